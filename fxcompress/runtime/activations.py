"""Compressed saves: what the activations pass's `fxc_save` nodes run.

Each rewritten node calls `fxc_save(spec, how, *args)`. The op runs inside
`torch.autograd.graph.saved_tensors_hooks`, scoped to that one call, so every
tensor autograd keeps for *this op's* backward goes through `spec.pack` and is
stored in packed form; backward calls `spec.unpack` to get it back. Nothing
else in the model is touched, and any op works, including ones we have no
rule for: whatever it saves is quantized.

What is stored, per saved tensor:
- parameters, buffers and anything computed from them alone (a masked or
  scaled weight): kept as they are (never compressed);
- tensors below `min_numel` elements, and 1-D tensors (a norm's saved mean
  and inverse std): kept (the bookkeeping would cost more, or they are not
  activations);
- bool tensors (dropout masks): 1 bit per element;
- rule "relu": the op's result, which backward only tests for > 0: a 1-bit
  mask; rule "hardtanh" (ReLU6): a 1-bit in-range mask, decoded to values
  with the same backward; rule "maxpool": the input is needed for its shape
  only, the int64 argmax indices become the position inside the pooling
  window (4 bits for 3x3); rule "shape" (average pools): shape only;
- every other floating tensor: quantized (fixed bits, zvc, or AutoQuant's
  per-channel bits), per channel or per group;
- under AutoQuant, a tensor that is a ReLU's output (the next convolution's
  input) stores only its non-zeros' codes: which elements are non-zero is
  the ReLU's 1-bit mask, already stored, so it is shared, not stored twice
  (actpack.PackedMixedZVC). Zeros are exact, so the conv bound's total
  error budget is spread over the non-zeros; and since every budget bounds
  a sum over the tensor, whole-bit rounding slack is spent by lowering the
  widths of the cheapest channels while the sum stays within the bound
  (spend_slack).

A storage saved by several ops (a ReLU output that the next convolution and
the downsample convolution both save) is packed once: packed objects are
shared through a registry keyed by storage, view geometry and version, whose
entries die with the source tensor (weakref.finalize), so a reused address
can never hit a stale entry, and with the forward (Ledger.reset), so the
same tensor object fed again is packed again.

On CPU with the C loops, AutoQuant's widths, grouping and codes of a saved
tensor take two C calls (kernels/auto_pack.py, PackedAuto: one code buffer
and one meta block), the same widths and bytes as the width rule and the
group packers one by one, which stay the path elsewhere (no compiler, CUDA).

Around it: runtime/ledger.py (the registry and byte counts a graph's specs
share), runtime/stored_forms.py (kept, shape-only, masks, window indices),
runtime/widths.py (AutoQuant's width rule), runtime/measure.py (measured
bytes), runtime/function_paths.py (export glue).

Accounting is measured, not estimated: per node, the bytes autograd would
have kept (each storage counted once, across the whole graph) and the bytes
of the packed tensors actually held.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import from_dict
from ..kernels import actpack
from .activations_config import ActivationsConfig
from .function_paths import _function_path, resolve_function
from .ledger import Ledger, _node_stats, _storage_key, shared_ledger
from .probe import keep_inputs, record_probe
from .sdpa_backend import sdpa_backend
from .statistics import record_statistics
from .stored_forms import (_decode_window_index, _encode_window_index, _Kept, _Mask, _nbytes, _ShapeOnly,
                           _WindowIndex)
from .widths import auto_bits


class SaveSpec(nn.Module):
    """One compressed node: its rule, settings, accounting, AutoQuant state.

    A submodule of the rewritten GraphModule (named fxc_act_<node>), so that
    printing the module shows every node's settings. It holds no parameters;
    AutoQuant's error budget lives here (`dx2`, set by the controller) and is
    saved in the controller's state, not here.
    """

    def __init__(self, node: str, op: str, rule: str, settings: ActivationsConfig, fn: Optional[Callable] = None,
                 method: Optional[str] = None, weight_args: Tuple[int, ...] = (), geom: Optional[dict] = None,
                 ledger: Optional[Ledger] = None, first: bool = False):
        super().__init__()
        self.node, self.op, self.rule, self.settings = node, op, rule, settings
        self._fn = fn            # call_function target (None: a module passed as first argument)
        self._method = method    # call_method name
        self.weight_args = tuple(weight_args)
        self.geom = geom or {}
        self._ledger = ledger
        self.first = first
        # AutoQuant: allowed squared error per element; None until the
        # controller has statistics (then `bits` is used)
        self.dx2: Any = None
        self.bn_terms: Optional[Dict[str, torch.Tensor]] = None
        self.collect = False
        self.snapshot: Dict[str, Any] = {}
        self.bits_seen: List[float] = []  # per forward: avg bits of the quantized tensors
        # AutoQuant, ops without a bound: the width measured by runtime/probe.py
        self.measured_bits: Optional[int] = None
        self._skip: set = set()
        self._attends: Optional[bool] = None  # run SDPA's math backend (sdpa_backend.py)

    def __getstate__(self):
        # deepcopy and pickle at any step: the width rule's caches inside
        # bn_terms (numpy arrays, the C path's ctypes pointer arrays: not
        # picklable) are dropped; widths.py rebuilds them on first use
        state = super().__getstate__()
        if state.get("bn_terms") is not None:
            state["bn_terms"] = {k: v for k, v in state["bn_terms"].items() if not k.startswith("_")}
        state["_skip"] = set()
        return state

    def extra_repr(self) -> str:
        s = self.settings
        what = {"relu": "1-bit mask", "hardtanh": "1-bit range mask", "maxpool": "window index, input shape only",
                "shape": "input shape only"}.get(self.rule)
        if what is None or not s.masks:
            what = ("auto bits" if s.mode == "auto" else f"{s.bits}-bit") + (" zvc" if s.zvc else "") + \
                   f" per-{s.granularity}" + (f"({s.group_size})" if s.granularity == "group" else "") + \
                   f" {s.rounding}"
        return f"node={self.node}, op={self.op}, rule={self.rule}: {what}"

    def fxc_constructor(self):
        """How fxcompress.export rebuilds this spec: `rebuild_save_spec` with
        literals only. The function is named by its dotted path (allow-listed
        namespaces), the settings as a dict, and the shared Ledger by a key
        given to it here once, so every spec of this graph names the same one.
        AutoQuant state (dx2, statistics) is the controller's, not exported."""
        ledger_key = None if self._ledger is None else self._ledger.export_key()
        kwargs = {"fn": None if self._fn is None else _function_path(self._fn, self.node),
                  "method": self._method, "weight_args": tuple(self.weight_args),
                  "geom": dict(self.geom), "ledger_key": ledger_key, "first": bool(self.first)}
        return rebuild_save_spec, (self.node, self.op, self.rule, asdict(self.settings)), kwargs

    # --- the hooks ------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        ledger = self._ledger
        st = _node_stats(ledger, self.node)
        if (t.requires_grad and t.is_leaf) or t.data_ptr() in self._skip:
            return _Kept(t)  # a parameter, buffer or weight-derived tensor: never compressed
        key = _storage_key(t)
        if key not in ledger.seen:
            ledger.seen.add(key)
            st["fp32_bytes"] += t.numel() * t.element_size()
            # once the tensor dies its address can be reused by another
            # tensor of the same shape: that one must be counted again
            weakref.finalize(t, ledger.seen.discard, key)
        form = self._form(t)
        rkey = key + (form,)
        hit = ledger.registry.get(rkey)
        if hit is not None:  # already stored by another save of this storage in this forward
            if id(hit) not in ledger.counted:
                ledger.counted.add(id(hit))
                st["stored_bytes"] += _nbytes(hit)
            return hit
        obj = self._encode(t, form, st, key)
        ledger.counted.add(id(obj))
        st["stored_bytes"] += _nbytes(obj)
        if not isinstance(obj, _Kept):
            ledger.registry[rkey] = obj
            reg = ledger.registry
            weakref.finalize(t, reg.pop, rkey, None)
        return obj

    def unpack(self, obj):
        if isinstance(obj, _Kept):
            return obj.t
        if isinstance(obj, _ShapeOnly):
            return torch.empty_strided(obj.shape, obj.stride, dtype=obj.dtype, device=obj.device)
        if isinstance(obj, _Mask):
            if obj.on is None:
                return actpack.unpack_mask(obj.packed)
            return actpack.unpack_mask_values(obj.packed, obj.on, obj.off, obj.dtype)
        if isinstance(obj, _WindowIndex):
            return _decode_window_index(obj)
        if isinstance(obj, actpack.PackedAuto):
            return actpack.auto_unpack(obj)
        if isinstance(obj, actpack.PackedZVC):
            return actpack.zvc_unpack(obj)
        if isinstance(obj, actpack.PackedMixed):
            return actpack.mixed_unpack(obj)
        if isinstance(obj, actpack.PackedMixedZVC):
            return actpack.mixed_zvc_unpack(obj)
        return actpack.unpack(obj)

    # --- choosing and making the stored form --------------------------------------
    def _form(self, t: torch.Tensor) -> str:
        s = self.settings
        if t.dtype == torch.bool:
            return "mask"
        if not t.is_floating_point():
            return "window" if (self.rule == "maxpool" and s.masks and t.dtype == torch.int64) else "kept"
        if s.masks and self.rule in ("maxpool", "shape"):
            return "shape"
        if t.numel() < s.min_numel or t.dim() < 2:
            # tiny, or 1-D: per-channel statistics a norm saves (mean, inv-std), not activations
            return "kept"
        if s.masks and self.rule == "relu":
            return "relu"
        if s.masks and self.rule == "hardtanh":
            return "hardtanh"
        return "quant"

    def _encode(self, t: torch.Tensor, form: str, st: Dict[str, float], key: Optional[tuple] = None,
                bits: Optional[int] = None):
        s = self.settings
        if form == "kept":
            st["kept"] += t.numel() * t.element_size()
            return _Kept(t)
        if form == "shape":
            return _ShapeOnly(t)
        if form == "mask":
            return _Mask(actpack.pack_mask(t), None, None, t.dtype)
        if form == "relu":
            # threshold_backward(grad, result, 0) only asks result > 0. The
            # next op's save of this tensor needs its statistics: taken in
            # the same read (one pass over the tensor instead of two)
            if t.dim() >= 3 and t.is_contiguous():
                t3 = actpack.view3(t, "channel")
                got = actpack.pack_mask_gt_stats(t3, t.shape)
                if got is not None:
                    return _Mask(got[0], 1.0, 0.0, t.dtype, (tuple(t3.shape),) + got[1:])
            return _Mask(actpack.pack_mask_gt(t, 0.0), 1.0, 0.0, t.dtype)
        if form == "hardtanh":
            lo, hi = self.geom.get("min_val", -1.0), self.geom.get("max_val", 1.0)
            # hardtanh_backward passes grad where lo < x < hi: any value inside does
            return _Mask(actpack.pack_mask((t > lo) & (t < hi)), 0.5 * (lo + hi), lo, t.dtype)
        if form == "window":
            return _encode_window_index(t, self.geom)
        x = t.contiguous()
        cdim = 1 if x.dim() >= 3 else -1
        x3 = actpack.view3(x, s.granularity, s.group_size, cdim)
        relu = None
        # a ReLU output whose mask is stored already: its statistics too
        mask = self._ledger.registry.get(key + ("relu",)) if key is not None and x.dim() >= 3 else None
        if not (isinstance(mask, _Mask) and mask.on == 1.0):
            mask = None
        cached = mask.stats if mask is not None and s.granularity == "channel" else None
        if cached is not None and cached[0] != tuple(x3.shape):
            cached = None
        if s.mode == "auto" and self.dx2 is not None and s.granularity == "channel":
            relu = mask
        if relu is not None:
            amax, mn, nnz_c = cached[1:] if cached is not None else actpack.stats_nnz(x3)
        else:
            amax, mn = cached[1:3] if cached is not None else actpack.stats(x3)
        signed = float(mn) < 0  # one read of the scalar, not a compare op and a read
        # stochastic rounding: one draw from torch's global generator per tensor,
        # so runs are reproducible and a resumed run (the driver restores the
        # generator) continues the same stream
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if s.rounding == "stochastic" else 0
        if s.mode == "auto" and self.dx2 is not None and s.granularity == "channel":
            # the C path: widths, groups and codes in two calls (kernels/auto_pack.py)
            zvc = relu is not None and not signed
            obj = None if (s.zvc and not zvc) else actpack.auto_pack(
                x3, amax, signed, self.dx2, self.bn_terms, s.max_bits, s.rounding, seed,
                nnz_c if zvc else None, relu.packed if zvc else None, spread=self.bn_terms is None, shape=t.shape)
            if obj is not None:
                st["quant_elements"] += t.numel()
                st["quant_bits"] += float(obj.code_bits())
                return obj
            if zvc:
                # a ReLU output: the ReLU already stores (t > 0) as its 1-bit
                # mask, so only the non-zeros are stored here (their codes)
                # and the mask is shared, not stored twice. Zeros are then
                # exact, so the bound's total squared error numel*dx2 is
                # spread over the nnz non-zeros only (conv/linear budget).
                nnz = float(nnz_c.sum())
                scale = t.numel() / nnz if (nnz and self.bn_terms is None) else 1.0
                bits_c = self.auto_bits(amax, signed, x3.shape[1], scale, counts=nnz_c)
                obj = actpack.mixed_zvc_pack(x3, bits_c, relu.packed, nnz_c, s.rounding, seed, amax,
                                             shape=t.shape)
                st["quant_elements"] += t.numel()
                # sum_c bits_c * nnz_c from the width groups (exact integers)
                st["quant_bits"] += float(obj.code_bits())
                return obj
            bits_c = self.auto_bits(amax, signed, x3.shape[1],
                                    counts=torch.full((x3.shape[1],), x3.shape[0] * x3.shape[2]))
            obj = (actpack.mixed_pack(x3, bits_c, s.rounding, seed, amax, signed, shape=t.shape)
                   if not s.zvc else actpack.zvc_pack(x3, int(bits_c.max()), s.rounding, seed, amax, signed,
                                                      shape=t.shape))
            nbits = float(obj.code_bits()) if isinstance(obj, actpack.PackedMixed) else 0.0  # zvc: below
        else:
            b = bits or (self.measured_bits if s.mode == "auto" and self.measured_bits else s.bits)
            obj = (actpack.zvc_pack(x3, b, s.rounding, seed, amax, signed, shape=t.shape) if s.zvc
                   else actpack.quant_pack(x3, b, s.rounding, seed, amax, signed, shape=t.shape))
            nbits = float(b * t.numel())
        if isinstance(obj, actpack.PackedZVC):
            nbits = float(obj.nnz * obj.bits + t.numel())
        st["quant_elements"] += t.numel()
        st["quant_bits"] += nbits
        return obj


    def auto_bits(self, amax: torch.Tensor, signed: bool, C: int, scale: float = 1.0,
                  counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-channel bits from this node's budget (runtime/widths.py)."""
        return auto_bits(amax, signed, C, self.dx2, self.bn_terms, self.settings.max_bits, scale, counts)

    # --- the call -----------------------------------------------------------------
    def call(self, args, kwargs):
        if self._fn is not None:
            return self._fn(*args, **kwargs)
        if self._method is not None:
            return getattr(args[0], self._method)(*args[1:], **kwargs)
        return args[0](*args[1:], **kwargs)



# graph entry

_NO_SKIP: frozenset = frozenset()


def fxc_save(spec: SaveSpec, how: str, *args, **kwargs):
    """Run one op with its saved tensors stored packed (`how` is for readers
    of gm.code: what this node stores, e.g. 'Conv2d: 2-bit per-channel')."""
    if not torch.is_grad_enabled():
        return spec.call(args, kwargs)  # evaluation: nothing is saved, the last figures stay
    if torch.compiler.is_compiling() and getattr(spec, "compiled_hooks", False):
        # the ambient compiled hooks store what it saves (runtime/compile_support.py);
        # the annotation names this node on the aten nodes its op makes
        # (attention: the math backend, as below)
        cid = getattr(spec, "compile_id", None)
        with sdpa_backend(spec, args):
            if cid is None:
                return spec.call(args, kwargs)
            with torch.fx.traceback.annotate({"fxc_save": cid}):
                return spec.call(args, kwargs)
    if spec.first:
        spec._ledger.reset()
    skip = set()
    if spec._fn is None and spec._method is None and isinstance(args[0], nn.Module):
        mod = args[0]
        if mod._modules:
            tensors = itertools.chain(mod.parameters(), mod.buffers())
        else:  # a leaf module (conv, norm): its own dicts, not the recursive generators
            tensors = itertools.chain(mod._parameters.values(), mod._buffers.values())
        for p in tensors:
            if p is not None:
                skip.add(p.data_ptr())
    for i in spec.weight_args:
        if i < len(args) and torch.is_tensor(args[i]):
            skip.add(args[i].data_ptr())
    # set per call, twice: past nn.Module.__setattr__ (its parameter, buffer
    # and submodule checks cost more than the rest of this wrapper)
    sd = spec.__dict__
    sd["_skip"] = skip
    if spec.rule == "maxpool":
        x = args[1] if spec._fn is None and spec._method is None else args[0]
        spec.geom["in_w"] = x.shape[-1]
    kept = None
    if spec.collect and spec.rule == "quant":
        kept = keep_inputs(args)  # before the call: an in-place op overwrites its input
    with torch.autograd.graph.saved_tensors_hooks(spec.pack, spec.unpack), sdpa_backend(spec, args):
        out = spec.call(args, kwargs)
    sd["_skip"] = _NO_SKIP
    if kept is not None:
        record_probe(spec, kept, kwargs, out)
    elif spec.collect:
        record_statistics(spec, args, out)
    return out


torch.fx.wrap("fxc_save")

# export

def rebuild_save_spec(node: str, op: str, rule: str, settings: Dict[str, Any], fn: Optional[str] = None,
                      method: Optional[str] = None, weight_args: Tuple[int, ...] = (),
                      geom: Optional[dict] = None, ledger_key: Optional[str] = None,
                      first: bool = False) -> SaveSpec:
    """A SaveSpec from literals (what SaveSpec.fxc_constructor returns; the
    exported module.py calls this).

    `fn` is a dotted path resolved through `resolve_function`; `settings`
    a dict loaded as ActivationsConfig by the allow-listed config loader. Specs
    built with the same `ledger_key` share one Ledger: the `first` spec of
    a graph (built first, as the exporter attaches submodules in graph
    order) starts a new one, and the specs built after it join it, so two
    instances of one exported module never share a ledger."""
    ledger = None if ledger_key is None else shared_ledger(ledger_key, first)
    return SaveSpec(node, op, rule, from_dict(ActivationsConfig, settings),
                    fn=None if fn is None else resolve_function(fn), method=method,
                    weight_args=tuple(weight_args), geom={k: (tuple(v) if isinstance(v, list) else v)
                                                          for k, v in (geom or {}).items()},
                    ledger=ledger, first=first)
