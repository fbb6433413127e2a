"""Per-channel bit widths with zero-value packing, for an unsigned tensor
whose non-zero pattern is already stored as a 1-bit mask by another save
(the ReLU that produced it): only the codes of the elements > 0 are kept,
per width group; the mask is shared, not stored again.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np
import torch

from ..errors import BadInput
from . import bufpool
from .actpack_cpu import lib as _lib
from .bitmask import PackedMask, unpack_mask
from .dispatch import backend_for
from .fixed_width import Packed, pack_codes, stats, unpack_codes
from .mixed_width import _Groups, _alloc_parts, _group_arrays, _unpack_args
from .rounding import ROUNDINGS, codes_reference, mix_seed, multipliers, slices

class PackedMixedZVC:
    """AutoQuant widths with zero-value packing for an unsigned tensor whose
    non-zero pattern is already stored as a 1-bit mask by another save (the
    ReLU that produced it): only the codes of the elements > 0 are kept, per
    width group, and `mask` is a reference to that shared mask (its bytes
    belong to the save that made it, and are counted there, once)."""

    __slots__ = ("groups", "mask", "shape", "shape3", "dtype", "C", "order", "c_args")

    def __init__(self, groups, mask, shape, shape3, dtype, C, order=None):
        self.groups, self.mask, self.shape, self.shape3, self.dtype, self.C = groups, mask, shape, shape3, dtype, C
        self.order, self.c_args = order, None  # as PackedMixed's

    def code_bits(self) -> int:
        """Bits of the codes stored: per group its width times its non-zeros
        (sum_c bits_c * nnz_c, in integers)."""
        return sum(g.bits * nnz for _, g, nnz in self.groups)

    def nbytes(self) -> int:
        """Codes, scales and channel indices; not the shared mask."""
        return sum(sum(q.numel() for q in g.parts) + g.kinv.numel() * 4 + idx.numel() * 4
                   for idx, g, _ in self.groups)


def mixed_zvc_pack(x3: torch.Tensor, bits_c: torch.Tensor, mask: PackedMask, nnz_c: torch.Tensor,
                   rounding: str = "nearest", seed: int = 0, amax: Optional[torch.Tensor] = None,
                   shape=None) -> PackedMixedZVC:
    """x (A, C, B) >= 0, channel c at bits_c[c] bits, only the elements > 0
    stored; `mask` holds (x > 0) (1 bit per element, flat order) and nnz_c
    the count of elements > 0 per channel. The stochastic draw of an element
    is indexed by its position in its width group (zeros included)."""
    if rounding not in ROUNDINGS:
        raise BadInput(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if amax is None:
        amax = stats(x3)[0]
    stoch = rounding == "stochastic"
    if x3.dtype == torch.float32 and x3.is_contiguous() and backend_for(x3, _lib) == "c":
        return _mixed_zvc_pack_c(x3, bits_c.detach(), nnz_c.detach(), mask, stoch, seed, amax, shape)
    bnp = np.clip(bits_c.detach().cpu().numpy().astype(np.int64), 1, 16)
    nnp = nnz_c.detach().cpu().numpy().astype(np.int64)
    A, C, B = x3.shape
    groups = []
    for i, b in enumerate(np.unique(bnp).tolist()):
        b = int(b)
        inp = np.nonzero(bnp == b)[0]
        idx = torch.from_numpy(inp).to(x3.device)
        k, kinv = multipliers(amax[idx], b, False)
        key = mix_seed(seed + i) if stoch else 0
        nnz = int(nnp[inp].sum())
        sub = x3.index_select(1, idx)
        codes = codes_reference(sub, k, b, False, stoch, key)[(sub > 0).reshape(-1)]
        parts = pack_codes(codes, b) if nnz else [torch.empty(0, dtype=torch.uint8, device=x3.device)
                                                   for _ in slices(b)]
        groups.append((idx.to(torch.int32), Packed(parts, kinv, b, False, (A, idx.numel(), B), (A, idx.numel(), B),
                                                   x3.dtype), nnz))
    return PackedMixedZVC(groups, mask, tuple(shape if shape is not None else x3.shape), tuple(x3.shape),
                          x3.dtype, C)


def _mixed_zvc_pack_c(x3, bits_c, nnz_c, mask, stoch, seed, amax, shape) -> PackedMixedZVC:
    """mixed_zvc_pack's C path: every width group in one call, bit for bit
    the per-group packing (same channel order, k, seeds, nnz per group)."""
    A, C, B = x3.shape
    grp = _Groups(bits_c, amax, False, nnz_c)
    gnnz = grp.gnnz
    parts, outs = _alloc_parts(grp, [int(v) for v in gnnz[:grp.G]])
    keys = (ctypes.c_uint32 * grp.G)(*[mix_seed(seed + i) if stoch else 0 for i in range(grp.G)])
    # the mask (x > 0) tells each thread where its piece starts in a group's
    # stream; a mask of another length is not used (one thread per group)
    mbits = mask.bits if mask.bits.is_contiguous() else mask.bits.contiguous()
    mptr = mbits.data_ptr() if mask.n == x3.numel() and mbits.numel() * 8 >= mask.n else None
    rc = _lib().fxc_mixed_zvc_pack(x3.data_ptr(), grp.k.data_ptr(), A, C, B, grp.order.data_ptr(), grp.G,
                                       grp.c_start, gnnz.ctypes.data, grp.c_bits, grp.c_np, grp.c_w, grp.c_sh,
                                       int(stoch), keys, mptr, outs)
    if rc:
        raise MemoryError("fxc_mixed_zvc_pack: out of memory for a channel index")
    groups = []
    st = grp.start
    for g, b in enumerate(grp.widths):
        s, e = int(st[g]), int(st[g + 1])
        sh3 = (A, e - s, B)
        groups.append((grp.order[s:e], Packed(parts[g], grp.kinv[s:e], b, False, sh3, sh3, x3.dtype), int(gnnz[g])))
    out = PackedMixedZVC(groups, mask, tuple(shape if shape is not None else x3.shape), tuple(x3.shape),
                         x3.dtype, C, grp.order)
    out.c_args = _unpack_args(grp, outs) + (gnnz,)
    return out


def mixed_zvc_unpack(p: PackedMixedZVC) -> torch.Tensor:
    A, C, B = p.shape3
    dev = p.groups[0][0].device
    if p.dtype == torch.float32 and backend_for(p.groups[0][1].parts[0], _lib) == "c":
        if p.c_args is not None:  # made at pack time
            parts, w, sh, nps, kinv, start, bits, gnnz = p.c_args
            order = p.order
        else:
            order, start, bits, nps, w, sh, parts, kinv, keep = _group_arrays([g[:2] for g in p.groups], p.order)
            gnnz = np.array([g[2] for g in p.groups], dtype=np.int64)
        out = bufpool.empty(p.shape3, torch.float32)
        mbits = p.mask.bits if p.mask.bits.is_contiguous() else p.mask.bits.contiguous()
        rc = _lib().fxc_mixed_zvc_unpack(parts, w, sh, nps, kinv, A, C, B, order.data_ptr(), len(p.groups),
                                             start.ctypes.data, gnnz.ctypes.data, mbits.data_ptr(), out.data_ptr())
        if rc:
            raise MemoryError("fxc_mixed_zvc_unpack: out of memory for a channel index")
        return out.reshape(p.shape)
    m = unpack_mask(p.mask).reshape(p.shape3)
    out = torch.empty(p.shape3, dtype=p.dtype, device=dev)
    for idx, g, nnz in p.groups:
        i64 = idx.to(torch.int64)
        sm = m.index_select(1, i64)
        codes = torch.zeros(sm.shape, dtype=torch.int32, device=dev)
        if nnz:
            codes[sm] = unpack_codes(g.parts, g.bits, nnz)
        out.index_copy_(1, i64, (codes.to(torch.float32) * g.kinv.view(1, -1, 1)).to(p.dtype))
    return out.reshape(p.shape)
