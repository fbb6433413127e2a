"""What every pass is: a small unit `(GraphModule, Plan) -> PassResult`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..kernels.binary_conv import binary_conv2d

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import Plan
    from ..runtime.controller import Controller


@dataclass
class PassResult:
    modified: bool = False
    #: names of nodes and submodules the pass inserted (all start with fxc_)
    inserted: List[str] = field(default_factory=list)
    #: training-time state the pass created, by name
    controllers: Dict[str, "Controller"] = field(default_factory=dict)
    #: one line per thing a user should know (fallbacks, skipped nodes)
    notes: List[str] = field(default_factory=list)


class Pass:
    """A graph rewrite for one treatment kind.

    Subclasses set `name`, and when they consume a per-node policy key,
    `key` (the policy key, e.g. "scaled_grad") and `config` (its dataclass).
    `applies_to` says whether a node can take the treatment (None = yes, else
    the reason why not, shown in the plan); `run` rewrites the graph in place.

    Optional, for a pass with a `key`:
    - `schedule_config`: dataclass of the policy's `schedule: {<key>: {...}}`
      (when the treatment changes over training);
    - `settings_config`: dataclass of the policy's `settings: {<key>: {...}}`,
      settings that hold for the whole pass (a controller's, say), which a
      per-node rule cannot give without one node's value silently winning.
    The policy loader validates both sections with these dataclasses, and the
    manager sets `self.schedule` (None when the policy has no schedule for the
    key) and `self.settings` (the defaults when the section is absent) before
    it calls `run`.

    Order: `after` / `before` name passes (by `name`) that must run before /
    after this one when both are in the pass list; the manager refuses a
    list that breaks them (manager.check_passes).
    """

    name: ClassVar[str] = "pass"
    key: ClassVar[Optional[str]] = None
    config: ClassVar[Optional[type]] = None
    schedule_config: ClassVar[Optional[type]] = None
    settings_config: ClassVar[Optional[type]] = None
    after: ClassVar[Tuple[str, ...]] = ()
    before: ClassVar[Tuple[str, ...]] = ()

    #: set by the manager before `run` (see the class docstring)
    schedule: Any = None
    settings: Any = None

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        return None

    def run(self, gm: fx.GraphModule, plan: "Plan") -> PassResult:  # pragma: no cover
        raise NotImplementedError


_SAFE = re.compile(r"[^0-9a-zA-Z_]")


def fxc_name(gm: fx.GraphModule, *parts: str) -> str:
    """A deterministic attribute name `fxc_<parts>` not yet used on `gm`.

    Determinism matters: the same model and policy always give the same
    names, so state_dicts and golden code snapshots are stable.
    """
    base = "fxc_" + "_".join(_SAFE.sub("_", p) for p in parts if p)
    name, i = base, 1
    while hasattr(gm, name) or name in {n.name for n in gm.graph.nodes}:
        name = f"{base}_{i}"
        i += 1
    return name


def add_submodule(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    assert name.startswith("fxc_"), "inserted submodules carry the fxc_ prefix"
    gm.add_submodule(name, module)
    return name


# --- weights of conv/linear calls (passes that act on weights share these) ----

#: conv/linear module classes and the functional call each becomes when a
#: pass routes its weight through an inserted node
MODULE_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, nn.Linear: F.linear}
#: functional calls whose second argument is a weight (binary_conv2d: the
#: dual-precision pass's 1-bit path, torch.conv2d but for CPU inference)
WEIGHT_FNS = (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d, binary_conv2d)


def param_of(gm: fx.GraphModule, target: str) -> Optional[nn.Parameter]:
    """The parameter `target` names on gm, or None (no such name, or not a Parameter)."""
    try:
        p = gm.get_parameter(target)
    except AttributeError:
        return None
    return p if isinstance(p, nn.Parameter) else None


def weight_arg(node: fx.Node) -> Optional[fx.Node]:
    """The weight argument of a functional conv/linear call, if it is a node."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) else None


def get_attr_before(gm: fx.GraphModule, target: str, value, anchor: fx.Node) -> fx.Node:
    """A get_attr of `target` (whose tensor is `value`) inserted before `anchor`, with its tensor_meta."""
    with gm.graph.inserting_before(anchor):
        n = gm.graph.get_attr(target)
    n.meta["tensor_meta"] = _extract_tensor_metadata(value)
    return n


def call_as_functional(gm: fx.GraphModule, plan: "Plan", node: fx.Node, m: nn.Module, weight: fx.Node,
                       bias: Optional[fx.Node]) -> fx.Node:
    """Replace call_module `node` of conv/linear `m` by its functional call
    (MODULE_FN, with the module's own hyper-parameters) on the given weight
    and bias nodes. The module stays in gm and owns its parameters, so the
    state_dict keeps the model's names; the plan follows the new node."""
    fn = next(f for c, f in MODULE_FN.items() if isinstance(m, c))
    x = node.args[0] if node.args else node.kwargs["input"]
    args = (x, weight, bias) if fn is F.linear else (x, weight, bias, m.stride, m.padding, m.dilation, m.groups)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    plan.replace_node(node.name, new)
    return new
