"""Activation compression (issues 4, 12): memory, peak RSS, step time, per-step peaks.

    .venv/bin/python tools/bench_activations.py                 # memory, rss, speed
    .venv/bin/python tools/bench_activations.py --only memory   # one of memory, rss, speed
    .venv/bin/python tools/bench_activations.py --peaks         # per-step peak memory (issue 12)

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
        uncompressed, modes alternated in one process, median of N steps:
        wall time at the default thread count (torch.get_num_threads(), the
        headline: what a user sees) and at 1 thread.
peaks:  (--peaks) peak resident memory of each of the first 3 training steps
        and of a later statistics step (--stats-step, default 10: AutoQuant
        is made to take statistics there), per model and mode, each config
        in its own process (the rss recipe: VmHWM after the step, reset by
        /proc/self/clear_refs before it, freed memory returned to the system
        between steps). `auto` must stay below `none` on every step.
        Models: resnet50 batch 32 at 64x64, vit_b_16 batch 4 at 224
        (--peak-models NAME:BATCH:SIZE ... for others).
ccalls  (only with --only ccalls; guidance where wall time is meaningless,
        e.g. a shared machine): thread-CPU time of every C call of the
        activation packers in one resnet50 step at 1 thread, per mode, the
        minimum over --steps steps, beside the whole step's thread-CPU time.
accuracy (only with --only accuracy: 15 trainings): the default model on
        digits (fxcompress.training.train, default settings), seeds 0..4:
        `auto` with its uncompressed baseline (same seed, same batches) and
        `2bit`; mean final test accuracy of each.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    "psgd": os.path.join(ROOT, "policies", "psgd_w4.yaml"),  # issue 12: PSGD's step beside the others
}
MODELS = {"resnet50": (32, 64), "vit_b_16": (16, 64)}


PEAK_MODELS = ["resnet50:32:64", "vit_b_16:4:224"]
PEAK_STEPS = 3


def build(name: str, mode: str, seed: int = 0, batch: int = 0, size: int = 0):
    import torchvision

    import fxcompress

    torch.manual_seed(seed)
    if not batch:
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


def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def measured_step(m, opt, x, y) -> tuple:
    """One training step: (VmRSS before it, VmHWM during it), in bytes."""
    import gc

    # the last step's gradients are freed by the next zero_grad: free them
    # now, or the step would reuse their memory and hide its own peak
    opt.zero_grad(set_to_none=True)
    gc.collect()
    # the decode-buffer pool keeps the last step's blocks for reuse: drop
    # them, or the step would reuse memory counted in `before` and hide its peak
    from fxcompress.kernels import bufpool

    bufpool.POOL.clear()
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    train_step(m, opt, x, y)
    return before, _status("VmHWM")


def rss_child(name: str, mode: str) -> dict:
    """Runs in a fresh process (see --rss-child)."""
    torch.set_num_threads(1)
    m, x, y = build(name, mode)
    opt = warm_up(m, x, y)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before, peak = measured_step(m, opt, x, y)
    return {"peak_added": peak - before}


def peaks_child(spec: str, mode: str, stats_step: int) -> dict:
    """Runs in a fresh process (see --peaks-child): the peak RSS of steps
    0..PEAK_STEPS-1 and of step `stats_step`, which is made a statistics
    step (the controller's period set to it; the steps between are run
    and not measured). lr 0.01, random batches."""
    torch.set_num_threads(1)
    name, batch, size = spec.split(":")
    m, x, y = build(name, mode, batch=int(batch), size=int(size))
    ctrl = m.controllers["activations"] if mode != "none" and "activations" in m.controllers else None
    if ctrl is not None:
        # statistics at step 0 and at stats_step (the policy's settings: section, here set directly)
        ctrl.settings = dataclasses.replace(ctrl.settings, stats_every=stats_step)
        ctrl._arm()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    out = {"steps": {}, "statistics": []}
    for step in range(stats_step + 1):
        xb, yb = torch.randn(x.shape, generator=gen), torch.randint(0, 1000, y.shape, generator=gen)
        if ctrl is not None and any(s.collect for s in ctrl._specs.values()):
            out["statistics"].append(step)
        if step < PEAK_STEPS or step == stats_step:
            before, peak = measured_step(m, opt, xb, yb)
            out["steps"][str(step)] = {"peak": peak, "before": before}
        else:
            train_step(m, opt, xb, yb)
    return out


def _child(args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, __file__] + args, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss(name: str, mode: str) -> int:
    return _child(["--rss-child", name, mode])["peak_added"]


def peaks(specs, modes, stats_step: int) -> dict:
    """Per model and mode: peak RSS (GiB) of the first steps and of the later
    statistics step, each config in its own process."""
    res = {}
    for spec in specs:
        name, batch, size = spec.split(":")
        print(f"\n{name} batch {batch} at {size}x{size}: peak RSS per step, GiB (1 thread; * = statistics step)")
        print(f"  {'mode':5} " + " ".join(f"{'step ' + str(s):>9}" for s in list(range(PEAK_STEPS)) + [stats_step]))
        for mode in modes:
            r = _child(["--peaks-child", spec, mode, str(stats_step)])
            res.setdefault(spec, {})[mode] = r
            cells = []
            for s in list(range(PEAK_STEPS)) + [stats_step]:
                mark = "*" if s in r["statistics"] else " "
                cells.append(f"{r['steps'][str(s)]['peak'] / 2**30:8.2f}{mark}")
            print(f"  {mode:5} " + " ".join(cells), flush=True)
        if "none" in res[spec]:
            base = res[spec]["none"]["steps"]
            for mode, r in res[spec].items():
                over = [s for s, v in r["steps"].items() if mode != "none" and v["peak"] >= base[s]["peak"]]
                if over:
                    print(f"  {mode}: at or above uncompressed at step(s) {', '.join(over)}")
    return res


def speed(name: str, modes, steps: int, threads: int, batch: int, size: int) -> dict:
    """Median wall time per step, per mode, at `threads` intra-op threads
    (the whole step: the compression work runs on torch's threads too, so
    thread CPU time would hide what does not scale)."""
    torch.set_num_threads(threads)
    runs = {}
    for mode in modes:
        m, x, y = build(name, mode, batch=batch, size=size)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        train_step(m, opt, x, y)  # warm-up (and AutoQuant's statistics)
        runs[mode] = (m, opt, x, y)
    wall = {mode: [] for mode in modes}
    for _ in range(steps):  # alternate so that load from other work hits every mode alike
        # a new batch every step (the same one for every mode): a tensor fed
        # twice would be a case no training loop has
        x0, y0 = runs[modes[0]][2], runs[modes[0]][3]
        xb, yb = torch.randn_like(x0), torch.randint_like(y0, 0, 1000)
        for mode in modes:
            m, opt = runs[mode][:2]
            t = time.perf_counter()
            train_step(m, opt, xb, yb)
            wall[mode].append(time.perf_counter() - t)
    return {mode: statistics.median(wall[mode]) for mode in modes}


def c_calls(name: str, modes, steps: int, batch: int, size: int) -> dict:
    """Per mode: the step's thread-CPU time and, per C function of the
    activation packers and AutoQuant's widths, (calls, thread-CPU s) in that
    step, for the step with the least CPU time of `steps` (1 thread)."""
    import collections

    from fxcompress.kernels import actpack_cpu, autobits

    torch.set_num_threads(1)
    acc = collections.defaultdict(lambda: [0, 0.0])

    class Timed:  # wraps one ctypes function: calls and thread-CPU time
        def __init__(self, f, name):
            self.f, self.name = f, name

        def __call__(self, *a):
            t = time.thread_time()
            r = self.f(*a)
            acc[self.name][0] += 1
            acc[self.name][1] += time.thread_time() - t
            return r

    libs = [lib for lib in (actpack_cpu.lib(), autobits._lib()) if lib is not None]
    saved = []
    for lib in libs:
        for fn in [n for n in dir(lib) if n.startswith("fxc_") and n != "fxc_set_threads"]:
            saved.append((lib, fn, getattr(lib, fn)))
            setattr(lib, fn, Timed(getattr(lib, fn), fn))
    out = {}
    try:
        for mode in modes:
            m, x, y = build(name, mode, batch=batch, size=size)
            opt = torch.optim.SGD(m.parameters(), lr=0.0)
            train_step(m, opt, x, y)  # warm-up (and AutoQuant's statistics)
            best = None
            for _ in range(steps):
                acc.clear()
                t = time.thread_time()
                train_step(m, opt, x, y)
                t = time.thread_time() - t
                if best is None or t < best[0]:
                    best = (t, {k: tuple(v) for k, v in acc.items()})
            out[mode] = {"step_cpu_s": best[0], "calls": best[1]}
    finally:
        for lib, fn, f in saved:
            setattr(lib, fn, f)
    return out


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
    ap.add_argument("--speed-size", default="32:64", metavar="BATCH:SIZE", help="resnet50's batch and image size")
    ap.add_argument("--peaks", action="store_true", help="only the per-step peak memory (issue 12)")
    ap.add_argument("--peak-models", nargs="*", default=PEAK_MODELS, metavar="NAME:BATCH:SIZE")
    ap.add_argument("--stats-step", type=int, default=10, help="the later statistics step measured by --peaks")
    ap.add_argument("--peaks-child", nargs=3, metavar=("NAME:BATCH:SIZE", "MODE", "STATS_STEP"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--run-root", default="runs/bench_activations")
    ap.add_argument("--json", metavar="PATH", help="also write every figure printed to this JSON file")
    args = ap.parse_args(argv)
    report = {"args": vars(args), "memory": [], "speed": {}, "accuracy": {}, "peaks": {}}
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child)))
        return 0
    if args.peaks_child:
        spec, mode, stats_step = args.peaks_child
        print(json.dumps(peaks_child(spec, mode, int(stats_step))))
        return 0
    default_threads = torch.get_num_threads()
    if args.peaks:
        args.only = ["peaks"]
        report["peaks"] = peaks(args.peak_models, args.modes, args.stats_step)
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
        modes = ["none"] + [m for m in args.modes if m != "none"]
        batch, size = (int(v) for v in args.speed_size.split(":"))
        t = speed("resnet50", modes, args.steps, default_threads, batch, size)
        t1 = speed("resnet50", modes, args.steps, 1, batch, size)
        report["speed"] = {mode: {"threads": default_threads, "wall_s": t[mode], "ratio": t[mode] / t["none"],
                                  "wall_s_1_thread": t1[mode], "ratio_1_thread": t1[mode] / t1["none"]}
                           for mode in modes}
        print(f"\nresnet50 batch {batch} {size}x{size}, wall time per step, median of {args.steps} alternated steps")
        print(f"  {'mode':5} {f'{default_threads} threads s':>12} {'ratio':>6} {'1 thread s':>11} {'ratio':>6}")
        for mode in modes:
            print(f"  {mode:5} {t[mode]:12.3f} {t[mode] / t['none']:6.2f} {t1[mode]:11.3f} {t1[mode] / t1['none']:6.2f}")
        torch.set_num_threads(1)
    if "ccalls" in args.only:
        batch, size = (int(v) for v in args.speed_size.split(":"))
        report["ccalls"] = c_calls("resnet50", ["none"] + [m for m in args.modes if m != "none"], args.steps,
                                   batch, size)
        print(f"\nresnet50 batch {batch} {size}x{size}, 1 thread, thread-CPU time of one step (least of "
              f"{args.steps}) and of the C calls in it")
        for mode, r in report["ccalls"].items():
            tot = sum(v[1] for v in r["calls"].values())
            print(f"  {mode:5} step {r['step_cpu_s']:.3f} s, C calls {tot * 1e3:.1f} ms")
            for fn, (n, sec) in sorted(r["calls"].items(), key=lambda kv: -kv[1][1]):
                print(f"      {fn:26} {n:5d} calls {sec * 1e3:8.1f} ms")
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
