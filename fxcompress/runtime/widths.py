"""AutoQuant's maths: per-channel widths from an error budget (SPEC section 1).

`auto_bits` is the rule (the C loop of kernels/autobits.py, or its numpy
reference here), `spend_slack` lowers whole-bit widths while the tensor's
summed error stays within the bound, `bn_dx2` is BatchNorm's per-channel
budget. The controller (runtime/autoquant.py) sets the budgets; SaveSpec
calls auto_bits per saved tensor.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from ..kernels import actpack, autobits


def auto_bits(amax: torch.Tensor, signed: bool, C: int, dx2: Any, bn_terms: Optional[Dict[str, Any]],
              max_bits: int, scale: float = 1.0, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-channel bits from the error budget dx2 (SPEC section 1).

    fbits = clip(trunc(-1/2 log2 dx2 - log2 s_c - 1), 1, 15), s_c = 1/(max|x_c| + 1e-6),
    i.e. a grid step of 2^-(fbits+1) on the scaled value. Unsigned
    tensors need fbits+1 bits for that grid, signed ones a sign bit more.
    `scale` multiplies the budget (numel/nnz when only non-zeros carry error).

    Conv/linear budgets bound the *total* squared error of the tensor
    (numel * dx2, SPEC section 1), and whole bits per channel leave most
    channels below their share: with `counts` (elements carrying error per
    channel), spend_slack then lowers widths while the total stays within
    the budget."""
    fast = autobits.auto_bits(amax.detach(), actpack.EPS, bn_terms,
                              0.0 if bn_terms is not None else float(dx2) * scale, counts, signed,
                              max_bits)
    if fast is not None:  # the C loop: the same widths as below, without numpy's per-call cost
        return torch.from_numpy(fast).to(amax.device)
    # numpy on a few thousand channels: torch's per-op overhead was
    # ~1 ms per tensor here, a tenth of the step's compression time
    a = amax.detach().double().cpu().numpy() + actpack.EPS
    if bn_terms is not None:
        dx2 = _bn_dx2_np(bn_terms, a - actpack.EPS)
    else:
        dx2 = np.full(a.shape, float(dx2) * scale)
    dx2 = np.maximum(dx2, 1e-30)
    f = -0.5 * np.log2(dx2) + np.log2(a) - 1.0
    bits = np.clip(np.trunc(f), 1, 15) + (2 if signed else 1)
    bits = np.clip(bits, 1, max_bits).astype(np.int64)
    if bits.size == 1:
        bits = np.full(C, int(bits.reshape(-1)[0]), dtype=np.int64)
        dx2 = np.full(C, float(dx2.reshape(-1)[0]))
    if counts is not None:
        bits = spend_slack(bits, a, dx2, counts.detach().cpu().numpy().astype(np.float64), signed)
    return torch.from_numpy(bits).to(amax.device)


def spend_slack(bits: np.ndarray, a: np.ndarray, dx2: np.ndarray, n: np.ndarray, signed: bool,
                rounds: int = 4) -> np.ndarray:
    """Lower per-channel widths while sum_c n_c * err_c / dx2_c <= sum_c n_c.

    The budgets bound a sum over the tensor: conv/linear the total squared
    error numel * dx2 (one dx2 for all channels), BatchNorm a sum over
    channels where channel k may use 1/K of the error (its dx2_k); in both,
    sum_c n_c * err_c / dx2_c <= sum_c n_c is the bound. The per-channel rule
    keeps every channel within its dx2_c by itself, and whole bits leave
    most of them well below it. err_c is channel c's squared rounding error
    at its width (half a grid step: (max|x_c|+eps) / (2^(b+1) - 2)
    unsigned, / (2^b - 2) signed (at least 1: max|x_c| + eps for signed 1
    bit), the half step of kernels/rounding.py's signed grid for round to
    nearest (0 on it); stochastic rounding's signed grid uses all 2^b codes,
    half step / (2^b - 1), so this stays an upper bound there); the same worst case the SPEC rule assumes; the mean squared error of round-to-nearest is a third of the
    half-step square, so the sum counted here stays above the real one in
    practice, which tests/test_autoquant.py measures). Each round takes one bit from the channels whose
    normalised error grows least per bit saved (it quadruples: an increase
    of 3 * n_c * err_c / dx2_c for n_c bits), cheapest first, while the
    total stays within the bound."""
    b = bits.astype(np.int64).copy()
    d = np.maximum(dx2, 1e-30)
    budget = float(n.sum())
    lo = 1 if not signed else 2
    sh = 1 if not signed else 0
    for _ in range(rounds):
        r = (a / np.maximum(np.exp2(b + sh) - 2.0, 1.0)) ** 2 / d
        slack = budget - float((n * r).sum())
        ok = (b > lo) & (n > 0)
        if slack <= 0 or not ok.any():
            break
        cost = np.where(ok, 3.0 * n * r, 0.0)
        order = np.argsort(np.where(ok, r, np.inf), kind="stable")
        take = order[(np.cumsum(cost[order]) <= slack) & ok[order]]
        if take.size == 0:
            break
        b[take] -= 1
    return b


def _bn_dx2_np(terms: Dict[str, Any], amax: np.ndarray) -> np.ndarray:
    """bn_dx2 in numpy (terms converted once and cached in the dict)."""
    np_terms = terms.get("_np")
    if np_terms is None:
        np_terms = terms["_np"] = {k: (v.detach().double().cpu().numpy() if torch.is_tensor(v) else v)
                                   for k, v in terms.items() if k != "_np"}
    t = np_terms
    inv2 = t["inv_std2"]
    g2 = inv2 * t["nnz2"] * t["gz2_max"] * (amax / 2) ** 2 + t["ggamma2"]
    denom = t["K"] * t["gamma2"] * inv2 ** 2 * g2
    dx2 = t["numer"] / np.maximum(denom, 1e-30)
    return np.maximum(dx2, 2.0 ** -16)


def bn_dx2(terms: Dict[str, torch.Tensor], amax: torch.Tensor) -> torch.Tensor:
    """BatchNorm input budget per channel k (SPEC section 1):
    dx2_k = e*|gx|^2*N*H*W / (K * g_k^2 * inv_std_k^4 * g2_k),
    g2_k = inv_std_k^2 * nnz_k^2 * max(gz_k)^2 * (max|x_k|/2)^2 + (dL/dgamma_k)^2, floored at 2^-16."""
    inv2 = terms["inv_std2"].to(amax.device).double()
    g2 = inv2 * terms["nnz2"].double() * terms["gz2_max"].double() * (amax.double() / 2) ** 2 \
        + terms["ggamma2"].double()
    denom = terms["K"] * terms["gamma2"].double() * inv2 ** 2 * g2
    dx2 = terms["numer"] / denom.clamp_min(1e-30)
    return dx2.clamp_min(2.0 ** -16)

