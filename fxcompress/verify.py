"""Checks that a compiled model still computes what the original did.

`check_identity` runs the original and the compiled model (compiled from a
deep copy) from the same RNG state on the same inputs, in training mode, and
compares outputs and every parameter gradient bit for bit. With a policy
that selects layers but applies no treatment this must hold exactly: any
difference is a tracing or rewriting bug.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .compiled import compile

# Selects layers and ops but treats none: each rule opts out of a treatment
# (a rule must carry one), so the plan lists the nodes and nothing is rewritten.
SELECT_ONLY = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "optional": True, "activations": None},
                         {"match": {"op": ["add", "matmul", "cat"]}, "optional": True, "activations": None}]}


@dataclass
class IdentityResult:
    outputs_equal: bool
    grads_equal: bool
    params: int
    mismatched: List[str] = field(default_factory=list)
    selected: int = 0
    auto_leaves: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outputs_equal and self.grads_equal


def _flatten(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _loss(out) -> torch.Tensor:
    return sum((t.float() * (i + 1)).sum() for i, t in enumerate(_flatten(out)) if t.is_floating_point())


def _run(model: nn.Module, inputs: Tuple[Any, ...], seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs)
    _loss(out).backward()
    return [t.detach().clone() for t in _flatten(out)]


def check_identity(model: nn.Module, inputs: Tuple[Any, ...], policy: Optional[Dict] = None,
                   seed: int = 0, passes: Optional[Sequence[type]] = None) -> IdentityResult:
    """`passes`: the compile's pass list (default fxcompress.passes.DEFAULT_PASSES)."""
    model.train()
    twin = copy.deepcopy(model)
    cm = compile(twin, policy if policy is not None else SELECT_ONLY, inputs, passes=passes)
    cm.train()
    ref = _run(model, inputs, seed)
    got = _run(cm, inputs, seed)
    outputs_equal = len(ref) == len(got) and all(torch.equal(a, b) for a, b in zip(ref, got))
    mismatched = []
    a_params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        q = a_params[name]
        if (p.grad is None) != (q.grad is None) or (p.grad is not None and not torch.equal(p.grad, q.grad)):
            mismatched.append(name)
    return IdentityResult(outputs_equal, not mismatched, len(a_params), mismatched,
                          len(cm.plan.selected_entries), [a.path for a in cm.trace_info.auto_leaves])
