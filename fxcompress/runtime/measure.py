"""Measured bytes of saved activations: what a compiled model's last forward
stored (saved_figures) and one measured training step (measure_saved), with
the uncompressed baseline counted by saved_tensors_hooks (_CountAll)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .ledger import Ledger, _storage_key


def _ledgers(model: nn.Module) -> List[Ledger]:
    out, seen = [], set()
    for m in model.modules():
        lg = getattr(m, "_ledger", None)  # a SaveSpec's (duck-typed: this module imports no spec)
        if isinstance(lg, Ledger) and id(lg) not in seen:
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
