#!/usr/bin/env python
"""Gradient quantization benchmark (issue 6).

1. Variance: train the default model on digits in a one-process gloo DDP and,
   at several steps, hand every DDP bucket to every compressor: our
   quantizers at 2, 3 and 4 bits, torch's fp16_compress_hook and its PowerSGD
   hook (rank 1 and 2, one step, no error feedback). Reported: normalised
   error E||C(g) - g||^2 / ||g||^2 (exact expectation for the quantizers, with
   levels fit on the *previous* snapshot as a refit would; measured for the
   deterministic fp16 and PowerSGD), and bytes on the wire per step.
2. Throughput: CPU encode + decode of a large fp32 gradient at 3 bits (the
   C path, kernels/gradquant_cpu.c), beside a plain Tensor.copy_ of the
   same bytes and beside the fp16 hook's cast (fp32 -> fp16 -> fp32), in one
   run; wall time at torch's default thread count (the headline) and at 1
   thread.
3. End to end: 2 and 4 gloo workers on digits, several seeds, ALQ 3-bit
   against full-precision all-reduce with the same seed and data order.

    .venv/bin/python tools/bench_gradquant.py            # everything (a few minutes)
    .venv/bin/python tools/bench_gradquant.py --quick    # a fast subset
    .venv/bin/python tools/bench_gradquant.py --json out.json
    .venv/bin/python tools/bench_gradquant.py --throughput-only   # only part 2
    .venv/bin/python tools/bench_gradquant.py --ddp               # only part 4

4. Data-parallel step time (--ddp): `fxcompress train --nproc 2 --policy
   policies/alq_3bit.yaml`'s training step (built the same way: prepare_run's
   model, optimizer, DDP wrapper and hook, the same shards and batch) beside
   fp32 all-reduce (train's fp32 hook, and DDP's own all-reduce without a
   hook), alternated in blocks on 2 gloo workers: median wall time per step,
   ratio to fp32, bytes per step per worker, time in encode + decode.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from fxcompress.data import load_data  # noqa: E402
from fxcompress.distributed.config import CommunicationConfig  # noqa: E402
from fxcompress.distributed.hook import QuantizedCommState, quantized_hook  # noqa: E402
from fxcompress.distributed.launch import free_port, run_data_parallel  # noqa: E402
from fxcompress.distributed.levels import BucketStats  # noqa: E402
from fxcompress.distributed.quantizers import Quantizer  # noqa: E402
from fxcompress.models import default_model  # noqa: E402

QUANTIZERS = ["qsgd", "qsgdinf", "nuqsgd", "terngrad", "alq", "alqn", "amq", "amqn"]
# options beside the paper's defaults (L2 norm, truncated-normal f), as
# "method/norm/distribution": the normalisation and the model of f decide
# how close the fitted levels come to the real optimum
VARIANTS = ["alq/linf/truncnorm", "amq/linf/truncnorm", "alq/l2/empirical", "amq/l2/empirical",
            "alq/linf/empirical"]


def parse_variant(name: str):
    """'alq/linf/empirical' -> ('alq', 'linf', 'empirical'); missing parts take defaults."""
    parts = name.split("/")
    method = parts[0]
    norm = parts[1] if len(parts) > 1 and parts[1] else None
    distribution = parts[2] if len(parts) > 2 and parts[2] else "truncnorm"
    return method, norm, distribution


def make_quantizer(name: str, bits: int, bucket_size: int) -> Quantizer:
    method, norm, distribution = parse_variant(name)
    return Quantizer(method, None if method == "terngrad" else bits, bucket_size, norm=norm,
                     distribution=distribution)


# ------------------------------------------------------------ data / model

def _batches(ds, batch: int, gen: torch.Generator, indices=None):
    idx = torch.as_tensor(indices) if indices is not None else torch.arange(len(ds))
    order = idx[torch.randperm(len(idx), generator=gen)]
    for s in range(0, len(order) - batch + 1, batch):
        items = [ds[int(i)] for i in order[s:s + batch]]
        yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _accuracy(model, ds) -> float:
    model.eval()
    with torch.no_grad():
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([ds[i][1] for i in range(len(ds))])
        acc = (model(xs).argmax(1) == ys).float().mean().item()
    model.train()
    return 100.0 * acc


# ------------------------------------------------------------- 1. variance

class Capture:
    """A DDP comm hook (world size 1) that, on chosen steps, records every
    bucket and the output of each torch hook for it, then restores the bucket
    and lets the exact gradient through."""

    def __init__(self, ranks=(1, 2)):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as ps

        self.default_hooks, self.ps = default_hooks, ps
        self.psgd = {r: ps.PowerSGDState(process_group=None, matrix_approximation_rank=r, start_powerSGD_iter=0,
                                         use_error_feedback=False, warm_start=False, random_seed=r)
                     for r in ranks}
        self.active = False
        self.buckets: List[Dict] = []

    def hook(self, _state, bucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        if self.active:
            g = buf.detach().clone()
            rec = {"g": g, "fp16": self._run(lambda: self.default_hooks.fp16_compress_hook(None, bucket), buf, g)}
            for r, st in self.psgd.items():
                rec[f"powersgd_r{r}"] = self._run(lambda: self.ps.powerSGD_hook(st, bucket), buf, g)
            self.buckets.append(rec)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    @staticmethod
    def _run(hook, buf, g):
        out = hook().wait()
        out = (out[0] if isinstance(out, list) else out).detach().clone()
        buf.copy_(g)  # every compressor sees the same gradient
        return out


def collect_gradients(depth: int, snapshots: int, every: int, seed: int):
    """Train on digits (one process, DDP so the buckets are DDP's) and return
    `snapshots + 1` lists of bucket records."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        bundle = load_data("digits")
        torch.manual_seed(seed)
        model = DDP(default_model(bundle, depth=depth))
        cap = Capture()
        model.register_comm_hook(None, cap.hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        taken, step = [], 0
        while len(taken) < snapshots + 1:
            for x, y in _batches(bundle.train, 64, gen):
                cap.active = step % every == 0
                cap.buckets = []
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                if cap.active:
                    taken.append({"step": step, "buckets": cap.buckets})
                opt.step()
                step += 1
                if len(taken) == snapshots + 1:
                    break
        psgd_bytes = {f"powersgd_r{r}": st.compression_stats() for r, st in cap.psgd.items()}
        return taken, psgd_bytes
    finally:
        dist.destroy_process_group()


def variance_table(snaps, bits_list, bucket_size: int):
    """method -> bits -> mean normalised error over snapshots 1..K."""
    table: Dict[str, Dict] = {}
    mc_check: Dict[str, float] = {}
    for method in QUANTIZERS + VARIANTS:
        for bits in bits_list:
            if method == "terngrad" and bits != 2:
                continue
            q = make_quantizer(method, bits, bucket_size)
            errs = []
            for i in range(1, len(snaps)):
                if q.adaptive:  # levels learned on the previous gradient, as a refit would
                    prev = snaps[i - 1]["buckets"]
                    q.fit(BucketStats.concat([q.stats(b["g"]) for b in prev]))
                gs = [b["g"] for b in snaps[i]["buckets"]]
                total = sum(float(g.double().pow(2).sum()) for g in gs)
                errs.append(sum(q.expected_error(g) for g in gs) / total)
                if i == 1 and bits == 3 and method in QUANTIZERS:  # a Monte Carlo check of the exact expectation
                    mc = sum(float((q.quantize(g, seed=7).double() - g.double()).pow(2).sum()) for g in gs)
                    mc_check[method] = mc / total / errs[-1]
            table.setdefault(method, {})[bits] = float(np.mean(errs))
    for name in ("fp16", "powersgd_r1", "powersgd_r2"):
        errs = []
        for s in snaps[1:]:
            total = sum(float(b["g"].double().pow(2).sum()) for b in s["buckets"])
            errs.append(sum(float((b[name].double() - b["g"].double()).pow(2).sum()) for b in s["buckets"]) / total)
        table[name] = {"-": float(np.mean(errs))}
    return table, mc_check


def bucket_shape(snaps, bucket_size: int) -> Dict[str, float]:
    """How far the normalised buckets are from normal (the ALQ/AMQ model):
    excess tails show as kurtosis > 3 and a large max |r| / std."""
    kurt, peak = [], []
    for s in snaps:
        for b in s["buckets"]:
            g = b["g"].double()
            full = g[: g.numel() // bucket_size * bucket_size].view(-1, bucket_size)
            if not full.numel():
                continue
            r = full / full.norm(dim=1, keepdim=True).clamp_min(1e-30)
            c = r - r.mean(1, keepdim=True)
            var = c.pow(2).mean(1)
            kurt += (c.pow(4).mean(1) / var.pow(2)).tolist()
            peak += (c.abs().amax(1) / var.sqrt()).tolist()
    return {"kurtosis_min": min(kurt), "kurtosis_median": float(np.median(kurt)), "kurtosis_max": max(kurt),
            "peak_min": min(peak), "peak_median": float(np.median(peak)), "peak_max": max(peak)}


def wire_bytes(snaps, bucket_size: int, psgd_stats) -> Dict[str, Dict]:
    numels = [b["g"].numel() for b in snaps[0]["buckets"]]
    fp32 = 4 * sum(numels)
    out = {"fp32": {"bytes": fp32, "ratio": 1.0}, "fp16": {"bytes": 2 * sum(numels), "ratio": 2.0}}
    for method in QUANTIZERS:
        q = Quantizer(method, 2 if method == "terngrad" else 3, bucket_size)
        nbytes = sum(q.layout(n).nbytes for n in numels)
        out[method] = {"bytes": nbytes, "ratio": fp32 / nbytes, "bits": q.bits}
    for name, (rate, before, after) in psgd_stats.items():
        out[name] = {"bytes": int(4 * after / max(1, len(snaps))), "ratio": float(rate)}
    return out


# ----------------------------------------------------------- 2. throughput

def _rate(fn, nbytes: int, repeats: int) -> float:
    """MB/s of wall time for fn() moving nbytes, best of `repeats` runs (after one warm-up)."""
    fn(0)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r + 1)
        best = min(best, time.perf_counter() - t0)
    return nbytes / 1e6 / best


def throughput(numel: int, repeats: int, threads_list=None) -> Dict:
    """encode+decode of fp32 at 3 bits, copy_ and the fp16 hook's cast, at
    each thread count (default first: the headline). Encode and decode write
    into buffers reused from call to call, as the DDP hook does (its message
    buffer per bucket, the decoded mean straight into the bucket), and as
    copy_ writes into an existing tensor."""
    threads_list = threads_list or [torch.get_num_threads(), 1]
    x = torch.randn(numel) * torch.rand(numel)
    q = Quantizer("alq", 3)
    q.fit(q.stats(x))
    out = torch.empty_like(x)
    msg = torch.empty(q.layout(numel).nbytes, dtype=torch.uint8)
    nbytes = 4 * numel
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads_list:
            torch.set_num_threads(n)
            sent = q.encode(x).clone()  # a message of its own, so decode does not read what encode writes
            enc = _rate(lambda r: q.encode(x, seed=r, out=msg), nbytes, repeats)
            dec = _rate(lambda r: q.decode(sent, numel, out=out), nbytes, repeats)
            both = _rate(lambda r: q.decode(q.encode(x, seed=r, out=msg), numel, out=out), nbytes, repeats)
            copy = _rate(lambda r: out.copy_(x), nbytes, repeats)
            # fp16_compress_hook: the bucket cast to fp16, and back into the fp32 bucket
            fp16 = _rate(lambda r: out.copy_(x.to(torch.float16)), nbytes, repeats)
            rows.append({"threads": n, "encode_MBps": enc, "decode_MBps": dec, "encode_decode_MBps": both,
                         "copy_MBps": copy, "fp16_cast_MBps": fp16})
    finally:
        torch.set_num_threads(before)
    return {"numel": numel, "bits": 3, "path": "C" if _c_path() else "torch reference", "rows": rows}


def _c_path() -> bool:
    from fxcompress.kernels import dispatch, gradquant

    return dispatch.backend_for(torch.zeros(1), gradquant.cpu_lib) == "c"


def print_throughput(t) -> None:
    print(f"\n## CPU gradient quantization, {t['numel']:,} fp32 coordinates at {t['bits']} bits ({t['path']} path), "
          f"MB/s of fp32 gradient, wall time (best of the repeats), into reused buffers; first row: torch's "
          f"default thread count")
    print(f"{'threads':>8}{'encode+decode':>15}{'encode':>10}{'decode':>10}{'copy_':>10}{'fp16 cast':>11}")
    for r in t["rows"]:
        print(f"{r['threads']:>8}{r['encode_decode_MBps']:>15.0f}{r['encode_MBps']:>10.0f}{r['decode_MBps']:>10.0f}"
              f"{r['copy_MBps']:>10.0f}{r['fp16_cast_MBps']:>11.0f}")


# ----------------------------------------------------------- 3. end to end

def _e2e_worker(rank, world, seeds, epochs, depth, batch, lr, variants):
    bundle = load_data("digits")
    results = []
    n = len(bundle.train)
    shard = list(range(rank, n - n % world, world))  # equal shards: every rank takes the same number of steps
    for seed in seeds:
        for variant in variants:
            method, norm, distribution = parse_variant(variant)
            torch.manual_seed(seed)  # same initial weights on every rank and for every method
            model = DDP(default_model(bundle, depth=depth))
            state = QuantizedCommState(CommunicationConfig(method=method, bits=3, seed=seed, norm=norm,
                                                           distribution=distribution))
            model.register_comm_hook(state, quantized_hook)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            steps = epochs * (len(shard) // batch)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            t0 = time.perf_counter()
            for epoch in range(epochs):
                gen = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
                for x, y in _batches(bundle.train, batch, gen, shard):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                    sched.step()
            acc = _accuracy(model.module, bundle.test) if rank == 0 else None
            results.append({"seed": seed, "method": variant, "acc": acc, "seconds": time.perf_counter() - t0,
                            "wire_bytes_step": state.wire_bytes_step, "fp32_bytes_step": state.fp32_bytes_step,
                            "refits": [r["iteration"] for r in state.refits]})
    return results


def end_to_end(worlds, seeds, epochs, depth, batch, lr, variants):
    out = {}
    for world in worlds:
        t0 = time.perf_counter()
        res = run_data_parallel(_e2e_worker, world, (seeds, epochs, depth, batch, lr, ["fp32"] + variants))[0]
        accs = {m: [r["acc"] for r in res if r["method"] == m] for m in ["fp32"] + variants}
        row = {"fp32": accs["fp32"], "fp32_mean": float(np.mean(accs["fp32"])), "variants": {}}
        for v in variants:
            first = next(r for r in res if r["method"] == v)
            row["variants"][v] = {"acc": accs[v], "mean": float(np.mean(accs[v])),
                                  "diff": float(np.mean(accs[v]) - np.mean(accs["fp32"])),
                                  "wire_ratio": first["fp32_bytes_step"] / max(1, first["wire_bytes_step"]),
                                  "refits": first["refits"]}
        row["seconds"] = time.perf_counter() - t0
        out[world] = row
    return out


# -------------------------------------------------- 4. data-parallel step time

DDP_METHODS = ("fp32", "ddp", "policy")  # train's fp32 hook, DDP's own all-reduce, the policy's hook


class _Timed:
    """Wall time spent in gradquant.encode / decode inside the hook (decode
    runs in the all-gather's callback)."""

    def __init__(self):
        from fxcompress.kernels import gradquant

        self.seconds = 0.0
        for name in ("encode", "decode"):
            setattr(gradquant, name, self._wrap(getattr(gradquant, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def _ddp_worker(rank, world, policy, depth, batch, threads, steps, rounds, warmup):
    """Each method as `fxcompress train --nproc N` builds it (prepare_run: the
    same model, optimizer, DDP wrapper and comm hook, the same data shards),
    trained in alternating blocks of `steps` steps; returns per-step wall
    times of every method after `warmup` steps, and its wire bytes."""
    import tempfile

    from fxcompress.training.build import build_data, build_model, make_optimizer, prepare_run
    from fxcompress.training.config import TrainConfig
    from fxcompress.training.loop import _make_loader
    from fxcompress.training.seeds import seed_everything

    timer = _Timed()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fxc_bench_ddp_") as tmp:
        for method in DDP_METHODS:
            cfg = TrainConfig(policy=policy if method == "policy" else None, depth=depth, batch_size=batch,
                              nproc=world, threads=threads, device="cpu", progress=False, plots=False)
            bundle = build_data(cfg)
            if method == "ddp":  # no comm hook at all: DDP's built-in fp32 all-reduce
                torch.set_num_threads(threads)
                seed_everything(cfg.seed)
                model = build_model(cfg, bundle)[0]
                ddp, opt, comm = DDP(model), make_optimizer(cfg, model.parameters()), None
            else:
                run = prepare_run(cfg, tmp, method, use_policy=True, bundle=bundle)
                ddp, opt, comm = run.ddp, run.optimizer, run.comm
            fp32_bytes = 4 * sum(p.numel() for p in ddp.parameters() if p.requires_grad)
            runs[method] = {"cfg": cfg, "bundle": bundle, "ddp": ddp, "opt": opt, "comm": comm, "epoch": 0,
                            "batches": iter(()), "times": [], "codec_s": 0.0, "fp32_bytes": fp32_bytes, "done": 0}

        def step(r) -> float:
            try:
                x, y = next(r["batches"])
            except StopIteration:
                r["batches"] = iter(_make_loader(r["cfg"], r["bundle"].train, r["epoch"], rank, world))
                r["epoch"] += 1
                x, y = next(r["batches"])
            out = r["ddp"](x)
            loss = nn.functional.cross_entropy(out, y)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            return float(loss.detach())

        for _ in range(rounds):
            for method in DDP_METHODS:
                r = runs[method]
                for _ in range(steps):
                    dist.barrier()  # every block starts together, whatever the last one left queued
                    codec0 = timer.seconds
                    t0 = time.perf_counter()
                    step(r)
                    dt = time.perf_counter() - t0
                    if r["done"] >= warmup:  # DDP rebuilds its buckets after step 1; levels fit at step 0
                        r["times"].append(dt)
                        r["codec_s"] += timer.seconds - codec0
                    r["done"] += 1
    out = {}
    for method, r in runs.items():
        comm = r["comm"]
        wire = comm.wire_bytes_step if comm is not None else r["fp32_bytes"]
        label = {"fp32": "fp32 all-reduce (train's hook)", "ddp": "fp32 all-reduce (DDP's own)",
                 "policy": os.path.splitext(os.path.basename(policy))[0]}[method]
        out[method] = {"label": label, "times": r["times"], "wire_bytes_step": int(wire),
                       "fp32_bytes_step": r["fp32_bytes"], "codec_s_step": r["codec_s"] / max(1, len(r["times"])),
                       "refits": [] if comm is None else [x["iteration"] for x in comm.refits]}
    return out


def ddp_timing(nproc, policy, depth, batch, threads, steps, rounds, warmup) -> Dict:
    t0 = time.perf_counter()
    res = run_data_parallel(_ddp_worker, nproc, (policy, depth, batch, threads, steps, rounds, warmup),
                            threads_per_worker=threads)[0]
    base = float(np.median(res["fp32"]["times"]))
    rows = []
    for method in DDP_METHODS:
        r = res[method]
        med = float(np.median(r["times"]))
        rows.append({"method": r["label"], "median_s": med, "mean_s": float(np.mean(r["times"])),
                     "ratio_vs_fp32": med / base, "wire_bytes_step": r["wire_bytes_step"],
                     "fp32_bytes_step": r["fp32_bytes_step"], "codec_ms_step": 1e3 * r["codec_s_step"],
                     "steps": len(r["times"]), "refits": r["refits"]})
    return {"nproc": nproc, "policy": policy, "depth": depth, "batch": batch, "threads": threads, "steps": steps,
            "rounds": rounds, "warmup": warmup, "rows": rows, "seconds": time.perf_counter() - t0}


def print_ddp(t) -> None:
    print(f"\n## Data-parallel training step, {t['nproc']} gloo workers on this machine: built-in ResNet-{t['depth']} "
          f"on digits, global batch {t['batch']} ({t['batch'] // t['nproc']} per worker), {t['threads']} thread(s) "
          f"per worker; {t['rounds']} rounds of {t['steps']} steps per method, alternated, the first {t['warmup']} "
          f"steps of each method not timed; wall time per step on rank 0")
    print(f"{'method':<32}{'median s/step':>14}{'mean':>9}{'vs fp32':>9}{'wire B/step/worker':>20}"
          f"{'vs fp32':>9}{'codec ms/step':>15}")
    for r in t["rows"]:
        print(f"{r['method']:<32}{r['median_s']:>14.4f}{r['mean_s']:>9.4f}{r['ratio_vs_fp32']:>8.2f}x"
              f"{r['wire_bytes_step']:>20,d}{r['fp32_bytes_step'] / r['wire_bytes_step']:>8.1f}x"
              f"{r['codec_ms_step']:>15.2f}")
    print("wire bytes: what each worker hands to the collective per step (all-reduce: the fp32 gradient; "
          "all-gather: its message; with 2 workers each is also what a worker sends). codec: time in the "
          "hook's encode + decode. Levels refit at iterations: "
          + ", ".join(f"{r['method']} {r['refits']}" for r in t["rows"] if r["refits"]))


# ----------------------------------------------------------------- report

def print_report(r) -> None:
    a = r["args"]
    print(f"\n## Normalised variance E||C(g)-g||^2/||g||^2  (digits, ResNet-{a['depth']}, "
          f"{a['snapshots']} gradient snapshots, bucket {a['bucket_size']}, DDP buckets)")
    bits = a["bits"]
    print(f"{'method':<20}" + "".join(f"{f'{b} bits':>12}" for b in bits))
    for m in QUANTIZERS + ["--- options:"] + VARIANTS:
        if m not in r["variance"]:
            print(m)
            continue
        row = r["variance"][m]
        print(f"{m:<20}" + "".join(f"{row[b]:>12.4g}" if b in row else f"{'-':>12}" for b in bits))
    for m in ("fp16", "powersgd_r1", "powersgd_r2"):
        print(f"{m:<20}{r['variance'][m]['-']:>12.4g}   (one setting)")
    for b in bits:
        for label, names in (("paper defaults", QUANTIZERS), ("with options", QUANTIZERS + VARIANTS)):
            quant = {m: r["variance"][m][b] for m in names if b in r["variance"][m]}
            best = min(quant, key=quant.get)
            print(f"lowest quantizer variance at {b} bits ({label}): {best} {quant[best]:.4g}")
    print("Monte Carlo / exact at 3 bits: " + ", ".join(f"{m} {v:.3f}" for m, v in r["mc_check"].items()))
    k = r["bucket_shape"]
    print(f"full buckets' normalised coordinates: kurtosis {k['kurtosis_min']:.1f} / {k['kurtosis_median']:.1f} / "
          f"{k['kurtosis_max']:.1f} (min / median / max; normal: 3), max |r - mean| {k['peak_min']:.1f} / "
          f"{k['peak_median']:.1f} / {k['peak_max']:.1f} standard deviations")
    print("\n## Bytes on the wire per step (3 bits; terngrad 2), norms included")
    for m, v in r["wire"].items():
        print(f"{m:<14}{v['bytes']:>12,d} B  {v['ratio']:>7.2f}x fewer than fp32")
    print_throughput(r["throughput"])
    if r.get("e2e"):
        print(f"\n## End to end: digits, ResNet-{a['e2e_depth']}, {a['epochs']} epochs, seeds {a['seeds']}, "
              f"test accuracy %")
        print(f"{'workers':<8}{'method (3 bits)':<20}{'mean acc':>9}{'vs fp32':>9}{'wire':>8}  per seed")
        for w, v in r["e2e"].items():
            print(f"{w:<8}{'fp32 all-reduce':<20}{v['fp32_mean']:>9.2f}{'':>9}{'1.0x':>8}  "
                  + ", ".join(f"{a:.1f}" for a in v["fp32"]))
            for name, d in v["variants"].items():
                print(f"{'':<8}{name:<20}{d['mean']:>9.2f}{d['diff']:>+9.2f}{d['wire_ratio']:>7.1f}x  "
                      + ", ".join(f"{a:.1f}" for a in d["acc"]))



def write_json(text: str, dest: str) -> None:
    """`--json -` prints to stdout; any other value is a file path."""
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer snapshots, 1 seed, 2 workers only")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--depth", type=int, default=20, help="default model depth for the variance table")
    p.add_argument("--snapshots", type=int, default=None, help="gradient snapshots (default 6, quick 2)")
    p.add_argument("--every", type=int, default=20, help="steps between snapshots")
    p.add_argument("--bucket-size", type=int, default=8192)
    p.add_argument("--seeds", type=int, default=None, help="end-to-end seeds (default 5, quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="end-to-end epochs (default 10, quick 3)")
    p.add_argument("--e2e-depth", type=int, default=8, help="model depth for the end-to-end runs")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 2,4; quick 2)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--e2e-methods", default="alq",
                   help="comma-separated methods run against fp32 end to end, each METHOD[/NORM[/DIST]] "
                        "(default alq; e.g. alq,alq/linf)")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--throughput-only", action="store_true", help="only the CPU encode+decode timing")
    p.add_argument("--numel", type=int, default=None, help="coordinates for the throughput (default 2^24, quick 2^20)")
    g = p.add_argument_group("data-parallel step time (--ddp)")
    g.add_argument("--ddp", action="store_true",
                   help="only time training steps with --nproc gloo workers: --ddp-policy's hook beside fp32 "
                        "all-reduce (train's hook and DDP's own), as `fxcompress train --nproc N` builds them")
    g.add_argument("--nproc", type=int, default=2)
    g.add_argument("--ddp-policy", default=os.path.join(ROOT, "policies", "alq_3bit.yaml"))
    g.add_argument("--ddp-depth", type=int, default=None, help="built-in ResNet depth (default 20 as train; quick 8)")
    g.add_argument("--ddp-batch", type=int, default=64, help="global batch, split over the workers (train's default)")
    g.add_argument("--ddp-threads", type=int, default=1, help="torch threads per worker (train's default)")
    g.add_argument("--ddp-steps", type=int, default=None, help="steps per block (default 20, quick 4)")
    g.add_argument("--ddp-rounds", type=int, default=None, help="blocks per method, alternated (default 5, quick 1)")
    g.add_argument("--ddp-warmup", type=int, default=None, help="first steps of each method not timed (default 3, "
                                                                 "quick 1)")
    a = p.parse_args(argv)
    if a.ddp:
        t = ddp_timing(a.nproc, a.ddp_policy, a.ddp_depth or (8 if a.quick else 20), a.ddp_batch, a.ddp_threads,
                       a.ddp_steps or (4 if a.quick else 20), a.ddp_rounds or (1 if a.quick else 5),
                       a.ddp_warmup if a.ddp_warmup is not None else (1 if a.quick else 3))
        print_ddp(t)
        if a.json:
            write_json(json.dumps(t, indent=1), a.json)
        return 0
    numel = a.numel or (1 << (20 if a.quick else 24))
    # throughput first, at torch's default thread count and at 1 thread; the
    # rest (variance, end to end) runs its processes on one thread each
    tp = throughput(numel, 3 if a.quick else 5)
    if a.throughput_only:
        if a.json == "-":
            print(json.dumps(tp, indent=1))
        else:
            print_throughput(tp)
        return 0
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the end-to-end workers, as before
    snapshots = a.snapshots or (2 if a.quick else 6)
    seeds = list(range(a.seeds or (1 if a.quick else 5)))
    epochs = a.epochs or (3 if a.quick else 10)
    workers = [int(w) for w in (a.workers or ("2" if a.quick else "2,4")).split(",")]
    bits = [2, 3, 4]
    args = {"depth": a.depth, "snapshots": snapshots, "every": a.every, "bucket_size": a.bucket_size, "bits": bits,
            "seeds": seeds, "epochs": epochs, "e2e_depth": a.e2e_depth, "workers": workers, "batch": a.batch,
            "lr": a.lr, "e2e_methods": a.e2e_methods}
    t0 = time.perf_counter()
    snaps, psgd = collect_gradients(a.depth, snapshots, a.every, seed=0)
    table, mc = variance_table(snaps, bits, a.bucket_size)
    result = {"args": args, "variance": table, "mc_check": mc, "bucket_shape": bucket_shape(snaps, a.bucket_size), "wire": wire_bytes(snaps, a.bucket_size, psgd),
              "throughput": tp}
    if not a.no_e2e:
        result["e2e"] = end_to_end(workers, seeds, epochs, a.e2e_depth, a.batch, a.lr, a.e2e_methods.split(","))
    result["seconds"] = time.perf_counter() - t0
    print_report(result)
    print(f"\n(total {result['seconds']:.0f} s)")
    if a.json:
        write_json(json.dumps(result, indent=1, default=str), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
