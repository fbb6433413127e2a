"""PSGD position-based scaled gradients: the `scaled_grad` policy key.

Every selected weight gets a node between itself and its use:

    fxc_scaled_grad_layer1_0_conv1 = self.fxc_scaled_grad_layer1_0_conv1(layer1_0_conv1_weight)
    conv2d_3 = torch.conv2d(relu_1, fxc_scaled_grad_layer1_0_conv1, None, (1, 1), (1, 1), (1, 1), 1)

identity in forward, backward scales the gradient (fxcompress/runtime/scaled_grad.py).
Which nodes take it:
- call_module Conv1d/2d/3d and Linear: the module call becomes the functional
  call (F.conv*/F.linear with the module's own hyper-parameters) whose weight
  reads the parameter through a get_attr and the fxc_ node. The module stays
  in the graph module and owns its parameters, so state_dict names are the
  original model's.
- call_function F.conv*/F.linear whose weight is a get_attr of a parameter,
  and get_attr parameter nodes feeding such a call as its weight.
One ScaledGrad module per parameter, shared by every use of it.

Policy key choice: the scale is `lambda_s` (the authors' flag name, and
`lambda` is a Python keyword that a dataclass field cannot be); a policy
that writes `lambda` gets "did you mean 'lambda_s'".

First/last rule (authors' first_last_quant): the first and the last weight
layer in graph order use `first_last_bits` (default 8) when `bits` < 4.
To keep them full precision as the authors' first_last_quant=0 does, opt
them out with a later rule (`scaled_grad: null`).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..quantizers.dorefa import WeightQuant
from ..runtime.scaled_grad import ScaledGrad, ScaledGradController, ScaledGradGroup
from ..runtime.scaled_grad_config import ScaledGradConfig
from .base import (MODULE_FN, WEIGHT_FNS, Pass, PassResult, add_submodule, call_as_functional, fxc_name,
                   get_attr_before, param_of, weight_arg)

def weight_use(node: fx.Node, gm: fx.GraphModule) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(consumer, get_attr) of the weight of functional conv/linear `node`:
    the get_attr of a parameter and the node that reads it, which is `node`
    itself or, when dual_precision ran first, the weight quantizer between
    them (`conv(x, quant(get_attr w))`): the scale then goes on the float
    weight, before the quantizer (README "Composing the methods")."""
    consumer, w = node, weight_arg(node)
    for _ in range(4):
        if not isinstance(w, fx.Node):
            return None
        if w.op == "get_attr":
            return (consumer, w) if param_of(gm, w.target) is not None else None
        if w.op != "call_module" or not isinstance(gm.get_submodule(w.target), WeightQuant) or not w.args:
            return None
        consumer, w = w, w.args[0]
    return None


def _module_reason(m: nn.Module) -> Optional[str]:
    base = next((c for c in MODULE_FN if type(m) is c or (isinstance(m, c) and type(m).forward is c.forward)),
                None)
    if base is None:
        return "scaled_grad acts on the weights of Conv1d/2d/3d and Linear (this module's forward is another)"
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode '{m.padding_mode}' is not supported by scaled_grad (only 'zeros')"
    if m._forward_hooks or m._forward_pre_hooks:
        return "the module has forward hooks, which rewriting it into a functional call would drop"
    if not isinstance(getattr(m, "weight", None), nn.Parameter):
        return "the module has no weight parameter"
    return None


def _functional_reason(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    if weight_use(node, gm) is None:
        return "the weight of this call is not a parameter read by get_attr"
    return None


class ScaledGradPass(Pass):
    name = "scaled_grad"
    key = "scaled_grad"
    config = ScaledGradConfig
    # the activation pass turns conv/linear calls into fxc_save calls, where
    # this pass would no longer find the weight it scales
    before = ("activations",)

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        if node.op == "call_module":
            return _module_reason(gm.get_submodule(node.target))
        if node.op == "call_function" and node.target in WEIGHT_FNS:
            return _functional_reason(node, gm)
        if node.op == "get_attr":
            if param_of(gm, node.target) is None:
                return "not a parameter"
            if not any(u.op == "call_function" and u.target in WEIGHT_FNS and weight_arg(u) is node
                       for u in node.users):
                return "this parameter is not the weight of a conv/linear call"
            return None
        return "scaled_grad acts on Conv/Linear weights (call_module, F.conv*/F.linear, or their get_attr weight)"

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _weight_layers(gm: fx.GraphModule) -> List[str]:
        """Weight parameter names of all conv/linear layers, in graph order
        (what first/last means), whether the policy selects them or not."""
        names: List[str] = []
        for n in gm.graph.nodes:
            if n.op == "call_module" and _module_reason(gm.get_submodule(n.target)) is None:
                names.append(f"{n.target}.weight")
            elif n.op == "call_function" and n.target in WEIGHT_FNS and _functional_reason(n, gm) is None:
                names.append(str(weight_use(n, gm)[1].target))
        return names

    @classmethod
    def _first_last_roles(cls, gm: fx.GraphModule) -> Dict[str, str]:
        order = cls._weight_layers(gm)
        return {order[0]: "first", order[-1]: "last"} if order else {}

    def effective(self, gm: fx.GraphModule, plan) -> Dict[str, Dict[str, Any]]:
        """Plan nodes whose width the first/last rule changes: node name ->
        {bits, role} (what plan tables show; run() applies the same rule)."""
        roles = self._first_last_roles(gm)
        out: Dict[str, Dict[str, Any]] = {}
        for node, cfg in plan.selected(self.key):
            if node.op == "call_module":
                weight = f"{node.target}.weight"
            elif node.op == "call_function":
                weight = str(weight_use(node, gm)[1].target)
            else:
                weight = str(node.target)
            role = roles.get(weight, "")
            bits = cfg.width(role)
            if bits != cfg.bits:
                out[node.name] = {"bits": bits, "role": role}
        return out

    def run(self, gm: fx.GraphModule, plan) -> PassResult:
        result = PassResult()
        self._gm, self._plan, self._result = gm, plan, result
        self._modules: Dict[str, ScaledGrad] = {}
        self._names: Dict[str, str] = {}
        self._params: Dict[str, nn.Parameter] = {}
        self._roles = self._first_last_roles(gm)
        for node, cfg in list(plan.selected(self.key)):
            if getattr(node, "_erased", False):  # a get_attr an earlier rewrite here replaced
                continue
            if node.op == "call_module":
                self._rewrite_module(node, cfg)
            elif node.op == "call_function":
                consumer, w = weight_use(node, gm)
                self._wrap_use(node, w, cfg, consumer)
            else:  # get_attr: every conv/linear use of it as a weight
                for user in list(node.users):
                    if user.op == "call_function" and user.target in WEIGHT_FNS and weight_arg(user) is node:
                        self._wrap_use(user, node, cfg)
        fl = sorted({f"{n} ({m.bits} bits)" for n, m in self._modules.items() if m.role})
        if fl:
            result.notes.append("first/last layer: " + ", ".join(fl))
        starts = sorted({m.start_step for m in self._modules.values() if m.start_step > 0})
        if starts:
            result.notes.append(f"gradients pass unscaled until optimizer step {', '.join(map(str, starts))} (start_step)")
        if self._modules:
            self._group()
            result.controllers["scaled_grad"] = ScaledGradController(self._modules, self._params)
        return result

    def _group(self) -> None:
        """One ScaledGradGroup node for all treated parameters, right after the
        inputs; each per-parameter node then reads its weight from it (and is
        the identity): all ranges are updated and all gradients scaled by a few
        batched ops per step instead of a set of small ops per weight
        (runtime/scaled_grad.py)."""
        gm = self._gm
        names = list(self._modules)
        gname = fxc_name(gm, self.name)
        add_submodule(gm, gname, ScaledGradGroup([self._modules[n] for n in names]))
        self._result.inserted.append(gname)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        items = {}
        with gm.graph.inserting_before(first):
            ws = []
            for n in names:
                w = gm.graph.get_attr(n)
                w.meta["tensor_meta"] = _extract_tensor_metadata(self._params[n])
                ws.append(w)
            grp = gm.graph.call_module(gname, tuple(ws))
            grp.meta["tensor_meta"] = tuple(w.meta["tensor_meta"] for w in ws)
            for i, (n, w) in enumerate(zip(names, ws)):
                it = gm.graph.call_function(operator.getitem, (grp, i))
                it.meta["tensor_meta"] = w.meta["tensor_meta"]
                items[self._names[n]] = it
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target in items and node.args[0] is not items[node.target]:
                old = node.args[0]
                node.replace_input_with(old, items[node.target])
                if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
                    gm.graph.erase_node(old)

    def _scaled(self, param_name: str, cfg: ScaledGradConfig, anchor: fx.Node, layer_weight: str) -> fx.Node:
        """A get_attr of the parameter followed by its ScaledGrad node, inserted
        before `anchor`. `layer_weight` names the layer's weight, which decides
        the first/last rule (a bias follows its layer's width)."""
        gm = self._gm
        mod = self._modules.get(param_name)
        if mod is None:
            # the module keeps the node's config; its width follows the role
            mod = ScaledGrad(param_name, cfg, self._roles.get(layer_weight, ""))
            name = fxc_name(gm, self.name, param_name)
            add_submodule(gm, name, mod)
            self._names[param_name] = name
            self._result.inserted.append(name)
            self._modules[param_name] = mod
            self._params[param_name] = param_of(gm, param_name)
        p = self._params[param_name]
        with gm.graph.inserting_before(anchor):
            w = gm.graph.get_attr(param_name)
            w.meta["tensor_meta"] = _extract_tensor_metadata(p)
            s = gm.graph.call_module(self._names[param_name], (w,))  # fx names it after the target
            s.meta["tensor_meta"] = w.meta["tensor_meta"]
        if s.name not in self._result.inserted:
            self._result.inserted.append(s.name)
        return s

    def _rewrite_module(self, node: fx.Node, cfg: ScaledGradConfig) -> None:
        gm = self._gm
        m = gm.get_submodule(node.target)
        wname = f"{node.target}.weight"
        weight = self._scaled(wname, cfg, node, wname)
        bias = None
        if m.bias is not None:
            if cfg.bias:
                bias = self._scaled(f"{node.target}.bias", cfg, node, wname)
            else:
                bias = get_attr_before(gm, f"{node.target}.bias", m.bias, node)
        call_as_functional(gm, self._plan, node, m, weight, bias)
        self._result.modified = True

    def _wrap_use(self, user: fx.Node, w: fx.Node, cfg: ScaledGradConfig,
                  consumer: Optional[fx.Node] = None) -> None:
        """The conv/linear `user`'s weight `w` (a get_attr) read through the
        scale; `consumer` is the node reading w (user, or a weight quantizer)."""
        consumer = consumer or user
        param_name = str(w.target)
        s = self._scaled(param_name, cfg, consumer, param_name)
        consumer.replace_input_with(w, s)
        if cfg.bias:
            b = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
            if isinstance(b, fx.Node) and b.op == "get_attr" and param_of(self._gm, b.target) is not None:
                user.replace_input_with(b, self._scaled(str(b.target), cfg, user, param_name))
                if not b.users:
                    self._gm.graph.erase_node(b)
        if not w.users:
            self._gm.graph.erase_node(w)  # the original get_attr, now read through the new one
        self._result.modified = True
