"""Measured widths for ops that have no analytic AutoQuant bound.

AC-GC's bounds cover convolution/linear inputs (the error only reaches that
layer's weight gradient) and BatchNorm inputs (the BN bound keeps the
relative squared error of the input gradient within e). LayerNorm, GELU,
softmax, attention and every other op have no such formula, so under `auto`
they used to stay at the fixed fallback width. Here their width is measured
against the same criterion as BatchNorm's:

    ||g_b - g||^2 <= e * ||g||^2

for each of the op's input gradients and its own parameter gradients (each
on its own, so a norm's small weight gradient is held to it too), where g is
the op's exact local backward and g_b the same backward with every tensor
the op saves stored at b bits by the real packing code. At a statistics
step the node keeps a copy of its inputs; in that step's backward, as soon
as the gradient of its output arrives, the op is replayed alone (forward and
backward, a few ms) at b = 2, 3, ... and the smallest width that satisfies
the criterion is kept. The window keeps the widths of the last snapshots and
the node uses the largest of them.

Memory: the statistics step must fit where every other step fits. Keeping
fp32 copies of every measured op's inputs, and each output's gradient,
until the controller's step cost more than the compression saved (vit at a
statistics step: 3.39 GiB against 1.80 uncompressed). So (1) the copies are
stored packed at COPY_BITS = 16 bits per channel (round to nearest, the
real packing code): half of fp32, with an input error of 2^-16 of the
channel's range, far below the error the widths are chosen against (e is
2^-eps_bits of the gradient; the test suite checks the widths equal those
measured from exact copies); and (2) each op is measured inside the backward
the moment its output's gradient arrives, one op at a time, and its copy
and gradient are freed right there, so they never pile up. (A side effect:
the replay uses the weights the forward used; measured at the controller's
step it used the weights after the optimizer step.) An op whose outputs do
not all receive a gradient is measured at the controller's step as before.

This is measured on the statistics batch, not proven for the next ones
(the analytic bounds assume the statistics carry over too); the test suite
and tools/bench_activations.py measure the whole model's weight-gradient
error on later batches.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..kernels import actpack
from .statistics import _once
from .stored_forms import _Kept

#: widths tried, smallest first (1-bit signed codes keep only the sign)
FIRST_WIDTH = 2
#: width of the input copies kept from the forward to the measurement
#: (None: exact fp32 copies; see the module docstring)
COPY_BITS: Optional[int] = 16
#: inputs smaller than this (a norm's weight, a bias) are copied as they are
COPY_MIN_NUMEL = 1024


def _copy(t: torch.Tensor):
    """A copy of an op's input that lives until the measurement: packed at
    COPY_BITS per channel (the packing code's own channel layout), or exact."""
    t = t.detach()
    if COPY_BITS is None or not t.is_floating_point() or t.dim() < 2 or t.numel() < COPY_MIN_NUMEL:
        return t.clone()
    x = t.contiguous()
    x3 = actpack.view3(x, "channel", 256, 1 if x.dim() >= 3 else -1)
    amax, mn = actpack.stats(x3)
    return actpack.quant_pack(x3, COPY_BITS, "nearest", 0, amax, float(mn) < 0, shape=t.shape)


def _restore(kept):
    return kept if torch.is_tensor(kept) else actpack.unpack(kept)


def _is_kept(a) -> bool:
    return torch.is_tensor(a) or isinstance(a, actpack.Packed)


def _tensors(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def keep_inputs(args: Sequence[Any]) -> Dict[str, list]:
    """Copies of an op's tensor inputs (_copy), taken before the op runs (an
    in-place op, ReLU(inplace=True), overwrites its input), and which needed
    grad. An input passed twice is copied once."""
    keep: Dict[int, Any] = {}
    saved = []
    for a in args:
        if torch.is_tensor(a) and id(a) not in keep:
            keep[id(a)] = _copy(a)
        saved.append(keep[id(a)] if torch.is_tensor(a) else a)
    return {"args": saved, "needs": [torch.is_tensor(a) and a.requires_grad for a in args]}


def record_probe(spec, kept: Dict[str, list], kwargs: Dict[str, Any], out) -> None:
    """At a statistics step: keep the op's inputs (from keep_inputs) and catch
    the gradient of each output in this backward."""
    outs = [t for t in _tensors(out) if t.requires_grad]
    if not outs:
        return
    snap = spec.snapshot = {"args": kept["args"], "needs": kept["needs"], "kwargs": dict(kwargs),
                            "gy": [None] * len(outs)}

    def catcher(i):
        def hook(g):
            snap["gy"][i] = g.detach()
            if all(gy is not None for gy in snap["gy"]):
                # every output's gradient is here: measure now, inside the
                # backward, and free the copies and gradients at once
                got = measure_width(spec, 2.0 ** -spec.settings.eps_bits, spec.settings.max_bits, snap)
                snap.clear()
                snap["measured"] = got
        return hook

    for i, o in enumerate(outs):
        _once(o, catcher(i))


def _run(spec, snap, pack_bits: Optional[int], seed: int) -> List[Optional[torch.Tensor]]:
    """The op's local backward on the kept inputs, with its saved tensors
    exact (pack_bits None) or stored at pack_bits."""
    leaves, args, made = [], [], {}
    for a, need in zip(snap["restored"], snap["needs"]):
        if torch.is_tensor(a) and need and a.is_floating_point():
            if id(a) not in made:
                leaf = a.detach().requires_grad_(True)
                leaves.append(leaf)
                # a copy, so the op sees a non-leaf activation (leaves are
                # taken for parameters and kept as they are) that an in-place
                # op (Hardswish(inplace=True)) may overwrite
                made[id(a)] = leaf.clone()
            args.append(made[id(a)])
        else:
            args.append(a)
    module = args[0] if isinstance(args[0], nn.Module) else None
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    skip = {p.data_ptr() for p in params}
    if module is not None:
        skip |= {b.data_ptr() for b in module.buffers()}
    for i in spec.weight_args:
        if i < len(args) and torch.is_tensor(args[i]):
            skip.add(args[i].data_ptr())
    scratch = {"fp32_bytes": 0.0, "stored_bytes": 0.0, "quant_elements": 0.0, "quant_bits": 0.0, "kept": 0.0}

    def pack(t):
        if (t.requires_grad and t.is_leaf) or t.data_ptr() in skip:
            return _Kept(t)
        return spec._encode(t, spec._form(t), scratch, key=None, bits=pack_bits)

    hooks = (torch.autograd.graph.saved_tensors_hooks(pack, spec.unpack) if pack_bits is not None
             else contextlib.nullcontext())
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)  # the same dropout masks (and rounding draws) in every replay
        with hooks:
            out = spec.call(args, snap["kwargs"])
    outs = [t for t in _tensors(out) if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, snap["gy"]) if g is not None]
    wrt = leaves + params
    if not pairs or not wrt:
        return []
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def measure(spec) -> Optional[Dict[str, float]]:
    """This statistics step's width of a measured node: the one measured in
    the backward, or (an output that got no gradient) measured now."""
    snap = spec.snapshot
    if "measured" in snap:
        return snap["measured"]
    return measure_width(spec, 2.0 ** -spec.settings.eps_bits, spec.settings.max_bits)


def measure_width(spec, e: float, max_bits: int, snap: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, float]]:
    """Smallest width whose local relative squared gradient error is <= e,
    or None when the snapshot carries no gradient (nothing to measure)."""
    snap = spec.snapshot if snap is None else snap
    if not snap or not any(g is not None for g in snap.get("gy", [])):
        return None
    restored: Dict[int, Any] = {}  # each kept input decoded once, for every replay (aliases stay aliases)
    for a in snap["args"]:
        if _is_kept(a) and id(a) not in restored:
            restored[id(a)] = _restore(a)
    snap["restored"] = [restored[id(a)] if _is_kept(a) else a for a in snap["args"]]
    seed = 0x5EED
    try:
        with torch.enable_grad():  # inside a backward grad mode is off: the replay builds its own graph
            return _search(spec, snap, e, max_bits, seed)
    finally:
        del snap["restored"]


def _search(spec, snap, e: float, max_bits: int, seed: int) -> Optional[Dict[str, float]]:
    """The exact local backward, then widths from FIRST_WIDTH up until within e."""
    ref = _run(spec, snap, None, seed)
    ref2 = [float(g.double().pow(2).sum()) if g is not None else 0.0 for g in ref]
    if not all(math.isfinite(n) for n in ref2):
        # a NaN/inf gradient (a diverging step, or a scaler's overflow step)
        # says nothing about the width: not measured at this step, as when no
        # gradient arrives (AutoQuant tries again at the next steps); a
        # diverged run is stopped by the loop's non-finite loss check
        return None
    if not any(ref2):
        return None
    err = float("nan")
    for b in range(FIRST_WIDTH, max_bits + 1):
        got = _run(spec, snap, b, seed)
        # each gradient on its own: a small one (a norm's weight) must not
        # hide behind a large one (the input's)
        err = max(float((g.double() - r.double()).pow(2).sum()) / n
                  for g, r, n in zip(got, ref, ref2) if g is not None and n > 0)
        if err <= e:
            return {"bits": float(b), "rel_err": err}
    return {"bits": float(max_bits), "rel_err": err}
