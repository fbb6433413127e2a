"""Bit-operations (BOPs) per sample: the cost model of mixed precision.

BOPs of a conv or linear layer = MACs per sample * weight bits * input
activation bits (the usual BOPs measure). MACs come from the traced shapes:
output elements per sample * (input channels / groups) * kernel size
(linear: output elements per sample * in_features). Relative energy is
taken proportional to BOPs, as CAMP's energy figure is; the reference is the
same network with every quantized layer at 4 bits (first and last layers at
32 x 32 in both).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

FULL = 32


@dataclass
class LayerCost:
    name: str          # the layer (module path)
    macs: int          # multiply-accumulates per sample
    w_bits: int
    a_bits: int
    #: "fixed", or the part of a dual block it belongs to: "low", "high", "gate"
    part: str = "fixed"
    block: Optional[str] = None

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits

    def as_dict(self):
        return {**asdict(self), "bops": self.bops}


def _per_sample(shape: Sequence[int]) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def layer_macs(module: nn.Module, out_shape: Sequence[int]) -> int:
    """MACs per sample of a conv or linear module whose output has `out_shape`
    (batch first)."""
    out = _per_sample(out_shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return out * (module.in_channels // module.groups) * int(math.prod(module.kernel_size))
    if isinstance(module, nn.Linear):
        return out * module.in_features
    raise TypeError(f"no MAC count for {type(module).__name__}")


def node_macs(node: fx.Node, gm: fx.GraphModule) -> Optional[int]:
    """MACs per sample of a call_module conv/linear node with traced shapes."""
    meta = node.meta.get("tensor_meta")
    if node.op != "call_module" or meta is None or not hasattr(meta, "shape"):
        return None
    m = gm.get_submodule(node.target)
    if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return None
    return layer_macs(m, tuple(meta.shape))


class CostModel:
    """Per-sample BOPs of a rewritten network as a function of gate usage.

    `layers` lists every conv and linear of the network as it runs, `reference`
    the all-4-bit network's BOPs. For a dual block with usage u (fraction of
    samples on the high path): the gate runs for every sample, the high path
    for a fraction u; the low path for every sample when the gate reads its
    output (post-gate, the default), for 1 - u with the pre-gate.
    """

    def __init__(self, layers: List[LayerCost], reference_bops: int, pre_gate: bool = False):
        self.layers = layers
        self.reference = reference_bops
        self.pre_gate = pre_gate

    def blocks(self) -> List[str]:
        seen: Dict[str, None] = {}
        for c in self.layers:
            if c.block is not None:
                seen.setdefault(c.block)
        return list(seen)

    def bops(self, usage: Dict[str, float]) -> float:
        total = 0.0
        for c in self.layers:
            if c.part == "high":
                total += usage.get(c.block, 1.0) * c.bops
            elif c.part == "low" and self.pre_gate:
                total += (1.0 - usage.get(c.block, 1.0)) * c.bops
            else:
                total += c.bops
        return total

    def relative(self, usage: Dict[str, float]) -> float:
        return self.bops(usage) / self.reference if self.reference else float("nan")

    def summary(self) -> Dict[str, float]:
        blocks = self.blocks()
        return {"reference_bops": float(self.reference),
                "relative_all_low": self.relative({b: 0.0 for b in blocks}),
                "relative_all_high": self.relative({b: 1.0 for b in blocks})}
