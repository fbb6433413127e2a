"""The one place that decides: Triton kernel, C loop or torch reference.

Triton runs on CUDA tensors. CPU tensors take a family's C loops when it has
them, they are enabled (FXC_CPU_FAST, kernels/cbuild.py) and they built;
everything else takes the torch reference, which is also the oracle the
tests compare kernels with. Setting
FXC_FORCE_TRITON=1 (with TRITON_INTERPRET=1 set before triton is imported)
sends CPU tensors through the Triton kernels too, which is how the tests run
the kernels on a machine without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from .cbuild import cpu_fast_enabled


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def force_triton() -> bool:
    return os.environ.get("FXC_FORCE_TRITON", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return force_triton() and os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_for(t: torch.Tensor, c_lib: Optional[Callable[[], object]] = None) -> str:
    """"triton", "c" or "torch" for tensor t. `c_lib` returns the family's
    loaded C library or None (not built); without it there is no C path."""
    if use_triton(t):
        return "triton"
    if c_lib is not None and t.device.type == "cpu" and cpu_fast_enabled() and c_lib() is not None:
        return "c"
    return "torch"
