"""AutoQuant's statistics step: the gradient norms each auto node's budget
needs, caught by tensor hooks in that step's backward (SPEC section 1).
The controller (runtime/autoquant.py) turns the snapshots into budgets."""
from __future__ import annotations

import torch


def _sumsq(g: torch.Tensor) -> float:
    return float(g.detach().double().pow(2).sum())


def _once(t: torch.Tensor, fn):
    """A tensor hook that runs once and removes itself (parameters keep
    hooks across iterations)."""
    handle = None

    def hook(g):
        fn(g)
        if handle is not None:
            handle.remove()

    handle = t.register_hook(hook)


def record_statistics(spec, args, out) -> None:
    """Install the hooks that measure this node's snapshot in this backward."""
    if not (torch.is_tensor(out) and out.requires_grad):
        return
    snap = spec.snapshot = {}
    is_module = spec._fn is None and spec._method is None
    mod = args[0] if is_module else None
    xs = args[1:] if is_module else args
    x = xs[0] if xs else None
    if spec.rule in ("conv", "linear"):
        w = mod.weight if mod is not None else (args[1] if len(args) > 1 else None)
        if not (torch.is_tensor(w) and w.requires_grad and torch.is_tensor(x)):
            return
        snap["numel"] = x.numel()
        if spec.rule == "conv":
            ks = w.shape[2:]
            stride = spec.geom.get("stride", (1,) * len(ks))
            area = 1
            for k in ks:
                area *= int(k)
            sp = 1
            for s in stride:
                sp *= int(s)
            snap["u"] = area / sp
        else:
            snap["u"] = 1.0
        _once(out, lambda g: snap.__setitem__("gy2", _sumsq(g)))
        _once(w, lambda g: snap.__setitem__("gw2", _sumsq(g)))
    elif spec.rule == "bn" and mod is not None and torch.is_tensor(x) and x.dim() >= 2:
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            var = x.detach().double().var(dim=dims, unbiased=False)
            snap["inv_std2"] = (1.0 / (var + mod.eps)).float().cpu()
            snap["gamma2"] = (mod.weight.detach().double() ** 2).float().cpu() if mod.weight is not None \
                else torch.ones(x.shape[1])
        snap["K"] = x.shape[1]
        snap["NHW"] = x.numel() // x.shape[1]
        if x.requires_grad:
            _once(x, lambda g: snap.__setitem__("sgx2", _sumsq(g)))

        def gz_stats(g):
            gd = g.detach()
            snap["nnz2"] = ((gd != 0).sum(dim=dims).double() ** 2).float().cpu()
            snap["gz2_max"] = gd.pow(2).amax(dim=dims).float().cpu()

        _once(out, gz_stats)
        if mod.weight is not None and mod.weight.requires_grad:
            _once(mod.weight, lambda g: snap.__setitem__("ggamma2", (g.detach().double() ** 2).float().cpu()))
