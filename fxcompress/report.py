"""Human-readable per-layer tables of a plan and a compiled model."""
from __future__ import annotations

from typing import Any, Dict, List

from .config import to_dict
from .plan import Plan
from .table import format_table


def _fmt_config(cfg) -> str:
    d = to_dict(cfg)
    return " ".join(f"{k}={v}" for k, v in d.items())


def treatment_lines(entry) -> List[str]:
    """One line per treatment, with the fields a pass really applies where
    they differ from the config (`bits=2 -> 8 (first layer)`), then skips."""
    return _lines({k: to_dict(v) for k, v in entry.treatments.items()}, entry.effective, entry.skipped)


def _lines(treatments: Dict[str, Dict[str, Any]], effective: Dict[str, Dict[str, Any]],
           skipped: Dict[str, str]) -> List[str]:
    lines = []
    for key, fields in treatments.items():
        eff = effective.get(key, {})
        parts = []
        for k, v in (fields or {}).items():
            if k in eff and eff[k] != v:
                role = f" ({eff['role']} layer)" if eff.get("role") else ""
                parts.append(f"{k}={v} -> {eff[k]}{role}")
            else:
                parts.append(f"{k}={v}")
        lines.append(f"{key}({' '.join(parts)})" if parts else key)
    lines += [f"{key}: skipped ({why})" for key, why in skipped.items()]
    return lines


def plan_rows(plan: Plan) -> List[Any]:
    """(label, entry) per selected node in graph order. A module called twice
    has one node per call: its rows are labelled `name #1`, `name #2`."""
    entries = plan.selected_entries
    if plan.gm is not None:
        order = {n.name: i for i, n in enumerate(plan.gm.graph.nodes)}
        entries = sorted(entries, key=lambda e: order.get(e.name, len(order)))
    counts: Dict[str, int] = {}
    for e in entries:
        counts[e.qualname] = counts.get(e.qualname, 0) + 1
    seen: Dict[str, int] = {}
    out = []
    for e in entries:
        label = e.qualname
        if counts[e.qualname] > 1:
            seen[e.qualname] = seen.get(e.qualname, 0) + 1
            label = f"{e.qualname} #{seen[e.qualname]}"
        out.append((label, e))
    return out


def plan_table(plan: Plan) -> str:
    rows: List[List[Any]] = []
    for label, e in plan_rows(plan):
        shape = "x".join(map(str, e.shape)) if e.shape else "-"
        treat = "\n".join(treatment_lines(e)) or "(selected, no treatment)"
        rows.append([label, e.kind.replace("call_", ""), e.target, shape, e.dtype or "-",
                     ",".join(map(str, e.rules)), treat])
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


class Report(dict):
    """What `CompressedModel.report()` returns: a dict (so `report()["plan"]`
    and `json.dumps(report)` work as before) that prints as tables a person
    can read: plan, leaves, forward arguments fixed while tracing, pass
    notes, controller figures, timings. `to_dict()` gives a plain dict."""

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.items()}

    def __str__(self) -> str:
        out: List[str] = []
        plan = self.get("plan") or []
        out.append(f"plan: {len(plan)} selected nodes")
        if plan:
            rows = []
            for n in plan:
                treat = "\n".join(_lines(n.get("treatments", {}), n.get("effective") or {}, n.get("skipped") or {}))
                treat = treat or "(selected, no treatment)"
                rows.append([n.get("qualname"), n.get("target"),
                             "x".join(map(str, n["shape"])) if n.get("shape") else None, treat])
            out.append(_indent(format_table(["layer", "target", "shape", "treatments"], rows)))
        trace = self.get("trace") or {}
        leaves = [f"auto-leaf {a['path']} ({a['type']}) at {a['where']}: {a['reason']}"
                  for a in self.get("auto_leaves") or []]
        leaves += [f"leaf {c['path']} ({c['type']}) holds {', '.join(c['inner'])}: {c['why']}"
                   for c in trace.get("leaf_containers") or []]
        if self.get("leaf_modules"):
            leaves.append("policy leaf_modules: " + ", ".join(self["leaf_modules"]))
        if leaves:
            out.append("leaves:\n" + _indent("\n".join(leaves)))
        if trace.get("fixed_args"):
            out.append("forward arguments fixed at their defaults while tracing: "
                       + ", ".join(f"{k}={v!r}" for k, v in trace["fixed_args"].items()))
        passes = self.get("passes") or {}
        if passes:
            lines = []
            for name, r in passes.items():
                lines.append(f"{name}: {len(r.get('inserted', []))} nodes/modules inserted")
                lines += [f"  note: {note}" for note in r.get("notes", [])]
            out.append("passes:\n" + _indent("\n".join(lines)))
        ctrl = self.get("controllers") or {}
        rows = [[name, k, v] for name, rep in ctrl.items() for k, v in _scalars(rep).items()]
        if rows:
            out.append("controllers:\n" + _indent(format_table(["controller", "figure", "value"], rows)))
        t = self.get("timings_s") or {}
        if t:
            out.append("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items()))
        return "\n\n".join(out)

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle):  # IPython shows the tables too
        p.text(str(self))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _scalars(rep: Any, prefix: str = "", depth: int = 0) -> Dict[str, Any]:
    """The numbers and short values of a controller's report, flattened
    (`figures.near_grid`); per-layer details stay in the dict."""
    out: Dict[str, Any] = {}
    if not isinstance(rep, dict) or depth > 1:
        return out
    for k, v in rep.items():
        key = f"{prefix}{k}"
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        elif isinstance(v, dict) and k != "layers":
            out.update(_scalars(v, key + ".", depth + 1))
    return out
