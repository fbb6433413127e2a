"""Magnitude masks for AC/DC (SPEC section 3): which weights a compressed phase keeps.

Three selections, each exact (the count of kept weights is the target, not
"about" it) with a deterministic tie rule: among equal scores the weight that
comes first in flat (row-major) order is kept, and within an N:M group the
lower index wins a tie for "larger".

- `topk_masks(scores, k)`: keep the k largest scores over a list of tensors
  (global: one threshold for all layers; uniform: call it per layer). The
  threshold is the k-th largest value found by `torch.kthvalue` (a selection,
  no sorted copy of all the weights); only the elements equal to the
  threshold are then looked at one by one, in index order.
- `nm_mask(w, n, m, in_dim)`: in every group of m consecutive weights along
  the input dimension, the n smallest |w| are zeroed (2:4: two of four kept).
  Conv weights are grouped in the (O, kh, kw, I) layout, so a group is m input
  channels at one output channel and kernel position (what 2:4 hardware and
  torch's semi-structured tensors group).

The Triton kernels fuse the selection with the masked weight: one pass over
w writes the mask and w * mask (a compressed phase starts with both). The
torch references are the oracles the tests compare them with; dispatch.py
decides which runs (CUDA: Triton; CPU: torch, unless forced for tests).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..errors import ShapeError
from .dispatch import use_triton


# ---------------------------------------------------------------- top-k (global / uniform)
def kept_count(n: int, sparsity: float) -> int:
    """k = ceil(n * (1 - s)) weights kept (the authors' rule), computed so that
    float rounding of n * (1 - s) cannot add one (0.9 * 10 is 9.000000000000002)."""
    keep = n * (1.0 - sparsity)
    k = int(round(keep))
    return k if abs(keep - k) < 1e-9 * max(1, n) else int(keep) + 1


def _threshold(flat: torch.Tensor, k: int) -> Tuple[torch.Tensor, int]:
    """The k-th largest value t and how many equal-to-t elements to keep."""
    n = flat.numel()
    t = torch.kthvalue(flat, n - k + 1).values  # k-th largest = (n-k+1)-th smallest
    above = int((flat > t).sum())
    return t, k - above


def topk_masks(scores: Sequence[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Boolean masks keeping exactly the k largest of all `scores` together
    (ties: lower position in the concatenation first)."""
    n = sum(s.numel() for s in scores)
    if not 0 <= k <= n:
        raise ShapeError(f"masks: cannot keep {k} of {n} weights")
    if k == n:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k == 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    t, need_ties = _threshold(flat, k)
    keep = flat > t
    ties = (flat == t).nonzero().flatten()
    keep[ties[:need_ties]] = True  # nonzero() lists indices in increasing order
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + s.numel()].view(s.shape))
        i += s.numel()
    return out


def magnitude_scores(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The authors' selection score (|w| + 1e-4) * mask: a weight the current
    mask removed scores 0 (at a phase start after a dense phase the mask is
    all ones, so this ranks by |w|)."""
    return (w.detach().abs().float() + 1e-4) * mask


# ---------------------------------------------------------------- N:M
def _groups_view(w: torch.Tensor, m: int, in_dim: int) -> torch.Tensor:
    """w with the input dimension moved last, as rows of m (a copy)."""
    if w.dim() < 2:
        raise ShapeError(f"N:M masks need a weight with >= 2 dimensions, got shape {tuple(w.shape)}")
    if w.shape[in_dim] % m:
        raise ShapeError(f"N:M masks: the input dimension ({w.shape[in_dim]}) of shape {tuple(w.shape)} "
                         f"is not a multiple of M={m}")
    return w.movedim(in_dim, -1).contiguous().reshape(-1, m)


def _from_groups(g: torch.Tensor, like: torch.Tensor, in_dim: int) -> torch.Tensor:
    shape = list(like.movedim(in_dim, -1).shape)
    return g.reshape(shape).movedim(-1, in_dim).contiguous()


def nm_mask_reference(w: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    """Zero the n smallest |w| of each group of m along `in_dim`; among equal
    |w| the lower index counts as the larger (it is kept)."""
    g = _groups_view(w.detach().abs().float(), m, in_dim)
    # rank of each element = how many in its group beat it (larger, or equal
    # with a lower index); the n with the highest rank are zeroed.
    a, b = g.unsqueeze(2), g.unsqueeze(1)  # [G, m, 1] vs [G, 1, m]
    idx = torch.arange(m, device=g.device)
    beats = (b > a) | ((b == a) & (idx.view(1, 1, m) < idx.view(1, m, 1)))
    rank = beats.sum(2)
    keep = rank < (m - n)
    return _from_groups(keep, w, in_dim)


def nm_mask(w: torch.Tensor, n: int, m: int, in_dim: int = 1) -> torch.Tensor:
    if not 0 <= n <= m:
        raise ShapeError(f"N:M masks need 0 <= N <= M, got {n}:{m}")
    if use_triton(w):
        return nm_mask_triton(w, n, m, in_dim)[0]
    return nm_mask_reference(w, n, m, in_dim)


# ---------------------------------------------------------------- Triton: fused selection + masked weight
_kernels = {}


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def threshold_mask_kernel(w_ptr, mask_ptr, out_ptr, t, numel, BLOCK: tl.constexpr):
        # keep |w| strictly above the threshold; ties at t are settled after
        # (they need index order across blocks)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        w = tl.load(w_ptr + offs, mask=inb, other=0.0)
        s = tl.abs(w.to(tl.float32)) + 1e-4
        keep = s > t
        tl.store(mask_ptr + offs, keep.to(tl.int8), mask=inb)
        tl.store(out_ptr + offs, tl.where(keep, w, 0.0), mask=inb)

    @triton.jit
    def nm_mask_kernel(g_ptr, mask_ptr, out_ptr, n_groups, N: tl.constexpr, M: tl.constexpr,
                       ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, M)
        inb = rows[:, None] < n_groups
        offs = rows[:, None] * M + cols[None, :]
        w = tl.load(g_ptr + offs, mask=inb, other=0.0)
        a = tl.abs(w.to(tl.float32))
        rank = tl.zeros([ROWS, M], dtype=tl.int32)
        for j in tl.static_range(M):  # how many of the group beat each element
            bj = tl.sum(tl.where(cols[None, :] == j, a, 0.0), axis=1)[:, None]
            beats = (bj > a) | ((bj == a) & (j < cols[None, :]))
            rank += beats.to(tl.int32)
        keep = rank < (M - N)
        tl.store(mask_ptr + offs, keep.to(tl.int8), mask=inb)
        tl.store(out_ptr + offs, tl.where(keep, w, 0.0), mask=inb)

    _kernels["threshold"] = threshold_mask_kernel
    _kernels["nm"] = nm_mask_kernel


def nm_mask_triton(w: torch.Tensor, n: int, m: int, in_dim: int = 1, rows: int = 256
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask, w * mask) by one kernel; M must be a power of two (tl.arange)."""
    import triton

    if not _kernels:
        _build()
    if m & (m - 1):
        raise ShapeError(f"N:M masks (Triton): M must be a power of two, got {m}")
    g = _groups_view(w.detach(), m, in_dim)
    mask = torch.empty(g.shape, dtype=torch.int8, device=w.device)
    out = torch.empty_like(g)
    _kernels["nm"][(triton.cdiv(g.shape[0], rows),)](g, mask, out, g.shape[0], N=n, M=m, ROWS=rows)
    return _from_groups(mask.bool(), w, in_dim), _from_groups(out, w, in_dim)


def topk_mask_triton(w: torch.Tensor, k: int, block: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask, w * mask) keeping the k largest |w| of one tensor: threshold by
    kthvalue, then one kernel pass for mask and masked weight, then the ties."""
    import triton

    if not _kernels:
        _build()
    flat = w.detach().reshape(-1).contiguous()
    scores = flat.abs().float() + 1e-4
    t, need_ties = _threshold(scores, k)
    mask = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    out = torch.empty_like(flat)
    _kernels["threshold"][(triton.cdiv(flat.numel(), block),)](flat, mask, out, float(t), flat.numel(),
                                                               BLOCK=block)
    mask = mask.bool()
    ties = (scores == t).nonzero().flatten()[:need_ties]
    mask[ties] = True
    out[ties] = flat[ties]
    return mask.view(w.shape), out.view(w.shape)


def topk_mask(w: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One tensor's (mask, w * mask) keeping the k largest |w| (+1e-4)."""
    if use_triton(w) and 0 < k < w.numel():
        return topk_mask_triton(w, k)
    (mask,) = topk_masks([w.detach().abs().float() + 1e-4], k)
    return mask, w.detach() * mask
