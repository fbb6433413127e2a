"""The convolution of CAMP's 1-bit path: torch.conv2d, and in CPU inference
a popcount kernel on bits (kernels/binary_conv_cpu.c).

The dual-precision pass emits `binary_conv2d` for a low-path conv whose
input is a DoReFa 1-bit unsigned activation (every value 0 or 1) and whose
weight is the 1-bit DoReFa weight (every value +s or -s). In fp32 the 1-bit
path costs as much as the 4-bit one, so routing samples to it would save
nothing on a CPU; on bits one output is s * (2 popcount(x & w) - popcount(x)).

The kernel runs only when nothing needs a gradient, on CPU float32 4-d
inputs, with groups 1, dilation 1, no bias and numeric padding, outside
torch.compile (which traces the torch.conv2d below); everything else, and
FXC_CPU_FAST=0 or a machine without a C compiler, takes torch.conv2d. Both
give the same values up to float rounding: the kernel counts exactly and
rounds once (tests/test_binary_conv.py).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional, Sequence, Union

import torch

from .cbuild import cpu_fast_enabled, load_library, on_torch_threads

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "binary_conv_cpu.c")


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.fxc_bconv2d.argtypes = [P, P, P, ctypes.c_float] + [I] * 13
    lib.fxc_bconv2d.restype = ctypes.c_int
    lib.fxc_bconv_set_threads.argtypes = [ctypes.c_int]


def _lib() -> Optional[ctypes.CDLL]:
    return on_torch_threads(load_library(_SRC, "binary_conv", _declare), "fxc_bconv_set_threads")


def _pair(v: Union[int, Sequence[int]]) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _kernel_applies(x: torch.Tensor, w: torch.Tensor, bias, padding, dilation, groups) -> bool:
    if torch.compiler.is_compiling() or not cpu_fast_enabled():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.dim() == 4 and w.dim() == 4 and bias is None and groups == 1
            and not isinstance(padding, str) and _pair(dilation) == (1, 1) and x.shape[1] == w.shape[1])


def binary_conv2d(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                  dilation=1, groups: int = 1) -> torch.Tensor:
    """torch.conv2d(x, w, ...) for x in {0, 1} and w in {-s, +s} (see the module docstring)."""
    if _kernel_applies(x, w, bias, padding, dilation, groups):
        lib = _lib()
        if lib is not None:
            n, c, h, wd = x.shape
            co, _, kh, kw = w.shape
            (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
            oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
            if oh > 0 and ow > 0:
                x = x.contiguous()
                w = w.contiguous()
                s = float(w.abs().max()) if w.numel() else 0.0
                out = torch.empty(n, co, oh, ow, dtype=torch.float32)
                rc = lib.fxc_bconv2d(x.data_ptr(), w.data_ptr(), out.data_ptr(), s, n, c, h, wd, co, kh, kw,
                                     sh, sw, ph, pw, oh, ow)
                if rc == 0:
                    return out
    return torch.conv2d(x, w, bias, stride, padding, dilation, groups)
