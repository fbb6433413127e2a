"""Human-readable per-layer tables of a plan and a compiled model."""
from __future__ import annotations

from typing import Any, Dict, List

from .config import to_dict
from .plan import Plan
from .table import format_table


def _fmt_config(cfg) -> str:
    d = to_dict(cfg)
    return " ".join(f"{k}={v}" for k, v in d.items())


def plan_table(plan: Plan) -> str:
    rows: List[List[Any]] = []
    for e in plan.selected_entries:
        shape = "x".join(map(str, e.shape)) if e.shape else "-"
        treat = "; ".join(f"{k}({_fmt_config(v)})" for k, v in e.treatments.items()) or "(selected, no treatment)"
        skipped = "; ".join(f"{k}: {why}" for k, why in e.skipped.items())
        rows.append([e.qualname, e.kind.replace("call_", ""), e.target, shape, e.dtype or "-",
                     ",".join(map(str, e.rules)), treat + (f"  [skipped {skipped}]" if skipped else "")])
    if not rows:
        return "(no node matched any rule)"
    return format_table(["layer", "kind", "target", "shape", "dtype", "rules", "treatments"], rows)


def summary(cm) -> Dict[str, Any]:
    counts: Dict[str, int] = {}
    for e in cm.plan.selected_entries:
        for k in e.treatments:
            counts[k] = counts.get(k, 0) + 1
    return {
        "selected_nodes": len(cm.plan.selected_entries),
        "treated_nodes": counts,
        "auto_leaves": [a.path for a in cm.trace_info.auto_leaves],
        "inserted": sum(len(r.inserted) for r in cm.pass_results.values()),
    }
