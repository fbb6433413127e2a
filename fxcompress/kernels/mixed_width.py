"""Per-channel bit widths (AutoQuant): channels grouped by width, each
group packed at its width by fixed_width; on CPU every group in one C call
(fxc_group_widths sorts the channels, fxc_mixed_pack / fxc_mixed_unpack
pack and unpack all groups), bit for bit the per-group packing.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from . import bufpool
from .actpack_cpu import lib as _lib
from .dispatch import backend_for
from .fixed_width import Packed, quant_pack, stats, unpack
from .rounding import EPS, grid_kind, mix_seed, slices

class PackedMixed:
    """Channels grouped by bit width (AutoQuant): one Packed per width."""

    __slots__ = ("groups", "shape", "shape3", "dtype", "C", "order", "c_args")

    def __init__(self, groups, shape, shape3, dtype, C, order=None):
        self.groups, self.shape, self.shape3, self.dtype, self.C = groups, shape, shape3, dtype, C
        # the groups' channel indices as one int32 tensor (their idx are views
        # of it), and the C unpack's arguments, when the C path made it
        self.order = order
        self.c_args = None

    def nbytes(self) -> int:
        return sum(p.nbytes() + idx.numel() * 4 for idx, p in self.groups)

    def code_bits(self) -> int:
        """Bits of the codes stored: per group its width times its elements
        (what sum_c bits_c * A * B gives, in integers, without a pass over
        the channels)."""
        A, _, B = self.shape3
        return sum(p.bits * idx.numel() for idx, p in self.groups) * A * B

    def element_bits(self) -> float:
        """Average stored bits per element (payload only)."""
        n = self.shape3[0] * self.shape3[1] * self.shape3[2]
        return 8.0 * sum(sum(q.numel() for q in p.parts) for _, p in self.groups) / max(n, 1)


def mixed_pack(x3: torch.Tensor, bits_c: torch.Tensor, rounding: str = "nearest", seed: int = 0,
               amax: Optional[torch.Tensor] = None, signed: Optional[bool] = None, shape=None) -> PackedMixed:
    """x (A, C, B) with channel c stored at bits_c[c] bits (1..16)."""
    if amax is None or signed is None:
        a, mn = stats(x3)
        amax = a if amax is None else amax
        signed = bool(mn < 0) if signed is None else signed
    signed = grid_kind(signed, rounding == "stochastic")  # the grid kind (rounding.py)
    if x3.dtype == torch.float32 and x3.is_contiguous() and backend_for(x3, _lib) == "c":
        return _mixed_pack_c(x3, bits_c.detach(), rounding, seed, amax, signed, shape)
    # grouping in numpy: a few thousand channels, where torch's per-op
    # overhead showed in the step time
    bnp = np.clip(bits_c.detach().cpu().numpy().astype(np.int64), 1, 16)
    widths = np.unique(bnp).tolist()
    groups = []
    for i, b in enumerate(widths):
        if len(widths) == 1:
            idx = torch.arange(x3.shape[1], device=x3.device)
            groups.append((idx.to(torch.int32), quant_pack(x3, int(b), rounding, seed + i, amax, signed)))
            continue
        idx = torch.from_numpy(np.nonzero(bnp == b)[0]).to(x3.device)
        sub = x3.index_select(1, idx)  # one copy of these channels only
        groups.append((idx.to(torch.int32), quant_pack(sub, int(b), rounding, seed + i, amax[idx], signed)))
    return PackedMixed(groups, tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype,
                       x3.shape[1])


_SLICE_ARRAYS: dict = {}


def _slice_arrays(widths: Tuple[int, ...]):
    """(bits, nparts, slice widths, slice shifts) C arrays, stride 5 per
    group, for a tuple of group widths (cached: the same few recur)."""
    arr = _SLICE_ARRAYS.get(widths)
    if arr is None:
        G = len(widths)
        sls = [slices(b) + [(0, 0)] * (5 - len(slices(b))) for b in widths]
        arr = ((ctypes.c_int * G)(*widths), (ctypes.c_int * G)(*[len(slices(b)) for b in widths]),
               (ctypes.c_int * (5 * G))(*[w for sl in sls for w, _ in sl]),
               (ctypes.c_int * (5 * G))(*[h for sl in sls for _, h in sl]))
        _SLICE_ARRAYS[widths] = arr
    return arr


class _Groups:
    """Width groups of a per-channel-width tensor laid out for one C call
    (fxc_group_widths): channels sorted by width (stable, so ascending within
    a group, as the per-group path has them), group starts, per group its
    width and slices, and k, 1/k of every channel in sorted order (what
    multipliers() gives each width group, bit for bit)."""

    def __init__(self, bits: torch.Tensor, amax: torch.Tensor, signed: bool, nnz: Optional[torch.Tensor] = None):
        C = bits.numel()
        b64 = bits if (bits.dtype == torch.int64 and bits.is_contiguous()) else bits.to(torch.int64).contiguous()
        # clamped to 1..16 in C (fxc_group_widths)
        a = amax if (amax.dtype == torch.float32 and amax.is_contiguous()) else amax.to(torch.float32).contiguous()
        self.order = torch.empty(C, dtype=torch.int32)
        self.start = np.empty(17, dtype=np.int64)
        widths = np.empty(16, dtype=np.int32)
        self.k = torch.empty(C, dtype=torch.float32)
        self.kinv = torch.empty(C, dtype=torch.float32)
        self.gnnz = None
        n64 = None
        if nnz is not None:
            n64 = nnz if (nnz.dtype == torch.int64 and nnz.is_contiguous()) else nnz.to(torch.int64).contiguous()
            self.gnnz = np.zeros(16, dtype=np.int64)
        G = _lib().fxc_group_widths(C, b64.data_ptr(), a.data_ptr(), int(signed), EPS, self.order.data_ptr(),
                                        self.start.ctypes.data, widths.ctypes.data, self.k.data_ptr(),
                                        self.kinv.data_ptr(), None if n64 is None else n64.data_ptr(),
                                        None if self.gnnz is None else self.gnnz.ctypes.data)
        self.G = G
        self.widths = [int(w) for w in widths[:G]]
        self.slices = [slices(w) for w in self.widths]
        self.c_start = self.start.ctypes.data
        self.c_bits, self.c_np, self.c_w, self.c_sh = _slice_arrays(tuple(self.widths))


def _alloc_parts(grp: _Groups, counts: Sequence[int]):
    """One byte buffer for every group's slices; per group its part views
    (counts: codes per group) and the out-pointer array (stride 5)."""
    sizes = [[-(-n // (8 // w)) for w, _ in sl] for sl, n in zip(grp.slices, counts)]
    buf = torch.empty(sum(map(sum, sizes)), dtype=torch.uint8)
    base, off = buf.data_ptr(), 0
    parts, ptrs = [], []
    for sz in sizes:
        ps = []
        for nb in sz:
            ps.append(buf[off:off + nb])
            ptrs.append(base + off)
            off += nb
        ptrs.extend([None] * (5 - len(sz)))
        parts.append(ps)
    return parts, (ctypes.c_void_p * len(ptrs))(*ptrs)


def _unpack_args(grp: _Groups, outs):
    """What the one-call unpack needs, made once at pack time (the pointers
    stay valid while the packed object holds its parts and scales)."""
    kinv = grp.kinv.data_ptr()
    return (outs, grp.c_w, grp.c_sh, grp.c_np,
            (ctypes.c_void_p * grp.G)(*[kinv + 4 * int(grp.start[g]) for g in range(grp.G)]),
            grp.start, grp.c_bits)


def _mixed_pack_c(x3, bits_c, rounding, seed, amax, signed, shape) -> PackedMixed:
    """mixed_pack's C path: every width group in one call, bit for bit the
    per-group packing (same channel order, k, seeds)."""
    stoch = rounding == "stochastic"
    A, C, B = x3.shape
    grp = _Groups(bits_c, amax, signed)
    st = grp.start
    parts, outs = _alloc_parts(grp, [A * int(st[g + 1] - st[g]) * B for g in range(grp.G)])
    keys = (ctypes.c_uint32 * grp.G)(*[mix_seed(seed + i) if stoch else 0 for i in range(grp.G)])
    rc = _lib().fxc_mixed_pack(x3.data_ptr(), grp.k.data_ptr(), A, C, B, grp.order.data_ptr(), grp.G,
                                   grp.c_start, grp.c_bits, grp.c_np, grp.c_w, grp.c_sh, int(signed), int(stoch),
                                   keys, outs)
    if rc:
        raise MemoryError("fxc_mixed_pack: out of memory for a channel index")
    groups = []
    for g, b in enumerate(grp.widths):
        s, e = int(st[g]), int(st[g + 1])
        sh3 = (A, e - s, B)
        groups.append((grp.order[s:e], Packed(parts[g], grp.kinv[s:e], b, signed, sh3, sh3, x3.dtype)))
    out = PackedMixed(groups, tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype, C,
                      grp.order)
    out.c_args = _unpack_args(grp, outs)
    return out


def _group_arrays(groups, order):
    """(order32, start, bits, nparts, widths, shifts, parts, kinv) C arrays
    for fxc_mixed_unpack / fxc_mixed_zvc_unpack from stored groups."""
    G = len(groups)
    if order is None:
        order = torch.cat([g[0] for g in groups]).to(torch.int32)
    start = np.zeros(G + 1, dtype=np.int64)
    np.cumsum([g[0].numel() for g in groups], out=start[1:])
    packs = [g[1] for g in groups]
    bits, nps, w, sh = _slice_arrays(tuple(p.bits for p in packs))
    parts = (ctypes.c_void_p * (5 * G))(*_part_ptrs(packs))
    kinv = [p.kinv if p.kinv.is_contiguous() else p.kinv.contiguous() for p in packs]
    return (order, start, bits, nps, w, sh, parts, (ctypes.c_void_p * G)(*[t.data_ptr() for t in kinv]), kinv)


def _part_ptrs(packs):
    out = []
    for p in packs:
        ptrs = [q.data_ptr() for q in p.parts]
        out.extend(ptrs + [None] * (5 - len(ptrs)))
    return out


def mixed_unpack(p: PackedMixed) -> torch.Tensor:
    if p.dtype == torch.float32 and len(p.groups) > 1 and backend_for(p.groups[0][1].parts[0], _lib) == "c":
        A, C, B = p.shape3
        if p.c_args is not None:  # made at pack time
            parts, w, sh, nps, kinv, start, bits = p.c_args
            order = p.order
        else:
            order, start, bits, nps, w, sh, parts, kinv, keep = _group_arrays(p.groups, p.order)
        out = bufpool.empty(p.shape3, torch.float32)
        rc = _lib().fxc_mixed_unpack(parts, w, sh, nps, kinv, A, C, B, order.data_ptr(), len(p.groups),
                                         start.ctypes.data, bits, int(p.groups[0][1].signed), out.data_ptr())
        if rc:
            raise MemoryError("fxc_mixed_unpack: out of memory for a channel index")
        return out.reshape(p.shape)
    if len(p.groups) == 1:
        return unpack(p.groups[0][1]).reshape(p.shape)
    dev = p.groups[0][0].device
    out = torch.empty(p.shape3, dtype=p.dtype, device=dev)
    for idx, g in p.groups:
        out.index_copy_(1, idx.to(torch.int64), unpack(g))
    return out.reshape(p.shape)
