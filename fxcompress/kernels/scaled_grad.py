"""PSGD's position-based scaled gradient, fused: g * (lambda * |w - Q(w)| + eps).

Q is the symmetric per-tensor grid of SPEC section 2:
    Q(w) = delta * round(clip(w / delta, -L, L)),   L = 2^(b-1) - 1
(2^b - 1 levels, round half to even as torch.round), or, for the sparse
variant (`zero_grid`), Q(w) = 0 so the scale is lambda * |w|.

`delta` arrives as a one-element float32 *tensor* (it comes from the EMA range
that lives on the device), so neither path ever syncs with the host.

Exactness. The Triton kernel reproduces the torch reference bit for bit:
- w / delta is an IEEE-rounded division in both (`div_rn` in Triton: plain
  `/` lowers to an approximate division on GPUs);
- rounding half to even is written with floor on |v| (exact for |v| <= 127,
  all that b <= 8 needs) instead of libdevice's rint, which the interpreter
  lacks; the sign is restored afterwards (round-half-even is odd-symmetric);
- the kernel is launched with `enable_fp_fusion=False`, so `lambda*d + eps`
  and `w - q` are not contracted into FMAs that torch does not use.
Both paths compute in float32 and return the gradient's dtype (the kernel
writes float32; torch casts, so half-precision rounding is torch's in both).
"""
from __future__ import annotations

import ctypes
import os
import weakref
from typing import List, Optional, Sequence

import torch

from ..errors import ShapeError
from .cbuild import cpu_fast_enabled, load_library, on_torch_threads
from .dispatch import use_triton

BLOCK = 1024


def levels_for(bits: int) -> int:
    """L, the largest level index of the symmetric b-bit grid (2L + 1 levels)."""
    return (1 << (bits - 1)) - 1


def quantize_reference(w: torch.Tensor, delta: torch.Tensor, levels: int) -> torch.Tensor:
    """Q(w) in float32: delta * round(clip(w / delta, -L, L))."""
    d = delta.to(torch.float32)
    v = torch.clamp(w.to(torch.float32) / d, -float(levels), float(levels))
    return torch.round(v) * d


def scaled_grad_reference(g: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, levels: int,
                          lambda_s: float, eps: float = 0.0, zero_grid: bool = False) -> torch.Tensor:
    # This runs once per weight tensor per backward on CPU, where per-op cost
    # dominates for small weights: one fresh buffer, then in-place ops
    # (same arithmetic, same order as the kernel: |w - q| * lambda (+ eps), times g).
    wf = w if w.dtype == torch.float32 else w.to(torch.float32)
    if zero_grid:
        s = wf.abs()
    else:
        d = delta.to(torch.float32)
        s = wf / d
        s.clamp_(-float(levels), float(levels)).round_().mul_(d)  # q = Q(w)
        torch.sub(wf, s, out=s).abs_()
    s.mul_(float(lambda_s))
    if eps:
        s.add_(float(eps))
    s.mul_(g if g.dtype == torch.float32 else g.to(torch.float32))
    return s if g.dtype == torch.float32 else s.to(g.dtype)


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_grad_kernel(g_ptr, w_ptr, delta_ptr, out_ptr, n, lam, eps,
                           LEVELS: tl.constexpr, ZERO_GRID: tl.constexpr, HAS_EPS: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ZERO_GRID:
            dist = tl.abs(w)
        else:
            d = tl.load(delta_ptr).to(tl.float32)
            v = tl.math.div_rn(w, d)
            v = tl.minimum(tl.maximum(v, -LEVELS * 1.0), LEVELS * 1.0)
            # round half to even on |v|: f + 1 when the fraction is above one
            # half, or exactly one half and f is odd
            a = tl.abs(v)
            f = tl.floor(a)
            frac = a - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
            r = f + tl.where(up, 1.0, 0.0)
            r = tl.where(v < 0, -r, r)
            dist = tl.abs(w - r * d)
        s = dist * lam
        if HAS_EPS:
            s = s + eps
        tl.store(out_ptr + offs, g * s, mask=mask)

    return scaled_grad_kernel


def scaled_grad_triton(g: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, levels: int,
                       lambda_s: float, eps: float = 0.0, zero_grid: bool = False) -> torch.Tensor:
    import triton

    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    gc, wc = g.contiguous(), w.contiguous()
    # float32 out, cast by torch: the interpreter truncates float32 -> bf16,
    # torch rounds to nearest; weights are small, so the extra cast is cheap
    out = torch.empty(gc.shape, dtype=torch.float32, device=gc.device)
    d = delta.to(device=w.device, dtype=torch.float32).reshape(1)
    n = gc.numel()
    _kernel[(triton.cdiv(n, BLOCK),)](gc, wc, d, out, n, float(lambda_s), float(eps),
                                      LEVELS=int(levels), ZERO_GRID=bool(zero_grid), HAS_EPS=bool(eps),
                                      BLOCK=BLOCK, enable_fp_fusion=False)
    return out if g.dtype == torch.float32 else out.to(g.dtype)


def scaled_grad(g: torch.Tensor, w: torch.Tensor, delta: torch.Tensor, levels: int,
                lambda_s: float, eps: float = 0.0, zero_grid: bool = False) -> torch.Tensor:
    """The scaled gradient of `w` for incoming gradient `g` (same shape)."""
    if g.shape != w.shape:
        raise ShapeError(f"scaled_grad: gradient shape {tuple(g.shape)} differs from weight shape {tuple(w.shape)}")
    if not (g.is_floating_point() and w.is_floating_point()):
        raise ShapeError(f"scaled_grad works on floating tensors, got {g.dtype} and {w.dtype}")
    if use_triton(g):
        return scaled_grad_triton(g, w, delta, levels, lambda_s, eps, zero_grid)
    return scaled_grad_reference(g, w, delta, levels, lambda_s, eps, zero_grid)


# ------------------------------------------- CPU fast path (C, one call for all)

_SRC_CPU = os.path.join(os.path.dirname(__file__), "scaled_grad_cpu.c")


class _BatchStruct(ctypes.Structure):
    """psgd_batch of scaled_grad_cpu.c."""
    _fields_ = [("n", ctypes.c_int32), ("momentum", ctypes.c_float), ("w", ctypes.c_void_p),
                ("range", ctypes.c_void_p), ("numel", ctypes.c_void_p), ("levels", ctypes.c_void_p),
                ("lam", ctypes.c_void_p), ("eps", ctypes.c_void_p), ("zero_grid", ctypes.c_void_p),
                ("delta", ctypes.c_void_p)]


def _declare(lib) -> None:
    P = ctypes.c_void_p
    lib.fxc_psgd_ranges.argtypes = [P, P]
    lib.fxc_psgd_step.argtypes = [P, P, P, P]
    lib.fxc_psgd_scale.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, P]
    lib.fxc_psgd_set_threads.argtypes = [ctypes.c_int]
    for f in (lib.fxc_psgd_ranges, lib.fxc_psgd_step, lib.fxc_psgd_scale, lib.fxc_psgd_set_threads):
        f.restype = None


def cpu_lib():
    """scaled_grad_cpu.c compiled, or None (no compiler, or FXC_CPU_FAST=0),
    on torch.get_num_threads() threads."""
    if not cpu_fast_enabled():
        return None
    return on_torch_threads(load_library(_SRC_CPU, "scaled_grad", _declare), "fxc_psgd_set_threads")


def _fits_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


class CpuBatch:
    """PSGD's per-step work for a fixed list of weights in one C call:
    `step` (backward: every EMA range, then the active weights' gradients
    scaled in place) or `ranges` (ranges only). The per-weight constants
    are converted to C arrays once, in one struct; the pointers are rebuilt
    only when a tensor moves (a parameter keeps its storage across optimizer
    steps). `make` returns None when the library or a tensor does not fit,
    and the caller takes the torch path."""

    def __init__(self, lib, ws: Sequence[torch.Tensor], ranges: Sequence[torch.Tensor],
                 levels: Sequence[int], lambdas: Sequence[float], eps: Sequence[float], zero: Sequence[bool],
                 momentum: float):
        n = len(ws)
        self.lib, self.n = lib, n
        self.shapes = [w.shape for w in ws]
        self.numel = (ctypes.c_int64 * n)(*[w.numel() for w in ws])
        self.levels = (ctypes.c_float * n)(*[float(v) for v in levels])
        self.lam = (ctypes.c_float * n)(*[float(v) for v in lambdas])
        self.eps = (ctypes.c_float * n)(*[float(v) for v in eps])
        self.zero = (ctypes.c_uint8 * n)(*[1 if z else 0 for z in zero])
        self.delta = (ctypes.c_float * n)()  # the grid steps of the last call
        self._s = _BatchStruct(n, momentum, None, None, ctypes.addressof(self.numel),
                               ctypes.addressof(self.levels), ctypes.addressof(self.lam),
                               ctypes.addressof(self.eps), ctypes.addressof(self.zero), ctypes.addressof(self.delta))
        self._addr = ctypes.addressof(self._s)
        self._rebind(ws, ranges)

    @classmethod
    def make(cls, ws, ranges, levels, lambdas, eps, zero, momentum: float) -> Optional["CpuBatch"]:
        lib = cpu_lib()
        if lib is None or not all(_fits_cpu(t) for t in (*ws, *ranges)):
            return None
        return cls(lib, ws, ranges, levels, lambdas, eps, zero, momentum)

    def _rebind(self, ws, ranges) -> None:
        n = self.n
        self.key = tuple(map(torch.Tensor.data_ptr, ws)) + tuple(map(torch.Tensor.data_ptr, ranges))
        self.w_ptrs = (ctypes.c_void_p * n)(*self.key[:n])
        self.r_ptrs = (ctypes.c_void_p * n)(*self.key[n:])
        self._s.w, self._s.range = ctypes.addressof(self.w_ptrs), ctypes.addressof(self.r_ptrs)
        # weak: the batch must not keep a module's parameters alive
        self._ws = [weakref.ref(w) for w in ws]

    def matches(self, ws, ranges) -> bool:
        """Same tensors as when built (or moved but still fitting: then rebound)."""
        key = tuple(map(torch.Tensor.data_ptr, ws)) + tuple(map(torch.Tensor.data_ptr, ranges))
        if key == self.key:
            return True
        if [w.shape for w in ws] != self.shapes or not all(_fits_cpu(t) for t in (*ws, *ranges)):
            return False
        self._rebind(ws, ranges)
        return True

    def weights(self) -> List[torch.Tensor]:
        """The weights last bound (for a caller that falls back to torch)."""
        return [r() for r in self._ws]

    def ranges(self, initialized: Sequence[bool]) -> torch.Tensor:
        """Update every EMA range in place; return the grid steps (float32, len n).
        `initialized` is read; the caller marks every member initialized after."""
        self.lib.fxc_psgd_ranges(self._addr, bytes(initialized))
        return torch.tensor(self.delta[:], dtype=torch.float32)

    def step(self, gs: Sequence[Optional[torch.Tensor]], initialized: bytes, active: bytes) -> Optional[List[torch.Tensor]]:
        """One backward: update every EMA range (as `ranges`), then scale the
        active weights' gradients gs *in place* with the new grid steps and
        return them; None (nothing done) when a gradient is missing.

        Shapes, dtypes and devices are not checked: autograd hands a backward
        gradients that match the forward's outputs (here aliases of this
        batch's float32 CPU weights). Strides are not guaranteed (a linear
        weight's gradient can arrive transposed): such a one is copied.
        In place because a fresh output costs more than the arithmetic:
        first-touch page faults and cache misses on new buffers measured ~2x
        the whole kernel on ResNet-8. The caller guarantees the buffers are
        its own (runtime/scaled_grad._GroupFn)."""
        if any(g is None for g in gs):
            return None
        if not all(map(torch.Tensor.is_contiguous, gs)):
            gs = [g.contiguous() for g in gs]
        self.lib.fxc_psgd_step(self._addr, (ctypes.c_void_p * self.n)(*map(torch.Tensor.data_ptr, gs)),
                               initialized, active)
        return list(gs)


def scale_many_cpu(gs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], deltas: Sequence[float],
                   levels: Sequence[int], lambdas: Sequence[float], eps: Sequence[float],
                   zero: Sequence[bool]) -> Optional[List[torch.Tensor]]:
    """The C scaling loop out of place for given grid steps (float32
    contiguous CPU tensors), or None without the library: the tests hold it
    against scaled_grad_reference."""
    lib = cpu_lib()
    if lib is None:
        return None
    n = len(gs)
    outs = [torch.empty_like(g) for g in gs]
    P, F = ctypes.c_void_p * n, ctypes.c_float * n
    lib.fxc_psgd_scale(n, P(*[g.data_ptr() for g in gs]), P(*[w.data_ptr() for w in ws]),
                       P(*[o.data_ptr() for o in outs]), (ctypes.c_int64 * n)(*[g.numel() for g in gs]),
                       F(*deltas), F(*[float(v) for v in levels]), F(*lambdas), F(*eps),
                       (ctypes.c_uint8 * n)(*[1 if z else 0 for z in zero]))
    return outs
