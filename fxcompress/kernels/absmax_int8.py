"""Per-group absmax scale + int8 quantization, fused.

The smallest real kernel family: it proves the dispatch point and the
interpreter test harness that the larger families (activation packing,
gradient quantization) use. Rounding is half away from zero written as
floor(|v| + 0.5) with the sign restored, in both paths, so the Triton kernel
and the reference agree bit for bit.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import ShapeError
from .dispatch import use_triton

QMAX = 127.0


def _check(x: torch.Tensor, group: int) -> None:
    if not x.is_floating_point():
        raise ShapeError(f"absmax_int8 quantizes floating tensors, got dtype {x.dtype}")
    if group <= 0 or x.numel() % group:
        raise ShapeError(f"absmax_int8: {x.numel()} elements do not split into groups of {group}")


def quantize_reference(x: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = x.reshape(-1, group).float()
    absmax = g.abs().amax(dim=1)
    inv = torch.where(absmax > 0, QMAX / absmax, torch.zeros_like(absmax))
    v = g * inv[:, None]
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return q.clamp_(-QMAX, QMAX).to(torch.int8).reshape(x.shape), absmax / QMAX


def dequantize(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return (q.reshape(-1, group).float() * scale[:, None]).reshape(q.shape)


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def absmax_int8_kernel(x_ptr, q_ptr, s_ptr, n_groups, GROUP: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, GROUP)
        mask = rows[:, None] < n_groups
        offs = rows[:, None] * GROUP + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        inv = tl.where(absmax > 0, 127.0 / absmax, 0.0)
        v = x * inv[:, None]
        r = tl.floor(tl.abs(v) + 0.5)
        q = tl.where(v < 0, -r, r)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + rows, absmax / 127.0, mask=rows < n_groups)

    return absmax_int8_kernel


def quantize_triton(x: torch.Tensor, group: int, rows: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    import triton

    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    if group & (group - 1):
        raise ShapeError(f"absmax_int8 (Triton): group must be a power of two, got {group}")
    xc = x.contiguous()
    n_groups = xc.numel() // group
    q = torch.empty(xc.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    _kernel[(triton.cdiv(n_groups, rows),)](xc, q, s, n_groups, GROUP=group, ROWS=rows)
    return q, s


def quantize(x: torch.Tensor, group: int = 128) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one fp32 scale per group of `group` consecutive elements."""
    _check(x, group)
    if use_triton(x):
        return quantize_triton(x, group)
    return quantize_reference(x, group)
