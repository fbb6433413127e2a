"""The activation quantizer's arithmetic, shared by every packing family.

Per scale row c with m_c = max|x_c| (SPEC section 1):
    signed    q = floor(x*k_c + r) clipped to [-2^(b-1), 2^(b-1)-1],  k_c = 2^(b-1)/(m_c+1e-6)
    unsigned  q = floor(x*k_c + r) clipped to [0, 2^b-1],             k_c = 2^b/(m_c+1e-6)
r = 0.5 (round to nearest) or u in [0,1) (stochastic). The stored code is
q + 2^(b-1) (signed) or q; decoding is (code - offset) / k_c.
(Computed as trunc(clamp(x*k + r + offset, 0, 2^b - 1)), see codes_reference.)

Randomness: u comes from a counter-based hash of (key, flat index), so no
full-size random tensor is made and the torch reference, the C loops and
the Triton kernels draw the same u for every element.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..errors import BadInput

EPS = 1e-6
MASK32 = 0xFFFFFFFF
# multipliers of a 32-bit xor-shift-multiply finaliser; below 2^31 so the
# int64 products of the torch path never overflow
_M1, _M2 = 0x6C8E9CF5, 0x2D2A5F3B
ROUNDINGS = ("nearest", "stochastic")


# ----------------------------------------------------------------- helpers

def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise BadInput(f"activation bits must be an integer in 1..16, got {bits!r}")


def slices(bits: int) -> List[Tuple[int, int]]:
    """(width, shift) of each power-of-two slice of a `bits`-bit code, high first."""
    check_bits(bits)
    out, rem = [], bits
    for w in (8, 8, 4, 2, 1):
        if rem >= w:
            rem -= w
            out.append((w, rem))
    return out


def mix_seed(seed: int) -> int:
    """A 32-bit key from any integer seed (the kernels only see the key)."""
    h = (seed * 0x9E3779B1 + 0x7F4A7C15) & MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 15
    return h


def uniform_reference(idx: torch.Tensor, key: int) -> torch.Tensor:
    """u in [0,1) on a 2^-24 grid (exact in float32) for each int64 index."""
    h = (idx + key) & MASK32
    h = h ^ (h >> 16)
    h = (h * _M1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _M2) & MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def multipliers(amax: torch.Tensor, bits: int, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """k_c (scaled grid units per unit of x) and 1/k_c, both float32."""
    levels = float(1 << (bits - 1)) if signed else float(1 << bits)
    k = levels / (amax.to(torch.float32) + EPS)
    return k, 1.0 / k


def qrange(bits: int, signed: bool) -> Tuple[float, float, int]:
    if signed:
        return -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1), 1 << (bits - 1)
    return 0.0, float((1 << bits) - 1), 0


def codes_reference(x3: torch.Tensor, k: torch.Tensor, bits: int, signed: bool, stoch: bool, key: int) -> torch.Tensor:
    """int32 codes in flat order for x viewed as (A, C, B).

    code = trunc(clamp(x*k + r + off, 0, 2^bits - 1)): the offset is added
    before clamping so that truncation is floor; every path does these float
    operations in this order, which keeps them bitwise equal."""
    v = x3.to(torch.float32) * k.view(1, -1, 1)
    if stoch:
        idx = torch.arange(x3.numel(), device=x3.device, dtype=torch.int64).view(x3.shape)
        v = v + uniform_reference(idx, key)
    else:
        v = v + 0.5
    off = qrange(bits, signed)[2]
    v = (v + float(off)).clamp_(0.0, float((1 << bits) - 1))
    return v.to(torch.int32).reshape(-1)

