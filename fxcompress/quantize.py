"""Post-training quantization for evaluating PSGD-trained models (SPEC section 2).

Weights: `quantize_weights(model, bits)` rounds every Conv/Linear weight to
the symmetric per-tensor grid PSGD trains towards,
    delta = max(|min(0, min w)|, max(0, max w)) / (2^(b-1) - 1),
    Q(w) = delta * round(clip(w / delta, -L, L)),
with delta from the weight's own range (the authors' evaluation builds a
fresh quantizer whose first forward sets the range to the current weights).

Activations: `quantize_activations(model, bits)` traces the model and puts a
fake-quant node after every ReLU (call_module nn.ReLU, F.relu, torch.relu,
x.relu()): unsigned grid 0..2^a - 1 with step x_max / (2^a - 1). x_max comes
from the BatchNorm that feeds the ReLU, max over channels of
beta_c + n * gamma_c (n = 6 by default, the authors' clipping_range); the BN
is the ReLU's input, or, for a ReLU after a residual add, the BN on one of
the add's inputs (the authors pair each ReLU with the BN registered before
it, which in a ResNet block is that one). A ReLU without a BN upstream, or
every ReLU with `clip="dynamic"`, uses a running max of what it sees
(momentum 0.1), the authors' behaviour without act_clipping.
"""
from __future__ import annotations

import copy
import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .config import check_bits
from .errors import BadInput
from .kernels.scaled_grad import levels_for, quantize_reference
from .tracing import trace

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CLIPS = ("bn", "dynamic")


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Conv/Linear modules in registration order (first and last are what the
    first/last rule means), skipping anything fxcompress inserted."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) and not any(p.startswith("fxc_") for p in n.split("."))]


#: the authors' first_last_quant rule: below FIRST_LAST_BELOW bits the first
#: and the last weight layer get FIRST_LAST_BITS (PSGD's training and evaluation)
FIRST_LAST_BELOW = 4
FIRST_LAST_BITS = 8


def authors_first_last_bits(bits: int, width: Optional[int] = FIRST_LAST_BITS) -> Optional[int]:
    """The width of the first and last layer under the authors' rule: `width`
    when `bits` < 4, else None (the same as the other layers). The one copy
    of the rule: the scaled_grad pass and `evaluate` both ask it."""
    return width if bits < FIRST_LAST_BELOW else None


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_b(w) with delta from w's own range; returns w's dtype."""
    L = levels_for(bits)
    wf = w.detach().to(torch.float32)
    absmax = torch.maximum(-wf.min().clamp(max=0), wf.max().clamp(min=0))
    delta = (absmax / L).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    return quantize_reference(wf, delta, L).to(w.dtype)


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int, first_last_bits: Optional[int] = None, *,
                     keep_first_last: bool = False, last_bias: bool = False, inplace: bool = False) -> nn.Module:
    """The model with every Conv/Linear weight rounded to its b-bit grid.

    first_last_bits: width of the first and last layer (None: `bits` too;
    `authors_first_last_bits(bits)` gives the authors' rule);
    keep_first_last: leave those two in full precision (first_last_quant=0);
    last_bias: quantize the last layer's bias too, on its own grid (the authors do);
    inplace: modify `model` rather than a copy.
    """
    check_bits("weight bits", bits, 2, 8)
    if first_last_bits is not None:
        check_bits("first/last-layer bits", first_last_bits, 2, 8)
    if not inplace:
        model = copy.deepcopy(model)
    layers = weight_layers(model)
    if not layers:
        raise BadInput("quantize_weights: the model has no Conv/Linear layer")
    ends = {0, len(layers) - 1}
    for i, (_, m) in enumerate(layers):
        if i in ends and keep_first_last:
            continue
        b = first_last_bits if (i in ends and first_last_bits is not None) else bits
        m.weight.copy_(quantize_tensor(m.weight, b))
        if last_bias and i == len(layers) - 1 and m.bias is not None:
            m.bias.copy_(quantize_tensor(m.bias, b))
    return model


class FakeQuantAct(nn.Module):
    """Unsigned fake quantization of a non-negative activation to 2^a levels
    (0 .. 2^a - 1 steps of x_max / (2^a - 1)); x_max fixed, or a running max."""

    def __init__(self, bits: int, x_max: Optional[float] = None, momentum: float = 0.1):
        super().__init__()
        self.bits = bits
        self.n = float((1 << bits) - 1)
        self.fixed = x_max is not None
        self.momentum = momentum
        self.seen = False
        self.register_buffer("x_max", torch.tensor(float(x_max) if x_max is not None else 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fixed:
            with torch.no_grad():
                cur = x.detach().max().clamp(min=0).to(self.x_max.dtype)
                if self.seen:
                    self.x_max.lerp_(cur, self.momentum)
                else:
                    self.x_max.copy_(cur)
                    self.seen = True
        delta = (self.x_max / self.n).clamp(min=torch.finfo(torch.float32).tiny)
        return torch.round(torch.clamp(x / delta, 0.0, self.n)) * delta

    def extra_repr(self) -> str:
        return f"bits={self.bits}, " + (f"x_max={float(self.x_max):.4g}" if self.fixed else "running max")


_RELU_FNS = (F.relu, torch.relu)
_ADDS = (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target == "relu"


def _bn_of(node: fx.Node, gm: fx.GraphModule) -> Optional[nn.Module]:
    """The BatchNorm module whose output reaches this ReLU's input directly
    or through one residual add."""
    def bn(n):
        if isinstance(n, fx.Node) and n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                return m
        return None

    src = node.args[0] if node.args else None
    if bn(src) is not None:
        return bn(src)
    if isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and (
            src.target in _ADDS or src.target in ("add", "add_")):
        for a in src.args:
            if bn(a) is not None:
                return bn(a)
    return None


def bn_clip(bn: nn.Module, n: float = 6.0) -> float:
    """max over channels of beta_c + n * gamma_c."""
    return float((bn.bias.detach() + n * bn.weight.detach()).max().clamp(min=0))


def quantize_activations(model: nn.Module, bits: int, clip: str = "bn", n: float = 6.0) -> fx.GraphModule:
    """A traced copy of `model` with a fake-quant node after every ReLU (see the
    module docstring); the copy's `fxc_actq` attribute lists (node, x_max or None)."""
    check_bits("activation bits", bits, 2, 16)
    if clip not in CLIPS:
        raise BadInput(f"activation clipping must be one of {', '.join(CLIPS)}, got {clip!r}")
    if not (isinstance(n, (int, float)) and n > 0):
        raise BadInput(f"the clipping range n (beta + n*gamma) must be positive, got {n!r}")
    gm, _ = trace(copy.deepcopy(model))
    placed = []
    for node in list(gm.graph.nodes):
        if not _is_relu(node, gm):
            continue
        bn = _bn_of(node, gm) if clip == "bn" else None
        x_max = bn_clip(bn, n) if bn is not None else None
        name = f"fxc_actq_{node.name}"
        gm.add_submodule(name, FakeQuantAct(bits, x_max))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        placed.append((node.name, x_max))
    if not placed:
        raise BadInput("quantize_activations: the model has no ReLU to quantize after")
    gm.graph.lint()
    gm.recompile()
    gm.fxc_actq = placed
    return gm
