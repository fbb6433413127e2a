"""AC-GC compressed activations: the `activations` policy key.

Every selected node `y = op(*args)` becomes

    y = fxc_save(self.fxc_act_<node>, '<op>: <what is stored>', *args)

so `gm.code` says which ops store their saved tensors compressed and how,
and `print(gm)` shows each node's full settings (the fxc_act_* submodules).
The op runs unchanged; only what autograd keeps for its backward is stored
packed (fxcompress/runtime/activations.py and the files it names). Per op kind a rule says how:

  conv, linear   quantize the input (fixed bits, zvc, or AutoQuant's conv bound)
  bn             quantize the input (fixed, zvc, or AutoQuant's BatchNorm bound)
  relu           1-bit mask of the result;  hardtanh (ReLU6): 1-bit range mask
  maxpool        argmax as the offset inside the window; input: shape only
  shape          average pools: the input's shape only
  dropout        (its bool mask is stored at 1 bit by every rule)
  quant          any other op: whatever it saves is quantized at fixed bits;
                 under `auto` no formula applies: the width is measured at
                 statistics steps (runtime/probe.py), `bits` until then, and
                 PassResult.notes names these nodes
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput
from ..kernels.binary_conv import binary_conv2d
from ..runtime.activations import SaveSpec, fxc_save
from ..runtime.activations_config import ActivationsConfig, ActivationsSettings
from ..runtime.autoquant import AutoQuantController
from ..runtime.ledger import Ledger
from .base import Pass, PassResult, add_submodule, fxc_name


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.modules.batchnorm._BatchNorm,)
_POOL_SHAPE = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveAvgPool3d)
_FN_RULES = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.linear: "linear", binary_conv2d: "conv",
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "hardtanh", F.hardtanh: "hardtanh",
    F.max_pool2d: "maxpool", F.avg_pool2d: "shape", F.adaptive_avg_pool2d: "shape",
    F.avg_pool1d: "shape", F.adaptive_avg_pool1d: "shape", F.batch_norm: "bn",
    F.dropout: "dropout",
}
_METHOD_RULES = {"relu": "relu", "relu_": "relu"}
#: ops whose backward needs nothing saved (or only shapes): no rewrite needed
_NOTHING_SAVED = {operator.add, operator.sub, operator.iadd, torch.add, torch.flatten, torch.cat, operator.getitem,
                  torch.reshape, torch.transpose, torch.permute, operator.neg, getattr}
_NOTHING_SAVED_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "size", "dim",
                          "add", "add_", "expand", "squeeze", "unsqueeze", "chunk", "split", "__getitem__"}


def _rule(node: fx.Node, gm: fx.GraphModule) -> Tuple[str, str, dict]:
    """(rule, op description, geometry) for a node."""
    geom: dict = {}
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        name = type(m).__name__
        if isinstance(m, _CONV):
            geom["stride"] = tuple(m.stride)
            return "conv", name, geom
        if isinstance(m, nn.Linear):
            return "linear", name, geom
        if isinstance(m, _BN):
            return "bn", name, geom
        if isinstance(m, nn.ReLU):
            return "relu", name, geom
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
            geom.update(min_val=float(m.min_val), max_val=float(m.max_val))
            return "hardtanh", name, geom
        if isinstance(m, nn.MaxPool2d) and not m.return_indices and not m.ceil_mode:
            geom.update(_pool_geom(m.kernel_size, m.stride, m.padding, m.dilation))
            return "maxpool", name, geom
        if isinstance(m, _POOL_SHAPE):
            return "shape", name, geom
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return "dropout", name, geom
        return "quant", name, geom
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        rule = _FN_RULES.get(node.target, "quant")
        if rule == "conv":
            stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
            geom["stride"] = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
        if rule == "hardtanh":
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            if node.target is F.relu6:
                lo, hi = 0.0, 6.0
            if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
                return "quant", name, geom
            geom.update(min_val=float(lo), max_val=float(hi))
        if rule == "maxpool":
            a, kw = list(node.args), node.kwargs

            def arg(i, k, d):
                return a[i] if len(a) > i else kw.get(k, d)

            ks = arg(1, "kernel_size", None)
            st = arg(2, "stride", None) or ks
            if arg(5, "ceil_mode", False) or arg(6, "return_indices", False) or not isinstance(ks, (int, tuple, list)):
                return "quant", name, geom
            geom.update(_pool_geom(ks, st, arg(3, "padding", 0), arg(4, "dilation", 1)))
        return rule, name, geom
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target, "quant"), f".{node.target}()", geom
    return "quant", str(node.target), geom


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_geom(k, s, p, d) -> dict:
    return {"kernel": _pair(k), "stride": _pair(s if s is not None else k), "padding": _pair(p),
            "dilation": _pair(d)}


def _saves_nothing(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _NOTHING_SAVED
    if node.op == "call_method":
        return node.target in _NOTHING_SAVED_METHODS
    return False


def _data_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on a graph input (activations, not weights)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def describe(rule: str, cfg: ActivationsConfig, op: str) -> str:
    if cfg.masks and rule == "relu":
        what = "1-bit mask"
    elif cfg.masks and rule == "hardtanh":
        what = "1-bit range mask"
    elif cfg.masks and rule == "maxpool":
        what = "window index, input shape only"
    elif cfg.masks and rule == "shape":
        what = "input shape only"
    elif rule == "dropout":
        what = "1-bit mask"
    else:
        bound = {"bn": "BN bound", "conv": "conv bound", "linear": "conv bound", "quant": "measured"}.get(rule)
        auto = cfg.mode == "auto" and bound is not None
        what = f"auto bits ({bound})" if auto else f"{cfg.bits}-bit"
        what += " zvc" if cfg.zvc else ""
        what += f" per-{cfg.granularity}" + (f"({cfg.group_size})" if cfg.granularity == "group" else "")
        what += f" {cfg.rounding}"
    return f"{op}: {what}"


class ActivationsPass(Pass):
    name = "activations"
    key = "activations"
    config = ActivationsConfig
    settings_config = ActivationsSettings
    settings: ActivationsSettings

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        if node.op not in ("call_module", "call_function", "call_method"):
            return "activations apply to ops (module, function and method calls)"
        if node.op == "call_function" and node.target is fxc_save:
            return "already a compressed save"
        produced = node.meta.get("type")
        if isinstance(produced, type) and issubclass(produced, (int, float, bool, str, type(None), torch.Size,
                                                                torch.dtype, torch.device)):
            return f"produces {produced.__name__}, not a tensor (shape arithmetic, asserts)"
        if _saves_nothing(node):
            return f"'{node.target.__name__ if callable(node.target) else node.target}' saves nothing for backward"
        return None

    def run(self, gm: fx.GraphModule, plan) -> PassResult:
        res = PassResult()
        ledger = Ledger()
        data = _data_nodes(gm)
        specs: List[SaveSpec] = []
        fallback: Dict[str, List[str]] = {}
        groups: Dict[str, List[str]] = {}  # auto conv/linear nodes by their input node
        eps: Dict[str, float] = {}  # their eps_bits: one budget per group
        for node, cfg in plan.selected(self.key):
            rule, op, geom = _rule(node, gm)
            if cfg.mode == "auto" and rule not in ("conv", "linear", "bn", "relu", "hardtanh", "maxpool", "shape",
                                                   "dropout"):
                fallback.setdefault(op, []).append((node.name, cfg.bits))
            if node.op == "call_module":
                fn, method = None, None
                weight_args: Tuple[int, ...] = ()
            elif node.op == "call_function":
                fn, method = node.target, None
                weight_args = tuple(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a not in data)
            else:
                fn, method = None, node.target
                weight_args = tuple(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a not in data)
            spec_name = fxc_name(gm, "act", node.name)
            spec = SaveSpec(node.name, op, rule, cfg, fn=fn, method=method, weight_args=weight_args,
                            geom=geom, ledger=ledger, first=not specs)
            add_submodule(gm, spec_name, spec)
            specs.append(spec)
            with gm.graph.inserting_before(node):
                spec_node = gm.graph.get_attr(spec_name)
                args = list(node.args)
                if node.op == "call_module":
                    args = [gm.graph.get_attr(node.target)] + args
                new = gm.graph.call_function(fxc_save, (spec_node, describe(rule, cfg, op), *args),
                                             dict(node.kwargs))
            new.meta = dict(node.meta)
            if node in data:  # later nodes reading this one still see an activation, not a weight
                data.add(new)
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            node.replace_all_uses_with(new)
            old = node.name
            gm.graph.erase_node(node)
            new.name = fxc_name(gm, "save", old)
            plan.replace_node(old, new)
            res.inserted += [spec_name, new.name]
            res.modified = True
            if cfg.mode == "auto" and rule in ("conv", "linear"):
                groups.setdefault(src.name if src is not None else old, []).append(old)
                eps[old] = cfg.eps_bits
        if not specs:
            return res
        for op, named in sorted(fallback.items()):
            names = [n for n, _ in named]
            bits = "/".join(str(b) for b in sorted({b for _, b in named}))
            shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
            res.notes.append(f"activations: no AutoQuant bound for {op} ({len(names)} node(s): {shown}); "
                             f"width measured at statistics steps, fixed {bits} bits until then")
        res.notes.append(f"activations: {len(specs)} node(s) store their saved tensors packed")
        for members in groups.values():
            if len({eps[n] for n in members}) > 1:
                # the group's input is stored once, under one budget: the first
                # member's eps_bits would silently decide for all of them
                raise BadInput("activations: " + ", ".join(f"{n} (eps_bits {eps[n]:g})" for n in members)
                               + " read one input, stored once under one error bound; give them the same eps_bits")
        ctrl = AutoQuantController(specs, list(groups.values()), self.settings)
        res.controllers["activations"] = ctrl
        return res
