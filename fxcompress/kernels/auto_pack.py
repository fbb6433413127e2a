"""AutoQuant's widths, grouping and packing of one saved tensor in two C calls.

Why. Per saved tensor, the width rule (autobits.py), the grouping
(mixed_width._Groups) and the packing (mixed_pack / mixed_zvc_pack) each
cost a few Python calls, numpy and ctypes arrays and a Packed object per
width group: about 20 small calls, measured at more than their C work on
resnet50 (batch 32, 64x64, one thread). Here the C does all of it
(actpack_cpu.c: fxc_auto_plan, fxc_auto_pack, fxc_auto_unpack) by calling
the same C loops, so the widths, codes and bytes are theirs, bit for bit.

What is stored: `PackedAuto`, one byte buffer with every group's codes
(the layout mixed_width._alloc_parts gives the groups' parts) and one meta
block (the channel order, 1/k per channel, and a small header: groups,
widths, codes per group). `groups` rebuilds the per-group view of
PackedMixed / PackedMixedZVC for inspection; the byte accounting (nbytes,
code_bits) is theirs.

`auto_pack` returns None where this path does not apply (no C library,
not float32 contiguous on CPU, BatchNorm terms of another length): the
caller then takes the width rule and the packers one by one.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from . import bufpool
from .actpack_cpu import lib as _lib
from .autobits import _BN_KEYS
from .cbuild import cpu_fast_enabled
from .dispatch import use_triton
from .fixed_width import Packed
from .rounding import EPS, grid_kind

_HDR = 3          # header words before the group starts (actpack_cpu.c, AUTO_HDR)
_HDR_WORDS = 52   # the longest header: 3 + 17 starts + 16 widths + 16 counts
_ROUNDS = 4       # spend_slack's rounds (widths.spend_slack's default)


class PackedAuto:
    """A tensor at per-channel widths (AutoQuant), packed by the C path in
    one buffer. zvc: only the elements > 0 are stored, `mask` is the ReLU's
    shared 1-bit mask (its bytes are counted by the save that made it)."""

    __slots__ = ("buf", "meta", "mask", "shape", "shape3", "dtype", "C", "kind", "zvc", "bits")

    def __init__(self, buf, meta, mask, shape, shape3, dtype, C, kind, zvc, bits):
        self.buf, self.meta, self.mask, self.shape, self.shape3 = buf, meta, mask, shape, shape3
        self.dtype, self.C, self.kind, self.zvc, self.bits = dtype, C, kind, zvc, bits

    def code_bits(self) -> int:
        """Bits of the codes stored: sum over groups of width times codes
        (zvc: the non-zeros), as PackedMixed / PackedMixedZVC count them."""
        return self.bits

    def nbytes(self) -> int:
        """Codes, plus 1/k and the channel index (4 bytes each) per channel,
        as PackedMixed / PackedMixedZVC count them; not a shared mask."""
        return self.buf.numel() + 8 * self.C

    def _header(self):
        h = self.meta[8 * self.C:].view(torch.int64)
        G = int(h[0])
        start = h[_HDR:_HDR + G + 1].tolist()
        widths = h[_HDR + G + 1:_HDR + 2 * G + 1].tolist()
        counts = h[_HDR + 2 * G + 1:_HDR + 3 * G + 1].tolist()
        return G, start, widths, counts

    @property
    def groups(self):
        """Per width group (channel indices, Packed[, non-zeros]): the view
        PackedMixed (PackedMixedZVC when zvc) gives, over this buffer."""
        from .rounding import slices

        G, start, widths, counts = self._header()
        order = self.meta[:4 * self.C].view(torch.int32)
        kinv = self.meta[4 * self.C:8 * self.C].view(torch.float32)
        A, _, B = self.shape3
        out, off = [], 0
        for g in range(G):
            parts = []
            for w, _ in slices(widths[g]):
                nb = -(-counts[g] // (8 // w))
                parts.append(self.buf[off:off + nb])
                off += nb
            s, e = start[g], start[g + 1]
            sh3 = (A, e - s, B)
            p = Packed(parts, kinv[s:e], widths[g], self.kind, sh3, sh3, self.dtype)
            out.append((order[s:e], p, counts[g]) if self.zvc else (order[s:e], p))
        return out


def _bn_block(terms: Dict[str, Any], C: int):
    """BatchNorm's terms as one float64 block of 5 x C (scalars broadcast,
    autobits._BN_KEYS' order): (its address, K, numer), cached in the
    terms dict under "_block" (a SaveSpec drops "_" keys when copied or
    pickled; the address is an int, so nothing here stops either); None for
    a term of another length."""
    got = terms.get("_block")
    if got is None or got[0] != C:
        try:
            rows = [np.broadcast_to(terms[k].detach().double().cpu().numpy() if torch.is_tensor(terms[k])
                                    else np.asarray(terms[k], dtype=np.float64), (C,)) for k in _BN_KEYS]
        except ValueError:
            return None
        block = np.ascontiguousarray(np.stack(rows), dtype=np.float64)
        got = terms["_block"] = (C, block, block.ctypes.data, float(terms["K"]), float(terms["numer"]))
    return got[2], got[3], got[4]


def auto_pack(x3: torch.Tensor, amax: torch.Tensor, signed: bool, dx2: float, bn_terms: Optional[Dict[str, Any]],
              max_bits: int, rounding: str, seed: int, nnz: Optional[torch.Tensor] = None, mask=None,
              spread: bool = False, shape=None) -> Optional[PackedAuto]:
    """x (A, C, B) at AutoQuant's per-channel widths: what widths.auto_bits
    then mixed_width.mixed_pack give (nnz None; counts A*B per channel), or,
    with nnz (elements > 0 per channel) and the ReLU's mask (x > 0),
    mixed_zvc.mixed_zvc_pack (x unsigned); spread: the budget dx2 times
    numel / sum(nnz). bn_terms: BatchNorm's budget instead of dx2. None
    where the C path does not apply (see the module docstring)."""
    if not cpu_fast_enabled() or x3.dtype != torch.float32 or x3.device.type != "cpu" or use_triton(x3):
        return None
    lib = _lib()
    if lib is None or not x3.is_contiguous() or amax.dtype != torch.float32 or not amax.is_contiguous():
        return None
    A, C, B = x3.shape
    if C == 0 or amax.numel() != C:
        return None
    bn_ptr, K, numer = None, 0.0, 0.0
    if bn_terms is not None:
        got = _bn_block(bn_terms, C)
        if got is None:  # a term of another length: the caller's path decides
            return None
        bn_ptr, K, numer = got
        dx2 = 0.0
    zvc = nnz is not None
    stoch = rounding == "stochastic"
    kind = 0 if zvc else grid_kind(signed, stoch)
    if zvc:
        if nnz.dtype != torch.int64 or not nnz.is_contiguous():
            nnz = nnz.to(torch.int64).contiguous()
    meta = torch.empty(8 * C + 8 * _HDR_WORDS, dtype=torch.uint8)
    mp = meta.data_ptr()
    nb = lib.fxc_auto_plan(A, C, B, amax.data_ptr(), EPS, bn_ptr, K, numer, float(dx2),
                           nnz.data_ptr() if zvc else None, int(spread), int(bool(signed)) if not zvc else 0, kind,
                           int(max_bits), _ROUNDS, mp)
    if nb < 0:
        raise MemoryError("fxc_auto_plan: out of memory for scratch")
    buf = torch.empty(nb, dtype=torch.uint8)
    mptr = None
    if zvc:
        # as mixed_zvc_pack: the mask tells each thread where its piece
        # starts; a mask of another length is not used (one thread per group)
        mbits = mask.bits if mask.bits.is_contiguous() else mask.bits.contiguous()
        mptr = mbits.data_ptr() if mask.n == x3.numel() and mbits.numel() * 8 >= mask.n else None
    bits = lib.fxc_auto_pack(x3.data_ptr(), A, C, B, mp, int(zvc), kind, int(stoch), int(seed), mptr,
                             buf.data_ptr())
    if bits < 0:
        raise MemoryError("fxc_auto_pack: out of memory for a channel index")
    return PackedAuto(buf, meta, mask, tuple(shape if shape is not None else x3.shape), (A, C, B), x3.dtype, C,
                      kind, zvc, bits)


def auto_unpack(p: PackedAuto) -> torch.Tensor:
    A, C, B = p.shape3
    out = bufpool.empty(p.shape3, torch.float32)
    mptr = None
    if p.zvc:
        mbits = p.mask.bits if p.mask.bits.is_contiguous() else p.mask.bits.contiguous()
        mptr = mbits.data_ptr()
    rc = _lib().fxc_auto_unpack(p.buf.data_ptr(), p.meta.data_ptr(), A, C, B, int(p.zvc), p.kind, mptr,
                                out.data_ptr())
    if rc:
        raise MemoryError("fxc_auto_unpack: out of memory for a channel index")
    return out.reshape(p.shape)
