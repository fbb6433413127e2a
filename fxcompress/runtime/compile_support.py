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
- zero-value compression and AutoQuant need sizes or widths that depend on
  the data (Python-side statistics); they stay on the eager per-node hooks,
  one graph break per compressed node (tools/bench_compile.py names them).

PSGD. `ScaledGradGroup.forward` takes `scaled_grad_compiled` under
compile: plain tensor code, guard-free (runtime/scaled_grad.py says what).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

_TINY = torch.finfo(torch.float32).tiny


def _storage_bits(bits: int) -> int:
    """Bits a code takes in the packed form: the smallest of 1, 2, 4, 8, 16 >= bits."""
    for b in (1, 2, 4, 8, 16):
        if bits <= b:
            return b
    raise ValueError(f"activation bits must be 1..16, got {bits}")


def _channel_view(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """x as (outer, channels, inner) for per-channel statistics: channel dim 1
    for >= 3 dims (N, C, ...), the last dim for 2-D (tokens, features), as eager."""
    if x.dim() >= 3:
        return x.reshape(x.shape[0], x.shape[1], -1), 1
    return x.reshape(1, x.shape[0], x.shape[1]).transpose(1, 2), 2


def _pack_codes(codes: torch.Tensor, sbits: int) -> torch.Tensor:
    """uint8 codes (< 2^sbits) flattened, 8 // sbits per byte (little end first)."""
    flat = codes.reshape(-1)
    per = 8 // sbits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * sbits
    return (g << shifts).sum(1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, sbits: int, n: int) -> torch.Tensor:
    per = 8 // sbits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * sbits
    g = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << sbits) - 1)
    return g.reshape(-1)[:n]


def pack_tensor(x: torch.Tensor, bits: int, stochastic: bool, min_numel: int):
    """The pack hook's body (plain tensor code, traced per saved tensor)."""
    if x.dtype == torch.bool:
        n = x.numel()
        return ("mask", _pack_codes(x.to(torch.uint8), 1), tuple(x.shape), n)
    if not x.is_floating_point() or x.dim() < 2 or x.numel() < min_numel or bits >= 16 and x.element_size() <= 2:
        return x
    sbits = _storage_bits(bits)
    if sbits >= 16:  # 9..16 bits: int16 codes
        sbits = 16
    xs = x.detach().float()
    v, cdim = _channel_view(xs)
    dims = [d for d in range(3) if d != cdim]
    mn = v.amin(dim=dims, keepdim=True)
    mx = v.amax(dim=dims, keepdim=True)
    top = float((1 << bits) - 1)
    scale = ((mx - mn) / top).clamp_min(_TINY)
    q = (v - mn) / scale
    if stochastic:  # unbiased: floor(q + u), u ~ U[0, 1)
        q = torch.floor(q + torch.rand_like(q))
    else:
        q = torch.round(q)
    q = q.clamp_(0, top)
    if sbits == 16:
        codes = q.to(torch.int32).to(torch.int16)  # 0..65535 wraps into int16, undone in unpack
        payload = codes
    else:
        payload = _pack_codes(q.to(torch.uint8), sbits)
    return ("quant", payload, mn, scale, tuple(x.shape), tuple(v.shape), cdim, sbits, x.dtype)


def unpack_tensor(obj):
    """The unpack hook's body."""
    if torch.is_tensor(obj):
        return obj
    kind = obj[0]
    if kind == "mask":
        _, packed, shape, n = obj
        return _unpack_codes(packed, 1, n).to(torch.bool).reshape(shape)
    _, payload, mn, scale, shape, vshape, cdim, sbits, dtype = obj
    if sbits == 16:
        q = payload.to(torch.int32) & 0xFFFF
    else:
        n = 1
        for s in vshape:
            n *= s
        q = _unpack_codes(payload, sbits, n)
    v = q.reshape(vshape).float() * scale + mn
    if cdim == 2:
        v = v.transpose(1, 2)
    return v.reshape(shape).to(dtype)


def _hook_graph_module(fn) -> fx.GraphModule:
    """A GraphModule whose call runs `fn` (its own graph is a placeholder):
    AOT autograd re-traces the hook for each saved tensor, so Python branches
    on the tensor's dtype and shape in `fn` become a specialised graph each."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(x)
    gm = fx.GraphModule(nn.Module(), g)
    gm.forward = fn  # instance attribute: what nn.Module.__call__ runs
    return gm


class ActivationHooks:
    """The pack/unpack GraphModule pair for one fixed-bit setting (see the
    module docstring). `enter()` returns the saved_tensors_hooks context;
    the same two objects every step, so dynamo's guard on them holds."""

    def __init__(self, bits: int, stochastic: bool, min_numel: int):
        self.bits, self.stochastic, self.min_numel = int(bits), bool(stochastic), int(min_numel)

        def pack(x):
            if not torch.compiler.is_compiling() and x.requires_grad and x.is_leaf:
                return x  # eager backend: parameters reach the hook too; never packed
            return pack_tensor(x, self.bits, self.stochastic, self.min_numel)

        self.pack = _hook_graph_module(pack)
        self.unpack = _hook_graph_module(unpack_tensor)

    def enter(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __repr__(self) -> str:
        return (f"ActivationHooks(bits={self.bits}, rounding={'stochastic' if self.stochastic else 'nearest'}, "
                f"min_numel={self.min_numel})")


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


def activation_hooks_for(gm: nn.Module) -> Tuple[Optional[ActivationHooks], str]:
    """The compiled hooks for a rewritten graph module, or (None, reason)
    when its activation nodes must keep the eager per-node hooks."""
    from .activations import SaveSpec

    specs = [m for m in gm.modules() if isinstance(m, SaveSpec)]
    if not specs:
        return None, ""
    st, why = uniform_settings(specs)
    if st is None:
        return None, why
    return ActivationHooks(st.bits, st.rounding == "stochastic", st.min_numel), ""


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
        self.hooks, self.eager_reason = activation_hooks_for(gm)
        for m in gm.modules():
            if isinstance(m, SaveSpec):
                m.compiled_hooks = self.hooks is not None
        self.fn = torch.compile(gm, backend=backend, fullgraph=fullgraph, dynamic=dynamic, mode=mode)

    def __call__(self, *args, **kwargs):
        if self.hooks is not None and self.gm.training and torch.is_grad_enabled():
            with self.hooks.enter():
                return self.fn(*args, **kwargs)
        return self.fn(*args, **kwargs)
