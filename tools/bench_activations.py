"""Activation compression (issue 4): memory, peak RSS and step time.

    .venv/bin/python tools/bench_activations.py                 # everything
    .venv/bin/python tools/bench_activations.py --only memory   # memory, speed, rss

memory: saved-activation bytes of one training forward, fp32 (what autograd
        keeps without compression, each storage counted once) vs stored
        (bytes of the packed tensors actually held), from
        fxcompress.runtime.measure.measure_saved, after 3 SGD steps
        (lr 0.01) on random data, so that `auto` has taken its statistics
        (torchvision's ViT starts with a zero classifier head: no gradient
        reaches the encoder at step 0, and AutoQuant measures again at step
        1). Beside it, measured on a fresh batch: the relative squared error
        of the weight gradients, compressed against uncompressed with the
        same weights, for the whole model (sum over parameters) and for the
        worst parameter tensor.
rss:    peak RSS a training step adds, after the same warm-up (ARCHITECTURE.md
        recipe: a separate process with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0,
        /proc/self/clear_refs reset, VmHWM after the step minus VmRSS before).
speed:  resnet50 step time (forward, backward, SGD step), compressed over
        uncompressed, modes alternated in one process, median of N steps.
accuracy (only with --only accuracy: 15 trainings): the default model on
        digits (fxcompress.training.train, default settings), seeds 0..4:
        `auto` with its uncompressed baseline (same seed, same batches) and
        `2bit`; mean final test accuracy of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODES = {
    "none": None,
    "2bit": os.path.join(ROOT, "policies", "acgc_2bit.yaml"),
    "auto": os.path.join(ROOT, "policies", "acgc_auto.yaml"),
    "zvc8": os.path.join(ROOT, "policies", "acgc_zvc8.yaml"),
}
MODELS = {"resnet50": (32, 64), "vit_b_16": (16, 64)}


def build(name: str, mode: str, seed: int = 0):
    import torchvision

    import fxcompress

    torch.manual_seed(seed)
    batch, size = MODELS[name]
    m = torchvision.models.vit_b_16(image_size=size) if name == "vit_b_16" else getattr(torchvision.models, name)()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    if MODES[mode] is not None:
        m = fxcompress.compile(m, MODES[mode], example_inputs=x[:1])
    return m, x, y


def train_step(m, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    if hasattr(m, "step"):
        m.step()


WARMUP_STEPS = 3


def warm_up(m, x, y):
    """WARMUP_STEPS SGD steps (lr 0.01) on random batches of x's and y's shapes:
    `auto` takes its statistics here; returns the optimizer."""
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(WARMUP_STEPS):
        xb, yb = torch.randn(x.shape, generator=gen), torch.randint(0, 1000, y.shape, generator=gen)
        train_step(m, opt, xb, yb)
    return opt


def memory(name: str, mode: str):
    from fxcompress.runtime.measure import _CountAll, measure_saved

    m, x, y = build(name, mode)
    m.train()
    if mode == "none":
        c = _CountAll(m)
        with torch.autograd.graph.saved_tensors_hooks(c.pack, c.unpack):
            F.cross_entropy(m(x), y).backward()
        return {"fp32": c.bytes, "stored": c.bytes}
    warm_up(m, x, y)
    f = measure_saved(m, x, lambda out: F.cross_entropy(out, y))
    # tensors saved by ops outside compressed nodes are kept as they are
    other = f["all_saved_bytes"]
    out = {"fp32": f["fp32_bytes"] + other, "stored": f["stored_bytes"] + other, "avg_bits": f["avg_bits"]}
    from fxcompress.runtime.gradient_check import gradient_error

    g = gradient_error(m, x, lambda out: F.cross_entropy(out, y))
    out.update(grad_err=g["total"], grad_err_worst=g["worst"], worst_param=g["worst_param"])
    return out


def rss_child(name: str, mode: str) -> dict:
    """Runs in a fresh process (see --rss-child)."""
    torch.set_num_threads(1)
    m, x, y = build(name, mode)
    opt = warm_up(m, x, y)
    for group in opt.param_groups:
        group["lr"] = 0.0

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    import gc

    # the last step's gradients are freed by the next zero_grad: free them
    # now, or the step would reuse their memory and hide its own peak
    opt.zero_grad(set_to_none=True)
    gc.collect()
    # the decode-buffer pool keeps the warm-up's blocks for reuse: drop them,
    # or the step would reuse memory counted in `before` and hide its peak
    from fxcompress.kernels import bufpool

    bufpool.POOL.clear()
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    train_step(m, opt, x, y)
    return {"peak_added": status("VmHWM") - before}


def rss(name: str, mode: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, __file__, "--rss-child", name, mode], env=env, capture_output=True,
                         text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_added"]


def speed(name: str, modes, steps: int) -> dict:
    """Median wall time and median thread CPU time per step, per mode.

    Thread CPU time does not count time the shared machine gives to other
    processes, so its ratio is the steadier one here (1 intra-op thread, so
    the step's work is this thread's work)."""
    torch.set_num_threads(1)
    runs = {}
    for mode in modes:
        m, x, y = build(name, mode)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        train_step(m, opt, x, y)  # warm-up (and AutoQuant's statistics)
        runs[mode] = (m, opt, x, y)
    wall = {mode: [] for mode in modes}
    cpu = {mode: [] for mode in modes}
    for _ in range(steps):  # alternate so that load from other work hits every mode alike
        for mode in modes:
            m, opt, x, y = runs[mode]
            t, c = time.perf_counter(), time.thread_time()
            train_step(m, opt, x, y)
            wall[mode].append(time.perf_counter() - t)
            cpu[mode].append(time.thread_time() - c)
    return {mode: (statistics.median(wall[mode]), statistics.median(cpu[mode])) for mode in modes}


def accuracy(seeds, run_root: str) -> dict:
    from fxcompress.training import TrainConfig, train

    acc = {"baseline": [], "auto": [], "2bit": []}
    for seed in seeds:
        for mode in ("auto", "2bit"):
            cfg = TrainConfig(policy=MODES[mode], seed=seed, baseline=(mode == "auto"), progress=False, plots=False,
                              run_dir=os.path.join(run_root, f"{mode}_s{seed}"))
            res = train(cfg)
            acc[mode].append(_final_acc(res, "main"))
            if mode == "auto":
                acc["baseline"].append(_final_acc(res, "baseline"))
            print(f"seed {seed} {mode}: {acc[mode][-1]:.2f}" +
                  (f"  baseline {acc['baseline'][-1]:.2f}" if mode == "auto" else ""), flush=True)
    return acc


def _final_acc(res: dict, which: str) -> float:
    """Final test accuracy (%) of train()'s compressed run ("main") or its baseline."""
    acc = float(res[which]["final"]["test_acc"])
    return acc * 100 if acc <= 1.0 else acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["memory", "rss", "speed"])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--modes", nargs="*", default=["none", "2bit", "auto"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rss-child", nargs=2, metavar=("MODEL", "MODE"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--run-root", default="runs/bench_activations")
    ap.add_argument("--json", metavar="PATH", help="also write every figure printed to this JSON file")
    args = ap.parse_args(argv)
    report = {"args": vars(args), "memory": [], "speed": {}, "accuracy": {}}
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child)))
        return 0
    torch.set_num_threads(1)
    if "memory" in args.only or "rss" in args.only:
        print(f"{'model':10} {'mode':5} {'fp32 MB':>9} {'stored MB':>10} {'ratio':>6} {'avg bits':>8} "
              f"{'peak RSS +MB':>12} {'grad err':>9} {'worst':>7}")
        for name in args.models:
            for mode in args.modes:
                mem = memory(name, mode) if "memory" in args.only else {}
                peak = rss(name, mode) / 2**20 if "rss" in args.only else float("nan")
                fp, st = mem.get("fp32", float("nan")), mem.get("stored", float("nan"))
                report["memory"].append({"model": name, "mode": mode, "peak_rss_added_mb": peak, **mem})
                print(f"{name:10} {mode:5} {fp / 2**20:9.1f} {st / 2**20:10.1f} {fp / st:6.2f} "
                      f"{mem.get('avg_bits', 32.0):8.2f} {peak:12.1f} {mem.get('grad_err', 0.0):9.2e} "
                      f"{mem.get('grad_err_worst', 0.0):7.3f}", flush=True)
    if "speed" in args.only:
        modes = [m for m in args.modes if m != "none"]
        t = speed("resnet50", ["none"] + modes, args.steps)
        report["speed"] = {mode: {"wall_s": w, "cpu_s": c, "ratio": w / t["none"][0], "cpu_ratio": c / t["none"][1]}
                           for mode, (w, c) in t.items()}
        print(f"\nresnet50 batch 32 64x64, 1 thread, median of {args.steps} alternated steps")
        print(f"  {'mode':5} {'wall s':>7} {'ratio':>6} {'CPU s':>7} {'ratio':>6}")
        for mode in ["none"] + modes:
            w, c = t[mode]
            print(f"  {mode:5} {w:7.3f} {w / t['none'][0]:6.2f} {c:7.3f} {c / t['none'][1]:6.2f}")
    if "accuracy" in args.only:
        acc = accuracy(range(args.seeds), args.run_root)
        base = statistics.mean(acc["baseline"])
        report["accuracy"] = acc
        print(f"\ndigits, default ResNet-20, {args.seeds} seeds: mean final test accuracy")
        for mode in ("baseline", "auto", "2bit"):
            m = statistics.mean(acc[mode])
            print(f"  {mode:8} {m:6.2f} %  ({m - base:+.2f} points)  " + " ".join(f"{a:.2f}" for a in acc[mode]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
