"""Look at what a compile did: code before and after, a diff, a per-node
table and a graph picture with the inserted nodes highlighted.

Everything here reads a CompressedModel and changes nothing.
"""
from __future__ import annotations

import difflib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import networkx as nx
import torch.fx as fx

from .errors import BadInput
from .plan import node_qualname
from .plots import pyplot
from .report import treatment_lines
from .table import format_table

FXC_PREFIX = "fxc_"
INSERTED_FILL = "#ffcc80"   # orange: added by a pass
TREATED_FILL = "#bbdefb"    # blue: a node the plan gives a treatment
AUTO_LEAF_FILL = "#e0e0e0"  # grey: a submodule tracing could not enter
TREATED_BORDER = "#1565c0"  # an inserted node that carries a treatment
DOT_TIMEOUT_S = 60


def code_before(cm) -> str:
    return cm.original_code


def code_after(cm) -> str:
    return cm.graph_module.code


def diff(cm, context: int = 3) -> str:
    """Unified diff of the traced forward against the rewritten one ('' when equal)."""
    # fx code starts with blank lines and ends with an indented empty line
    before = code_before(cm).strip().splitlines(keepends=True)
    after = code_after(cm).strip().splitlines(keepends=True)
    lines = difflib.unified_diff(before, after, fromfile="traced (before passes)",
                                 tofile="rewritten (after passes)", n=context)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# --- per-node table ---------------------------------------------------------

def is_inserted(node: fx.Node) -> bool:
    """Inserted by a pass: the node, or the submodule/attribute it reads, is fxc_-named."""
    if node.name.startswith(FXC_PREFIX):
        return True
    if node.op in ("call_module", "get_attr"):
        return any(part.startswith(FXC_PREFIX) for part in str(node.target).split("."))
    return False


def _inserted_by(cm) -> Dict[str, str]:
    owner: Dict[str, str] = {}
    for pass_name, result in cm.pass_results.items():
        for name in result.inserted:
            owner[name] = pass_name
    return owner


def _guess_pass(name: str, cm) -> str:
    # fxc_name() builds fxc_<pass>_<target>; a pass that forgot to list a
    # node in PassResult.inserted is still named by its prefix.
    for pass_name in sorted(cm.pass_results, key=len, reverse=True):
        if name.startswith(f"{FXC_PREFIX}{pass_name}_") or name == f"{FXC_PREFIX}{pass_name}":
            return pass_name
    return "?"


def _fmt_treatments(entry) -> str:
    return "; ".join(treatment_lines(entry))


def _node_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape), str(meta.dtype).replace("torch.", "")
    return None, None


def _target(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def node_rows(cm) -> List[Dict[str, Any]]:
    """One dict per node the plan selected or a pass inserted, in graph order."""
    gm = cm.graph_module
    owners = _inserted_by(cm)
    entries = cm.plan.entries
    rows: List[Dict[str, Any]] = []
    seen = set()
    for node in gm.graph.nodes:
        entry = entries.get(node.name)
        inserted = is_inserted(node)
        if entry is None and not inserted:
            continue
        seen.add(node.name)
        shape, dtype = _node_shape(node)
        if entry is not None and entry.shape is not None:
            shape, dtype = entry.shape, entry.dtype
        by = None
        if inserted:
            by = owners.get(node.name) or owners.get(str(node.target)) or _guess_pass(node.name, cm)
        rows.append({
            "node": node.name, "qualname": entry.qualname if entry else node_qualname(node),
            "op": node.op, "target": _target(node, gm),
            "shape": list(shape) if shape is not None else None, "dtype": dtype,
            "treatments": _fmt_treatments(entry) if entry else "", "inserted_by": by,
        })
    # A plan entry whose node a pass removed without handing its name on
    # still belongs in the table: the user asked for that node.
    for name, entry in entries.items():
        if name not in seen and entry.rules:
            rows.append({"node": name, "qualname": entry.qualname, "op": entry.kind, "target": entry.target,
                         "shape": list(entry.shape) if entry.shape else None, "dtype": entry.dtype,
                         "treatments": _fmt_treatments(entry) + " (node no longer in graph)", "inserted_by": None})
    return rows


def node_table(cm) -> str:
    rows = node_rows(cm)
    if not rows:
        return "(no node selected by the policy or inserted by a pass)"
    return format_table(
        ["node", "qualname", "op", "target", "shape", "dtype", "treatments", "inserted by"],
        [[r["node"], r["qualname"], r["op"].replace("call_", ""), r["target"],
          "x".join(map(str, r["shape"])) if r["shape"] else None, r["dtype"],
          r["treatments"] or None, r["inserted_by"]] for r in rows])


# --- graph picture ----------------------------------------------------------

def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_dot(cm) -> str:
    """The rewritten graph in Graphviz DOT: a box per node, an edge per input.

    Orange boxes were inserted by a pass (fxc_ names; a blue border when
    they carry a node's treatment), blue boxes carry a treatment from the
    plan, grey double boxes are automatic leaves.
    """
    gm = cm.graph_module
    auto_leaves = {a.path: a for a in cm.trace_info.auto_leaves}
    entries = cm.plan.entries
    out = ["digraph fxcompress {", "  rankdir=TB;",
           '  node [shape=box, fontname="Helvetica", fontsize=10, style="rounded"];',
           '  edge [arrowsize=0.6];']
    for node in gm.graph.nodes:
        lines = [node.name, _short(f"{node.op.replace('call_', '')}: {_target(node, gm)}")]
        shape, _ = _node_shape(node)
        if shape is not None:
            lines.append("x".join(map(str, shape)))
        attrs: Dict[str, str] = {}
        entry = entries.get(node.name)
        if entry is not None and (entry.treatments or entry.skipped):
            lines.append(_short(_fmt_treatments(entry), 60))
            attrs.update(style='"rounded,filled"', fillcolor=_q(TREATED_FILL))
        if node.op == "call_module" and node.target in auto_leaves:
            lines.append("auto-leaf")
            attrs.update(style='"rounded,filled"', fillcolor=_q(AUTO_LEAF_FILL), peripheries="2")
        if is_inserted(node):
            if "fillcolor" in attrs:  # inserted and treated: keep the treated colour as the border
                attrs["color"] = _q(TREATED_BORDER)
            attrs.update(style='"rounded,filled,bold"', fillcolor=_q(INSERTED_FILL))
        attrs["label"] = _q("\n".join(lines))
        out.append(f"  {_q(node.name)} [{', '.join(f'{k}={v}' for k, v in attrs.items())}];")
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            out.append(f"  {_q(src.name)} -> {_q(node.name)};")
    out.append("}")
    return "\n".join(out) + "\n"


def _node_style(cm, node: fx.Node, auto_leaves) -> str:
    """The fill colour of a node in both pictures (see to_dot)."""
    if is_inserted(node):
        return INSERTED_FILL
    if node.op == "call_module" and node.target in auto_leaves:
        return AUTO_LEAF_FILL
    entry = cm.plan.entries.get(node.name)
    if entry is not None and (entry.treatments or entry.skipped):
        return TREATED_FILL
    return "#ffffff"


def draw_png(cm, path: Path) -> Path:
    """The rewritten graph as a PNG without Graphviz: networkx places the
    nodes in rows by their depth from the inputs (a DAG's topological
    generations, as dot's top-to-bottom ranks), matplotlib draws them with
    the colours of to_dot."""
    gm = cm.graph_module
    auto_leaves = {a.path for a in cm.trace_info.auto_leaves}
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    for depth, names in enumerate(nx.topological_generations(g)):
        for name in names:
            g.nodes[name]["depth"] = depth
    # weights and constants (get_attr) sit just above their first user, not
    # all in the inputs' row
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            g.nodes[node.name]["depth"] = min(g.nodes[u.name]["depth"] for u in node.users) - 1
    pos = nx.multipartite_layout(g, subset_key="depth", align="horizontal", scale=1.0)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}  # inputs at the top, as dot draws them
    depth = 1 + max((d for _, d in g.nodes(data="depth")), default=0)
    width = 1 + max((sum(1 for _, d in g.nodes(data="depth") if d == k) for k in range(depth)), default=1)
    plt = pyplot()
    size = (min(4 + 1.6 * width, 40), min(2 + 0.55 * depth, 80))
    fig, ax = plt.subplots(figsize=size)
    colours = [_node_style(cm, n, auto_leaves) for n in gm.graph.nodes]
    nx.draw_networkx_edges(g, pos, ax=ax, arrowsize=6, width=0.6, edge_color="#777777", node_size=900)
    nx.draw_networkx_nodes(g, pos, nodelist=[n.name for n in gm.graph.nodes], node_color=colours,
                           edgecolors="#555555", node_shape="s", node_size=900, linewidths=0.6, ax=ax)
    nx.draw_networkx_labels(g, pos, labels={n.name: _short(n.name, 24) for n in gm.graph.nodes}, font_size=5, ax=ax)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110 if max(size) <= 40 else 60)  # a deep graph: fewer pixels, not a huge file
    plt.close(fig)
    return path


@dataclass
class GraphFiles:
    dot: Path
    svg: Optional[Path] = None
    png: Optional[Path] = None
    note: Optional[str] = None  # what was not drawn, and why
    paths: List[Path] = field(default_factory=list)


def write_graph(cm, path) -> GraphFiles:
    """Write PATH's .dot (always), .png (networkx + matplotlib, no Graphviz
    needed) and .svg (when Graphviz `dot` is installed).

    PATH may end in .dot, .svg, .png or nothing; the files share its stem. A
    missing or failing `dot` (or matplotlib) is a note, not an error: the
    .dot file is the picture's source and renders anywhere later.
    """
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".dot", ".svg", ".gv", ".png") else p
    if stem.parent and not stem.parent.exists():
        raise BadInput(f"cannot write the graph: folder {stem.parent} does not exist")
    dot_path, svg_path = stem.with_name(stem.name + ".dot"), stem.with_name(stem.name + ".svg")
    png_path = stem.with_name(stem.name + ".png")
    dot_path.write_text(to_dot(cm))
    out = GraphFiles(dot_path, paths=[dot_path])
    notes = []
    try:
        out.png = draw_png(cm, png_path)
        out.paths.append(png_path)
    except ImportError as e:
        notes.append(f"no {png_path.name}: {e.name or 'matplotlib'} is not installed (pip install matplotlib)")
    exe = shutil.which("dot")
    if exe is None:
        notes.append(f"Graphviz 'dot' is not installed: no {svg_path.name} "
                     f"(render it later with: dot -Tsvg {dot_path} -o {svg_path})")
    else:
        try:
            proc = subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg_path)],
                                  capture_output=True, text=True, timeout=DOT_TIMEOUT_S)
            if proc.returncode != 0:
                notes.append(f"Graphviz 'dot' failed ({proc.stderr.strip()[:200]}); no {svg_path.name}")
            else:
                out.svg = svg_path
                out.paths.append(svg_path)
        except subprocess.TimeoutExpired:
            notes.append(f"Graphviz 'dot' took over {DOT_TIMEOUT_S} s; no {svg_path.name}")
    out.note = "; ".join(notes) or None
    return out


__all__ = ["code_before", "code_after", "diff", "node_rows", "node_table", "to_dot", "write_graph",
           "GraphFiles", "is_inserted", "draw_png"]
