"""fxcompress transform MODEL --policy P.yaml: trace, plan, rewrite, write."""
from __future__ import annotations

import argparse

from ..export import export
from ..report import plan_table, summary
from .common import add_json_arg, add_model_args, compile_from_args, print_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("transform", help="rewrite a model's graph by a policy",
                       description="Trace MODEL, resolve the policy against its graph and rewrite it. "
                       "Prints the per-layer plan; with -o DIR writes the rewritten module as Python, "
                       "its weights, report.json and graph pictures.")
    add_model_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan only; rewrite nothing")
    add_json_arg(p)
    p.add_argument("-o", "--output", metavar="DIR", help="write module.py, weights, report.json, graph.dot/png (and graph.svg with Graphviz)")
    return p


def _auto_leaf_lines(cm) -> list:
    """What tracing decided on its own: automatic leaves, leaves that hold
    layers no rule reaches, forward arguments fixed at their defaults."""
    info = cm.trace_info
    lines = [f"auto-leaf: {a.path} ({a.type}) at {a.where}: {a.reason}" for a in info.auto_leaves]
    lines += [f"leaf: {c.path} ({c.type}) holds {', '.join(c.inner)}: {c.why}" for c in info.leaf_containers]
    if info.fixed_args:
        fixed = ", ".join(f"{k}={v!r}" for k, v in info.fixed_args.items())
        lines.append(f"traced with forward arguments at their defaults (the example inputs do not give them): {fixed}")
    return lines


def run(args) -> int:
    if args.dry_run:
        return _dry_run(args)
    loaded, inputs, cm = compile_from_args(args)
    written, notes = [], []
    if args.output:
        written = export(cm, args.output, loaded.source, notes=notes)
    if args.json:
        print_json({"summary": summary(cm), "report": cm.report().to_dict(), "written": [str(w) for w in written],
                    "notes": notes})
        return 0
    for line in _auto_leaf_lines(cm):
        print(line)
    print(plan_table(cm.plan))
    s = summary(cm)
    print(f"\n{s['selected_nodes']} nodes selected, treated: {s['treated_nodes'] or 'none'}, "
          f"{s['inserted']} nodes/modules inserted")
    for r in cm.pass_results.values():
        for note in r.notes:
            print(f"note: {note}")
    for w in written:
        print(f"wrote {w}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _dry_run(args) -> int:
    # The plan needs a traced graph and shapes but no rewrite: a dry-run
    # compile resolves and validates everything a real run would.
    _, _, cm = compile_from_args(args, dry_run=True)
    if args.json:
        print_json({"summary": summary(cm), "auto_leaves": [vars(a) for a in cm.trace_info.auto_leaves],
                    "plan": cm.plan.to_json()["nodes"]})
        return 0
    for line in _auto_leaf_lines(cm):
        print(line)
    print(plan_table(cm.plan))
    s = summary(cm)
    print(f"\n(dry run) {s['selected_nodes']} nodes selected, would treat: {s['treated_nodes'] or 'none'}")
    return 0
