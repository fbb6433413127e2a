"""CAMP dual precision: the `dual_precision` policy key (SPEC section 5).

What a rule selects:
- a residual add (`match: {op: add}`, or by name: `layer1.*`): its block,
  found by graph analysis, becomes a dual block: a low path (1-bit) and a
  high path (4-bit) that share the float weights, with separate norms, and a
  per-sample gate;
- a Conv/Linear module outside any dual block: quantized at `high_bits`
  (weights and its input activation), so the rest of the network is the
  4-bit network CAMP starts from.
The first and the last weight layer of the network (and their inputs) stay
full precision whatever the rules say, as the authors' configs keep them.
A block without a residual add is named by its module path in the
settings (`blocks: [stage2]`): that module's forward, if it reads one tensor
and has one output.

Settings (`settings: {dual_precision: {...}}`): `mode` sp (supervised,
hard gate with straight-through gradient), rl (sampled gates, REINFORCE term
through the controller's extra_loss) or fixed (no gates: every selected
layer, blocks included, at high_bits; the all-4-bit and all-1-bit networks);
alpha, gamma, w_rl of the RL reward; pre_gate (the gate reads the block
input instead of the low path's output).

Finding blocks. The FX graph becomes a networkx DiGraph of its data flow
(parameters left out); a residual add t's block input s is t's immediate
dominator (every path from the inputs to t passes s), and the block is
every node on a path from s to t (descendants of s that are ancestors of t),
plus a ReLU that is the add's only user. A block is kept only if nothing
inside it is used outside it except its end, it reads nothing from outside
but s and parameters, and it holds a Conv. That covers ResNet basic and
bottleneck blocks (with or without a downsample conv on the shortcut) and
inverted residuals, and any user block of the same shape.

The rewritten block in gm.code (post-gate):

    fxc_dual_layer1_0_low_layer1_0_conv1_in = self.fxc_dual_layer1_0.quant.low_a_layer1_0_conv1(relu)
    fxc_dual_layer1_0_low_layer1_0_conv1_w = self.fxc_dual_layer1_0.quant.low_w(layer1_0_conv1_weight)
    fxc_dual_layer1_0_low_layer1_0_conv1 = torch.conv2d(fxc_..._conv1_in, fxc_..._conv1_w, None, ...)
    fxc_dual_layer1_0_low_layer1_0_bn1 = self.fxc_dual_layer1_0.low_norms.layer1_0_bn1(...)
    ...
    fxc_dual_layer1_0_gate = self.fxc_dual_layer1_0.gate(fxc_dual_layer1_0_low_relu_2)
    fxc_dual_layer1_0 = self.fxc_dual_layer1_0(fxc_dual_layer1_0_gate)
    fxc_dual_layer1_0_route_high = self.fxc_dual_layer1_0.route_high(relu, fxc_dual_layer1_0)
    fxc_dual_layer1_0_high_layer1_0_conv1_in = self.fxc_dual_layer1_0.quant.high_a_layer1_0_conv1(...)
    ...                                            # the high path uses layer1.0.bn1 itself
    fxc_dual_layer1_0_merge = self.fxc_dual_layer1_0.merge(fxc_dual_layer1_0_low_relu_2,
                                                           fxc_dual_layer1_0_high_relu_2, fxc_dual_layer1_0)

torch.compile sees a training forward as one graph (tested); routed eval
breaks the graph at the data-dependent split (nonzero) of each block.

The high path reads the original modules' parameters and norms, so a
CAMP model's state_dict holds the 4-bit model's names and `--init` from an
all-4-bit run fills it (the low norms start as copies of the loaded norms).
Runtime pieces: fxcompress/runtime/dual_precision.py; cost model:
fxcompress/bops.py; quantizers: fxcompress/quantizers/.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..bops import FULL, CostModel, LayerCost, node_macs
from ..config import ConfigError, check_range
from ..errors import BadInput
from ..kernels.binary_conv import binary_conv2d
from ..quantizers.dorefa import ActQuant, WeightQuant
from ..quantizers.pact import PactQuant
from ..runtime.dual_precision import DualBlock, DualPrecisionController, Gate, fill_low_norms
from .base import Pass, PassResult, add_submodule, fxc_name

#: the width relative energy is measured against (CAMP's all-4-bit network)
REFERENCE_BITS = 4

_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS_F = (F.relu, torch.relu, F.relu6, torch.relu_)
_RELUS_M = (nn.ReLU, nn.ReLU6)
_PASS_THROUGH_F = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten,
                   F.dropout, operator.getitem)
_PASS_THROUGH_M = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                   nn.Identity)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_LAYERS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, nn.Linear: F.linear}


@dataclass
class DualPrecisionConfig:
    #: the low path's weight and activation width (CAMP: 1)
    low_bits: int = 1
    #: the high path's width, and that of selected layers outside dual blocks (CAMP: 4)
    high_bits: int = 4
    #: activation quantizer: dorefa (clamp to [0, 1]) or pact (learned clip)
    quantizer: Literal["dorefa", "pact"] = "dorefa"
    #: PACT's initial clip
    pact_alpha: float = 6.0
    #: channels of the gate's 3x3 convolution
    gate_channels: int = 8
    #: the gate's 3x3 conv weight and input width (null: full precision; the 1x1
    #: head is always full precision, see runtime Gate); counted in the BOPs
    gate_bits: Optional[int] = 4

    def check(self):
        check_range("low_bits", self.low_bits, 1, 8)
        check_range("high_bits", self.high_bits, 1, 8)
        check_range("gate_bits", self.gate_bits, 1, 8)
        check_range("gate_channels", self.gate_channels, 1, 4096)
        if not (math.isfinite(self.pact_alpha) and self.pact_alpha > 0):
            raise ConfigError("pact_alpha", f"must be a positive number, got {self.pact_alpha}")


@dataclass
class DualPrecisionSettings:
    #: sp: supervised (hard gate, straight-through); rl: REINFORCE; fixed: no gates
    mode: Literal["sp", "rl", "fixed"] = "sp"
    #: RL reward for choosing the low path, split over the N gates (alpha / N each)
    alpha: float = 0.1
    #: RL discount
    gamma: float = 1.0
    #: weight of the RL term in the loss
    w_rl: float = 0.01
    #: the gate reads the block input (the low path then runs only for its samples)
    pre_gate: bool = False
    #: module paths whose whole forward is a block (for blocks without a residual
    #: add); block settings come from the rule that selects the block's first layer
    blocks: List[str] = field(default_factory=list)
    #: recipe option, not in the SPEC (0: off, the SPEC's recipe): the first
    #: warmup_epochs of training run each sample's block on the high path with
    #: probability warmup_high, else the low path, whatever the gate says; the
    #: gate does not learn then. From a 4-bit model the 1-bit path starts
    #: untrained; this trains it (and the shared weights for both widths)
    #: before the gate weighs the two paths.
    warmup_epochs: int = 0
    warmup_high: float = 0.5
    #: recipe option, not in the SPEC (false: the SPEC's loss): RL subtracts
    #: each gate's batch-mean return from the returns (REINFORCE baseline)
    rl_baseline: bool = False
    #: recipe option, not in the SPEC (0: off): weight of a per-block feature
    #: distillation term, mean((low - high.detach())^2) summed over blocks, in
    #: training (both paths run on every sample then)
    distill: float = 0.0
    #: recipe option, not in the SPEC (0: off, the SPEC's supervised loss): mode
    #: sp adds energy * (relative energy at the batch's gate choices) to the
    #: loss, straight-through to the gates (runtime/dual_precision.py)
    energy: float = 0.0
    #: recipe option, not in the SPEC (0: off, the whole energy is penalised):
    #: with energy > 0, penalise only the relative energy above this budget,
    #: energy * max(0, E - energy_target), so the gates stop at the budget
    #: (below it only the cross-entropy moves them, toward the 4-bit path)
    #: instead of drifting on toward all-low with every step
    energy_target: float = 0.0

    def check(self):
        check_range("warmup_epochs", self.warmup_epochs, 0, 100000)
        check_range("warmup_high", self.warmup_high, 0.0, 1.0)
        for name in ("alpha", "w_rl", "distill", "energy"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(name, f"must be a number >= 0, got {v}")
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("energy_target", self.energy_target, 0.0, 100.0)
        if self.energy_target > 0 and self.energy == 0:
            raise ConfigError("energy_target", "needs an energy weight > 0 (settings energy)")
        if self.energy > 0 and self.mode != "sp":
            raise ConfigError("energy", f"applies to mode sp (the RL reward is alpha), not mode {self.mode}")


@dataclass
class Region:
    """A residual block: input node, its nodes in graph order, its end node."""

    input: fx.Node
    nodes: List[fx.Node]
    end: fx.Node
    name: str = ""
    layers: List[fx.Node] = field(default_factory=list)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    if node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"):
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    return False


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module(gm, node)
    return m is not None and type(m) in _LAYERS


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS_F
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    m = _module(gm, node)
    return isinstance(m, _RELUS_M)


def _layer_reason(m: nn.Module) -> Optional[str]:
    if type(m) not in _LAYERS:
        return "dual_precision quantizes Conv1d/2d/3d and Linear modules (and blocks at residual adds)"
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode '{m.padding_mode}' is not supported (only 'zeros')"
    if m._forward_hooks or m._forward_pre_hooks:
        return "the module has forward hooks, which the functional rewrite would drop"
    return None


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def find_residual_blocks(gm: fx.GraphModule) -> Tuple[Dict[str, Region], Dict[str, str]]:
    """(regions by add node name, reasons by add node name for adds that are not blocks)."""
    g = nx.DiGraph()
    root = "__input__"
    g.add_node(root)
    nodes = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue  # parameters and constants: not data flow
        g.add_node(n.name)
        if n.op == "placeholder":
            g.add_edge(root, n.name)
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                g.add_edge(a.name, n.name)
    idom = nx.immediate_dominators(g, root)
    regions: Dict[str, Region] = {}
    reasons: Dict[str, str] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for t in gm.graph.nodes:
        if not _is_add(t):
            continue
        s_name = idom.get(t.name)
        if s_name is None or s_name == root:
            reasons[t.name] = "no single block input dominates this add"
            continue
        inside = (nx.descendants(g, s_name) & nx.ancestors(g, t.name)) | {t.name}
        members = sorted((nodes[x] for x in inside), key=order.__getitem__)
        end = t
        if len(t.users) == 1:
            (u,) = t.users
            if _is_relu(gm, u):
                members.append(u)
                end = u
        s = nodes[s_name]
        member_set = set(members)
        why = None
        for n in members:
            if n is not end and any(u not in member_set for u in n.users):
                why = f"'{n.name}' inside the block is also used outside it"
                break
            if any(a is not s and a not in member_set and a.op != "get_attr" for a in n.all_input_nodes):
                why = f"'{n.name}' inside the block reads a tensor from outside it"
                break
        layers = [n for n in members if _is_layer(gm, n)]
        if why is None and not any(isinstance(_module(gm, n), nn.modules.conv._ConvNd) for n in layers):
            why = "the block holds no Conv module"
        if why is None:
            bad = next((n for n in members if n.op == "call_function" and n.target in (F.conv2d, F.linear)), None)
            if bad is not None:
                why = f"'{bad.name}' is a functional conv/linear (only modules are rewritten)"
        if why:
            reasons[t.name] = why
            continue
        regions[t.name] = Region(s, members, end, _scope(t) or t.name, layers)
    return regions, reasons


def _in_module(node: fx.Node, prefix: str) -> bool:
    if node.op == "call_module" and (node.target == prefix or str(node.target).startswith(prefix + ".")):
        return True
    paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
    return any(p == prefix or p.startswith(prefix + ".") for p in paths)


def module_region(gm: fx.GraphModule, prefix: str) -> Region:
    """The nodes of module `prefix`'s forward as a block; ValueError says why not."""
    members = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
               and _in_module(n, prefix)]
    if not members:
        raise ValueError(f"no node of the graph belongs to module '{prefix}'")
    inside = set(members)
    inputs = {a for n in members for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    exits = [n for n in members if any(u not in inside for u in n.users)]
    if len(inputs) != 1:
        raise ValueError(f"module '{prefix}' reads {len(inputs)} tensors from outside; a block reads one")
    if len(exits) != 1 or exits[0] is not members[-1]:
        raise ValueError(f"module '{prefix}' has {len(exits)} outputs used outside; a block has one, its last node")
    layers = [n for n in members if _is_layer(gm, n)]
    if not any(isinstance(_module(gm, n), nn.modules.conv._ConvNd) for n in layers):
        raise ValueError(f"module '{prefix}' holds no Conv module")
    return Region(next(iter(inputs)), members, exits[0], prefix, layers)


def _weight_layers(gm: fx.GraphModule) -> List[fx.Node]:
    return [n for n in gm.graph.nodes if _is_layer(gm, n)]


class DualPrecisionPass(Pass):
    name = "dual_precision"
    key = "dual_precision"
    config = DualPrecisionConfig
    settings_config = DualPrecisionSettings
    # first: both paths' copies of a layer then carry its plan entry, and the
    # weight passes put their nodes on each path's weight (README "Composing
    # the methods"); activations wraps the final ops, these paths included
    before = ("scaled_grad", "sparsity", "activations")

    def __init__(self):
        self._cache: Optional[Tuple[int, Dict[str, Region], Dict[str, str], set]] = None

    def _analysis(self, gm: fx.GraphModule):
        if self._cache is None or self._cache[0] != id(gm.graph):
            regions, reasons = find_residual_blocks(gm)
            layers = _weight_layers(gm)
            ends = {layers[0].name, layers[-1].name} if layers else set()
            self._cache = (id(gm.graph), regions, reasons, ends)
        return self._cache[1:]

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        regions, reasons, ends = self._analysis(gm)
        if _is_add(node):
            if node.name in reasons:
                return "not a residual block: " + reasons[node.name]
            r = regions[node.name]
            if any(n.name in ends for n in r.layers):
                return "the block holds the first or last weight layer, which stays full precision"
            meta = r.end.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
                return "the gate needs the block's 4-D output shape (compile with example inputs)"
            return None
        m = _module(gm, node)
        if m is None:
            return "dual_precision acts on residual adds (blocks) and Conv/Linear modules"
        why = _layer_reason(m)
        if why:
            return why
        if node.name in ends:
            return "first/last weight layer: stays full precision"
        return None

    # ------------------------------------------------------------------ run
    def run(self, gm: fx.GraphModule, plan) -> PassResult:
        settings = getattr(self, "settings", None) or DualPrecisionSettings()
        self._cache = None
        regions, _, ends = self._analysis(gm)
        self._gm, self._plan, self._settings = gm, plan, settings
        result = self._result = PassResult()
        self._nonneg_nodes: set = set()
        self._replaced: Dict[fx.Node, fx.Node] = {}
        selected = list(plan.selected(self.key))
        costs: Dict[str, LayerCost] = {}
        reference = 0
        first_last = set(ends)
        for n in _weight_layers(gm):
            macs = node_macs(n, gm)
            if macs is None:
                raise BadInput("dual_precision: the cost model needs traced shapes; compile with example inputs")
            bits = FULL if n.name in first_last else REFERENCE_BITS
            reference += macs * bits * bits
            costs[n.name] = LayerCost(str(n.target), macs, FULL, FULL)
        blocks: Dict[str, DualBlock] = {}
        taken: set = set()
        dual = settings.mode != "fixed"
        fixed: List[Tuple[fx.Node, DualPrecisionConfig]] = []
        configs = {node: cfg for node, cfg in selected}
        for prefix in settings.blocks:
            try:
                r = module_region(gm, prefix)
            except ValueError as e:
                raise BadInput(f"dual_precision settings blocks: {e}") from None
            if any(n.name in first_last for n in r.layers):
                raise BadInput(f"dual_precision settings blocks: '{prefix}' holds the first or last weight layer, "
                               "which stays full precision")
            cfg = configs.get(r.layers[0]) or DualPrecisionConfig()
            taken.update(r.nodes)
            if dual:
                blocks[r.name] = self._rewrite_block(r, cfg, costs)
            else:
                fixed += [(n, cfg) for n in r.layers]
        for node, cfg in selected:
            if node.name in regions:
                r = regions[node.name]
                if any(n in taken for n in r.nodes):
                    result.notes.append(f"block {r.name}: overlaps an earlier block, left as it is")
                    continue
                taken.update(r.nodes)
                if dual:
                    blocks[r.name] = self._rewrite_block(r, cfg, costs)
                else:
                    fixed += [(n, cfg) for n in r.layers]
            elif node.op == "call_module":
                fixed.append((node, cfg))
        for node, cfg in fixed:
            if node.name in first_last or (dual and node in taken):
                continue
            costs[node.name].w_bits = costs[node.name].a_bits = cfg.high_bits
            self._quantize_layer(node, cfg)
        layers = [c for c in costs.values() if c.part != "dual"]
        for b in blocks.values():
            layers += b._costs
        cost = CostModel(layers, reference, settings.pre_gate)
        if blocks:
            gm._register_load_state_dict_pre_hook(fill_low_norms, with_module=True)
        if result.modified:
            result.controllers["dual_precision"] = DualPrecisionController(
                blocks, cost, settings.mode, settings.alpha, settings.gamma, settings.w_rl,
                settings.warmup_epochs, settings.warmup_high, settings.rl_baseline,
                settings.distill, settings.energy, settings.energy_target)
            if blocks:
                result.notes.append(f"{len(blocks)} dual block(s) ({settings.mode}"
                                    f"{', pre-gate' if settings.pre_gate else ''}): {', '.join(blocks)}")
            s = cost.summary()
            result.notes.append(f"energy relative to all-{REFERENCE_BITS}-bit: {s['relative_all_low']:.3f} "
                                f"(every gate low) .. {s['relative_all_high']:.3f} (every gate high)")
        return result

    # ------------------------------------------------------------------ helpers
    def _nonneg(self, node: fx.Node) -> bool:
        """Whether a tensor is known >= 0 (a ReLU output, or pooled from one):
        then activations quantize on [0, 1], else on [-1, 1]."""
        gm = self._gm
        for _ in range(16):
            if node.name in self._nonneg_nodes or _is_relu(gm, node):
                return True
            m = _module(gm, node)
            if (node.op == "call_function" and node.target in _PASS_THROUGH_F) or isinstance(m, _PASS_THROUGH_M) \
                    or (node.op == "call_method" and node.target in ("flatten", "view", "reshape")):
                if not node.args or not isinstance(node.args[0], fx.Node):
                    return False
                node = node.args[0]
                continue
            return False
        return False

    def _act_quant(self, cfg: DualPrecisionConfig, bits: int, signed: bool) -> nn.Module:
        if cfg.quantizer == "pact":
            return PactQuant(bits, cfg.pact_alpha, signed)
        return ActQuant(bits, signed)

    def _layer_call(self, node: fx.Node, x: fx.Node, aq_target: str, wq_target: str, name: str,
                    binary: bool = False) -> fx.Node:
        """F.conv*/F.linear(aq(x), wq(weight), bias, ...) for module node `node`;
        `binary`: a 2-d conv becomes binary_conv2d (kernels/binary_conv.py)."""
        gm = self._gm
        m = gm.get_submodule(node.target)
        g = gm.graph
        qa = g.create_node("call_module", aq_target, (x,), name=name + "_in")
        w = g.get_attr(f"{node.target}.weight")
        qw = g.create_node("call_module", wq_target, (w,), name=name + "_w")
        bias = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
        fn = _LAYERS[type(m)]
        if binary and fn is F.conv2d:
            fn = binary_conv2d
        args = (qa, qw, bias) if fn is F.linear else (qa, qw, bias, m.stride, m.padding, m.dilation, m.groups)
        new = g.create_node("call_function", fn, args, name=name)
        new.meta = dict(node.meta)
        self._result.inserted += [qa.name, qw.name, new.name]
        # the input quantizer keeps its float input for the clamp's backward:
        # compressed like the layer's own saved input
        self._inherit(node, qa, keys=("activations",))
        return new

    def _inherit(self, src: fx.Node, new: fx.Node, keys: Optional[Tuple[str, ...]] = None) -> None:
        """`new`, a copy of `src` in a path (or a node of src's block), takes
        src's plan entry less this pass's treatment (only `keys` if given), so
        the passes after this one (scaled_grad, sparsity, activations) treat
        both paths as they would have treated src. README "Composing the
        methods" lists what each does with a copy."""
        e = self._plan.entries.get(src.name)
        if e is None:
            return
        kept = {k: v for k, v in e.treatments.items() if k != self.key and (keys is None or k in keys)}
        if not kept:
            return
        self._plan.entries[new.name] = dataclasses.replace(
            e, name=new.name, rules=list(e.rules), treatments=kept, skipped=dict(e.skipped),
            effective={k: dict(v) for k, v in e.effective.items() if k in kept})

    def _quantize_layer(self, node: fx.Node, cfg: DualPrecisionConfig) -> None:
        gm = self._gm
        x = node.args[0] if node.args else node.kwargs["input"]
        signed = not (isinstance(x, fx.Node) and self._nonneg(x))
        aname = fxc_name(gm, self.name, str(node.target), "a")
        add_submodule(gm, aname, self._act_quant(cfg, cfg.high_bits, signed))
        wname = fxc_name(gm, self.name, str(node.target), "w")
        add_submodule(gm, wname, WeightQuant(cfg.high_bits))
        self._result.inserted += [aname, wname]
        with gm.graph.inserting_before(node):
            new = self._layer_call(node, x, aname, wname, fxc_name(gm, self.name, node.name))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        self._plan.replace_node(node.name, new)
        self._result.modified = True

    def _copy_path(self, r: Region, block: DualBlock, bname: str, path: str, bits: int, x_in: fx.Node,
                   cfg: DualPrecisionConfig) -> fx.Node:
        """The region's ops again, reading x_in, at `bits` (low path: own norms)."""
        gm, g = self._gm, self._gm.graph
        env: Dict[fx.Node, fx.Node] = {r.input: x_in}
        wq = f"{path}_w"
        if wq not in block.quant:
            block.quant[wq] = WeightQuant(bits)
        for n in r.nodes:
            name = f"{bname}_{path}_{n.name}"
            if n in r.layers:
                src = n.args[0] if n.args else n.kwargs["input"]
                key = f"{path}_a_{_key(n.target)}"
                signed = not self._nonneg(src)
                block.quant[key] = self._act_quant(cfg, bits, signed)
                # a DoReFa 1-bit input on 1-bit weights: {0, 1} x {-s, s}, a popcount in CPU inference
                binary = bits == 1 and cfg.quantizer == "dorefa" and not signed
                env[n] = self._layer_call(n, env.get(src, src), f"{bname}.quant.{key}", f"{bname}.quant.{wq}", name,
                                          binary)
                self._inherit(n, env[n])
                continue
            target = n.target
            m = _module(gm, n)
            if path == "low" and isinstance(m, _NORMS):
                key = _key(n.target)
                if key not in block.low_norms:
                    block.low_norms[key] = copy.deepcopy(m)
                    block._norm_sources[key] = str(n.target)
                target = f"{bname}.low_norms.{key}"
            args = fx.map_arg(n.args, lambda a: env.get(a, a))
            kwargs = fx.map_arg(n.kwargs, lambda a: env.get(a, a))
            new = g.create_node(n.op, target, args, kwargs, name=name, type_expr=n.type)
            new.meta = dict(n.meta)
            env[n] = new
            self._inherit(n, new)
            self._result.inserted.append(new.name)
        return env[r.end]

    def _rewrite_block(self, r: Region, cfg: DualPrecisionConfig, costs: Dict[str, LayerCost]) -> DualBlock:
        gm, g = self._gm, self._gm.graph
        st = self._settings
        # the block input may be the end of a block rewritten just before: its merge now
        r.input = self._replaced.get(r.input, r.input)
        bname = fxc_name(gm, self.name.split("_")[0], r.name)
        gate_in_node = r.input if st.pre_gate else r.end
        shape = tuple(gate_in_node.meta["tensor_meta"].shape)
        gate = Gate(shape[1], cfg.gate_channels, cfg.gate_bits, signed=not self._nonneg(gate_in_node))
        block = DualBlock(r.name, gate, st.mode, st.pre_gate)
        add_submodule(gm, bname, block)
        self._result.inserted.append(bname)
        with g.inserting_before(r.end):
            if st.pre_gate:
                probs = g.create_node("call_module", f"{bname}.gate", (r.input,), name=f"{bname}_gate")
                m = g.create_node("call_module", bname, (probs,), name=bname)
                xl = g.create_node("call_module", f"{bname}.route_low", (r.input, m), name=f"{bname}_route_low")
                low = self._copy_path(r, block, bname, "low", cfg.low_bits, xl, cfg)
            else:
                low = self._copy_path(r, block, bname, "low", cfg.low_bits, r.input, cfg)
                probs = g.create_node("call_module", f"{bname}.gate", (low,), name=f"{bname}_gate")
                m = g.create_node("call_module", bname, (probs,), name=bname)
            xh = g.create_node("call_module", f"{bname}.route_high", (r.input, m), name=f"{bname}_route_high")
            high = self._copy_path(r, block, bname, "high", cfg.high_bits, xh, cfg)
            out = g.create_node("call_module", f"{bname}.merge", (low, high, m), name=f"{bname}_merge")
        out.meta = dict(r.end.meta)
        self._result.inserted += [probs.name, m.name, xh.name, out.name] + ([xl.name] if st.pre_gate else [])
        # the gate and the merge save activations too (the gate its input, the
        # merge both paths' outputs): compressed as the block's own nodes are
        src = next((n for n in [r.end, *reversed(r.nodes)]
                    if "activations" in getattr(self._plan.entries.get(n.name), "treatments", {})), None)
        if src is not None:
            self._inherit(src, probs, keys=("activations",))
            self._inherit(src, out, keys=("activations",))
        if self._nonneg(r.end):
            self._nonneg_nodes.add(out.name)
        r.end.replace_all_uses_with(out)
        self._replaced[r.end] = out
        for n in reversed(r.nodes):
            g.erase_node(n)
        # cost: both paths of every layer, and the gate
        block._costs = []
        for n in r.layers:
            c = costs[n.name]
            c.part = "dual"
            for part, bits in (("low", cfg.low_bits), ("high", cfg.high_bits)):
                block._costs.append(LayerCost(c.name, c.macs, bits, bits, part, r.name))
        gb = cfg.gate_bits or 32
        h, w = (shape[2] + 1) // 2, (shape[3] + 1) // 2
        block._costs.append(LayerCost(f"{bname}.gate.conv", cfg.gate_channels * shape[1] * 9 * h * w, gb, gb,
                                      "gate", r.name))
        # the head reads gb-bit features with full-precision weights (Gate's docstring)
        block._costs.append(LayerCost(f"{bname}.gate.fc", cfg.gate_channels * 2, 32, gb, "gate", r.name))
        self._result.modified = True
        return block


def _key(target) -> str:
    return str(target).replace(".", "_")
