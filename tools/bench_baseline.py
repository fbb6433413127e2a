"""Baseline accuracy of the default model on digits: mean and spread over seeds.

    .venv/bin/python tools/bench_baseline.py            # 5 seeds, the defaults of `fxcompress train`
    .venv/bin/python tools/bench_baseline.py --json

Trains the built-in ResNet uncompressed with `fxcompress train`'s defaults
(TrainConfig), once per seed, and prints one row per seed plus mean and
sample standard deviation. Other settings can be given to explore
(--epochs, --upscale, --depth, --lr, --threads); the table says which were used.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxcompress.table import format_table  # noqa: E402
from fxcompress.training import DIGITS_DEFAULT_UPSCALE, TrainConfig, train  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    p.add_argument("--data", default=None, help="data spec (default: the train default, digits)")
    for name, typ in (("epochs", int), ("upscale", int), ("depth", int), ("lr", float), ("threads", int),
                      ("batch-size", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the train default")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2 for a spread")

    overrides = {k: v for k, v in vars(args).items()
                 if k in ("data", "epochs", "upscale", "depth", "lr", "threads", "batch_size") and v is not None}
    base = replace(TrainConfig(), progress=False, plots=False, **overrides)
    rows, results = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxc_bench_") as tmp:
        for seed in range(args.seeds):
            cfg = replace(base, seed=seed, run_dir=os.path.join(tmp, f"seed{seed}"))
            res = train(cfg)["main"]
            f = res["final"]
            results.append({"seed": seed, "test_acc": f["test_acc"], "best_test_acc": f["best_test_acc"],
                            "time_per_epoch_s": f["time_per_epoch_s"], "img_per_s": f["img_per_s"]})
            rows.append([seed, 100 * f["test_acc"], 100 * f["best_test_acc"], f["time_per_epoch_s"], f["img_per_s"]])
            print(f"seed {seed}: test {100 * f['test_acc']:.2f}%", file=sys.stderr, flush=True)
    accs = [100 * r["test_acc"] for r in results]
    best = [100 * r["best_test_acc"] for r in results]
    times = [r["time_per_epoch_s"] for r in results]
    summary = {"mean_test_acc": statistics.mean(accs), "std_test_acc": statistics.stdev(accs),
               "min_test_acc": min(accs), "max_test_acc": max(accs),
               "mean_best_test_acc": statistics.mean(best), "mean_time_per_epoch_s": statistics.mean(times),
               "wall_s": time.perf_counter() - t_start}
    if args.json:
        json.dump({"config": {k: v for k, v in asdict(base).items() if k not in ("run_dir", "progress", "plots")},
                   "seeds": results, "summary": summary}, sys.stdout, indent=2)
        print()
        return 0
    upscale = base.upscale or (DIGITS_DEFAULT_UPSCALE if base.data == "digits" else "native")
    cfg_text = (f"data {base.data}, upscale {upscale}, ResNet-{base.depth}, {base.epochs} epochs, "
                f"batch {base.batch_size}, {base.optimizer} lr {base.lr} {base.schedule}, wd {base.weight_decay}, "
                f"threads {base.threads}")
    print(cfg_text)
    rows.append(["mean ± std", f"{summary['mean_test_acc']:.2f} ± {summary['std_test_acc']:.2f}",
                 f"{summary['mean_best_test_acc']:.2f}", summary["mean_time_per_epoch_s"], None])
    print(format_table(["seed", "final test acc (%)", "best test acc (%)", "s/epoch", "img/s"], rows))
    print(f"min {summary['min_test_acc']:.2f} %, max {summary['max_test_acc']:.2f} %, "
          f"wall {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
