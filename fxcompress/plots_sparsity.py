"""AC/DC's picture: sparsity over training, compressed phases shaded.

The schedule (phase starts) is drawn from the controller's resolved phases,
the sparsity curve from the per-epoch history the training loop records
(the `sparsity` figure of the `sparsity` controller, however the loop
prefixes it), so the PNG shows what ran, on top of what the policy asked.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _sparsity_of(rec: Dict[str, Any]) -> Optional[float]:
    figs = rec.get("figures", rec)
    for k, v in figs.items():
        if k == "sparsity" or k.endswith(".sparsity") or k.endswith("/sparsity") or k.endswith("_sparsity"):
            return float(v)
    return None


def plot_sparsity(history: Sequence[Dict[str, Any]], phases: Sequence[Tuple[int, str]], unit: str,
                  out_dir: str, name: str = "sparsity.png", steps_per_epoch: Optional[int] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs: List[float] = []
    ys: List[float] = []
    for i, rec in enumerate(history):
        s = _sparsity_of(rec)
        if s is not None:
            xs.append(rec.get("epoch", i))
            ys.append(100.0 * s)
    scale = 1.0 if unit == "epoch" else 1.0 / max(steps_per_epoch or 1, 1)
    step = (xs[-1] - xs[-2]) if len(xs) > 1 else 1.0  # one record's width: an epoch, or a step
    end = xs[-1] + step if xs else phases[-1][0] * scale + 1
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for i, (start, kind) in enumerate(phases):
        stop = phases[i + 1][0] * scale if i + 1 < len(phases) else end
        if kind == "sparse":
            ax.axvspan(start * scale, stop, color="tab:orange", alpha=0.18, lw=0)
    if xs:
        ax.step(xs, ys, where="post", color="tab:blue", marker="o", ms=3, label="sparsity (mean over each record)")
    ax.set_xlim(0, end)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("epoch")
    ax.set_ylabel("sparsity (%)")
    ax.set_title("AC/DC: compressed phases shaded")
    ax.legend(loc="lower right", fontsize=8)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
