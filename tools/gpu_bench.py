"""The measuring half of tools/gpu_check.sh: kernel bandwidth, resnet training
steps under every shipped policy, and the torch.compile table.

    python tools/gpu_bench.py --out DIR            # on a CUDA machine (what gpu_check.sh runs)
    python tools/gpu_bench.py --dry --out DIR      # CPU, tiny sizes, Triton interpreter: checks this script

bandwidth: each kernel family through its public API (so the stats pass,
scale computation and every launch a user pays for are counted) beside a
device-to-device `copy_` of the same uncompressed tensor (fp32, or bool for
masks): time per call, GB/s of the uncompressed tensor, and kernel time /
copy time. Timing: torch.cuda.Event around `--iters` calls after `--warmup`
calls. Every kernel call is first checked to run the Triton path
(dispatch.backend_for), and its output against the torch reference on a
small slice is tested by tests/kernels/test_triton_on_device.py, not here.

train: torchvision `--model` (resnet50), batch `--batch`, `--size`x`--size`,
SGD with momentum: the uncompressed step and each graph policy in
policies/ (communication-only policies change no graph and are listed as
such), median step time over `--steps` steps after `--warmup-steps`
(AutoQuant's first statistics step is among the warm-up steps; every step's
peak is kept, so the peak column includes statistics steps), peak
torch.cuda.max_memory_allocated per step, and both as ratios to uncompressed.

compile: tools/bench_compile.py when it exists (`--quick` in dry mode),
its JSON kept as it prints it.

--dry: FXC_FORCE_TRITON=1 and TRITON_INTERPRET=1 (set before triton is
imported), CPU tensors, a few thousand elements, one timed call, resnet18 at
batch 4, 32x32, 1+1 steps: the same code paths, so a broken script shows
here and not on the day a GPU is lent. Dry-mode times are meaningless.
Exit status 1 when any family or policy failed (each failure is printed
and recorded; the others still run).
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if "--dry" in sys.argv[1:]:
    # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FXC_FORCE_TRITON"] = "1"
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ------------------------------------------------------------------ timing

class Timer:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU (dry)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def fmt_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


# --------------------------------------------------------------- bandwidth

def kernel_cases(n: int, device: torch.device):
    """(family, op, uncompressed input tensor, callable) for every family.
    Each callable goes through the public API; `probe` is a tensor whose
    dispatch must say "triton"."""
    from fxcompress.kernels import absmax_int8
    from fxcompress.kernels import actpack as ap
    from fxcompress.kernels import gradquant as G
    from fxcompress.kernels import scaled_grad as sg
    from fxcompress.distributed import levels as L

    gen = torch.Generator().manual_seed(0)
    C = 64
    x = (torch.randn(n, generator=gen) * 3).to(device)
    x3 = x.view(4, C, -1)
    r3 = x3.relu()
    cases = []
    for bits in (2, 4, 8):
        p = ap.quant_pack(x3, bits, "stochastic", seed=1)
        cases.append(("fixed width", f"pack {bits}b", x, lambda b=bits: ap.quant_pack(x3, b, "stochastic", seed=1)))
        cases.append(("fixed width", f"unpack {bits}b", x, lambda p=p: ap.unpack(p)))
    m = x > 0.5
    pm = ap.pack_mask(m)
    cases.append(("mask", "pack", m, lambda: ap.pack_mask(m)))
    cases.append(("mask", "unpack", m, lambda: ap.unpack_mask(pm)))
    z = ap.zvc_pack(r3, 8)
    cases.append(("zvc", "pack 8b", x, lambda: ap.zvc_pack(r3, 8)))
    cases.append(("zvc", "unpack 8b", x, lambda: ap.zvc_unpack(z)))
    bits_c = torch.randint(2, 9, (C,), generator=gen)
    mx = ap.mixed_pack(x3, bits_c, "stochastic", seed=2)
    cases.append(("mixed widths", "pack 2-8b", x, lambda: ap.mixed_pack(x3, bits_c, "stochastic", seed=2)))
    cases.append(("mixed widths", "unpack 2-8b", x, lambda: ap.mixed_unpack(mx)))
    nnz_c = (r3 > 0).sum(dim=(0, 2))
    rmask = ap.pack_mask(r3 > 0)
    mz = ap.mixed_zvc_pack(r3, bits_c, rmask, nnz_c, "stochastic", seed=3)
    cases.append(("mixed zvc", "pack 2-8b", x, lambda: ap.mixed_zvc_pack(r3, bits_c, rmask, nnz_c, "stochastic", seed=3)))
    cases.append(("mixed zvc", "unpack 2-8b", x, lambda: ap.mixed_zvc_unpack(mz)))
    w = x * 0.03
    delta = (w.abs().max() / 7).reshape(1)
    cases.append(("PSGD scaled grad", "4b", x, lambda: sg.scaled_grad(x, w, delta, 7, 150.0, 1e-3, False)))
    lv = L.exponential_levels(3, 0.4)
    bucket = 8192 if n >= 8192 else 512
    msg = G.encode(x, lv, 3, bucket, "l2", seed=4)
    msgs = torch.stack([msg, msg])
    cases.append(("gradient quantization", "encode 3b", x, lambda: G.encode(x, lv, 3, bucket, "l2", seed=4)))
    cases.append(("gradient quantization", "decode 3b x2", x, lambda: G.decode(msgs, lv, 3, n, bucket)))
    cases.append(("absmax int8", "quantize", x, lambda: absmax_int8.quantize(x, 128)))
    try:
        from fxcompress.kernels import masks
    except ImportError:
        masks = None
    if masks is not None:
        wm = x.view(-1, 64)
        cases.append(("sparsity masks", "2:4", x, lambda: masks.nm_mask(wm, 2, 4)))
        k = masks.kept_count(n, 0.9)
        cases.append(("sparsity masks", "top-k 10%", x, lambda: masks.topk_mask(x, k)))
    return cases


def bandwidth(n: int, device: torch.device, warmup: int, iters: int) -> dict:
    from fxcompress.kernels import dispatch

    timer = Timer(device)
    results, failed = [], 0
    if dispatch.backend_for(torch.zeros(1, device=device)) != "triton":
        raise RuntimeError(f"the Triton path is not selected for {device} tensors: nothing to measure")
    try:
        cases = kernel_cases(n, device)
    except Exception as e:  # the set-up calls are kernel calls too
        traceback.print_exc()
        return {"rows": [], "failed": 1, "error": f"{type(e).__name__}: {e}"}
    for family, op, src, fn in cases:
        row = {"family": family, "op": op, "elements": n, "bytes": src.numel() * src.element_size()}
        try:
            dst = torch.empty_like(src)
            t_copy = timer.per_call(lambda: dst.copy_(src), warmup, iters)
            t = timer.per_call(fn, warmup, iters)
            row.update(kernel_s=t, copy_s=t_copy, gbps=row["bytes"] / t / 1e9,
                       copy_gbps=row["bytes"] / t_copy / 1e9, x_copy=t / t_copy)
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            failed += 1
        results.append(row)
    return {"rows": results, "failed": failed}


def print_bandwidth(b: dict) -> None:
    rows = []
    for r in b["rows"]:
        if "error" in r:
            rows.append([r["family"], r["op"], r["bytes"], "ERROR", r["error"][:60], "", "", ""])
        else:
            rows.append([r["family"], r["op"], r["bytes"], f"{r['kernel_s'] * 1e6:.1f}", f"{r['gbps']:.1f}",
                         f"{r['copy_s'] * 1e6:.1f}", f"{r['copy_gbps']:.1f}", f"{r['x_copy']:.2f}"])
    print(fmt_table(["family", "op", "bytes", "us/call", "GB/s", "copy us", "copy GB/s", "x copy"], rows))


# ------------------------------------------------------------------- train

def graph_policies():
    from fxcompress.compiled import load_policy  # the default pass list

    graph, comm = [], []
    for p in sorted(glob.glob(os.path.join(ROOT, "policies", "*.yaml"))):
        pol = load_policy(p)
        (comm if not pol.rules and pol.section("communication") is not None else graph).append(p)
    return graph, comm


def train_one(policy, model_name, batch, size, device, warmup, steps) -> dict:
    import torchvision.models as tvm

    import fxcompress
    from fxcompress.errors import BadInput, PolicyError, TraceError

    torch.manual_seed(0)
    model = tvm.get_model(model_name, weights=None).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if policy is None:
        m, step_hook = model, (lambda: None)
    else:
        try:
            m = fxcompress.compile(model, policy, example_inputs=x)
        except (PolicyError, BadInput, TraceError) as e:
            return {"status": "n/a", "reason": str(e).splitlines()[0][:200]}
        step_hook = m.step
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    if policy is not None:
        m.attach_optimizer(opt)
    m.train()
    timer = Timer(device)
    times, peaks = [], []
    for i in range(warmup + steps):
        if timer.cuda:
            torch.cuda.reset_peak_memory_stats()
        xi = x + 0  # a new tensor object each step: a pack belongs to one forward

        def step():
            out = m(xi)
            loss = F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_hook()
            return loss

        holder = {}
        t = timer.per_call(lambda: holder.setdefault("loss", step()), 0, 1)
        if not torch.isfinite(holder["loss"]):
            raise FloatingPointError(f"loss {holder['loss'].item()} at step {i}")
        peaks.append(torch.cuda.max_memory_allocated() if timer.cuda else None)
        if i >= warmup:
            times.append(t)
    del m, model, opt
    return {"status": "ok", "step_s": statistics.median(times),
            "peak_bytes": max(peaks) if peaks[0] is not None else None,
            "peak_per_step": peaks}


def train(args, device) -> dict:
    graph, comm = graph_policies()
    if args.policies:
        wanted = set(args.policies.split(","))
        graph = [p for p in graph if os.path.splitext(os.path.basename(p))[0] in wanted]
    res, failed = [], 0
    base = None
    for p in [None] + graph:
        name = "uncompressed" if p is None else os.path.splitext(os.path.basename(p))[0]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            r = train_one(p, args.model, args.batch, args.size, device, args.warmup_steps, args.steps)
        except Exception as e:
            traceback.print_exc()
            r = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
            failed += 1
        r["policy"] = name
        if p is None:
            base = r if r["status"] == "ok" else None
        elif base and r["status"] == "ok":
            r["time_ratio"] = r["step_s"] / base["step_s"]
            if r["peak_bytes"] is not None:
                r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        res.append(r)
        print(f"  train {name}: {r['status']}", flush=True)
    return {"model": args.model, "batch": args.batch, "size": args.size, "rows": res, "failed": failed,
            "communication_only": [os.path.basename(p) for p in comm]}


def print_train(t: dict) -> None:
    rows = []
    for r in t["rows"]:
        if r["status"] != "ok":
            rows.append([r["policy"], r["status"], r.get("reason", "")[:70], "", ""])
            continue
        pk = r["peak_bytes"]
        rows.append([r["policy"], f"{r['step_s'] * 1e3:.1f}", f"{r.get('time_ratio', 1.0):.2f}",
                     "n/a (cpu)" if pk is None else f"{pk / 2 ** 20:.0f}",
                     "" if pk is None else f"{r.get('peak_ratio', 1.0):.2f}"])
    print(f"{t['model']}, batch {t['batch']}, {t['size']}x{t['size']}")
    print(fmt_table(["policy", "step ms", "x time", "peak MiB", "x peak"], rows))
    if t["communication_only"]:
        print("communication-only (no graph change; their kernels are in the bandwidth table): "
              + ", ".join(t["communication_only"]))


# ----------------------------------------------------------------- compile

def compile_table(dry: bool, timeout: int) -> dict:
    script = os.path.join(ROOT, "tools", "bench_compile.py")
    if not os.path.exists(script):
        return {"status": "absent", "reason": "tools/bench_compile.py is not in this tree"}
    # dry: its own tiny check on two policies (the call path); GPU day: resnet18 under every policy (vit_b_16
    # too would not fit the 8 minutes; run bench_compile.py alone for it)
    cmd = [sys.executable, script, "--json"] + (["--quick", "--policies", "acgc_auto,psgd_w4"] if dry
                                              else ["--models", "resnet18"])
    env = dict(os.environ)
    env.pop("FXC_FORCE_TRITON", None)  # bench_compile picks its own paths
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"over {timeout} s", "command": " ".join(cmd)}
    out = {"command": " ".join(cmd), "rc": p.returncode}
    try:
        out["rows"] = json.loads(p.stdout)
        out["status"] = "ok" if p.returncode == 0 else "error"
    except ValueError:
        out["status"] = "error"
        out["stdout_tail"] = p.stdout[-2000:]
    if p.returncode:
        out["stderr_tail"] = p.stderr[-2000:]
    return out


def print_compile(c: dict) -> None:
    if c["status"] != "ok":
        print(f"compile table: {c['status']}: {c.get('reason', '')}{c.get('stderr_tail', '')[-600:]}")
        return
    rows = c["rows"] if isinstance(c["rows"], list) else [c["rows"]]
    keys = []
    for r in rows:
        for k in r:
            if k not in keys and not isinstance(r[k], (dict, list)):
                keys.append(k)
    print(fmt_table(keys, [[f"{r.get(k):.3g}" if isinstance(r.get(k), float) else r.get(k) for k in keys]
                           for r in rows]))


# -------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"))
    ap.add_argument("--sections", default="bandwidth,train,compile")
    ap.add_argument("--elements", type=int, default=None, help="elements per kernel input (default 2^25; dry 2^14)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--model", default=None, help="default resnet50 (dry: resnet18)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (dry: 4)")
    ap.add_argument("--size", type=int, default=None, help="default 64 (dry: 32)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 3 (dry: 1)")
    ap.add_argument("--steps", type=int, default=None, help="default 10 (dry: 1)")
    ap.add_argument("--policies", default="", help="comma-separated policy names (default: every graph policy)")
    ap.add_argument("--compile-timeout", type=int, default=180)
    a = ap.parse_args(argv)
    d = a.dry
    defaults = dict(elements=1 << 14 if d else 1 << 25, warmup=1 if d else 5, iters=1 if d else 20,
                    model="resnet18" if d else "resnet50", batch=4 if d else 32, size=32 if d else 64,
                    warmup_steps=1 if d else 3, steps=1 if d else 10)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if d:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device (use --dry on a CPU machine)", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("gpu_bench: TRITON_INTERPRET=1 would interpret the kernels; unset it", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    sections = set(a.sections.split(","))
    os.makedirs(a.out, exist_ok=True)
    res = {"dry": d, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry: times meaningless)",
           "args": vars(a)}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    failed = 0
    print(f"# gpu_bench on {res['device']}, torch {res['torch']}, triton {res['triton']}, {res['date_utc']}")
    if "bandwidth" in sections:
        print(f"\n## kernel bandwidth ({a.elements} elements, {a.warmup} warm-up + {a.iters} timed calls)")
        try:
            res["bandwidth"] = bandwidth(a.elements, device, a.warmup, a.iters)
        except Exception as e:
            traceback.print_exc()
            res["bandwidth"] = {"rows": [], "failed": 1, "error": f"{type(e).__name__}: {e}"}
        print_bandwidth(res["bandwidth"])
        failed += res["bandwidth"]["failed"]
    if "train" in sections:
        # the training step takes each op's production path: CUDA -> Triton,
        # CPU -> C or torch (the interpreter would take minutes per step)
        os.environ.pop("FXC_FORCE_TRITON", None)
        print(f"\n## training step, every policy ({a.warmup_steps} warm-up + {a.steps} timed steps)")
        res["train"] = train(a, device)
        print_train(res["train"])
        failed += res["train"]["failed"]
    if "compile" in sections:
        print("\n## torch.compile (tools/bench_compile.py)")
        res["compile"] = compile_table(d, a.compile_timeout)
        print_compile(res["compile"])
        c = res["compile"]
        # a cell that errors is a failure too, though the tool itself exits 0
        bad = [r for r in (c.get("rows") or []) if isinstance(r, dict) and r.get("error")]
        c["failed_cells"] = len(bad)
        failed += (c["status"] in ("error", "timeout")) + len(bad)
    path = os.path.join(a.out, "gpu_bench.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"\n{failed} failure(s); results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
