"""All five methods on one model (policies/all.yaml) against the uncompressed
baseline, on the embedded digits data with data-parallel workers (issue 16).

The recipe a user would follow (README "Composing the methods"): CAMP and
PSGD start from a trained model, so per seed

1. stage 1: the all-4-bit network (`--init-policy`, policies/camp_w4.yaml),
   `--init-epochs` epochs at `--lr`;
2. stage 2: `fxcompress train --policy policies/all.yaml --nproc N --init
   <stage 1>` for `--epochs` epochs at `--lr2` (CAMP's two paths, PSGD,
   AC/DC, AutoQuant activations, ALQ gradients, all on);

and the baseline follows the same two stages with no policy (fp32 all-reduce,
same seed, same data order, same epochs and learning rates). `--init-epochs
0` skips stage 1 (all.yaml from scratch, `--baseline` beside it).

From the run reports, one row per seed: test accuracy of both, the
difference, the saved-activation ratio (fp32 bytes of the tensors the
compressed graph saves / the bytes it stores), the weight sparsity at the
end, CAMP's relative energy on the test set (BOPs vs the all-4-bit network)
and its high-path usage, and the bytes each worker puts on the wire per
step (ALQ) against fp32.

    nice -n 10 .venv/bin/python tools/replicate_all.py --seeds 5 --json all.json        # BENCHMARKS.md
    .venv/bin/python tools/replicate_all.py --seeds 1 --init-epochs 1 --epochs 1 --train-limit 128   # smoke run

The policy's sparsity schedule is in epochs and written for stage 2's
default length (--epochs 4).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fxcompress.table import format_table  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--policy", default=os.path.join(ROOT, "policies", "all.yaml"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--init-policy", default=os.path.join(ROOT, "policies", "camp_w4.yaml"),
                   help="stage 1's policy (default: the all-4-bit network)")
    p.add_argument("--init-epochs", type=int, default=6, help="stage 1's epochs (0: no stage 1)")
    p.add_argument("--epochs", type=int, default=4, help="stage 2's epochs (all.yaml)")
    p.add_argument("--depth", type=int, default=8, help="built-in ResNet depth 6n+2 (default 8)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.05, help="stage 1's initial learning rate (cosine)")
    p.add_argument("--lr2", type=float, default=0.02, help="stage 2's initial learning rate (cosine)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "replicate_all"), help="run directories go here")
    p.add_argument("--json", metavar="PATH", help="also write the rows and means as JSON")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: read the seeds' finished run directories under --runs (seeds run by "
                        "several processes with --first-seed) and print the table")
    return p.parse_args(argv)


def _train(args, seed: int, run_dir: str, epochs: int, lr: float, policy=None, init=None, baseline=False):
    cmd = [sys.executable, "-m", "fxcompress", "train", "--nproc", str(args.nproc), "--seed", str(seed),
           "--epochs", str(epochs), "--depth", str(args.depth), "--lr", str(lr), "--run-dir", run_dir,
           "--no-plots", "--no-progress"]
    if policy:
        cmd += ["--policy", policy]
    if init:
        cmd += ["--init", init]
    if baseline:
        cmd += ["--baseline"]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.test_limit:
        cmd += ["--test-limit", str(args.test_limit)]
    out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():  # what --init loaded, and each epoch, for the log
        if line.startswith("--init") or " epoch " in line:
            print(f"  {os.path.basename(run_dir)}: {line[:160]}", file=sys.stderr)


def train(args, seed: int):
    """Both arms of one seed; returns (compressed run dir, baseline run dir)."""
    root = os.path.join(args.runs, f"seed{seed}")
    if not args.init_epochs:
        _train(args, seed, root, args.epochs, args.lr2, args.policy, baseline=True)
        return root, os.path.join(root, "baseline")
    s1, s2 = os.path.join(root, "stage1"), os.path.join(root, "all")
    b1, b2 = os.path.join(root, "baseline_stage1"), os.path.join(root, "baseline")
    # stage 1 with --baseline: the fp32 model of the same seed's first stage
    _train(args, seed, s1, args.init_epochs, args.lr, args.init_policy, baseline=True)
    _train(args, seed, s2, args.epochs, args.lr2, args.policy, init=s1)
    os.replace(os.path.join(s1, "baseline"), b1)
    _train(args, seed, b2, args.epochs, args.lr2, init=b1)
    return s2, b2


def _dirs(args, seed: int):
    root = os.path.join(args.runs, f"seed{seed}")
    return (root, os.path.join(root, "baseline")) if not args.init_epochs else \
        (os.path.join(root, "all"), os.path.join(root, "baseline"))


def _finished(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "report.json")) as f:
            return json.load(f).get("status") == "done"
    except (OSError, ValueError):
        return False


def row(run_dir: str, base_dir: str, seed: int) -> dict:
    with open(os.path.join(run_dir, "report.json")) as f:
        r = json.load(f)
    with open(os.path.join(base_dir, "report.json")) as f:
        b = json.load(f)
    stage1 = os.path.join(os.path.dirname(run_dir), "stage1", "report.json")
    w4 = None
    if os.path.isfile(stage1):  # the all-4-bit network stage 2 started from
        with open(stage1) as f:
            w4 = json.load(f)["final"]["test_acc"]
    c = r["controllers"]
    act, dp, sp = c.get("activations", {}), c.get("dual_precision", {}), c.get("sparsity", {})
    wire = (r.get("distributed") or {}).get("wire", {})
    return {"seed": seed, "acc": r["final"]["test_acc"], "baseline_acc": b["final"]["test_acc"], "w4_acc": w4,
            "diff_points": 100 * (r["final"]["test_acc"] - b["final"]["test_acc"]),
            "activation_ratio": act.get("fp32_mb", 0) / max(act.get("saved_mb", 0), 1e-12) if act else None,
            "sparsity": sp.get("sparsity"), "energy": dp.get("test_energy"), "high_usage": dp.get("test_usage"),
            "wire_bytes_per_step": wire.get("comm.wire_bytes_per_step"),
            "fp32_bytes_per_step": wire.get("comm.fp32_bytes_per_step")}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        dirs = _dirs(args, seed) if args.collect else train(args, seed)
        if args.collect and not all(_finished(d) for d in dirs):
            print(f"seed {seed}: not finished, left out", file=sys.stderr)
            continue
        rows.append(row(*dirs, seed))
        print(f"seed {seed} done", file=sys.stderr)
    keys = ["acc", "baseline_acc", "w4_acc", "diff_points", "activation_ratio", "sparsity", "energy", "high_usage",
            "wire_bytes_per_step", "fp32_bytes_per_step"]
    mean = {k: statistics.fmean([r[k] for r in rows if r[k] is not None]) if any(r[k] is not None for r in rows)
            else None for k in keys}
    table = [[str(r["seed"]), fmt(100 * r["acc"], ".2f"), fmt(100 * r["baseline_acc"], ".2f"),
              "-" if r["w4_acc"] is None else fmt(100 * r["w4_acc"], ".2f"),
              fmt(r["diff_points"], "+.2f"), fmt(r["activation_ratio"], ".2f") + "x", fmt(r["sparsity"], ".3f"),
              fmt(r["energy"], ".3f"), fmt(r["high_usage"], ".2f"),
              f"{fmt(r['wire_bytes_per_step'], ',.0f')} / {fmt(r['fp32_bytes_per_step'], ',.0f')}"]
             for r in rows + [dict(mean, seed="mean")]]
    print(format_table(["seed", "all.yaml acc %", "baseline acc %", "stage 1 (4-bit) %", "diff (points)", "saved-act ratio",
                        "sparsity", "rel. energy", "high-path use", "wire B/step (alq / fp32)"], table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "mean": mean}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
