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

import torch

from ..errors import ShapeError
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
