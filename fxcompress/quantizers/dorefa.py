"""DoReFa-Net quantizers with straight-through gradients (SPEC section 5).

Weights, k bits:
- k = 1: sign(w) * mean|w|  (one scale per tensor; sign(0) taken as +1)
- k > 1: t = tanh(w) / (2 max|tanh(w)|) + 1/2 in [0, 1], rounded to 2^k - 1
  steps, mapped back to [-1, 1]: 2 * round(t * n) / n - 1
Activations, k bits: round(clamp(x, 0, 1) * n) / n with n = 2^k - 1; the
`signed` variant maps [-1, 1] onto the same grid (for block inputs that are
not ReLU outputs, e.g. MobileNet's linear bottlenecks).

Rounding is straight-through: `x + (round(x) - x).detach()`, plain tensor
code (no autograd.Function, no Python state), so torch.compile traces it.
The gradient of everything around the rounding (tanh, the max, the clamp)
is the true one, as in DoReFa; the 1-bit weight passes its gradient straight
through to w (the scale mean|w| is detached, as the paper does).

Memory: autograd would keep three weight-sized tensors of the k-bit chain
(tanh(w), its absolute value for the max, and the normalised weight) until
the backward, for every quantized layer and path: on the largest models
that is more than the weights, their gradients and momentum together. In
eager training the chain runs under a non-reentrant checkpoint instead, so
only w (a parameter, in memory anyway) is kept and the chain is recomputed
in the backward; the values and gradients are the same (tested). Under
torch.compile the plain code is traced and the partitioner decides what to
save.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def round_st(x: torch.Tensor) -> torch.Tensor:
    """round(x) in forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits >= 32:
        return w
    if bits == 1:
        scale = w.detach().abs().mean()
        q = torch.where(w >= 0, scale, -scale)
        return w + (q - w).detach()
    if w.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(_k_bit_weight, w, bits, use_reentrant=False, preserve_rng_state=False)
    return _k_bit_weight(w, bits)


def _k_bit_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    n = float(2 ** bits - 1)
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
    return 2 * round_st(t * n) / n - 1


def quantize_activation(x: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    if bits >= 32:
        return x
    n = float(2 ** bits - 1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # inference: no straight-through arithmetic (its add and subtract are
        # two more passes over the tensor) and one new tensor, rounded in
        # place; the values are the grid's exactly
        if bits == 1 and not signed:
            # round(clamp(x, 0, 1)) is 1 exactly where x > 1/2 (round half to even): one pass, not four
            # (a NaN gives 0 here, NaN on the training path)
            return (x > 0.5).to(x.dtype)
        if signed:
            return torch.clamp(x, -1, 1).add_(1).mul_(0.5).mul_(n).round_().mul_(2).div_(n).sub_(1)
        return torch.clamp(x, 0, 1).mul_(n).round_().div_(n)
    if signed:
        # [-1, 1] -> [0, 1], the unsigned grid, and back: 1 bit gives {-1, 1}
        return 2 * round_st((torch.clamp(x, -1, 1) + 1) * 0.5 * n) / n - 1
    return round_st(torch.clamp(x, 0, 1) * n) / n


class WeightQuant(nn.Module):
    """DoReFa weight quantizer (stateless; one per path and bit width)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActQuant(nn.Module):
    """DoReFa activation quantizer: clamp to [0, 1] (or [-1, 1]) and round."""

    def __init__(self, bits: int, signed: bool = False):
        super().__init__()
        self.bits, self.signed = bits, signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"
