"""PACT activation quantizer: a learned clip alpha (Choi et al. 2018).

y = clamp(x, 0, alpha) (signed: clamp(x, -alpha, alpha)), rounded to
2^k - 1 steps of alpha / n. Straight-through as PACT defines it: the rounding
error is detached, so dq/dx = 1 inside the clip and dq/dalpha = 1 (signed:
sign(x)) outside it. alpha is a parameter (one per quantizer), so the
optimizer's weight decay acts on it as the paper's L2 term does.
Plain tensor code, compile-friendly.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def pact(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    if bits >= 32:
        return x
    n = float(2 ** bits - 1)
    if signed:
        y = torch.maximum(torch.minimum(x, alpha), -alpha)
        q = (torch.round((y + alpha) * (n / (2 * alpha))) * (2 * alpha / n)) - alpha
    else:
        y = torch.minimum(torch.relu(x), alpha)
        q = torch.round(y * (n / alpha)) * (alpha / n)
    return y + (q - y).detach()


class PactQuant(nn.Module):
    def __init__(self, bits: int, alpha: float = 6.0, signed: bool = False):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pact(x, self.alpha, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"
