"""torch.compile of rewritten models (issue 13): graph breaks, recompiles, numerics; timing and memory.

    .venv/bin/python tools/bench_compile.py                      # table: every policy x resnet18, vit_b_16
    .venv/bin/python tools/bench_compile.py --quick              # tiny CNN, aot_eager (seconds)
    .venv/bin/python tools/bench_compile.py --timing             # resnet50 b32 64x64 step time + peak memory
    .venv/bin/python tools/bench_compile.py --timing --interleaved  # step times in one process, interleaved
    .venv/bin/python tools/bench_compile.py --main-job --epochs 3  # ResNet-20 digits epochs, eager vs --compile
    .venv/bin/python tools/bench_compile.py --op-counts          # custom-op calls per compiled ResNet-20 step

Table, per (model, policy), the model compressed with the policy and
compiled with `--backend` (default inductor):
- fullgraph: `CompressedModel.compile_with(backend, fullgraph=True)` runs a
  training step; otherwise `breaks` lists each graph break (torch._dynamo.explain
  on the rewritten graph, under the same hooks), counted by reason;
- recompiles: compiles (calls of the backend, graph pieces included) during
  `--steps` training steps (more when the next one would be a statistics
  step) after warm-up (until 2 steps have run compiled: statistics steps
  run eager); AutoQuant's statistics are
  taken every 5 steps here (`stats_every` overridden), so statistics steps
  are among them;
- numerics: the same weights, batch and RNG seed, eager vs compiled: `out`
  max |difference| / max |eager output|; `grad` for lossless policies the
  largest relative gradient difference (norm over each tensor) against eager
  with the same policy; for lossy activation policies the relative
  whole-model gradient error against the uncompressed model, compiled
  (`grad`) beside eager (`grad_eager`): quantized saves differ between the
  two (compiled saves what inductor's partitioner keeps), so the check is
  that compiled's error is of eager's size (`ok`: <= 2x eager's + 1e-3);
  lossless policies: `ok` when `out` < 1e-4 and `grad` < 1e-4 (inductor:
  1e-3, its fused reductions reassociate float sums); CAMP's quantized
  forward (dual_precision without activation rules): `out` and `grad` as
  for lossless policies but in float64 (`ok`: both < 1e-9; row() says why),
  the float32 `out` printed beside; `all` (dual_precision and activation
  rules): `ok` by the gradient rule alone, its quantized forward moves the
  float32 output as above.

--timing: resnet50, batch 32, 64x64 (`--quick`: resnet18, batch 4, 32x32),
none / 2bit / auto / psgd: median step time (forward, backward, SGD step)
eager and compiled, compressed/uncompressed ratios in each (also
`2bit_plain`, `2bit_c`: compiled 2bit with its CPU route forced, side by
side in one run: `--timing-modes none 2bit_plain 2bit_c auto`); step peak
memory by bench_activations' method (a fresh process with
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, VmHWM after one step
minus VmRSS before), eager and compiled. Do not take timing figures on a
shared machine.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

POLICIES = sorted(glob.glob(os.path.join(ROOT, "policies", "*.yaml")))
# (batch, image size, classes); small inputs: the table is about graphs, not speed
MODELS = {"resnet18": (4, 32, 10), "vit_b_16": (2, 32, 10), "tiny": (4, 16, 10)}
def quantized_forward(pol: dict) -> bool:
    """CAMP's dual precision: DoReFa-quantized weights and activations."""
    return any("dual_precision" in (r or {}) for r in pol.get("rules", []) or [])


def lossy(pol: dict) -> bool:
    """Activation compression: gradients approximate by design."""
    return any("activations" in (r or {}) for r in pol.get("rules", []) or [])
STATS_EVERY = 5


def policy_dict(path: str) -> dict:
    """The policy with AutoQuant's statistics every STATS_EVERY steps, so the
    counted steps include statistics steps."""
    with open(path) as f:
        pol = yaml.safe_load(f)
    rules = pol.get("rules", []) or []
    if any(isinstance(r.get("activations"), dict) and r["activations"].get("mode") == "auto" for r in rules):
        pol.setdefault("settings", {}).setdefault("activations", {}).update(stats_every=STATS_EVERY, window=2)
    return pol


def build_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    batch, size, classes = MODELS[name]
    if name == "tiny":
        from tests.models.small_cnn import SmallCNN

        m = SmallCNN(classes)
    else:
        import torchvision

        if name.startswith("vit"):
            m = getattr(torchvision.models, name)(image_size=size, num_classes=classes)
        else:
            m = getattr(torchvision.models, name)(num_classes=classes)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return m, x, y


def compress(m, policy, x):
    import fxcompress

    if policy is None:
        return fxcompress.compile(m, {"version": 1}, example_inputs=x[:1])
    return fxcompress.compile(m, policy, example_inputs=x[:1])


class CountingBackend:
    """A backend that counts its calls (one per compiled graph: first compiles,
    graph-break pieces and recompiles) and hands the graph on."""

    def __init__(self, backend: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(backend)
        self.calls = 0

    def __call__(self, gm, example_inputs, **kw):
        self.calls += 1
        return self.inner(gm, example_inputs, **kw)


def step(cm, opt, x, y, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    out = cm(x)
    F.cross_entropy(out, y).backward()
    opt.step()
    cm.step()
    return out


def graph_breaks(cm, x, y) -> list:
    """[(reason, count)] of dynamo's graph breaks in a training forward."""
    from fxcompress.runtime.compile_support import CompiledCall

    call = CompiledCall(cm.graph_module, "eager")  # sets the specs' compiled_hooks as a compiled run does
    torch._dynamo.reset()
    ctx = call.hooks.enter() if call.hooks is not None else _null()
    with ctx:
        ex = torch._dynamo.explain(cm.graph_module)(x)
    reasons = Counter()
    for b in ex.break_reasons:
        r = str(b.reason).strip().splitlines()
        text = " ".join(s.strip() for s in r[:3])[:160]
        reasons[text] += 1
    cm.compile_with(None)
    return sorted(reasons.items(), key=lambda kv: -kv[1])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_total(g, ref):
    num = sum(float((g[n] - ref[n]).pow(2).sum()) for n in ref if n in g)
    den = sum(float(ref[n].pow(2).sum()) for n in ref)
    return (num / den) ** 0.5 if den else 0.0


def rel_worst(g, ref):
    """Largest |g - ref| / |ref| over tensors; |ref| floored at 1e-3 of the
    largest tensor's norm (a bias before BatchNorm has a gradient of ~0)."""
    floor = 1e-3 * max(float(t.norm()) for t in ref.values())
    return max(float((g[n] - ref[n]).norm()) / max(float(ref[n].norm()), floor) for n in ref)


def one_grad(cm, x, y, seed):
    cm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = cm(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), grads(cm)


def train(cm, x, y, steps: int):
    """Warm-up until 2 steps have run compiled (statistics steps run eager:
    under AutoQuant the first steps may all be statistics steps, and a
    first compile among the counted steps would read as a recompile); then
    an iterator of random batches of x's shape for the counted steps."""
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(3)

    def batches():
        while True:
            yield torch.randn(x.shape, generator=gen), torch.randint(0, 10, y.shape, generator=gen)

    it = batches()
    call = cm.__dict__["_compiled"]
    compiled = tries = 0
    while compiled < 2 and tries < 20:
        eager0 = call.eager_calls
        step(cm, opt, *next(it))
        compiled += call.eager_calls == eager0
        tries += 1
    return opt, it


def twin(m, pol, x, trained):
    """An eager CompressedModel in `trained`'s state: weights, buffers and
    every controller's state (AutoQuant's budgets, PSGD's ranges)."""
    e = compress(copy.deepcopy(m), pol, x)
    e.load_state_dict(trained.state_dict(), strict=False)
    for name, c in trained.controllers.items():
        if name in e.controllers:
            e.controllers[name].load_state(c.state())
    return e


_MODEL_CACHE: dict = {}


def model_for(model: str):
    """(module, x, y, uncompressed CompressedModel): built once per model per
    process; every cell deep-copies the module (the same seed-0 weights a
    fresh build gives) and loads its trained weights into the shared
    uncompressed model before using it as the gradient reference."""
    if model not in _MODEL_CACHE:
        m, x, y = build_model(model)
        base = compress(copy.deepcopy(m), None, x)
        _MODEL_CACHE[model] = (m, x, y, base, copy.deepcopy(base.state_dict()))
    m, x, y, base, init = _MODEL_CACHE[model]
    base.load_state_dict(init)  # what a fresh build holds where the trained model has no such key
    return m, x, y, base


def row(model: str, policy_path: str, backend: str, steps: int) -> dict:
    name = os.path.splitext(os.path.basename(policy_path))[0]
    res = {"model": model, "policy": name, "backend": backend}
    pol = policy_dict(policy_path)
    m, x, y, base = model_for(model)
    torch._dynamo.reset()
    counter = CountingBackend(backend)
    comp = compress(copy.deepcopy(m), pol, x)
    t0 = time.perf_counter()
    try:
        comp.compile_with(counter, fullgraph=True)
        opt, batches = train(comp, x, y, steps)
        res["fullgraph"], res["breaks"] = True, []
    except Exception as e:  # noqa: BLE001 - the table reports why
        res["fullgraph"] = False
        res["fullgraph_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        res["breaks"] = graph_breaks(compress(copy.deepcopy(m), pol, x), x, y)
        torch._dynamo.reset()
        counter = CountingBackend(backend)
        comp = compress(copy.deepcopy(m), pol, x)
        comp.compile_with(counter)
        opt, batches = train(comp, x, y, steps)
    res["first_compile_s"] = round(time.perf_counter() - t0, 1)
    # recompiles over `steps` training steps after warm-up (statistics steps among them)
    before = counter.calls
    call = comp.__dict__["_compiled"]
    counted = 0
    # `steps` steps, then on until the next step is not a statistics step
    # (the numerics step below compares compiled with eager)
    while counted < steps or any(s.collect for s in call.specs):
        step(comp, opt, *next(batches))
        counted += 1
    res["compiles_warmup"] = before
    res["recompiles"] = counter.calls - before
    res["steps"] = counted
    bad = [n for n, p in comp.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # trained to NaN/inf: the numerics below are NaN; name where it is
        res["nonfinite_params"] = [len(bad)] + bad[:3]
    res["activation_hooks"] = repr(call.hooks) if call.hooks is not None else "-"
    res["eager_statistics_steps"] = call.eager_calls
    # numerics: the trained compiled model vs its eager twin (same weights,
    # budgets, ranges; a step that is not a statistics step), same batch, seed
    assert not any(s.collect for s in call.specs), "numerics step would be a statistics step"
    eager = twin(m, pol, x, comp)
    base.load_state_dict(comp.state_dict(), strict=False)
    out_b, g_b = one_grad(base, x, y, 7)
    out_e, g_e = one_grad(eager, x, y, 7)
    out_c, g_c = one_grad(comp, x, y, 7)
    scale = float(out_e.abs().max()) or 1.0
    res["out"] = float((out_c - out_e).abs().max()) / scale
    if lossy(pol):
        res["grad"] = rel_total(g_c, g_b)
        res["grad_eager"] = rel_total(g_e, g_b)
        res["ok"] = res["grad"] <= 2 * res["grad_eager"] + 1e-3
        if quantized_forward(pol):
            # `all`: the float32 output moves with the quantized forward's
            # codes (below); that forward is judged in float64 by the camp
            # rows, the activation packs here by the gradient's error
            res["out_f32"] = res["out"]
        else:
            res["ok"] = res["ok"] and res["out"] < 1e-4
    elif quantized_forward(pol):
        # DoReFa rounds weights and activations in the forward: a value that
        # inductor's reassociated float sums or its own tanh move by one ulp
        # across a rounding boundary lands on the next code, and the step
        # grows through the layers (in float32 eager itself moves its output
        # by 0.57 of its size under a 1e-4 relative input perturbation on
        # resnet18 camp_w4). So the judged comparison is in float64, where
        # an ulp is 1e-16 and no code moves: the same weights and buffers,
        # compiled again in float64 (inductor's RNG replaced by eager's,
        # `fallback_random`, so RL samples the same gates); out and the
        # worst gradient as for lossless policies. float32 `out` printed.
        res["out_f32"] = res["out"]
        res["out"], res["grad"] = float64_diff(m, pol, x, y, comp, backend)
        res["ok"] = res["out"] < 1e-9 and res["grad"] < 1e-9
    else:
        res["grad"] = rel_worst(g_c, g_e)
        # inductor reassociates float sums in its fused reductions (1e-4
        # is aot_eager's, whose kernels are eager's own)
        res["ok"] = res["out"] < 1e-4 and res["grad"] < (1e-3 if backend == "inductor" else 1e-4)
    torch._dynamo.reset()
    return res


def float64_diff(m, pol, x, y, trained, backend) -> tuple:
    """(out, worst gradient) differences of `trained`'s state in float64,
    compiled with `backend` against eager (row() says why float64)."""
    from torch._inductor import config as inductor_config

    x64 = x.double()
    eager = twin(m, pol, x, trained).double()
    comp = twin(m, pol, x, trained).double()
    torch._dynamo.reset()
    comp.compile_with(backend, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        out_c, g_c = one_grad(comp, x64, y, 7)
    out_e, g_e = one_grad(eager, x64, y, 7)
    return float((out_c - out_e).abs().max()) / (float(out_e.abs().max()) or 1.0), rel_worst(g_c, g_e)


def table_cells(a) -> list:
    """[(model, policy path)] in run order: --cells, else --models x --policies
    (one model's cells together: its module and reference are built once)."""
    by_name = {os.path.splitext(os.path.basename(p))[0]: p for p in POLICIES}
    if a.cells:
        out = []
        for c in a.cells.split(","):
            model, _, pol = c.strip().partition(":")
            if model not in MODELS or pol not in by_name:
                raise ValueError(f"--cells {c!r}: want MODEL:POLICY with MODEL in {sorted(MODELS)} "
                                 f"and POLICY a file in policies/")
            out.append((model, by_name[pol]))
        return out
    models = ["tiny"] if a.quick else a.models.split(",")
    wanted = set(filter(None, a.policies.split(",")))
    unknown = wanted - set(by_name)
    if unknown or any(m not in MODELS for m in models):
        raise ValueError(f"unknown policy or model: {sorted(unknown) or models}")
    return [(m, p) for m in models for p in POLICIES if not wanted or os.path.splitext(os.path.basename(p))[0] in wanted]


def where(e: BaseException) -> str:
    """file:line of the innermost frames of an error (the table's row names it)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)[-3:]
    return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in reversed(frames))


def read_rows(path: str) -> list:
    """The rows of a --out file (the last row of a cell wins: a re-run cell)."""
    if not path or not os.path.exists(path):
        return []
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["model"], r["policy"], r.get("backend"))] = r
    return list(rows.values())


def print_table(rows, header=True):
    if header:
        print(f"{'model':9} {'policy':20} {'backend':9} {'fullgraph':9} {'recomp':6} {'out':>8} {'grad':>8} "
              f"{'grad_eag':>8} ok  breaks")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:9} {r['policy']:20} {r.get('backend', '?'):9} ERROR {r['error']}")
            if r.get("where"):
                print(f"{'':41}at {r['where']}")
            continue
        br = "; ".join(f"{n}x {t}" for t, n in r["breaks"]) or "-"
        ge = f"{r['grad_eager']:.2e}" if "grad_eager" in r else "-"
        print(f"{r['model']:9} {r['policy']:20} {r.get('backend', '?'):9} {str(r['fullgraph']):9} {r['recompiles']:6} "
              f"{r['out']:8.1e} "
              f"{r['grad']:8.1e} {ge:>8} {'y' if r['ok'] else 'N'}   {br}")
        if not r["fullgraph"]:
            print(f"{'':41}fullgraph=True: {r['fullgraph_error']}")
        if r.get("nonfinite_params"):
            n, *names = r["nonfinite_params"]
            print(f"{'':41}non-finite weights after the compiled steps: {n} ({', '.join(names)}, ...)")
        if "out_f32" in r and "grad_eager" in r:
            print(f"{'':41}quantized forward and activation packs: `ok` by grad against grad_eag, out not judged")
        elif "out_f32" in r:
            print(f"{'':41}quantized forward: out and grad compared in float64; float32 out {r['out_f32']:.1e}")
        print(f"{'':41}activations: {r['activation_hooks'] or '-'}; eager statistics steps: "
              f"{r['eager_statistics_steps']}")


# ------------------------------------------------------------------ timing

TIMING_MODES = {"none": None, "2bit": "acgc_2bit.yaml", "auto": "acgc_auto.yaml", "psgd": "psgd_w4.yaml",
                "2bit_plain": "acgc_2bit.yaml", "2bit_c": "acgc_2bit.yaml"}
# The fixed-width hooks' two CPU routes under compile, each forced in its
# child's environment (compile_support.c_path_available): inductor's loops
# for the plain tensor code, or the C kernels through fxcompress::pack_saved.
# Compiled only: eager runs the C kernels either way (its row is 2bit's).
ROUTE_ENV = {"2bit_plain": "0", "2bit_c": "1"}


def _timing_model(quick: bool):
    import torchvision

    torch.manual_seed(0)
    name, batch, size = ("resnet18", 4, 32) if quick else ("resnet50", 32, 64)
    m = getattr(torchvision.models, name)()
    gen = torch.Generator().manual_seed(1)
    return m, torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def _timing_build(mode: str, compiled: bool, quick: bool, backend: str):
    m, x, y = _timing_model(quick)
    pol = TIMING_MODES[mode]
    cm = compress(m, None if pol is None else os.path.join(ROOT, "policies", pol), x)
    if compiled:
        cm.compile_with(backend)
    opt = torch.optim.SGD(cm.parameters(), lr=0.0)  # lr 0: the same weights every step
    cm.attach_optimizer(opt)
    for _ in range(3):  # compile, AutoQuant's first statistics
        step(cm, opt, x, y)
    return cm, opt, x, y


def timing_child(mode: str, compiled: bool, quick: bool, backend: str, steps: int) -> dict:
    # The headline is the user's setting: torch's default thread count;
    # FXC_BENCH_THREADS=1 gives the one-thread column.
    if os.environ.get("FXC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FXC_BENCH_THREADS"]))
    cm, opt, x, y = _timing_build(mode, compiled, quick, backend)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(cm, opt, x, y)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times)}


def memory_child(mode: str, compiled: bool, quick: bool, backend: str) -> dict:
    import gc

    torch.set_num_threads(1)
    cm, opt, x, y = _timing_build(mode, compiled, quick, backend)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    opt.zero_grad(set_to_none=True)
    gc.collect()
    from fxcompress.kernels import bufpool

    bufpool.POOL.clear()
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(cm, opt, x, y)
    return {"peak_added": status("VmHWM") - before}


def _child(kind: str, mode: str, compiled: bool, quick: bool, backend: str, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if mode in ROUTE_ENV:
        env["FXC_COMPILE_C_PACK"] = ROUTE_ENV[mode]
    if kind == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", kind, mode, "1" if compiled else "0", "1" if quick else "0",
           backend, str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(quick: bool, backend: str, steps: int, modes) -> dict:
    res = {}
    for mode in modes:
        for compiled in (False, True) if mode not in ROUTE_ENV else (True,):
            key = f"{mode}/{'compiled' if compiled else 'eager'}"
            r = _child("time", mode, compiled, quick, backend, steps)
            r.update(_child("memory", mode, compiled, quick, backend, steps))
            res[key] = r
            print(f"  {key:18} step {r['step_s'] * 1e3:8.1f} ms  peak added {r['peak_added'] / 2**20:8.1f} MiB",
                  flush=True)
    for kind in ("eager", "compiled"):
        base = res.get(f"none/{kind}")
        for mode in modes:
            r = res.get(f"{mode}/{kind}")
            if mode != "none" and base and r:
                r["ratio_vs_none"] = r["step_s"] / base["step_s"]
                r["memory_vs_none"] = r["peak_added"] / base["peak_added"] if base["peak_added"] else None
                print(f"  {mode}/{kind}: step {r['ratio_vs_none']:.2f}x the uncompressed one", flush=True)
    return res


def timing_interleaved(quick: bool, backend: str, rounds: int, modes) -> dict:
    """Step time of every (mode, eager/compiled) in ONE process, interleaved:
    each round runs one step of each, in a rotating order, on that round's
    new batch (the same batch for every mode), so machine drift and
    process-to-process differences (+-0.2 across the one-process-per-figure
    runs above) fall on all of them alike. Median over rounds; a round in
    which a model takes AutoQuant's statistics step (run eager) is dropped
    for that model. Peak memory is `timing`'s (a process per figure)."""
    from fxcompress.runtime.activations import SaveSpec

    if os.environ.get("FXC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FXC_BENCH_THREADS"]))
    from unittest import mock

    runs = {}
    for mode in modes:
        # the route is read when the hooks are built (as `_child` sets it for its process)
        route = {"FXC_COMPILE_C_PACK": ROUTE_ENV[mode]} if mode in ROUTE_ENV else {}
        for compiled in (False, True) if mode not in ROUTE_ENV else (True,):
            with mock.patch.dict(os.environ, route):
                runs[f"{mode}/{'compiled' if compiled else 'eager'}"] = _timing_build(mode, compiled, quick, backend)
    _, x0, y0 = _timing_model(quick)
    gen = torch.Generator().manual_seed(5)
    times = {k: [] for k in runs}
    keys = list(runs)
    for r in range(rounds):
        x, y = torch.randn(x0.shape, generator=gen), torch.randint(0, 1000, y0.shape, generator=gen)
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            cm, opt, _, _ = runs[k]
            stats = any(m.collect for m in cm.modules() if isinstance(m, SaveSpec))
            t0 = time.perf_counter()
            step(cm, opt, x, y)
            if not stats:
                times[k].append(time.perf_counter() - t0)
    res = {k: {"step_s": statistics.median(v), "steps": len(v)} for k, v in times.items() if v}
    for k, r in res.items():
        print(f"  {k:18} step {r['step_s'] * 1e3:8.1f} ms  ({r['steps']} steps)", flush=True)
    return print_ratios(res, modes, "step_s", "{}: step {:.2f}x the uncompressed one", "compiled step")


# ------------------------------------------------------------------ op counts

def op_counts(backend: str, policy: str = "acgc_auto.yaml", steps: int = 2) -> dict:
    """Per compiled training step of ResNet-20 at the main job's shapes
    (batch 64, 1x16x16): calls of the custom ops pack_saved / unpack_saved,
    of SaveSpec.pack inside them, and tensor copies (Tensor.clone) made while
    they run. Counts, not time: meaningful on a loaded machine."""
    import fxcompress.runtime.activations as acts
    from fxcompress.models.resnet_cifar import resnet_cifar
    from fxcompress.runtime import compile_support as cs

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    cm = compress(resnet_cifar(20, 10, 1), os.path.join(ROOT, "policies", policy), x)
    cm.compile_with(backend)
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm.attach_optimizer(opt)
    for _ in range(12):  # compile, AutoQuant's first statistics steps (run eager)
        step(cm, opt, x, y)
    n = Counter()
    inside = [0]

    def counting(name, fn):
        def wrapped(*a, **k):
            n[name] += 1
            inside[0] += 1
            try:
                return fn(*a, **k)
            finally:
                inside[0] -= 1
        return wrapped

    ops = {"pack_saved": cs.pack_saved, "unpack_saved": cs.unpack_saved}
    saved = {k: dict(op._backend_fns) for k, op in ops.items()}
    pack, clone = acts.SaveSpec.pack, torch.Tensor.clone

    def spec_pack(self, t):
        n["SaveSpec.pack"] += 1
        return pack(self, t)

    def counted_clone(self, *a, **k):
        if inside[0]:
            n["Tensor.clone"] += 1
        return clone(self, *a, **k)

    try:
        for k, op in ops.items():
            for dev, fn in list(op._backend_fns.items()):
                op._backend_fns[dev] = counting(k, fn)
        acts.SaveSpec.pack, torch.Tensor.clone = spec_pack, counted_clone
        eager0 = cm.__dict__["_compiled"].eager_calls
        for _ in range(steps):
            step(cm, opt, x, y)
        assert cm.__dict__["_compiled"].eager_calls == eager0, "a statistics step among the counted ones"
    finally:
        for k, op in ops.items():
            op._backend_fns.clear()
            op._backend_fns.update(saved[k])
        acts.SaveSpec.pack, torch.Tensor.clone = pack, clone
    res = {k: n[k] / steps for k in ("pack_saved", "unpack_saved", "SaveSpec.pack", "Tensor.clone")}
    print("  per compiled step: " + ", ".join(f"{k} {v:g}" for k, v in res.items()), flush=True)
    return res


# ------------------------------------------------------------------ main job

MAIN_JOB_MODES = {"none": None, "auto": "acgc_auto.yaml"}


def main_job(epochs: int, backend: str, extra, modes) -> dict:
    """The default ResNet-20 main job on digits (`fxcompress train`), eager
    and `--compile BACKEND`, uncompressed and acgc_auto: per-epoch time from
    each run's report.json. Epoch 1 of a compiled run includes its compile;
    `epoch_s` is the mean of the later epochs (needs --epochs >= 2)."""
    import tempfile

    res = {}
    for mode in modes:
        for compiled in (False, True):
            key = f"{mode}/{'compiled' if compiled else 'eager'}"
            with tempfile.TemporaryDirectory() as run:
                cmd = [sys.executable, "-m", "fxcompress", "train", "--epochs", str(epochs), "--run-dir", run,
                       "--no-progress", "--no-plots", "--json"] + list(extra)
                if MAIN_JOB_MODES[mode]:
                    cmd += ["--policy", os.path.join(ROOT, "policies", MAIN_JOB_MODES[mode])]
                if compiled:
                    cmd += ["--compile", backend]
                out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                                     text=True, timeout=7200)
                if out.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: {out.stderr[-2000:]}")
                with open(os.path.join(run, "report.json")) as f:
                    rep = json.load(f)
            times = [e["time_s"] for e in rep["epochs"]]
            later = times[1:] or times
            r = {"epoch1_s": times[0], "epoch_s": sum(later) / len(later), "test_acc": rep["epochs"][-1]["test_acc"]}
            res[key] = r
            print(f"  {key:16} epoch 1 {r['epoch1_s']:8.1f} s   later epochs {r['epoch_s']:8.1f} s   "
                  f"test acc {r['test_acc']:.4f}", flush=True)
    return print_ratios(res, modes, "epoch_s", "{}: {:.2f}x the uncompressed epoch", "compiled epoch")


def print_ratios(res: dict, modes, key: str, vs_none: str, vs_eager: str) -> dict:
    """Each mode's `key` against the uncompressed run of the same kind
    (stored as ratio_vs_none) and compiled against eager, printed."""
    for kind in ("eager", "compiled"):
        base = res.get(f"none/{kind}")
        for mode in modes:
            r = res.get(f"{mode}/{kind}")
            if mode != "none" and base and r:
                r["ratio_vs_none"] = r[key] / base[key]
                print("  " + vs_none.format(f"{mode}/{kind}", r["ratio_vs_none"]), flush=True)
    for mode in modes:
        e, c = res.get(f"{mode}/eager"), res.get(f"{mode}/compiled")
        if e and c:
            print(f"  {mode}: {vs_eager} {c[key] / e[key]:.2f}x eager's", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vit_b_16")
    ap.add_argument("--policies", default="", help="comma-separated policy names (default: all in policies/)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny model, aot_eager, 6 steps (a check that it runs)")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--timing-modes", nargs="+", default=["none,2bit,auto,psgd"],
                    help="modes among none 2bit auto psgd 2bit_plain 2bit_c (space- or comma-separated; "
                         "2bit_plain / 2bit_c: compiled only, the fixed-width hooks' CPU route forced to "
                         "inductor's plain tensor code / the C kernels through fxcompress::pack_saved)")
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--interleaved", action="store_true",
                    help="--timing: every mode's step time in one process, interleaved round by round "
                         "(`--timing-steps` rounds; no memory figures)")
    ap.add_argument("--main-job", action="store_true",
                    help="time per epoch of the default ResNet-20 digits job, eager vs --compile")
    ap.add_argument("--op-counts", action="store_true",
                    help="custom-op calls and copies per compiled acgc_auto step of ResNet-20 at the main "
                         "job's shapes (counts, not time)")
    ap.add_argument("--epochs", type=int, default=2, help="--main-job: epochs per run (>= 2: epoch 1 compiles)")
    ap.add_argument("--train-args", default="", help="--main-job: extra `fxcompress train` arguments (quoted)")
    ap.add_argument("--cells", default="",
                    help="table: comma-separated MODEL:POLICY cells to run (default: --models x --policies)")
    ap.add_argument("--out", default="",
                    help="table: append each finished cell's row to this JSON-lines file and skip the cells "
                         "it already holds (a stopped run resumes); --print-table FILE prints it")
    ap.add_argument("--print-table", default="", metavar="FILE", help="print the table of a --out file and exit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind, mode, compiled, quick, backend, steps = a.child
        fn = timing_child if kind == "time" else memory_child
        args = (mode, compiled == "1", quick == "1", backend) + ((int(steps),) if kind == "time" else ())
        print(json.dumps(fn(*args)))
        return 0
    if a.op_counts:
        if a.threads:
            torch.set_num_threads(a.threads)
        res = op_counts(a.backend)
        if a.json:
            print(json.dumps(res, indent=1))
        return 0
    if a.main_job:
        import shlex

        res = main_job(a.epochs, a.backend, shlex.split(a.train_args), list(MAIN_JOB_MODES))
        if a.json:
            print(json.dumps(res, indent=1))
        return 0
    if a.timing:
        modes = [m for part in a.timing_modes for m in part.split(",") if m]
        bad = [m for m in modes if m not in TIMING_MODES]
        if bad:
            print(f"bench_compile: --timing-modes {' '.join(bad)}: want among {' '.join(TIMING_MODES)}", file=sys.stderr)
            return 2
        if a.threads:
            os.environ["FXC_BENCH_THREADS"] = str(a.threads)
        run = timing_interleaved if a.interleaved else timing
        res = run(a.quick, a.backend, 3 if a.quick else a.timing_steps, modes)
        if a.json:
            print(json.dumps(res, indent=1))
        return 0
    if a.print_table:
        print_table(read_rows(a.print_table))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    backend = "aot_eager" if a.quick and a.backend == "inductor" else a.backend
    steps = 6 if a.quick else a.steps
    try:
        cells = table_cells(a)
    except ValueError as e:
        print(f"bench_compile: {e}", file=sys.stderr)
        return 2
    done = {(r["model"], r["policy"], r.get("backend")) for r in read_rows(a.out)} if a.out else set()
    rows = []
    for model, p in cells:
        name = os.path.splitext(os.path.basename(p))[0]
        if (model, name, backend) in done:
            continue
        t0 = time.perf_counter()
        try:
            r = row(model, p, backend, steps)
        except Exception as e:  # noqa: BLE001 - one failing cell does not hide the others
            r = {"model": model, "policy": name, "backend": backend,
                 "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                 "where": where(e)}
        r["cell_s"] = round(time.perf_counter() - t0, 1)
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows.append(r)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        if not a.json:
            print_table([r], header=len(rows) == 1)
            sys.stdout.flush()
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
