"""PNG pictures of a training run (matplotlib, Agg backend: no display needed).

Methods get pictures without writing plotting code:
- every per-epoch figure (``model.figures()``) gets a panel in figures.png;
- layers.png: a bar chart per column of per-layer figures: stored bits of
  every activation-treated layer, PSGD's bits per weight, the columns a
  controller's ``report()`` hands over as ``layer_columns``, and any other
  mapping ``{layer: number}`` in a report (see per_layer_tables);
- figures whose name mentions energy or cost get accuracy-vs-figure in
  tradeoff.png (CAMP's accuracy vs relative energy).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

TRADEOFF_WORDS = ("energy", "cost")
MAX_BARS = 120


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int):
    cols = min(3, max(1, n))
    return int(math.ceil(n / cols)), cols


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_curves(history: Sequence[Dict[str, Any]], path: str,
                baseline: Optional[Sequence[Dict[str, Any]]] = None, title: str = "") -> str:
    """Loss and accuracy per epoch, train and test; the baseline dashed if given."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    runs = [("", history, "-")] + ([("baseline ", baseline, "--")] if baseline else [])
    for prefix, hist, style in runs:
        ep = [h["epoch"] for h in hist]
        for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "acc", 100)):
            for split, color in (("train", "C0"), ("test", "C1")):
                ax.plot(ep, [scale * h[f"{split}_{key}"] for h in hist], style, color=color, marker=".",
                        label=f"{prefix}{split}")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    _integer_epochs(ax_loss, ax_acc)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def figure_names(history: Sequence[Dict[str, Any]]) -> List[str]:
    names: List[str] = []
    for h in history:
        for k in h.get("figures", {}):
            if k not in names:
                names.append(k)
    return names


def plot_figures(history: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """One panel per method figure, value per epoch. None when there are no figures."""
    names = figure_names(history)
    if not names:
        return None
    plt = pyplot()
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(h["epoch"], h["figures"][name]) for h in history if _is_number(h.get("figures", {}).get(name))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
        ax.set(title=name, xlabel="epoch")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save(fig, path)


def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def per_layer_tables(reports: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """`{column title: {layer: value}}` for layers.png, in this order:

    1. what every treated layer stores or gets: the stored bits per element
       of every activation-treated node (the activations controller's ledger
       of the last forward: 32 * stored / fp32 bytes, the packed data with
       its scales and masks; a node whose saved tensor another node stored
       already, or that keeps only tiny tensors as they are, has no bar),
       and PSGD's grid width per weight;
    2. columns a controller's report() hands over as
       `layer_columns: {title: {layer: number}}` (the hook for per-layer
       sparsity or precision of later methods);
    3. every other all-numeric mapping in a report (AutoQuant's measured
       widths of probed ops, budgets, ...), as `controller.key`.
    """
    out: Dict[str, Dict[str, float]] = {}
    for ctrl, rep in (reports or {}).items():
        if not isinstance(rep, dict):
            continue
        nodes = rep.get("nodes")
        if isinstance(nodes, dict) and nodes:
            bits = {str(n): 32.0 * d["stored_bytes"] / d["fp32_bytes"] for n, d in nodes.items()
                    if isinstance(d, dict) and _is_number(d.get("stored_bytes")) and d.get("fp32_bytes")}
            if bits:
                out[f"{ctrl}: stored bits per element (last forward)"] = bits
        layers = rep.get("layers")
        if isinstance(layers, dict) and layers:
            bits = {str(n): float(d["bits"]) for n, d in layers.items() if isinstance(d, dict) and _is_number(d.get("bits"))}
            if bits:
                out[f"{ctrl}: bits per weight"] = bits
    for ctrl, rep in (reports or {}).items():
        cols = rep.get("layer_columns") if isinstance(rep, dict) else None
        for title, col in (cols or {}).items():
            if isinstance(col, dict) and col and all(_is_number(v) for v in col.values()):
                out[f"{ctrl}: {title}"] = {str(k): float(v) for k, v in col.items()}
    for ctrl, rep in (reports or {}).items():
        if not isinstance(rep, dict):
            continue
        for key, val in rep.items():
            if isinstance(val, dict) and val and all(_is_number(v) for v in val.values()):
                out[f"{ctrl}.{key}"] = {str(k): float(v) for k, v in val.items()}
    return out


def plot_layers(reports: Dict[str, Any], path: str) -> Optional[str]:
    tables = per_layer_tables(reports)
    if not tables:
        return None
    plt = pyplot()
    widest = max(min(len(t), MAX_BARS) for t in tables.values())
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(10, 0.12 * widest), 3.2 * len(tables)), squeeze=False)
    for ax, (name, table) in zip(axes.flat, tables.items()):
        items = list(table.items())[:MAX_BARS]
        ax.bar(range(len(items)), [v for _, v in items])
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([k for k, _ in items], rotation=90, fontsize=6)
        ax.set(title=name + (f" (first {MAX_BARS} of {len(table)})" if len(table) > MAX_BARS else ""))
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_tradeoff(history: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    names = [n for n in figure_names(history) if any(w in n.lower() for w in TRADEOFF_WORDS)]
    if not names:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(h["figures"][name], 100 * h["test_acc"], h["epoch"]) for h in history
               if _is_number(h.get("figures", {}).get(name))]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis")
        ax.set(xlabel=name, ylabel="test accuracy (%)", title=f"accuracy vs {name}")
        ax.grid(alpha=0.3)
        fig.colorbar(sc, ax=ax, label="epoch")
    return _save(fig, path)


def write_plots(run_dir: str, history: Sequence[Dict[str, Any]], reports: Optional[Dict[str, Any]] = None,
                baseline: Optional[Sequence[Dict[str, Any]]] = None, title: str = "") -> List[str]:
    """Every picture that applies to this run, under run_dir/plots/. Returns the paths written."""
    if not history:
        return []
    try:
        pyplot()
    except ImportError:
        return []
    folder = os.path.join(run_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    written = [plot_curves(history, os.path.join(folder, "curves.png"), baseline, title),
               plot_figures(history, os.path.join(folder, "figures.png")),
               plot_layers(reports or {}, os.path.join(folder, "layers.png")),
               plot_tradeoff(history, os.path.join(folder, "tradeoff.png"))]
    return [p for p in written if p]
