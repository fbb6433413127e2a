"""How the loop drives a model's controllers: duck-typed, so a plain
nn.Module (no hooks) trains too."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn


def hook(model: nn.Module, name: str, *args) -> Any:
    fn = getattr(model, name, None)
    return fn(*args) if callable(fn) else None


def model_figures(model: nn.Module) -> Dict[str, float]:
    raw = hook(model, "figures") or {}
    out = {}
    for k, v in raw.items():
        if torch.is_tensor(v):
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def controller_reports(model: nn.Module) -> Optional[Dict[str, Any]]:
    """Each controller's report() by name; None for a model without controllers."""
    if not hasattr(model, "controllers"):
        return None
    return {n: hook(c, "report") for n, c in model.controllers.items()}


def snapshot_labels(model: nn.Module) -> List[str]:
    """The labels of the snapshots the model's controllers want now (after a step)."""
    due = hook(model, "snapshot_due")
    if due is None:
        return []
    return [due] if isinstance(due, str) else list(due)
