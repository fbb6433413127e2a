"""How far compressed saves move the weight gradients, measured.

`gradient_error(model, inputs, loss_fn)` runs one backward through the
compiled graph and one through the same graph with every `fxc_save` node
put back to the op it wraps (same parameters, same batch, BatchNorm state
restored between the two), and compares the parameter gradients: the
relative squared error of the whole model and of each parameter tensor.
This is what AutoQuant's bound and its measured widths promise to keep
within e, checked on a batch the statistics were not taken from.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .activations import fxc_save
from .measure import _default_loss


def uncompressed_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing `gm`'s parameters whose graph runs every
    compressed node's op plainly."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    plain = fx.GraphModule(gm, graph)
    for n in plain.graph.nodes:
        if n.op == "call_function" and n.target is fxc_save:
            spec = getattr(plain, n.args[0].target)
            rest = tuple(n.args[2:])
            if spec._fn is not None:
                n.target, n.args = spec._fn, rest
            elif spec._method is not None:
                n.op, n.target, n.args = "call_method", spec._method, rest
            else:
                n.op, n.target, n.args = "call_module", rest[0].target, rest[1:]
    plain.graph.eliminate_dead_code()
    plain.recompile()
    return plain


def gradient_error(model: nn.Module, inputs, loss_fn: Optional[Callable] = None) -> Dict[str, object]:
    """{"total": sum_p ||dg_p||^2 / sum_p ||g_p||^2, "worst": max_p ||dg_p||^2 / ||g_p||^2,
    "worst_param": its name, "per_param": {name: relative error}} for a compiled model."""
    gm = getattr(model, "graph_module", model)
    plain = uncompressed_copy(gm)
    if torch.is_tensor(inputs):
        inputs = (inputs,)
    loss_fn = loss_fn or _default_loss
    state = {k: v.clone() for k, v in gm.state_dict().items() if torch.is_tensor(v)}
    was = gm.training
    saved_grads = {p: p.grad for p in gm.parameters()}
    grads = []
    try:
        for m in (gm, plain):
            gm.load_state_dict(state, strict=False)
            m.train()
            for p in gm.parameters():
                p.grad = None
            with torch.random.fork_rng(devices=[]):
                loss_fn(m(*inputs)).backward()
            grads.append({k: p.grad.detach().double().clone() for k, p in gm.named_parameters()
                          if p.grad is not None})
    finally:
        gm.load_state_dict(state, strict=False)
        gm.train(was)
        for p, g in saved_grads.items():
            p.grad = g
    got, ref = grads
    per = {}
    err_sum = norm_sum = 0.0
    for k, r in ref.items():
        e = float((got[k] - r).pow(2).sum())
        n = float(r.pow(2).sum())
        err_sum, norm_sum = err_sum + e, norm_sum + n
        if n > 0:
            per[k] = e / n
    worst = max(per, key=per.get) if per else None
    return {"total": err_sum / norm_sum if norm_sum else 0.0, "worst": per[worst] if worst else 0.0,
            "worst_param": worst, "per_param": per}
