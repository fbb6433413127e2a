"""CAMP's pictures of one run: gate usage and relative energy per epoch
(training gates) beside test accuracy, and the usage of each block's gate."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from .plots import _save, pyplot as _pyplot


def write_plots(history: Sequence[Dict[str, Any]], report: Dict[str, Any], out_dir: str) -> List[str]:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ep = [h["epoch"] for h in history]
    figs = [h.get("figures", {}) for h in history]
    usage = [f.get("dual_precision.usage") for f in figs]
    energy = [f.get("dual_precision.energy") for f in figs]
    if history and all(v is not None for v in usage + energy):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ep, usage, marker=".", label="high-path usage (train)")
        a.plot(ep, energy, marker=".", label="energy vs all-4-bit (train)")
        a.set(xlabel="epoch", ylim=(0, max(1.1, max(energy) * 1.05)), title="gates")
        b.plot(energy, [100 * h["test_acc"] for h in history], marker="o")
        for e, h in zip(energy, history):
            b.annotate(str(h["epoch"]), (e, 100 * h["test_acc"]), fontsize=7)
        b.set(xlabel="relative energy (train gates)", ylabel="test accuracy (%)", title="accuracy vs energy")
        for ax in (a, b):
            ax.grid(alpha=0.3)
        a.legend()
        written.append(_save(fig, os.path.join(out_dir, "dual_precision_epochs.png")))
    blocks = report.get("blocks") or {}
    if blocks:
        names = list(blocks)
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 4))
        x = range(len(names))
        for off, key, label in ((-0.2, "train_usage", "train (last epoch)"), (0.2, "test_usage", "test")):
            vals = [blocks[n].get(key) or 0.0 for n in names]
            ax.bar([i + off for i in x], vals, width=0.4, label=label)
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
        ax.set(ylabel="fraction of samples on the high path", ylim=(0, 1.05), title="gate usage per block")
        ax.legend()
        written.append(_save(fig, os.path.join(out_dir, "dual_precision_blocks.png")))
    return written
