"""The activation quantizer's arithmetic, shared by every packing family.

Per scale row c with m_c = max|x_c| + 1e-6, a uniform grid that contains the
channel's extremes (so stochastic rounding is unbiased everywhere, the top
cell included) and uses all 2^b codes:
    unsigned  levels 0, m/L, 2m/L, ..., m             L = 2^b - 1
    signed    levels -m + k 2m/(2^b - 1), k = 0..2^b-1  L = (2^b - 1)/2 a side
              (symmetric; 0 is not a level: at 2 bits -m, -m/3, m/3, m)
Decision (README "Decisions"), measured as the relative squared error of
the weight gradients (runtime/gradient_check.py) against the grid with 0 on
it (L = 2^(b-1) - 1 a side, 2^b - 1 codes: -m, 0, m at 2 bits), mean of 3
seeds, 2 bits: resnet18 (64x64, batch 8) stochastic 1.25 vs 2.78, round to
nearest 0.62 vs 1.04; a 4-layer ViT (32x32, batch 8) stochastic 0.46 vs
0.78, nearest 0.28 vs 0.33. The extra level outweighs an exact 0 in both
modes, so one grid serves both: stochastic rounding needs only the
extremes on the grid to stay unbiased, and round to nearest's error per
value stays within half a step, the bound AutoQuant's width rule assumes
(the step is 2m/(2^b - 1), below the 0-on-grid step m/(2^(b-1) - 1), so the
rule's widths stay correct bounds). An affine per-channel min/max grid
(ActNN) was not taken: a second number per channel, and a symmetric grid
already reaches a channel's extremes when its negative and positive
extremes are alike.
k_c = L / m_c grid steps per unit of x. code = floor(x*k_c + off + r) with
off = 0 (unsigned) or L (signed), r = 0.5 (round to nearest) or u in [0,1)
(stochastic: up with probability equal to the fraction of the step, so
E[decoded] = x); decoding is (code - off) / k_c. Computed as
trunc(clamp(x*k + r + off, 0, hi)), see codes_reference. Signed L and off
are half-integers, exact in float32.

Randomness: u comes from counter_hash.py's counter-based stream of
(key, flat index), so no full-size random tensor is made and the torch
reference, the C loops and the Triton kernels draw the same u for every
element.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .. import config
from .counter_hash import MASK32, mix32, mix32_tensor, to_uniform

EPS = 1e-6
ROUNDINGS = ("nearest", "stochastic")


# ----------------------------------------------------------------- helpers

def check_bits(bits: int) -> None:
    """Entry guard of the public pack functions (a policy's widths were checked at load)."""
    config.check_bits("activation bits", bits, 1, 16)


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
    return mix32(seed * 0x9E3779B1 + 0x7F4A7C15)


def uniform_reference(idx: torch.Tensor, key: int) -> torch.Tensor:
    """u in [0,1) on a 2^-24 grid (exact in float32) for each int64 index:
    counter_hash's finaliser of (index + key) mod 2^32."""
    return to_uniform(mix32_tensor((idx + key) & MASK32))


def grid(bits: int, signed: bool) -> Tuple[float, float, float]:
    """(L, off, hi): grid steps from 0 to the channel maximum, the offset
    that makes codes non-negative and the top code (2^b - 1 both ways); see
    the module docstring."""
    top = float((1 << bits) - 1)
    if not signed:
        return top, 0.0, top
    return top / 2.0, top / 2.0, top


def multipliers(amax: torch.Tensor, bits: int, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """k_c (grid steps per unit of x) and 1/k_c, both float32, computed as
    (1 / (amax + eps)) * L: the operations the C loops repeat."""
    k = torch.reciprocal(amax.to(torch.float32) + EPS) * grid(bits, signed)[0]
    return k, torch.reciprocal(k)


def codes_reference(x3: torch.Tensor, k: torch.Tensor, bits: int, signed: bool, stoch: bool, key: int) -> torch.Tensor:
    """int32 codes in flat order for x viewed as (A, C, B).

    code = trunc(clamp(x*k + r + off, 0, hi)): the offset is added before
    clamping so that truncation is floor; every path does these float
    operations in this order, which keeps them bitwise equal."""
    v = x3.to(torch.float32) * k.view(1, -1, 1)
    if stoch:
        idx = torch.arange(x3.numel(), device=x3.device, dtype=torch.int64).view(x3.shape)
        v = v + uniform_reference(idx, key)
    else:
        v = v + 0.5
    _, off, hi = grid(bits, signed)
    v = (v + off).clamp_(0.0, hi)
    return v.to(torch.int32).reshape(-1)

