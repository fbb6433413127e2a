"""Zero-value compression at one width: one mask bit per element plus
`bits` per non-zero element (the codes of the non-zeros, packed by
fixed_width.pack_codes). Exact zeros come back exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from .bitmask import pack_mask, unpack_mask
from .fixed_width import pack_codes, stats, unpack_codes
from .rounding import check_bits, codes_reference, grid, grid_kind, mix_seed, multipliers

class PackedZVC:
    """Zero-value compression: 1 mask bit per element plus `bits` per non-zero."""

    __slots__ = ("mask", "codes", "nnz", "kinv", "bits", "signed", "shape", "shape3", "dtype")

    def __init__(self, mask, codes, nnz, kinv, bits, signed, shape, shape3, dtype):
        self.mask, self.codes, self.nnz, self.kinv = mask, codes, nnz, kinv
        self.bits, self.signed, self.shape, self.shape3, self.dtype = bits, signed, shape, shape3, dtype

    def nbytes(self) -> int:
        return self.mask.nbytes() + sum(c.numel() for c in self.codes) + self.kinv.numel() * 4


def zvc_pack(x3: torch.Tensor, bits: int, rounding: str = "nearest", seed: int = 0,
             amax: Optional[torch.Tensor] = None, signed: Optional[bool] = None, shape=None) -> PackedZVC:
    check_bits(bits)
    if amax is None or signed is None:
        a, mn = stats(x3)
        amax = a if amax is None else amax
        signed = bool(mn < 0) if signed is None else signed
    stoch = rounding == "stochastic"
    signed = grid_kind(signed, stoch)  # from here on the grid kind (rounding.py)
    k, kinv = multipliers(amax, bits, signed)
    nz = x3 != 0
    key = mix_seed(seed) if stoch else 0
    # Codes of every element, then only the non-zeros kept: the mask
    # restores the zeros exactly.
    codes = codes_reference(x3, k, bits, signed, stoch, key)
    nzc = codes[nz.reshape(-1)]
    return PackedZVC(pack_mask(nz), pack_codes(nzc, bits), int(nzc.numel()), kinv, bits, signed,
                     tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype)


def zvc_unpack(p: PackedZVC) -> torch.Tensor:
    n = p.shape3[0] * p.shape3[1] * p.shape3[2]
    off = grid(p.bits, p.signed)[1]
    # zeros take the code of the value 0, so they decode to exactly 0
    codes = torch.full((n,), off, dtype=torch.float32, device=p.kinv.device)
    if p.nnz:
        codes[unpack_mask(p.mask).reshape(-1)] = unpack_codes(p.codes, p.bits, p.nnz).to(torch.float32)
    x = (codes - off).view(p.shape3) * p.kinv.view(1, -1, 1)
    return x.to(p.dtype).reshape(p.shape)
