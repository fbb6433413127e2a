"""fxcompress inspect MODEL --policy P.yaml: what the compile did to the graph."""
from __future__ import annotations

import argparse

from .. import inspect as fxi
from .common import add_json_arg, add_model_args, compile_from_args, print_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show the code before and after, a per-node table and the graph",
                       description="Compile MODEL with the policy and show what changed: the traced and "
                       "rewritten forward code, their diff, a table of selected and inserted nodes, "
                       "and a graph picture with inserted nodes highlighted. "
                       "Without a view flag, prints the table and the diff.")
    add_model_args(p)
    p.add_argument("--code", action="store_true", help="print the forward code before and after")
    p.add_argument("--diff", action="store_true", help="print a unified diff of the code")
    p.add_argument("--table", action="store_true", help="print the per-node table")
    p.add_argument("--graph", metavar="PATH", help="write PATH.dot, PATH.png (no Graphviz needed), and PATH.svg when Graphviz is installed")
    add_json_arg(p)
    return p


def run(args) -> int:
    _, _, cm = compile_from_args(args)
    show_code, show_diff, show_table = args.code, args.diff, args.table
    if not (show_code or show_diff or show_table or args.graph):
        show_diff = show_table = True
    graph = fxi.write_graph(cm, args.graph) if args.graph else None
    if args.json:
        data = {}
        if show_code:
            data.update(code_before=fxi.code_before(cm), code_after=fxi.code_after(cm))
        if show_diff:
            data["diff"] = fxi.diff(cm)
        if show_table:
            data["nodes"] = fxi.node_rows(cm)
        if graph:
            data["graph"] = {"written": [str(p) for p in graph.paths], "note": graph.note}
        print_json(data)
        return 0
    sections = []
    if show_code:
        sections += [f"# before\n{fxi.code_before(cm).strip()}", f"# after\n{fxi.code_after(cm).strip()}"]
    if show_table:
        sections.append(fxi.node_table(cm))
    if show_diff:
        sections.append(fxi.diff(cm).rstrip() or "(the rewrite changed no code)")
    if graph:
        lines = [f"wrote {p}" for p in graph.paths] + ([f"note: {graph.note}"] if graph.note else [])
        sections.append("\n".join(lines))
    print("\n\n".join(sections))
    return 0
