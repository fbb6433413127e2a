"""AC/DC alternating compressed/decompressed training: the `sparsity` policy key.

Every selected weight reaches its op through a masked-weight node:

    fxc_sparsity_layer1_0_conv1 = self.fxc_sparsity_layer1_0_conv1(layer1_0_conv1_weight)
    conv2d_3 = torch.conv2d(relu_1, fxc_sparsity_layer1_0_conv1, None, (1, 1), (1, 1), (1, 1), 1)

(`w * mask`, runtime/sparsity.py; the mask is a boolean buffer, so it is in
the state dict). Biases are never masked. Which nodes take it:
- call_module Conv1d/2d/3d and Linear: rewritten to the functional call, as
  the scaled_grad pass does (the module keeps its parameters and names);
- call_function F.conv*/F.linear/torch.conv* whose weight is a parameter read
  by get_attr, and matmul-family calls (torch.matmul, @, mm, bmm) with a
  parameter operand (functional weights of user models and transformers);
- the get_attr of such a parameter (every weight use of it);
- any other module called as a leaf that owns weight parameters (>= 2
  dimensions, e.g. nn.MultiheadAttention's in_proj_weight and out_proj.weight
  in vit_b_16): the call becomes `torch.func.functional_call(module,
  {name: masked weight}, args, kwargs)`, so the module's own forward runs on
  the masked weights.

The schedule (`schedule: {sparsity: {...}}`, SparsitySchedule) and the mask
kind (per rule: global, uniform, nm) are read here; the controller applies
them during training.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..config import ConfigError
from ..runtime.sparsity import MaskedWeight, Member, SparsityController
from ..quantizers.dorefa import WeightQuant
from ..runtime.scaled_grad import ScaledGrad
from .base import (MODULE_FN, WEIGHT_FNS, Pass, PassResult, add_submodule, call_as_functional, fxc_name,
                   get_attr_before, param_of, weight_arg)

_MATMUL_FNS = (torch.matmul, operator.matmul, torch.mm, torch.bmm)

#: the authors' schedules: (dense warm-up, compressed length, decompressed length, final phase start), epochs
PRESETS = {
    # ImageNet, 100 epochs: dense 0-9, 5/5 alternation 10-74, dense 75-84, sparse 85-99
    "imagenet": (10, 5, 5, 85),
    # CIFAR-100 WRN-28-10, 200 epochs: prune at 10, 50, 90, 130, 170; restore at 30, 70, 110, 150
    "cifar": (10, 20, 20, 170),
}


@dataclass
class SparsityConfig:
    #: fraction of the selected weights set to zero (global and uniform)
    sparsity: float = 0.9
    #: global: one magnitude threshold over all weights of this sparsity;
    #: uniform: the same rule per layer; nm: n of every m along the input dimension zeroed
    kind: Literal["global", "uniform", "nm"] = "global"
    n: int = 2
    m: int = 4
    #: keep the first and last weight layers dense (default: yes for uniform, no otherwise)
    first_last_dense: Optional[bool] = None

    def check(self):
        if not (math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise ConfigError("sparsity", f"must be in [0, 1), got {self.sparsity}")
        if not (1 <= self.m <= 64):
            raise ConfigError("m", f"must be in 1..64, got {self.m}")
        if not (0 <= self.n <= self.m):
            raise ConfigError("n", f"must be in 0..m ({self.m}), got {self.n}")


@dataclass
class SparsitySchedule:
    """Phases in epochs or optimizer steps. Either the pattern (a preset and/or
    warmup, compressed, decompressed, final) or explicit lists of phase starts."""
    unit: Literal["epoch", "step"] = "epoch"
    #: the authors' schedules (in epochs): imagenet (100 epochs) or cifar (200 epochs)
    preset: Optional[Literal["imagenet", "cifar"]] = None
    warmup: Optional[int] = None        # dense warm-up length
    compressed: Optional[int] = None    # length of each alternating compressed phase
    decompressed: Optional[int] = None  # length of each alternating decompressed phase
    final: Optional[int] = None         # start of the final compressed phase (runs to the end)
    compress_at: List[int] = field(default_factory=list)
    decompress_at: List[int] = field(default_factory=list)

    def resolved(self) -> Tuple[int, int, int, int]:
        base = PRESETS[self.preset or "imagenet"]
        mine = (self.warmup, self.compressed, self.decompressed, self.final)
        return tuple(b if v is None else v for v, b in zip(mine, base))

    def check(self):
        pattern = [self.preset, self.warmup, self.compressed, self.decompressed, self.final]
        if self.compress_at or self.decompress_at:
            if any(v is not None for v in pattern):
                raise ConfigError("compress_at", "give either compress_at/decompress_at or the pattern "
                                  "(preset, warmup, compressed, decompressed, final), not both")
            if not self.compress_at:
                raise ConfigError("compress_at", "decompress_at without compress_at")
            marks = sorted([(s, 1) for s in self.compress_at] + [(s, 0) for s in self.decompress_at])
            if len({s for s, _ in marks}) != len(marks) or any(s < 0 for s, _ in marks):
                raise ConfigError("compress_at", "phase starts must be distinct and >= 0")
            kinds = [k for _, k in marks]
            if any(a == b for a, b in zip(kinds, kinds[1:])) or kinds[0] != 1:
                raise ConfigError("decompress_at", "compressed and decompressed phases must alternate, "
                                  "starting with a compressed one")
            return
        w, c, d, f = self.resolved()
        for name, v, lo in (("warmup", w, 0), ("compressed", c, 1), ("decompressed", d, 1), ("final", f, 0)):
            if v < lo:
                raise ConfigError(name, f"must be >= {lo}, got {v}")
        if f < w:
            raise ConfigError("final", f"the final compressed phase ({f}) starts before the warm-up ends ({w})")


def _plain_layer(m: nn.Module) -> bool:
    """Conv/Linear with the stock forward (rewritten to the functional call)."""
    return any(type(m) is c or (isinstance(m, c) and type(m).forward is c.forward) for c in MODULE_FN)


def _module_reason(m: nn.Module) -> Optional[str]:
    if _plain_layer(m):
        if getattr(m, "padding_mode", "zeros") != "zeros":
            return f"padding_mode '{m.padding_mode}' is not supported by sparsity (only 'zeros')"
        if m._forward_hooks or m._forward_pre_hooks:
            return "the module has forward hooks, which rewriting it into a functional call would drop"
        return None
    if not _leaf_weights(m):
        return "sparsity masks weights (parameters with >= 2 dimensions); this module has none"
    return None


def _leaf_weights(m: nn.Module) -> List[str]:
    """Weight parameters of a module called as a leaf (not biases, embeddings' 1-d things)."""
    return [n for n, p in m.named_parameters() if p.dim() >= 2 and "bias" not in n.rsplit(".", 1)[-1]]


def _weight_param(w: Optional[fx.Node], gm: fx.GraphModule) -> Optional[str]:
    """The parameter a conv/linear weight argument reads: a get_attr, or the
    nodes the passes before this one put on it (dual_precision's weight
    quantizer, scaled_grad's node). The mask then goes last, right before
    the op, so a pruned weight is exactly 0 after the quantizer too (DoReFa's
    grid has no 0) and its gradient is 0 before anything scales it."""
    for _ in range(4):
        if not isinstance(w, fx.Node):
            return None
        if w.op == "get_attr":
            return str(w.target) if param_of(gm, w.target) is not None else None
        if w.op != "call_module":
            return None
        m = gm.get_submodule(w.target)
        if isinstance(m, ScaledGrad):
            return m.param_name
        if not isinstance(m, WeightQuant) or not w.args:
            return None
        w = w.args[0]
    return None


def _matmul_weight(node: fx.Node, gm: fx.GraphModule) -> List[Tuple[fx.Node, int]]:
    """(get_attr weight node, its input dimension) of a matmul-family call."""
    out = []
    for i, a in enumerate(node.args[:2]):
        if isinstance(a, fx.Node) and a.op == "get_attr" and param_of(gm, a.target) is not None \
                and param_of(gm, a.target).dim() >= 2:
            out.append((a, -2 if i == 1 else -1))  # x @ W: W's rows are inputs; W @ x: its columns
    return out


def _weight_uses(node: fx.Node, gm: fx.GraphModule) -> List[Tuple[fx.Node, fx.Node, int]]:
    """(user, weight get_attr, input dim) for each weight use of a get_attr."""
    out = []
    for u in node.users:
        if u.op != "call_function":
            continue
        if u.target in WEIGHT_FNS and weight_arg(u) is node:
            out.append((u, node, 1))
        elif u.target in _MATMUL_FNS:
            out += [(u, w, d) for w, d in _matmul_weight(u, gm) if w is node]
    return out


class SparsityPass(Pass):
    name = "sparsity"
    key = "sparsity"
    config = SparsityConfig
    schedule_config = SparsitySchedule
    after = ("scaled_grad",)
    before = ("activations",)

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        if node.op == "call_module":
            return _module_reason(gm.get_submodule(node.target))
        if node.op == "call_function" and node.target in WEIGHT_FNS:
            if _weight_param(weight_arg(node), gm) is None:
                return "the weight of this call is not a parameter read by get_attr"
            return None
        if node.op == "call_function" and node.target in _MATMUL_FNS:
            return None if _matmul_weight(node, gm) else "no operand of this matmul is a parameter"
        if node.op == "get_attr":
            p = param_of(gm, node.target)
            if p is None or p.dim() < 2:
                return "not a weight parameter (>= 2 dimensions)"
            return None if _weight_uses(node, gm) else "this parameter is not the weight of a conv/linear/matmul"
        return "sparsity masks weights of Conv/Linear, functional conv/linear/matmul, and leaf modules with weights"

    # ------------------------------------------------------------------ run
    def _weight_order(self, gm: fx.GraphModule) -> List[str]:
        """All maskable weights in graph order (first/last means these)."""
        names: List[str] = []
        for n in gm.graph.nodes:
            if n.op == "call_module" and self.applies_to(n, gm) is None:
                m = gm.get_submodule(n.target)
                names += [f"{n.target}.weight"] if _plain_layer(m) else \
                    [f"{n.target}.{w}" for w in _leaf_weights(m)]
            elif n.op == "call_function" and n.target in WEIGHT_FNS and self.applies_to(n, gm) is None:
                names.append(_weight_param(weight_arg(n), gm))
            elif n.op == "call_function" and n.target in _MATMUL_FNS:
                names += [str(w.target) for w, _ in _matmul_weight(n, gm)]
        return list(dict.fromkeys(names))

    def run(self, gm: fx.GraphModule, plan) -> PassResult:
        result = PassResult()
        sched = self.schedule if self.schedule is not None else SparsitySchedule()
        if self.schedule is None:
            result.notes.append("no schedule: the authors' ImageNet schedule in epochs (schedule: {sparsity: "
                                "{preset: imagenet}}); set one in the policy")
        order = self._weight_order(gm)
        self._ends = {order[0], order[-1]} if order else set()
        self._gm, self._plan, self._result = gm, plan, result
        self._modules: Dict[str, MaskedWeight] = {}
        self._names: Dict[str, str] = {}
        self._members: Dict[str, Member] = {}
        for node, cfg in list(plan.selected(self.key)):
            if getattr(node, "_erased", False) or node.graph is not gm.graph:
                continue
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                if _plain_layer(m):
                    self._rewrite_module(node, m, cfg)
                else:
                    self._rewrite_leaf(node, m, cfg)
            elif node.op == "call_function" and node.target in WEIGHT_FNS:
                w = weight_arg(node)
                if w is not None and w.op == "get_attr":
                    self._wrap_use(node, w, cfg, 1)
                elif w is not None and not (w.op == "call_module" and str(w.target) in self._names.values()):
                    # the weight passes through an earlier pass's node (scaled
                    # gradient, dual_precision's quantizer): mask its output
                    pname = _weight_param(w, gm)
                    if pname is None:  # not a node any pass before this one makes (a plan made elsewhere)
                        result.notes.append(f"{node.name}: weight comes from {w.name}, not a parameter; not masked")
                        continue
                    node.replace_input_with(w, self._masked(pname, cfg, node, 1, src=w))
                    result.modified = True
            elif node.op == "call_function":
                for w, d in _matmul_weight(node, gm):
                    self._wrap_use(node, w, cfg, d)
            else:
                for user, w, d in _weight_uses(node, gm):
                    self._wrap_use(user, w, cfg, d)
        if self._members:
            members = [self._members[n] for n in self._names]
            params = {n: param_of(gm, n) for n in self._names}
            dense = sorted(mb.name for mb in members if mb.dense)
            if dense:
                result.notes.append("kept dense (first/last layer): " + ", ".join(dense))
            nm_bad = [mb for mb in members if mb.kind == "nm" and params[mb.name].shape[mb.in_dim] % mb.m]
            for mb in nm_bad:  # e.g. a 3-channel stem, a depthwise conv: no groups of m to zero
                mb.dense = True
            if nm_bad:
                result.notes.append(f"kept dense (input dimension not a multiple of m): "
                                    f"{', '.join(mb.name for mb in nm_bad)}")
            result.controllers["sparsity"] = SparsityController(members, params, self._modules, sched)
        return result

    def _masked(self, param_name: str, cfg: SparsityConfig, anchor: fx.Node, in_dim: int,
                src: Optional[fx.Node] = None) -> fx.Node:
        """The parameter's mask node before `anchor`, on a fresh get_attr of
        it, or on `src` (the weight as an earlier pass left it)."""
        gm = self._gm
        p = param_of(gm, param_name)
        if param_name not in self._modules:
            mod = MaskedWeight(param_name, p.shape, device=p.device)
            name = fxc_name(gm, self.name, param_name)
            add_submodule(gm, name, mod)
            self._names[param_name] = name
            self._modules[param_name] = mod
            self._result.inserted.append(name)
            fl = cfg.first_last_dense if cfg.first_last_dense is not None else cfg.kind == "uniform"
            self._members[param_name] = Member(param_name, cfg.kind, cfg.sparsity, cfg.n, cfg.m,
                                               in_dim % p.dim(), dense=fl and param_name in self._ends)
        with gm.graph.inserting_before(anchor):
            w = src
            if w is None:
                w = gm.graph.get_attr(param_name)
                w.meta["tensor_meta"] = _extract_tensor_metadata(p)
            s = gm.graph.call_module(self._names[param_name], (w,))
            s.meta["tensor_meta"] = _extract_tensor_metadata(p)
        self._result.inserted.append(s.name)
        return s

    def _rewrite_module(self, node: fx.Node, m: nn.Module, cfg: SparsityConfig) -> None:
        gm = self._gm
        weight = self._masked(f"{node.target}.weight", cfg, node, 1)
        bias = None if m.bias is None else get_attr_before(gm, f"{node.target}.bias", m.bias, node)
        call_as_functional(gm, self._plan, node, m, weight, bias)
        self._result.modified = True

    def _rewrite_leaf(self, node: fx.Node, m: nn.Module, cfg: SparsityConfig) -> None:
        """A leaf module with weights: its own forward, on masked weights."""
        gm = self._gm
        weights = {w: self._masked(f"{node.target}.{w}", cfg, node, 1) for w in _leaf_weights(m)}
        with gm.graph.inserting_before(node):
            mod = gm.graph.get_attr(node.target)
            new = gm.graph.call_function(torch.func.functional_call,
                                         (mod, weights, tuple(node.args), dict(node.kwargs)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self._plan.replace_node(node.name, new)
        self._result.modified = True

    def _wrap_use(self, user: fx.Node, w: fx.Node, cfg: SparsityConfig, in_dim: int) -> None:
        s = self._masked(str(w.target), cfg, user, in_dim)
        user.replace_input_with(w, s)
        if not w.users:
            self._gm.graph.erase_node(w)
        self._result.modified = True
