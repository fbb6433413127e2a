"""torch.compile support: what a compiled CompressedModel runs.

Two parts.

Activations. In eager mode every `fxc_save` node runs its op inside Python
`saved_tensors_hooks` (runtime/activations.py). Dynamo cannot trace Python
hooks: each such node would be a graph break, and the packs would run as
Python between compiled pieces. This torch version inlines *ambient* hooks
given as `torch.fx.GraphModule`s (pytorch PR 150032): AOT autograd traces the
pack hook once per saved intermediate of the compiled graph into the
forward's epilogue and the unpack hook into the backward's prologue, so what
the forward hands to the backward is the packed tensors. `ActivationHooks`
are such hooks, written as plain tensor code (per-channel fixed-point codes
packed several to a byte, bool masks 8 to a byte), so inductor generates and
fuses the pack and unpack kernels. `CompressedModel.forward` enters them
around the compiled call when the model was built with a `backend`.

What they cover, and why it differs from eager:
- they apply to every intermediate the compiled graph saves for backward
  (AOT's "donated" buffers: never parameters, inputs or outputs), which is
  the set inductor's partitioner chose (it may recompute cheap ops instead
  of saving them), not the per-node set of the eager graph; so they need one
  setting for all compressed nodes (checked: `uniform_settings`);
- bool tensors (the ReLU masks inductor saves itself) are stored at 1 bit;
  float tensors of >= 2 dims and `min_numel` elements at `bits` per element
  (widths that do not divide 8 are stored in the next that does: 3 -> 4);
  integers (max-pool offsets) and small tensors as they are;
- zero-value compression, AutoQuant and policies whose nodes have
  different settings take the second kind of hooks below.

Per-node settings (`SpecHooks`). Every `fxc_save` region is annotated while
dynamo traces it (torch.fx.traceback.annotate: the node name travels in the
meta of every aten node the region makes, through AOT autograd). The pack
hook is told which forward-graph node it stores (AOT's hook context), finds
the region that saves it as eager does (the op that reads it as an input,
else the op that made it) and calls two torch.library custom ops:
`fxcompress::pack_saved` runs that node's eager SaveSpec.pack (its rule,
bits, zvc, AutoQuant widths from the budget the controller set at its last
step, the ledger's byte accounting) and returns a one-element handle;
`fxcompress::unpack_saved` decodes it. The packed object lives in a table
outside the graph while the handle (what autograd saves) lives. A save its
node keeps as it is (decided by dtype and shape) stays in the graph, no
op call; what a pack may and may not hold of its input under inductor's
buffer reuse: pack_saved. Why custom
ops and not plain tensor code: the stored sizes depend on the data (the
non-zeros, the widths picked from max|x_c| each step), and the widths on a
budget that changes at statistics steps; traced, either would be a
recompile per step or data-dependent shapes through the saved tensors.
Opaque, they run the C/Triton kernels eager runs (inductor fuses nothing
into them). Statistics steps (AutoQuant's `collect`, a few per hundred) run
the eager graph module: their tensor hooks and replays are Python.

PSGD. `ScaledGradGroup.forward` takes `scaled_grad_compiled` under
compile: plain tensor code, guard-free (runtime/scaled_grad.py says what).
"""
from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..kernels import actpack
from .ledger import _node_stats
from .stored_forms import _Kept, _Mask


def _channel_view(x: torch.Tensor) -> torch.Tensor:
    """x (float32, contiguous) as (A, C, B), one scale per C: channel dim 1 for
    >= 3 dims (N, C, ...), the last dim for 2-D (tokens, features), as eager."""
    if x.dim() >= 3:
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(1, -1, x.shape[-1]).transpose(1, 2)


def _pack_slices(codes: torch.Tensor, bits: int) -> list:
    """int32 codes < 2^bits as actpack stores them: one uint8 tensor per
    power-of-two slice of the code (actpack.slices), 8 // width per byte."""
    flat = codes.reshape(-1)
    out = []
    for w, sh in actpack.slices(bits):
        per = 8 // w
        part = (flat >> sh) & ((1 << w) - 1)
        pad = (-part.numel()) % per
        if pad:
            part = torch.cat([part, part.new_zeros(pad)])
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * w
        out.append((part.view(-1, per) << shifts).sum(1, dtype=torch.int32).to(torch.uint8))
    return out


def _unpack_slices(parts, bits: int, n: int) -> torch.Tensor:
    codes = None
    for (w, sh), p in zip(actpack.slices(bits), parts):
        shifts = torch.arange(8 // w, dtype=torch.int32, device=p.device) * w
        c = ((p.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << w) - 1)).reshape(-1)[:n] << sh
        codes = c if codes is None else codes | c
    return codes


def pack_tensor(x: torch.Tensor, bits: int, stochastic: bool, min_numel: int):
    """The pack hook's body: plain tensor code, traced once per saved tensor.

    Floating tensors: eager's fixed-width arithmetic (kernels/rounding.py: per
    channel k_c = L / (max|x_c| + EPS), L = 2^b - 1, and when the tensor has
    a negative value L and offset 2^(b-1) - 1 (nearest, 0 on the grid) or
    (2^b - 1)/2 (stochastic, all 2^b codes), so the grid holds the channel's
    extremes; code = trunc(clamp(x k_c + r + offset)), r = 0.5 or a
    uniform draw), with the sign test as a tensor instead of a Python branch.
    Stochastic draws: actpack's counter-based hash of the element index,
    keyed by a hash of the tensor's own bits (a random op cannot sit in the
    inlined hook: inductor's RNG handling does not reach it), so every step
    gets new draws without RNG state in the graph."""
    if x.dtype == torch.bool:
        return ("mask", _pack_slices(x.to(torch.int32), 1), tuple(x.shape))
    if not x.is_floating_point() or x.dim() < 2 or x.numel() < min_numel:
        return x
    xf = x.detach().to(torch.float32).contiguous()
    x3 = _channel_view(xf)
    amax = x3.abs().amax(dim=(0, 2))
    signed = xf.amin() < 0
    half = actpack.grid(bits, actpack.SIGNED_ALL if stochastic else actpack.SIGNED_ZERO)[0]
    top = float((1 << bits) - 1)
    levels = torch.where(signed, half, top)
    k = (levels / (amax + actpack.EPS)).view(1, -1, 1)
    v = x3 * k
    if stochastic:
        idx = torch.arange(x3.numel(), dtype=torch.int64, device=x.device).view(x3.shape)
        key = xf.view(torch.int32).to(torch.int64).sum() & 0xFFFFFFFF
        v = v + actpack.uniform_reference(idx, key)
    else:
        v = v + 0.5
    off = torch.where(signed, half, 0.0)
    # signed round to nearest tops out at 2^b - 2 by itself (|x| k < L), so
    # one float bound serves every grid (a tensor bound broke tracing)
    codes = (v + off).clamp(0.0, top).to(torch.int32)
    # A ReLU's output: its backward reads x > 0, which a small positive value
    # rounded to code 0 would lose; as eager stores the ReLU's 1-bit mask,
    # the mask is stored beside the codes and restores the sign on unpack.
    mask = _pack_slices((x3 > 0).to(torch.int32), 1) if _is_relu_output(x) else None
    return ("quant", _pack_slices(codes, bits), 1.0 / k, off, tuple(x.shape), tuple(x3.shape), bits, x.dtype, mask)


def _is_relu_output(x: torch.Tensor) -> bool:
    """Whether the saved tensor is a ReLU's result. Inside AOT autograd's
    inlining the saved node is known (its target); a hook called at run time
    (backend "eager") sees the data instead: no negative value."""
    try:
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context

        ctx = _get_saved_tensor_hook_context()
    except ImportError:  # another torch: no node information; the codes alone
        return False
    if ctx is None:
        return not torch.compiler.is_compiling() and bool(x.min() >= 0)
    node = ctx.get("_node")
    aten = torch.ops.aten
    # ReLU's backward saves its result through a detach (or alias) of it
    while getattr(node, "target", None) in (aten.detach.default, aten.alias.default) and node.args:
        node = node.args[0]
    return getattr(node, "target", None) in (aten.relu.default, aten.relu_.default)


def unpack_tensor(obj):
    """The unpack hook's body."""
    if torch.is_tensor(obj):
        return obj
    if obj[0] == "mask":
        _, parts, shape = obj
        n = 1
        for s in shape:
            n *= s
        return _unpack_slices(parts, 1, n).to(torch.bool).view(shape)
    _, parts, kinv, off, shape, shape3, bits, dtype, mask = obj
    n = shape3[0] * shape3[1] * shape3[2]
    codes = _unpack_slices(parts, bits, n)
    v = (codes.to(torch.float32) - off).view(shape3) * kinv
    if mask is not None:  # a positive value decoded as 0 becomes the smallest positive float
        pos = _unpack_slices(mask, 1, n).view(shape3) > 0
        v = torch.where(pos, v.clamp(min=torch.finfo(torch.float32).tiny), v)
    if len(shape) < 3:
        v = v.transpose(1, 2)
    return v.reshape(shape).to(dtype)


def _python_hook_body(x):
    """Stands in the hook GraphModule's graph (never run: `forward` is the hook)."""
    return x


def _hook_graph_module(fn) -> fx.GraphModule:
    """A GraphModule whose call runs `fn` (its own graph is a placeholder):
    AOT autograd re-traces the hook for each saved tensor, so Python branches
    on the tensor's dtype and shape in `fn` become a specialised graph each."""
    g = fx.Graph()
    x = g.placeholder("x")
    # AOT autograd's cache keys a graph by its hooks' *graphs*; ours are
    # Python (bits, spec ids, the routing), invisible there: a cache hit
    # could reuse another setting's packing. A call of a plain Python
    # function makes AOT bypass its cache for these graphs (inductor's own
    # cache still keys the inlined result).
    g.output(g.call_function(_python_hook_body, (x,)))
    gm = fx.GraphModule(nn.Module(), g)
    gm.forward = fn  # instance attribute: what nn.Module.__call__ runs
    return gm


# The fixed-width hooks' CPU route when FXC_COMPILE_C_PACK is unset (see
# c_path_available; README, torch.compile, says why).
C_PACK_DEFAULT = True


def c_path_available() -> bool:
    """Whether the fixed-width hooks route CPU tensors through the C kernels
    (fxcompress::pack_saved) instead of inductor's loops for the plain
    tensor code: FXC_COMPILE_C_PACK=1 on, =0 off, unset C_PACK_DEFAULT; and
    only where CPU tensors take actpack's C loops in eager
    (kernels/dispatch.py: FXC_CPU_FAST on, the library built, Triton not
    forced onto the CPU)."""
    from ..kernels.actpack_cpu import lib
    from ..kernels.cbuild import cpu_fast_enabled
    from ..kernels.dispatch import force_triton

    env = os.environ.get("FXC_COMPILE_C_PACK", "")
    if env == "0" or (env != "1" and not C_PACK_DEFAULT):
        return False
    if force_triton() and os.environ.get("TRITON_INTERPRET", "") == "1":
        return False
    return bool(cpu_fast_enabled()) and lib() is not None


class ActivationHooks:
    """The pack/unpack GraphModule pair for one fixed-bit setting (see the
    module docstring). `enter()` returns the saved_tensors_hooks context;
    the same two objects every step, so dynamo's guard on them holds.

    `c_path` (CPU with actpack's C loops built): a saved CPU tensor that a
    compressed node stores goes through `fxcompress::pack_saved` /
    `unpack_saved` (SpecHooks' route: the node's eager SaveSpec, i.e. the
    C kernels) instead of the plain tensor code. Measured (BENCHMARKS.md,
    torch.compile (b)): inductor's C++ loops for the plain code made the
    compiled resnet50 2-bit step 1.71x the compiled uncompressed one, against
    1.30x in eager with the C kernels. CUDA tensors keep the plain code
    (inductor emits Triton and fuses it with the ops around it), as does
    every tensor when there is no C compiler. Decided per saved tensor while
    AOT autograd traces the hook (its device is static there): no guard."""

    def __init__(self, bits: int, stochastic: bool, min_numel: int, c_path: bool = False):
        self.bits, self.stochastic, self.min_numel = int(bits), bool(stochastic), int(min_numel)
        self.c_path = bool(c_path)

        def pack(x):
            if not torch.compiler.is_compiling() and x.requires_grad and x.is_leaf:
                return x  # eager backend: parameters reach the hook too; never packed
            if compared_in_backward(_hook_context()):
                return x  # (see there: a max's input located by equality)
            if self.c_path and x.device.type == "cpu":
                obj = spec_pack(x)
                if obj is not x:
                    return obj
                # a saved tensor no compressed node stores (not in any
                # region): the plain code, as without the C path
            return pack_tensor(x, self.bits, self.stochastic, self.min_numel)

        def unpack(obj):
            if isinstance(obj, tuple) and obj[0] == "spec":
                return spec_unpack(obj)
            return unpack_tensor(obj)

        self.pack = _hook_graph_module(pack)
        self.unpack = _hook_graph_module(unpack)

    def enter(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __repr__(self) -> str:
        return (f"ActivationHooks(bits={self.bits}, rounding={'stochastic' if self.stochastic else 'nearest'}, "
                f"min_numel={self.min_numel}{', CPU: C kernels via fxcompress::pack_saved' if self.c_path else ''})")


# ---------------------------------------------------------- per-node settings

ANNOTATION = "fxc_save"  # key of the region annotation (node meta "custom")
_SPECS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_STORE: Dict[int, Any] = {}
_KEYS = itertools.count(1)
_IDS = itertools.count(1)


def register_spec(spec) -> int:
    """A process-wide id for a SaveSpec (what the custom ops name it by)."""
    sid = getattr(spec, "compile_id", None)
    if sid is None or _SPECS.get(sid) is not spec:
        sid = next(_IDS)
        spec.compile_id = sid
        _SPECS[sid] = spec
    return sid


def _forget(key: int) -> None:
    _STORE.pop(key, None)


@torch.library.custom_op("fxcompress::pack_saved", mutates_args=())
def pack_saved(x: torch.Tensor, spec_id: int, relu_id: int) -> torch.Tensor:
    """Store `x` as node `spec_id` stores it in eager mode; a handle to it.

    relu_id (0: none): the ReLU whose result x is; its 1-bit mask is stored
    first, as eager's ReLU node stores it, so that the consumer's AutoQuant
    pack shares it (stores only the non-zeros) and unpack keeps the sign.

    x's buffer is inductor's: once this op (its last reader as far as
    inductor knows) has run, inductor reuses it for a later result, writing
    in place with no version bump. What is stored must not depend on it
    afterwards. Two things did (wrong weight gradients under inductor, NaN
    on ResNet-20; aot_eager reuses no buffer):
    - the ledger's registry, which shares a pack between saves of one
      storage, keyed by address, geometry and version: a reused buffer of
      the same shape matched an earlier save's key, so the consumer of a
      ReLU got BatchNorm's pack of the convolution output that had sat in
      that buffer. Under compile every saved tensor reaches this op once,
      so sharing across calls has nothing to share: each call packs in a
      registry of its own (the ReLU mask and its consumer still share
      inside the call);
    - a kept form (`_Kept`, the tensor itself) holds x: it gets a copy.
    Every other stored form is new tensors only (codes, scales, channel
    indices, masks, shapes; tests/test_torch_compile.py checks each form
    against an overwritten input), so no other copy is made."""
    spec = _SPECS[spec_id]
    with _own_registry(spec._ledger):
        relu = _SPECS[relu_id].pack(x) if relu_id else None
        obj = spec.pack(x)
    key = next(_KEYS)
    h = torch.tensor([key], dtype=torch.int64)
    _STORE[key] = (_private(obj, x), _private(relu, x))
    weakref.finalize(h, _forget, key)  # the packed object lives as long as autograd keeps the handle
    return h


class _own_registry:
    """The ledger's share-by-storage registry (and its counted sets) empty
    for one pack_saved call, the forward's restored after (pack_saved)."""

    __slots__ = ("ledger", "saved")

    def __init__(self, ledger):
        self.ledger = ledger

    def __enter__(self):
        lg = self.ledger
        if lg is not None:
            self.saved = (lg.registry, lg.seen, lg.counted)
            lg.registry, lg.seen, lg.counted = {}, set(), set()

    def __exit__(self, *exc):
        if self.ledger is not None:
            self.ledger.registry, self.ledger.seen, self.ledger.counted = self.saved
        return False


def _private(obj, x: torch.Tensor):
    """A kept form that holds x's storage, with a copy in its place."""
    if isinstance(obj, _Kept) and obj.t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return _Kept(obj.t.clone())
    return obj


@pack_saved.register_fake
def _(x, spec_id, relu_id):
    return x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("fxcompress::unpack_saved", mutates_args=())
def unpack_saved(h: torch.Tensor, spec_id: int, relu_id: int, shape: List[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor a handle stores, contiguous."""
    obj, relu = _STORE[int(h[0])]
    v = _SPECS[spec_id].unpack(obj)
    if isinstance(obj, _Kept):
        # the stored copy itself: the compiled backward may write into an
        # op's output buffer, and a second backward unpacks it again
        v = v.clone(memory_format=torch.contiguous_format)
    if relu is not None and v.is_floating_point():
        v = _keep_positive(v, relu, _SPECS[relu_id].unpack(relu))
    return v.reshape(shape).to(dtype).contiguous()


def _keep_positive(v: torch.Tensor, relu, m: torch.Tensor) -> torch.Tensor:
    """v (a decoded ReLU result) with the elements the ReLU's mask `m`
    marks as > 0 kept > 0: one tensor serves the ReLU's backward (x > 0)
    and the consumer's, and a small positive value whose code is 0 must
    not read as 0 there.

    With the mask decoded to 1.0 / 0.0 (a `_Mask` of a float ReLU) in v's
    dtype: max(v, m * tiny) in place (v and m are this call's own decoded
    tensors), the same as where(m > 0, max(v, tiny), v) since v >= 0 where
    m is 0 (a ReLU's zeros decode to exactly 0 on the unsigned grid, or
    are exact under zvc); two passes without allocations where that was
    four with three."""
    tiny = torch.finfo(v.dtype).tiny
    m = m.reshape(v.shape)
    if isinstance(relu, _Mask) and relu.on == 1.0 and relu.off == 0.0 and m.dtype == v.dtype \
            and v.is_contiguous() and m.is_contiguous():
        return torch.maximum(v, m.mul_(tiny), out=v)
    return torch.where(m > 0, v.clamp(min=tiny), v)


@unpack_saved.register_fake
def _(h, spec_id, relu_id, shape, dtype):
    return h.new_empty(shape, dtype=dtype)


def _no_grad_backward(ctx, grad):
    return None, None, None  # a stored form carries no gradient (hooks see detached tensors)


pack_saved.register_autograd(_no_grad_backward)
unpack_saved.register_autograd(lambda ctx, grad: (None, None, None, None, None))


def _region(node) -> Optional[int]:
    return (node.meta.get("custom") or {}).get(ANNOTATION)


_STORING_RULES = ("relu", "hardtanh", "maxpool", "shape")  # rules whose stored form is not values


def specs_for(node, bw_graph=None) -> Tuple[Optional[Any], Optional[Any]]:
    """(spec that stores the saved fx node, ReLU spec whose result it is).

    As eager decides: the nodes that save a tensor are those whose backward
    reads it (the annotation reaches the backward graph's nodes too). A
    node that needs its values (a convolution's input, BatchNorm's, a
    softmax's output) stores it by its rule and settings; a ReLU whose
    result it is adds its 1-bit mask (shared, as eager shares it). When
    only mask-like rules read it (a ReLU result no convolution reads, a
    max-pool's indices), that rule's form."""
    aten = torch.ops.aten
    saved_name = node.name
    while getattr(node, "target", None) in (aten.detach.default, aten.alias.default) and node.args:
        node = node.args[0]
    made = _region(node)
    savers = []
    if bw_graph is not None:
        for p in bw_graph.find_nodes(op="placeholder"):
            if p.name == saved_name:
                for u in p.users:
                    r = _region(u)
                    if r is not None and r in _SPECS and r not in savers:
                        savers.append(r)
    if not savers and made in _SPECS:
        savers = [made]
    if not savers:
        return None, None
    values = [r for r in savers if _SPECS[r].rule not in _STORING_RULES]
    relu = None
    if made in savers and _SPECS[made].rule == "relu" and _SPECS[made].settings.masks:
        relu = _SPECS[made]
    if values:
        return _SPECS[min(values)], relu
    return _SPECS[min(savers)], None


_EQ_DEPTH = 3  # how far from the saved tensor the backward's comparison may sit


def compared_in_backward(ctx) -> bool:
    """Whether the backward tests the saved tensor for equality (within a few
    ops of it): the gradient of max/amax/min locates the extremes by
    `x == max(x)` and divides by their count. AOT's partitioner may save
    the tensor the reduction read (DoReFa's tanh(w), whose |.| is compared
    with max|tanh(w)|) and recompute the comparison in the backward; from a
    quantized copy nothing equals the stored maximum, the count is 0 and the
    gradient NaN (the CAMP gate's weights under `all`, resnet18). Such a
    tensor is saved exact."""
    bw = ctx.get("_bw_graph") if ctx else None
    if bw is None:
        return False
    aten = torch.ops.aten
    name = ctx["_node"].name
    frontier = [p for p in bw.find_nodes(op="placeholder") if p.name == name]
    for _ in range(_EQ_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.target in (aten.eq.Tensor, aten.eq.Scalar):
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def kept_in_graph(spec, x) -> bool:
    """Whether spec_pack leaves saved tensor x in the graph: its node stores
    it as it is (see there)."""
    return spec._form(x) == "kept"


# {saved fx node: (spec's node, bytes)} of the graph being traced: the saves
# spec_pack leaves kept (set by CompiledCall around its compiled call)
_KEPT_SINK: Optional[Dict[str, Tuple[str, int]]] = None


def spec_pack(x):
    """Pack hook body: the saved tensor as its node's SaveSpec stores it, by
    the custom op; x itself when no compressed node stores it (or the
    backward compares it for equality: compared_in_backward)."""
    ctx = _hook_context()
    if ctx is None or not torch.is_tensor(x):
        return x  # not inside AOT's inlining (a run-time call): nothing to name the node by
    if compared_in_backward(ctx):
        return x
    spec, relu = specs_for(ctx["_node"], ctx.get("_bw_graph"))
    if spec is None:
        return x
    if kept_in_graph(spec, x):
        # stored as it is (1-D norm statistics, below min_numel, integers):
        # decided by dtype and shape alone, so here, at trace time. Left in
        # the graph, inductor keeps it as any saved tensor (no op call, no
        # copy); its bytes are counted after each compiled forward
        # (CompiledCall), as eager's ledger counts a kept save
        if _KEPT_SINK is not None:
            _KEPT_SINK[ctx["_node"].name] = (spec.node, x.numel() * x.element_size())
        return x
    if spec.rule == "maxpool" and x.dtype == torch.int64:
        _set_pool_width(spec, ctx["_node"])
    h = torch.ops.fxcompress.pack_saved(x, spec.compile_id, 0 if relu is None else relu.compile_id)
    return ("spec", h, spec.compile_id, 0 if relu is None else relu.compile_id, tuple(x.shape),
            tuple(x.stride()), x.dtype)


def spec_unpack(obj):
    if torch.is_tensor(obj):
        return obj
    _, h, sid, rid, shape, stride, dtype = obj
    v = torch.ops.fxcompress.unpack_saved(h, sid, rid, list(shape), dtype)
    if len(shape) and tuple(stride) != tuple(v.stride()):
        v = torch.empty_strided(shape, stride, dtype=dtype, device=v.device).copy_(v)
    return v


class SpecHooks:
    """Pack/unpack GraphModules that store each saved tensor by its node's
    own SaveSpec through the custom ops (module docstring)."""

    def __init__(self):
        self.pack = _hook_graph_module(spec_pack)
        self.unpack = _hook_graph_module(spec_unpack)

    def enter(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __repr__(self) -> str:
        return "SpecHooks(per-node SaveSpec through fxcompress::pack_saved / unpack_saved)"


def _hook_context():
    try:
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    except ImportError:
        return None
    return _get_saved_tensor_hook_context()


def _set_pool_width(spec, node) -> None:
    """A max-pool's window index needs its input's width (eager reads it in
    fxc_save; static under compile: read from the graph). The saved node
    is the pool's index output, or, where inductor's joint-graph passes
    lowered the pool to `_low_memory_max_pool_with_offsets`, the indices
    `_low_memory_max_pool_offsets_to_indices` rebuilds from its offsets:
    the pool node is found among the saved node's nearest inputs."""
    frontier, seen = [node], set()
    for _ in range(4):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            name = str(getattr(n, "target", ""))
            if "max_pool" in name and "with" in name and n.args and isinstance(n.args[0], fx.Node):
                val = n.args[0].meta.get("val")
                if torch.is_tensor(val):
                    spec.geom["in_w"] = int(val.shape[-1])
                    return
            nxt.extend(a for a in n.args if isinstance(a, fx.Node))
        frontier = nxt
    raise RuntimeError(f"fxcompress: no max-pool input width found for saved node {node.name!r} "
                       f"({node.target}); the window index needs it")


def uniform_settings(specs: Sequence[Any]) -> Tuple[Optional[Any], str]:
    """(settings, "") when every compressed node has one fixed-bit setting the
    compiled hooks can apply, else (None, why not)."""
    if not specs:
        return None, "no activation node is compressed"
    keyset = {(s.settings.mode, s.settings.bits, s.settings.zvc, s.settings.rounding, s.settings.min_numel)
              for s in specs}
    if len(keyset) != 1:
        return None, "the compressed nodes have different activation settings (compiled hooks take one)"
    st = specs[0].settings
    if st.mode == "auto":
        return None, "AutoQuant picks widths from Python-side statistics"
    if st.zvc:
        return None, "zero-value compression stores a data-dependent number of codes"
    return st, ""


def activation_hooks_for(gm: nn.Module) -> Tuple[Optional[Any], str]:
    """The compiled hooks for a rewritten graph module: the fused fixed-bit
    hooks when every compressed node has one fixed-bit setting, else the
    per-node SpecHooks (with why the fused ones do not apply)."""
    from .activations import SaveSpec

    specs = [m for m in gm.modules() if isinstance(m, SaveSpec)]
    if not specs:
        return None, ""
    st, why = uniform_settings(specs)
    c_path = st is not None and c_path_available()
    if st is None or c_path:
        for s in specs:
            register_spec(s)  # (the fixed-width hooks' CPU tensors take SpecHooks' route)
    if st is None:
        return SpecHooks(), why
    return ActivationHooks(st.bits, st.rounding == "stochastic", st.min_numel, c_path=c_path), ""


def compiled_save_ok(spec) -> bool:
    """fxc_save under dynamo: True when the op may run plain (the ambient
    compiled hooks store what it saves); False keeps the eager per-node hooks
    (a graph break)."""
    return getattr(spec, "compiled_hooks", False)


class CompiledCall:
    """What a compiled CompressedModel calls: torch.compile of the rewritten
    graph module, entered under the activation hooks when it trains.

    `dynamic=False` by default: every batch shape gets its own graph (a last
    smaller batch is one more compile, not dynamic shapes everywhere).
    A plain object, not a Module: the compiled wrapper must not add entries
    to the model's state_dict."""

    def __init__(self, gm: nn.Module, backend: str = "inductor", fullgraph: bool = False,
                 dynamic: Optional[bool] = False, mode: Optional[str] = None):
        from .activations import SaveSpec

        self.gm, self.backend = gm, backend
        self.hooks, self.hooks_reason = activation_hooks_for(gm)
        self.specs = [m for m in gm.modules() if isinstance(m, SaveSpec)]
        for m in self.specs:
            m.compiled_hooks = self.hooks is not None
        self.ledger = next((m._ledger for m in self.specs if m.first and m._ledger is not None), None)
        self.fn = torch.compile(gm, backend=backend, fullgraph=fullgraph, dynamic=dynamic, mode=mode)
        self.eager_calls = 0  # statistics steps run eager (counted for the report)
        self.kept: Dict[tuple, Dict[str, Tuple[str, int]]] = {}  # per input shapes: spec_pack's kept saves

    def __call__(self, *args, **kwargs):
        training = self.gm.training and torch.is_grad_enabled()
        if training and any(m.collect for m in self.specs):
            # AutoQuant's statistics step: tensor hooks and replays are
            # Python; the eager graph module runs it (no compile, no guard)
            self.eager_calls += 1
            return self.gm(*args, **kwargs)
        if self.hooks is not None and training:
            counts = self.ledger is not None and (isinstance(self.hooks, SpecHooks)
                                                  or getattr(self.hooks, "c_path", False))
            if counts:
                self.ledger.reset()  # eager's first node does this in fxc_save (traced away here)
            # one graph per input shapes (dynamic=False): the kept saves its trace recorded
            kept = self.kept.setdefault(_shapes_key(args, kwargs), {})
            global _KEPT_SINK
            outer, _KEPT_SINK = _KEPT_SINK, kept
            try:
                with self.hooks.enter(), _eager_saves():
                    out = self.fn(*args, **kwargs)
            finally:
                _KEPT_SINK = outer
            if counts:
                for node, nbytes in kept.values():
                    st = _node_stats(self.ledger, node)
                    st["fp32_bytes"] += nbytes
                    st["stored_bytes"] += nbytes
                    st["kept"] += nbytes
            return out
        return self.fn(*args, **kwargs)


def _eager_saves():
    """Inductor's partition of a graph under activation hooks: AOT's default
    partitioner, which saves for the backward what the forward computed, as
    eager does, instead of inductor's min-cut one, which saves fewer tensors
    and recomputes the rest in the backward from them. Recomputing from a
    quantized save is what eager never does: a ReLU's mask recomputed
    from its quantized BatchNorm input flips wherever rounding crosses 0,
    and resnet18 trained to NaN at 2 bits (BENCHMARKS.md, torch.compile
    (e)). Under compression the saves min-cut spares are packed small
    anyway. A config patch around the compiled call: the partition runs
    while the forward compiles, inside it (other backends ignore it)."""
    from torch._inductor import config

    from .eager_partition import PARTITIONER

    return config.patch(custom_partitioner_fn=PARTITIONER)


def _shapes_key(args, kwargs) -> tuple:
    def one(a):
        return (tuple(a.shape), a.dtype, a.device) if torch.is_tensor(a) else type(a).__name__

    return tuple(map(one, args)) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))
