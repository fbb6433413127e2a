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
step the node keeps its inputs and the upstream gradient of its output; the
controller then replays the op alone (forward and backward, a few ms) at
b = 2, 3, ... and takes the smallest width that satisfies the criterion.
The window keeps the widths of the last snapshots and the node uses the
largest of them.

This is measured on the statistics batch, not proven for the next ones
(the analytic bounds assume the statistics carry over too); the test suite
and tools/bench_activations.py measure the whole model's weight-gradient
error on later batches.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .statistics import _once
from .stored_forms import _Kept

#: widths tried, smallest first (1-bit signed codes keep only the sign)
FIRST_WIDTH = 2


def _tensors(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def keep_inputs(args: Sequence[Any]) -> Dict[str, list]:
    """Copies of an op's tensor inputs, taken before the op runs (an in-place
    op, ReLU(inplace=True), overwrites its input), and which needed grad."""
    keep: Dict[int, torch.Tensor] = {}
    saved = []
    for a in args:
        if torch.is_tensor(a) and id(a) not in keep:
            keep[id(a)] = a.detach().clone()
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
        return hook

    for i, o in enumerate(outs):
        _once(o, catcher(i))


def _run(spec, snap, pack_bits: Optional[int], seed: int) -> List[Optional[torch.Tensor]]:
    """The op's local backward on the kept inputs, with its saved tensors
    exact (pack_bits None) or stored at pack_bits."""
    leaves, args, made = [], [], {}
    for a, need in zip(snap["args"], snap["needs"]):
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


def measure_width(spec, e: float, max_bits: int) -> Optional[Dict[str, float]]:
    """Smallest width whose local relative squared gradient error is <= e,
    or None when the snapshot carries no gradient (nothing to measure)."""
    snap = spec.snapshot
    if not snap or not any(g is not None for g in snap.get("gy", [])):
        return None
    seed = 0x5EED
    ref = _run(spec, snap, None, seed)
    ref2 = [float(g.double().pow(2).sum()) if g is not None else 0.0 for g in ref]
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
