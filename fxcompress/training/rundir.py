"""The run directory: its name, report.json, the final model, plots, and the
side-by-side table of a run and its baseline."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..errors import BadInput
from ..plots import write_plots
from ..table import format_table
from .checkpoint import CHECKPOINT, FINAL_MODEL, save_weights, snapshots
from .hooks import controller_reports, hook

if TYPE_CHECKING:
    from .build import Run


REPORT = "report.json"
BASELINE_DIR = "baseline"


def new_run_dir(base: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(base, stamp), 1
    while os.path.exists(path):
        path, i = os.path.join(base, f"{stamp}-{i}"), i + 1
    return path


def claim_run_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, REPORT)) or os.path.exists(os.path.join(path, CHECKPOINT)):
        raise BadInput(f"--run-dir {path} already holds a run; continue it with --resume {path} "
                       "or choose another --run-dir")
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"--run-dir {path} exists and is not a folder")
    return path  # created by the first epoch, so a run that fails to start leaves nothing behind


def summarise(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    total_time = sum(h["time_s"] for h in history)
    # Images over time, not a mean of per-epoch rates: one stalled epoch on a
    # shared machine must weigh by how long it took.
    images = sum(h["img_per_s"] * h["time_s"] for h in history)
    return {"epochs": len(history), "test_acc": last["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in history), "train_acc": last["train_acc"],
            "train_loss": last["train_loss"], "test_loss": last["test_loss"],
            "time_per_epoch_s": total_time / len(history), "img_per_s": images / total_time if total_time else 0.0,
            "figures": dict(last["figures"])}


def file_digest(path: Optional[str]) -> Optional[str]:
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_report(run: Run, status: str) -> Dict[str, Any]:
    params = sum(p.numel() for p in run.model.parameters())
    report = {"label": run.label, "status": status, "run_dir": run.run_dir, "config": asdict(run.cfg),
              "policy_sha256": file_digest(run.cfg.policy),
              "data": run.bundle.describe(), "model": {**run.source, "parameters": params},
              "compressed": run.compressed, "device": str(run.device), "epochs": run.history,
              "final": summarise(run.history), "compile": run.compile_report,
              "distributed": _distributed_report(run)}
    if run.init is not None:
        report["init"] = run.init
    saved = snapshots(run.run_dir)
    if saved:
        report["snapshots"] = saved
    return report


def _distributed_report(run: Run) -> Optional[Dict[str, Any]]:
    if run.world <= 1:
        return None
    out = {"nproc": run.world, "backend": run.backend, "batch_per_worker": run.cfg.batch_size // run.world,
           "global_batch": run.cfg.batch_size, "written_by_rank": run.rank}
    if run.comm is not None:
        out["communication"] = jsonable(asdict(run.comm.config))
        out["wire"] = {k: float(v) for k, v in run.comm.figures().items()}
        out["refits"] = jsonable(run.comm.refits)
    return out


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def jsonable(obj):
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=str))


def finish(run: Run, status: str) -> None:
    if status == "done":
        save_weights(run, os.path.join(run.run_dir, FINAL_MODEL))
    report = run_report(run, status)
    if hasattr(run.model, "controllers"):
        report["controllers"] = jsonable(controller_reports(run.model))
    write_json(os.path.join(run.run_dir, REPORT), report)


def describe_run(run: Run) -> str:
    b = run.bundle
    params = sum(p.numel() for p in run.model.parameters())
    name = run.source.get("name") or os.path.basename(run.source.get("path", "model"))
    text = (f"data {b.name}: {len(b.train)} train / {len(b.test)} test images, {b.in_channels}x{b.image_size}x"
            f"{b.image_size}, {b.num_classes} classes; model {name} ({params / 1e6:.2f} M parameters); "
            f"policy {run.cfg.policy or 'none'}; device {run.device}; run dir {run.run_dir}")
    if run.world > 1:
        comm = run.comm.config
        wire = "fp32 all-reduce" if comm.full_precision else f"{comm.method} {comm.resolved_bits}-bit"
        text += (f"; {run.world} {run.backend} workers x {run.cfg.batch_size // run.world} images a step, "
                 f"gradients as {wire}")
    if run.history:
        text += f"; resuming after epoch {len(run.history)}"
    return text


def job_report(main: Run, status: str, result: Dict[str, Any]) -> Dict[str, Any]:
    report = run_report(main, status)
    if hasattr(main.model, "controllers"):
        report["controllers"] = jsonable(controller_reports(main.model))
    for key in ("baseline", "comparison", "plots", "resumed"):
        if key in result:
            report[key] = result[key]
    return report


def run_plots(main: Run, base: Optional[Run]) -> List[str]:
    reports = jsonable(controller_reports(main.model)) or {}
    title = f"{main.source.get('name', 'model')} on {main.bundle.name}"
    written = write_plots(main.run_dir, main.history, reports, base.history if base else None, title)
    if main.history:
        # the controllers' own pictures (a method's plot file), beside the run's
        folder = os.path.join(main.run_dir, "plots")
        os.makedirs(folder, exist_ok=True)
        written += list(hook(main.model, "plots", main.history, folder) or [])
    if base is not None:
        written += write_plots(base.run_dir, base.history, None, None, title + " (baseline)")
    return written


def comparison_rows(main: Dict[str, Any], base: Dict[str, Any]) -> List[List[Any]]:
    """[measure, compressed, baseline, difference] rows for the final table."""
    m, b = main["final"], base["final"]

    def pct(v):
        return None if v is None else round(100 * v, 2)

    rows = [["test accuracy (%)", pct(m.get("test_acc")), pct(b.get("test_acc"))],
            ["best test accuracy (%)", pct(m.get("best_test_acc")), pct(b.get("best_test_acc"))],
            ["train accuracy (%)", pct(m.get("train_acc")), pct(b.get("train_acc"))],
            ["train loss", m.get("train_loss"), b.get("train_loss")],
            ["test loss", m.get("test_loss"), b.get("test_loss")],
            ["time/epoch (s)", m.get("time_per_epoch_s"), b.get("time_per_epoch_s")],
            ["throughput (img/s)", m.get("img_per_s"), b.get("img_per_s")],
            ["parameters", main["model"]["parameters"], base["model"]["parameters"]]]
    for name, v in m.get("figures", {}).items():
        rows.append([name, v, b.get("figures", {}).get(name)])
    out = []
    for name, a, c in rows:
        diff = a - c if isinstance(a, (int, float)) and isinstance(c, (int, float)) else None
        out.append([name, a, c, diff])
    return out


def comparison_table(rows: List[List[Any]]) -> str:
    return format_table(["", "compressed", "baseline", "difference"], rows)
