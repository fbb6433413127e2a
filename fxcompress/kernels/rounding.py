"""The activation quantizer's arithmetic, shared by every packing family.

Per scale row c with m_c = max|x_c| + 1e-6, a uniform grid that contains the
channel's extremes (so stochastic rounding is unbiased everywhere, the top
cell included). Three grids, named by an int the packers carry in their
`signed` field (0 is falsy, 1 and 2 truthy, so `if signed` still reads):
    UNSIGNED (0)     levels 0, m/L, 2m/L, ..., m    L = 2^b - 1 (all 2^b codes)
    SIGNED_ZERO (1)  levels -m, ..., 0, ..., m      L = 2^(b-1) - 1 a side
                     (2^b - 1 codes, 0 on the grid), {-m, m} at 1 bit (L = 1/2)
    SIGNED_ALL (2)   levels -m + k 2m/(2^b - 1), k = 0..2^b - 1: L = (2^b - 1)/2
                     a side (all 2^b codes, symmetric, 0 between two levels)
`grid_kind(signed, stochastic)` picks one: signed stochastic rounding uses
SIGNED_ALL, signed round-to-nearest SIGNED_ZERO (decision, README
"Decisions"). Stochastic rounding needs only the extremes on the grid to be
unbiased, and the code SIGNED_ZERO leaves unused is a whole level at 2 bits
(3 -> 4). Measured (relative squared error of the weight gradients,
runtime/gradient_check.py, mean of 3 seeds, 2 bits, SIGNED_ALL vs
SIGNED_ZERO): stochastic resnet18 (64x64, batch 8) 1.25 vs 2.78, a 4-layer
ViT (32x32, batch 8) 0.46 vs 0.78. Round to nearest measured mixed:
resnet18 0.62 vs 1.04, but on tests/test_autoquant.py's ViT under `auto`
(nearest, widths at their 2-bit floor) the worst parameter's error went
from 1.53 e to 2.99 e and the total from 0.71 e to 1.8 e with SIGNED_ALL:
rounding to nearest is deterministic, and without 0 on the grid every
value near 0 moves by +-m/(2^b - 1) the same way (LayerNorm's weight
gradient sums them), an error that does not average out. So nearest keeps
0 exact, and AutoQuant's width model (widths.py), built on that grid's
half step, is unchanged (for SIGNED_ALL, whose step is smaller, it is an
upper bound). A per-channel min/max (affine) grid was not taken: a second
number per channel, and the symmetric grids already reach the extremes.
k_c = L / m_c grid steps per unit of x. code = floor(x*k_c + off + r) with
off = 0 (unsigned) or L (signed), r = 0.5 (round to nearest) or u in [0,1)
(stochastic: up with probability equal to the fraction of the step, so
E[decoded] = x); decoding is (code - off) / k_c. Computed as
trunc(clamp(x*k + r + off, 0, hi)), see codes_reference. SIGNED_ALL's L
and off are half-integers, exact in float32.

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
UNSIGNED, SIGNED_ZERO, SIGNED_ALL = 0, 1, 2


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


def grid_kind(signed, stoch: bool) -> int:
    """The grid of a tensor (UNSIGNED, SIGNED_ZERO or SIGNED_ALL, see the
    module docstring); `signed` may already be a kind (then only its
    signedness is read)."""
    if not signed:
        return UNSIGNED
    return SIGNED_ALL if stoch else SIGNED_ZERO


def grid(bits: int, signed) -> Tuple[float, float, float]:
    """(L, off, hi): grid steps from 0 to the channel maximum, the offset
    that makes codes non-negative (signed: the position of 0) and the top
    code, for grid kind `signed` (False/0, True/1 or 2); see the module
    docstring."""
    if not signed:
        top = float((1 << bits) - 1)
        return top, 0.0, top
    if int(signed) == SIGNED_ALL:
        half = ((1 << bits) - 1) / 2.0
    else:
        half = float((1 << (bits - 1)) - 1) if bits > 1 else 0.5
    return half, half, 2.0 * half


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

