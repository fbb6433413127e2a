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
can never hit a stale entry.

Accounting is measured, not estimated: per node, the bytes autograd would
have kept (each storage counted once, across the whole graph) and the bytes
of the packed tensors actually held.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..kernels import actpack, autobits

# ----------------------------------------------------------------- ledger


class Ledger:
    """Per compiled graph: the shared-storage registry and the byte counts of
    the current forward (reset by the first save node of each forward)."""

    def __init__(self):
        self.registry: Dict[tuple, Any] = {}
        self.seen: set = set()  # storages already counted in this forward
        self.counted: set = set()  # ids of packed objects already counted in this forward
        self.nodes: Dict[str, Dict[str, float]] = {}
        self.forwards = 0

    def reset(self) -> None:
        self.seen = set()
        self.counted = set()
        self.nodes = {}
        self.forwards += 1

    def totals(self) -> Dict[str, float]:
        fp = sum(v["fp32_bytes"] for v in self.nodes.values())
        st = sum(v["stored_bytes"] for v in self.nodes.values())
        el = sum(v["quant_elements"] for v in self.nodes.values())
        bits = sum(v["quant_bits"] for v in self.nodes.values())
        return {"fp32_bytes": fp, "stored_bytes": st, "ratio": fp / st if st else float("inf") if fp else 1.0,
                "avg_bits": bits / el if el else 0.0}


def _node_stats(ledger: Ledger, name: str) -> Dict[str, float]:
    d = ledger.nodes.get(name)
    if d is None:
        d = ledger.nodes[name] = {"fp32_bytes": 0.0, "stored_bytes": 0.0, "quant_elements": 0.0,
                                  "quant_bits": 0.0, "kept": 0.0}
    return d


# ------------------------------------------------------------ stored forms


class _Kept:
    """A tensor stored as it is (parameter, tiny, integer)."""

    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


class _ShapeOnly:
    """Backward needs only the shape (and layout) of this tensor."""

    __slots__ = ("shape", "stride", "dtype", "device")

    def __init__(self, t):
        self.shape, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device

    def nbytes(self) -> int:
        return 0


class _Mask:
    """1 bit per element; decoded to `on`/`off` values of the original dtype."""

    __slots__ = ("packed", "on", "off", "dtype", "stride")

    def __init__(self, packed, on, off, dtype):
        self.packed, self.on, self.off, self.dtype = packed, on, off, dtype

    def nbytes(self) -> int:
        return self.packed.nbytes()


class _WindowIndex:
    """Max-pool argmax as the offset inside its pooling window."""

    __slots__ = ("parts", "bits", "shape", "geom", "width")

    def __init__(self, parts, bits, shape, geom, width):
        self.parts, self.bits, self.shape, self.geom, self.width = parts, bits, shape, geom, width

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts)


def _nbytes(obj) -> int:
    if isinstance(obj, _Kept):
        return obj.t.numel() * obj.t.element_size()
    return obj.nbytes()


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage (sparse, meta)
        ptr = id(t)
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version, t.device)


# ------------------------------------------------------------------ spec


@dataclass
class SaveSettings:
    """The resolved config of one node (from ActivationsConfig)."""

    mode: str = "fixed"           # fixed | auto
    bits: int = 8
    zvc: bool = False
    granularity: str = "channel"  # channel | group
    group_size: int = 256
    rounding: str = "nearest"
    min_numel: int = 1024
    masks: bool = True
    max_bits: int = 16
    eps_bits: float = 0.0


class SaveSpec(nn.Module):
    """One compressed node: its rule, settings, accounting, AutoQuant state.

    A submodule of the rewritten GraphModule (named fxc_act_<node>), so that
    printing the module shows every node's settings. It holds no parameters;
    AutoQuant's error budget lives here (`dx2`, set by the controller) and is
    saved in the controller's state, not here.
    """

    def __init__(self, node: str, op: str, rule: str, settings: SaveSettings, fn: Optional[Callable] = None,
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
        from dataclasses import asdict

        ledger_key = None
        if self._ledger is not None:
            ledger_key = getattr(self._ledger, "fxc_key", None)
            if ledger_key is None:
                import uuid

                ledger_key = self._ledger.fxc_key = uuid.uuid4().hex[:16]
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
        if hit is not None:  # already stored by another save of this storage
            if id(hit) not in ledger.counted:  # (made in an earlier forward: count it in this one)
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
            # threshold_backward(grad, result, 0) only asks result > 0
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
        if s.mode == "auto" and self.dx2 is not None and s.granularity == "channel" and key is not None \
                and x.dim() >= 3:
            relu = self._ledger.registry.get(key + ("relu",))
            if not (isinstance(relu, _Mask) and relu.on == 1.0):
                relu = None
        if relu is not None:
            amax, mn, nnz_c = actpack.stats_nnz(x3)
        else:
            amax, mn = actpack.stats(x3)
        signed = float(mn) < 0  # one read of the scalar, not a compare op and a read
        # stochastic rounding: one draw from torch's global generator per tensor,
        # so runs are reproducible and a resumed run (the driver restores the
        # generator) continues the same stream
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if s.rounding == "stochastic" else 0
        if s.mode == "auto" and self.dx2 is not None and s.granularity == "channel":
            if relu is not None and not signed:
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
                st["quant_bits"] += _dot(bits_c, nnz_c)
                return obj
            bits_c = self.auto_bits(amax, signed, x3.shape[1],
                                    counts=torch.full((x3.shape[1],), x3.shape[0] * x3.shape[2]))
            obj = (actpack.mixed_pack(x3, bits_c, s.rounding, seed, amax, signed, shape=t.shape)
                   if not s.zvc else actpack.zvc_pack(x3, int(bits_c.max()), s.rounding, seed, amax, signed,
                                                      shape=t.shape))
            nbits = _dot(bits_c, None) * (x3.shape[0] * x3.shape[2])
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
        """Per-channel bits from the error budget dx2 (SPEC section 1).

        fbits = clip(trunc(-1/2 log2 dx2 - log2 s_c - 1), 1, 15), s_c = 1/(max|x_c| + 1e-6),
        i.e. a grid step of 2^-(fbits+1) on the scaled value. Unsigned
        tensors need fbits+1 bits for that grid, signed ones a sign bit more.
        `scale` multiplies the budget (numel/nnz when only non-zeros carry error).

        Conv/linear budgets bound the *total* squared error of the tensor
        (numel * dx2, SPEC section 1), and whole bits per channel leave most
        channels below their share: with `counts` (elements carrying error per
        channel), spend_slack then lowers widths while the total stays within
        the budget."""
        fast = autobits.auto_bits(amax.detach(), actpack.EPS, self.bn_terms,
                                  0.0 if self.bn_terms is not None else float(self.dx2) * scale, counts, signed,
                                  self.settings.max_bits)
        if fast is not None:  # the C loop: the same widths as below, without numpy's per-call cost
            return torch.from_numpy(fast).to(amax.device)
        # numpy on a few thousand channels: torch's per-op overhead was
        # ~1 ms per tensor here, a tenth of the step's compression time
        a = amax.detach().double().cpu().numpy() + actpack.EPS
        if self.bn_terms is not None:
            dx2 = _bn_dx2_np(self.bn_terms, a - actpack.EPS)
        else:
            dx2 = np.full(a.shape, float(self.dx2) * scale)
        dx2 = np.maximum(dx2, 1e-30)
        f = -0.5 * np.log2(dx2) + np.log2(a) - 1.0
        bits = np.clip(np.trunc(f), 1, 15) + (2 if signed else 1)
        bits = np.clip(bits, 1, self.settings.max_bits).astype(np.int64)
        if bits.size == 1:
            bits = np.full(C, int(bits.reshape(-1)[0]), dtype=np.int64)
            dx2 = np.full(C, float(dx2.reshape(-1)[0]))
        if counts is not None:
            bits = spend_slack(bits, a, dx2, counts.detach().cpu().numpy().astype(np.float64), signed)
        return torch.from_numpy(bits).to(amax.device)

    # --- the call -----------------------------------------------------------------
    def call(self, args, kwargs):
        if self._fn is not None:
            return self._fn(*args, **kwargs)
        if self._method is not None:
            return getattr(args[0], self._method)(*args[1:], **kwargs)
        return args[0](*args[1:], **kwargs)


def _dot(bits_c: torch.Tensor, counts: Optional[torch.Tensor]) -> float:
    """sum_c bits_c * counts_c (or sum_c bits_c), as a float; numpy for CPU
    tensors (this runs per saved tensor per step: torch's per-op overhead)."""
    if bits_c.device.type == "cpu" and (counts is None or counts.device.type == "cpu"):
        b = bits_c.detach().numpy().astype(np.float64)
        return float(b.sum() if counts is None else b @ counts.detach().numpy().astype(np.float64))
    b = bits_c.double()
    return float(b.sum() if counts is None else (b * counts.double().to(b.device)).sum())


def spend_slack(bits: np.ndarray, a: np.ndarray, dx2: np.ndarray, n: np.ndarray, signed: bool,
                rounds: int = 4) -> np.ndarray:
    """Lower per-channel widths while sum_c n_c * err_c / dx2_c <= sum_c n_c.

    The budgets bound a sum over the tensor: conv/linear the total squared
    error numel * dx2 (one dx2 for all channels), BatchNorm a sum over
    channels where channel k may use 1/K of the error (its dx2_k); in both,
    sum_c n_c * err_c / dx2_c <= sum_c n_c is the bound. The per-channel rule
    keeps every channel within its dx2_c by itself, and whole bits leave
    most of them well below it. err_c is channel c's squared rounding error
    at its width (half a grid step: (max|x_c|+eps) / 2^(b+1) unsigned,
    / 2^b signed; the same worst case the SPEC rule assumes; only values in
    the clipped top grid cell can be off by up to a step, and the mean
    squared error of round-to-nearest is a third of the half-step square,
    so the sum counted here stays above the real one in practice, which
    tests/test_autoquant.py measures). Each round takes one bit from the channels whose
    normalised error grows least per bit saved (it quadruples: an increase
    of 3 * n_c * err_c / dx2_c for n_c bits), cheapest first, while the
    total stays within the bound."""
    b = bits.astype(np.int64).copy()
    d = np.maximum(dx2, 1e-30)
    budget = float(n.sum())
    lo = 1 if not signed else 2
    sh = 1 if not signed else 0
    for _ in range(rounds):
        r = (a / np.exp2(b + sh)) ** 2 / d
        slack = budget - float((n * r).sum())
        ok = (b > lo) & (n > 0)
        if slack <= 0 or not ok.any():
            break
        cost = np.where(ok, 3.0 * n * r, 0.0)
        order = np.argsort(np.where(ok, r, np.inf), kind="stable")
        take = order[(np.cumsum(cost[order]) <= slack) & ok[order]]
        if take.size == 0:
            break
        b[take] -= 1
    return b


def _bn_dx2_np(terms: Dict[str, Any], amax: np.ndarray) -> np.ndarray:
    """bn_dx2 in numpy (terms converted once and cached in the dict)."""
    np_terms = terms.get("_np")
    if np_terms is None:
        np_terms = terms["_np"] = {k: (v.detach().double().cpu().numpy() if torch.is_tensor(v) else v)
                                   for k, v in terms.items() if k != "_np"}
    t = np_terms
    inv2 = t["inv_std2"]
    g2 = inv2 * t["nnz2"] * t["gz2_max"] * (amax / 2) ** 2 + t["ggamma2"]
    denom = t["K"] * t["gamma2"] * inv2 ** 2 * g2
    dx2 = t["numer"] / np.maximum(denom, 1e-30)
    return np.maximum(dx2, 2.0 ** -16)


def bn_dx2(terms: Dict[str, torch.Tensor], amax: torch.Tensor) -> torch.Tensor:
    """BatchNorm input budget per channel k (SPEC section 1):
    dx2_k = e*|gx|^2*N*H*W / (K * g_k^2 * inv_std_k^4 * g2_k),
    g2_k = inv_std_k^2 * nnz_k^2 * max(gz_k)^2 * (max|x_k|/2)^2 + (dL/dgamma_k)^2, floored at 2^-16."""
    inv2 = terms["inv_std2"].to(amax.device).double()
    g2 = inv2 * terms["nnz2"].double() * terms["gz2_max"].double() * (amax.double() / 2) ** 2 \
        + terms["ggamma2"].double()
    denom = terms["K"] * terms["gamma2"].double() * inv2 ** 2 * g2
    dx2 = terms["numer"] / denom.clamp_min(1e-30)
    return dx2.clamp_min(2.0 ** -16)


# ---------------------------------------------------------- max-pool indices

def _encode_window_index(idx: torch.Tensor, geom: dict) -> _WindowIndex:
    kh, kw = geom["kernel"]
    bits = max(1, math.ceil(math.log2(kh * kw)))
    local = actpack.window_local(idx, geom)
    return _WindowIndex(actpack.pack_codes(local, bits), bits, tuple(idx.shape), dict(geom), geom["in_w"])


def _decode_window_index(obj: _WindowIndex) -> torch.Tensor:
    n = 1
    for s in obj.shape:
        n *= s
    local = actpack.unpack_codes(obj.parts, obj.bits, n).view(obj.shape)
    return actpack.window_global(local.contiguous(), obj.geom, obj.width)


# ------------------------------------------------------------- graph entry

def fxc_save(spec: SaveSpec, how: str, *args, **kwargs):
    """Run one op with its saved tensors stored packed (`how` is for readers
    of gm.code: what this node stores, e.g. 'Conv2d: 2-bit per-channel')."""
    if not torch.is_grad_enabled():
        return spec.call(args, kwargs)  # evaluation: nothing is saved, the last figures stay
    if torch.compiler.is_compiling() and getattr(spec, "compiled_hooks", False):
        # the ambient compiled hooks store what it saves (runtime/compile_support.py)
        return spec.call(args, kwargs)
    if spec.first:
        spec._ledger.reset()
    skip = set()
    if spec._fn is None and spec._method is None and isinstance(args[0], nn.Module):
        for p in args[0].parameters():
            skip.add(p.data_ptr())
        for b in args[0].buffers():
            skip.add(b.data_ptr())
    for i in spec.weight_args:
        if i < len(args) and torch.is_tensor(args[i]):
            skip.add(args[i].data_ptr())
    spec._skip = skip
    if spec.rule == "maxpool":
        x = args[1] if spec._fn is None and spec._method is None else args[0]
        spec.geom["in_w"] = x.shape[-1]
    kept = None
    if spec.collect and spec.rule == "quant":
        from .probe import keep_inputs

        kept = keep_inputs(args)  # before the call: an in-place op overwrites its input
    with torch.autograd.graph.saved_tensors_hooks(spec.pack, spec.unpack):
        out = spec.call(args, kwargs)
    spec._skip = set()
    if kept is not None:
        from .probe import record_probe

        record_probe(spec, kept, kwargs, out)
    elif spec.collect:
        from .autoquant import record_statistics

        record_statistics(spec, args, out)
    return out


torch.fx.wrap("fxc_save")


# ------------------------------------------------------------- measurement

def _ledgers(model: nn.Module) -> List[Ledger]:
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, SaveSpec) and id(m._ledger) not in seen:
            seen.add(id(m._ledger))
            out.append(m._ledger)
    return out


def saved_figures(model: nn.Module) -> Dict[str, Any]:
    """Totals and per-node bytes of the last forward of a compiled model."""
    nodes: Dict[str, Dict[str, float]] = {}
    for lg in _ledgers(model):
        nodes.update({k: dict(v) for k, v in lg.nodes.items()})
    fp = sum(v["fp32_bytes"] for v in nodes.values())
    st = sum(v["stored_bytes"] for v in nodes.values())
    el = sum(v["quant_elements"] for v in nodes.values())
    bits = sum(v["quant_bits"] for v in nodes.values())
    return {"fp32_bytes": fp, "stored_bytes": st, "ratio": (fp / st) if st else (float("inf") if fp else 1.0),
            "avg_bits": bits / el if el else 0.0, "nodes": nodes}


class _CountAll:
    """saved_tensors_hooks that keep tensors and count them (uncompressed
    baseline): activations only, so parameters and views of them (a linear
    layer saves its weight transposed) are left out, as the packed path
    leaves them out."""

    def __init__(self, model: Optional[nn.Module] = None):
        self.seen, self.bytes = set(), 0
        self.param_storages = set()
        if model is not None:
            for p in list(model.parameters()) + list(model.buffers()):
                self.param_storages.add(p.untyped_storage().data_ptr())

    def pack(self, t):
        if (t.requires_grad and t.is_leaf) or t.untyped_storage().data_ptr() in self.param_storages:
            return t
        key = _storage_key(t)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.numel() * t.element_size()
        return t

    def unpack(self, t):
        return t


def measure_saved(model: nn.Module, inputs, loss_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """One training forward and backward of `model` on `inputs`; returns the
    activation bytes autograd kept.

    For a model compiled with the activations pass: `fp32_bytes` (what the
    saved tensors of the compressed nodes occupy uncompressed, each storage
    once), `stored_bytes` (bytes of the packed tensors actually held),
    `ratio`, `avg_bits` (of the quantized tensors) and per-node figures. For
    any model, `all_saved_bytes` counts every tensor autograd saves in the
    forward (parameters excluded, each storage once) as a baseline. The
    model's parameters' .grad are restored afterwards."""
    if torch.is_tensor(inputs):
        inputs = (inputs,)
    grads = {p: (p.grad.clone() if p.grad is not None else None) for p in model.parameters()}
    was = model.training
    model.train()
    counter = _CountAll(model)
    try:
        with torch.random.fork_rng(devices=[]):
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                out = model(*inputs)
            figures = saved_figures(model)
            loss = loss_fn(out) if loss_fn is not None else _default_loss(out)
            loss.backward()
    finally:
        model.train(was)
        for p, g in grads.items():
            p.grad = g
    figures["all_saved_bytes"] = counter.bytes
    return figures


def _default_loss(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out.float().pow(2).mean()


# ------------------------------------------------------------------ export

# Namespaces a rebuilt spec may take its function from (by dotted path).
_FUNCTION_NAMESPACES = ("torch.nn.functional", "torch", "operator", "math")

# Ledgers of rebuilt specs by key: weak, so a Ledger lives as long as specs use it.
_SHARED_LEDGERS: "weakref.WeakValueDictionary[str, Ledger]" = weakref.WeakValueDictionary()


def _namespace(name: str):
    import importlib

    return importlib.import_module(name)


def _function_path(fn: Callable, node: str = "?") -> str:
    """`fn`'s dotted path in an allowed namespace (SaveSpec.fxc_constructor)."""
    name = getattr(fn, "__name__", None)
    for ns_name in _FUNCTION_NAMESPACES:
        ns = _namespace(ns_name)
        if isinstance(name, str) and not name.startswith("_") and getattr(ns, name, None) is fn:
            return f"{ns_name}.{name}"
    for ns_name in _FUNCTION_NAMESPACES:  # exposed under another name
        for attr, value in vars(_namespace(ns_name)).items():
            if value is fn and not attr.startswith("_"):
                return f"{ns_name}.{attr}"
    from ..errors import BadInput

    raise BadInput(f"cannot export the compressed save of node '{node}': its function {fn!r} is not a public "
                   f"function of {', '.join(_FUNCTION_NAMESPACES)}, the only ones an exported SaveSpec may name")


def resolve_function(path: str) -> Callable:
    """The function a dotted path names, from the allow-list only (no eval):
    'torch.nn.functional.conv2d', 'torch.relu', 'operator.add', 'math.sqrt'."""
    from ..errors import BadInput

    ns_name, _, attr = path.rpartition(".") if isinstance(path, str) else ("", "", "")
    if ns_name not in _FUNCTION_NAMESPACES or not attr.isidentifier() or attr.startswith("_"):
        raise BadInput(f"SaveSpec function {path!r} is not allowed: name a public function of "
                       + ", ".join(_FUNCTION_NAMESPACES) + " (e.g. 'torch.nn.functional.conv2d')")
    fn = getattr(_namespace(ns_name), attr, None)
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise BadInput(f"SaveSpec function {path!r} is not a function of {ns_name}")
    return fn


def rebuild_save_spec(node: str, op: str, rule: str, settings: Dict[str, Any], fn: Optional[str] = None,
                      method: Optional[str] = None, weight_args: Tuple[int, ...] = (),
                      geom: Optional[dict] = None, ledger_key: Optional[str] = None,
                      first: bool = False) -> SaveSpec:
    """A SaveSpec from literals (what SaveSpec.fxc_constructor returns; the
    exported module.py calls this).

    `fn` is a dotted path resolved through `resolve_function`; `settings`
    a dict loaded as SaveSettings by the allow-listed config loader. Specs
    built with the same `ledger_key` share one Ledger: the `first` spec of
    a graph (built first, as the exporter attaches submodules in graph
    order) starts a new one, and the specs built after it join it, so two
    instances of one exported module never share a ledger."""
    from ..config import from_dict

    ledger = None
    if ledger_key is not None:
        ledger = None if first else _SHARED_LEDGERS.get(ledger_key)
        if ledger is None:
            ledger = Ledger()
            ledger.fxc_key = ledger_key
            _SHARED_LEDGERS[ledger_key] = ledger
    return SaveSpec(node, op, rule, from_dict(SaveSettings, settings),
                    fn=None if fn is None else resolve_function(fn), method=method,
                    weight_args=tuple(weight_args), geom={k: (tuple(v) if isinstance(v, list) else v)
                                                          for k, v in (geom or {}).items()},
                    ledger=ledger, first=first)
