"""Replicate AC/DC's claims on the embedded digits data (issue 14, SPEC section 3).

Per seed, the built-in CIFAR ResNet, SGD with momentum, the same epochs,
batches and learning-rate schedule for every arm (--lr-schedule: step, decays
at 50 % and 75 %; or cosine to 0 per step, as the authors' ImageNet runs):
- dense: plain training (the baseline);
- acdc90 / acdc95: AC/DC with one global magnitude threshold; acdc24: 2:4 masks.
  The authors' ImageNet schedule scaled to the run, in optimizer steps: dense
  warm-up 10 %, 5 % sparse / 5 % dense alternation, last dense phase
  75-85 %, final sparse phase 85-100 %. The sparse model is the end of
  training; the dense model the end of the last dense phase (the controller's
  snapshot_due says when: after the last step of that phase).
- gmp90 / gmp95: torch.ao.pruning gradual magnitude pruning: a BaseSparsifier with
  WeightNormSparsifier's unstructured per-layer magnitude rule with the cubic schedule CubicSL from 10 % to 75 % of
  training (mask updated every --gmp-every steps), then fine-tuning with the
  final masks; masks folded in at the end (squash_mask).
- acdc90fl / acdc95fl (on request, --arms): global with the first conv and the
  last linear kept dense, as the shipped policies/acdc_90.yaml (the sparsity
  printed counts all Conv/Linear weights, so it is below the target).
- sparseml90: the ablation of SparseML's simplified AC/DC: fixed 5 % phases from
  step 0 (no warm-up), no long final phase, ending on a compressed phase.
Every arm prunes the same weights: all Conv2d and Linear weights.
Prints accuracy (mean, spread = max - min over seeds), the measured sparsity of
every compressed phase (zeros counted in the weights at its start and end), the
sparse checkpoint's bytes against dense, and writes the schedule PNG.

    nice -n 10 .venv/bin/python tools/replicate_acdc.py --seeds 5 --epochs 10 --depth 8 --upscale 8 \
        --lr-schedule cosine --json acdc.json --plot acdc.png     # BENCHMARKS.md adds --arms
    .venv/bin/python tools/replicate_acdc.py --seeds 1 --epochs 2 --arms dense,acdc90   # smoke run

--timing: a training step of torchvision resnet50 (batch 32, 64x64 by default)
with masks (in a compressed phase) against the same model without the pass,
steps alternated in one process at the default thread count, medians; and the
bytes of a 90 %-sparse resnet50 checkpoint (bitmask + values) against dense.
Run it on a quiet machine:

    .venv/bin/python tools/replicate_acdc.py --timing --timing-steps 20
    .venv/bin/python tools/replicate_acdc.py --timing --quick     # does it run (tiny sizes)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxcompress  # noqa: E402
from fxcompress.training.checkpoint import original_names  # noqa: E402
from fxcompress.data import load_data  # noqa: E402
from fxcompress.models import resnet_cifar  # noqa: E402
from fxcompress.sparse_export import compact, nbytes, sparsity_of  # noqa: E402

ARMS = ["dense", "acdc90", "acdc95", "acdc24", "gmp90", "gmp95", "sparseml90"]
EXTRA_ARMS = ["acdc90fl", "acdc95fl"]  # global with the first and last layer dense (not in the default set)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--depth", type=int, default=20, help="ResNet depth 6n+2 (default 20)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--upscale", type=int, default=16, help="digits image side (native 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default="step",
                   help="step: x0.1 at 50%% and 75%% of the epochs; cosine: to 0, set every step")
    p.add_argument("--gmp-every", type=int, default=10, help="steps between GMP mask updates")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", help="write the AC/DC schedule PNG here (sparsity over epochs, phases shaded)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--timing", action="store_true", help="resnet50 step time with/without masks, checkpoint bytes")
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--timing-batch", type=int, default=32)
    p.add_argument("--timing-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="--timing at tiny sizes (resnet18, batch 2, 32px, 2 steps)")
    return p.parse_args(argv)


def batches(x, y, bs, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(y), generator=g)
    n = len(y) - (1 if len(y) % bs == 1 else 0)  # no batch of one (BatchNorm)
    for i in range(0, n, bs):
        idx = order[i:i + bs]
        yield x[idx], y[idx]


def lr_at(args, epoch, frac=0.0):
    """The learning rate at `frac` of the way through `epoch`."""
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * (epoch + frac) / args.epochs))
    decays = (max(1, round(args.epochs * 0.5)), max(1, round(args.epochs * 0.75)))
    return args.lr * 0.1 ** sum(epoch >= d for d in decays)


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    correct = 0
    for i in range(0, len(data["yte"]), 500):
        correct += int((model(data["xte"][i:i + 500]).argmax(1) == data["yte"][i:i + 500]).sum())
    return 100.0 * correct / len(data["yte"])


def at(frac, total):
    return int(round(frac * total))


def acdc_schedule(total):
    """The authors' ImageNet proportions (of 100 epochs) in optimizer steps."""
    return {"unit": "step", "warmup": at(0.10, total), "compressed": max(1, at(0.05, total)),
            "decompressed": max(1, at(0.05, total)), "final": at(0.85, total)}


def sparseml_schedule(total):
    """Fixed-length phases from step 0, ending on a compressed phase."""
    length = max(1, at(0.05, total))
    starts = list(range(total - length, -1, -length))[::-1]  # phase starts, the last one compressed
    kinds = ["sparse" if (len(starts) - 1 - i) % 2 == 0 else "dense" for i in range(len(starts))]
    if kinds[0] == "dense":
        starts, kinds = starts[1:], kinds[1:]
        starts[0] = starts[0]
    comp = [s for s, k in zip(starts, kinds) if k == "sparse"]
    dec = [s for s, k in zip(starts, kinds) if k == "dense"]
    if comp[0] != 0:  # no warm-up: the first phase is compressed from step 0
        comp[0] = 0
    return {"unit": "step", "compress_at": comp, "decompress_at": dec}


def acdc_policy(arm, total):
    if arm == "acdc24":
        sparsity = {"kind": "nm", "n": 2, "m": 4}
    else:
        level = int(arm.removeprefix("sparseml").removeprefix("acdc")[:2]) / 100
        sparsity = {"kind": "global", "sparsity": level}
        if arm.endswith("fl"):  # the first conv and the last linear kept dense, the rest global
            sparsity["first_last_dense"] = True
    rules = [{"match": {"type": ["Conv2d", "Linear"]}, "sparsity": sparsity}]
    if arm == "acdc24":  # the stem's input channels (1 or 3) are not a multiple of 4
        rules.append({"match": {"name": "conv1"}, "sparsity": None})
    sched = sparseml_schedule(total) if arm.startswith("sparseml") else acdc_schedule(total)
    return {"rules": rules, "schedule": {"sparsity": sched}}


def train(model, opt, data, args, seed, on_step=None):
    model.train()
    for epoch in range(args.epochs):
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(epoch)
        epoch_batches = list(batches(data["xtr"], data["ytr"], args.batch_size, seed, epoch))
        for i, (xb, yb) in enumerate(epoch_batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(args, epoch, i / len(epoch_batches))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(model, "step"):
                model.step()
            if on_step is not None:
                on_step(epoch)
        if hasattr(model, "on_epoch_end"):
            model.on_epoch_end(epoch)


def make_opt(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def weights_sparsity(model):
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in ws)
    return zeros / sum(w.numel() for w in ws)


def run_acdc(arm, plain, data, args, seed, steps_per_epoch):
    total = steps_per_epoch * args.epochs
    cm = fxcompress.compile(copy.deepcopy(plain), acdc_policy(arm, total), example_inputs=data["xte"][:2])
    opt = make_opt(cm, args)
    cm.attach_optimizer(opt)
    ctrl = cm.controllers["sparsity"]
    snaps, history = {}, []

    def on_step(epoch):
        label = ctrl.snapshot_due()
        if label == "dense":
            snaps["dense"] = copy.deepcopy(cm.state_dict())
            snaps["dense_step"] = ctrl.steps
        ctrl.flush()  # a phase that ended at this step changes now (else: at the next forward)
        # one point per step (x in epochs): the phases are shorter than an epoch here
        history.append({"epoch": ctrl.steps / steps_per_epoch, "figures": ctrl.figures()})  # in effect from here

    train(cm, opt, data, args, seed, on_step)
    sparse_acc = accuracy(cm, data)
    rep = ctrl.report()
    # measured sparsity of every compressed phase: zeros at its start (the
    # entry of the phase) and at its end (the entry of the next phase, or now)
    phases = []
    log = rep["phases"] + [{"phase": "end", "step": ctrl.steps, "sparsity": ctrl.measured_sparsity()}]
    for a, b in zip(log, log[1:]):
        if a["phase"] == "sparse":
            phases.append({"start_step": a["step"], "end_step": b["step"], "at_start": a["sparsity"],
                           "at_end": b["sparsity"]})
    out = {"sparse_acc": sparse_acc, "sparsity": ctrl.measured_sparsity(), "phases": phases,
           "momentum_resets": rep["momentum_resets"], "dense_step": snaps.get("dense_step"), "steps": ctrl.steps}
    state = original_names(cm.state_dict())
    out["bytes"] = {"dense": nbytes(state), "compact": nbytes(compact(state))}
    if "dense" in snaps:
        cm.load_state_dict(snaps["dense"])
        out["dense_acc"] = accuracy(cm, data)
    return out, ctrl, history


def _magnitude_sparsifier():
    """torch.ao.pruning's WeightNormSparsifier with unstructured (1x1) blocks,
    per layer, also for 4-D conv weights: in this torch its mask code handles
    only 2-D weights (a conv weight fails in _make_tensor_mask), so the rule
    (zero the sparsity_level smallest |w| of the layer) is written out here."""
    from torch.ao.pruning import BaseSparsifier

    class MagnitudeSparsifier(BaseSparsifier):
        def __init__(self, sparsity_level):
            super().__init__(defaults={"sparsity_level": sparsity_level})

        def update_mask(self, module, tensor_name, sparsity_level, **kwargs):
            mask = getattr(module.parametrizations, tensor_name)[0].mask
            w = getattr(module, tensor_name).detach().abs().flatten()
            zeros = int(round(sparsity_level * w.numel()))
            keep = torch.ones(w.numel(), dtype=torch.bool)
            if zeros > 0:
                keep[torch.topk(w, zeros, largest=False).indices] = False
            mask.data = keep.view(mask.shape).to(mask.dtype)

    return MagnitudeSparsifier


def run_gmp(arm, plain, data, args, seed, steps_per_epoch):
    from torch.ao.pruning import CubicSL

    total = steps_per_epoch * args.epochs
    model = copy.deepcopy(plain)
    level = int(arm[-2:]) / 100
    sp = _magnitude_sparsifier()(level)
    config = [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sp.prepare(model, config)
    t0, t1 = at(0.10, total), at(0.75, total)
    every = max(1, args.gmp_every)
    sched = CubicSL(sp, init_sl=0.0, init_t=t0, delta_t=every, total_t=max(1, (t1 - t0) // every))
    opt = make_opt(model, args)
    state = {"step": 0}

    def on_step(epoch):
        state["step"] += 1
        sched.step()  # CubicSL's clock counts its own step() calls: one per optimizer step
        if state["step"] % every == 0 or state["step"] == t1:
            sp.step()  # the masks follow the cubic level every `every` steps

    sp.step()
    train(model, opt, data, args, seed, on_step)
    sp.squash_mask()
    return {"sparse_acc": accuracy(model, data), "sparsity": weights_sparsity(model)}


def run_seed(seed, data, args, arms):
    torch.manual_seed(seed)
    plain = resnet_cifar(args.depth, 10, data["xtr"].shape[1], args.width)
    steps_per_epoch = len(list(batches(data["xtr"], data["ytr"], args.batch_size, seed, 0)))
    res, ctrl, history = {}, None, None
    for arm in arms:
        t = time.time()
        torch.manual_seed(seed * 7919 + 1)  # same initial state for every arm's random draws
        if arm == "dense":
            model = copy.deepcopy(plain)
            train(model, make_opt(model, args), data, args, seed)
            res[arm] = {"acc": accuracy(model, data)}
        elif arm.startswith("gmp"):
            res[arm] = run_gmp(arm, plain, data, args, seed, steps_per_epoch)
        else:
            res[arm], c, h = run_acdc(arm, plain, data, args, seed, steps_per_epoch)
            if arm == "acdc90" or ctrl is None:
                ctrl, history = c, h
        res[arm]["train_s"] = time.time() - t
    return res, ctrl, history, steps_per_epoch


def ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "spread": max(vals) - min(vals), "n": len(vals)}


def summarise(results, arms):
    s = {}
    for arm in arms:
        if arm == "dense":
            s[arm] = {"acc": ms([r[arm]["acc"] for r in results])}
        else:
            s[arm] = {"sparse_acc": ms([r[arm]["sparse_acc"] for r in results]),
                      "dense_acc": ms([r[arm].get("dense_acc") for r in results]),
                      "sparsity": ms([r[arm]["sparsity"] for r in results])}
    return s


def fmt(m):
    return "-" if m is None else f"{m['mean']:.2f} (spread {m['spread']:.2f})"


def format_summary(s, n):
    lines = [f"mean over {n} seeds, spread = max - min:", f"{'arm':<11} {'sparse model':<24} {'dense model':<24} sparsity"]
    for arm, v in s.items():
        if arm == "dense":
            lines.append(f"{arm:<11} {'-':<24} {fmt(v['acc']):<24} 0")
        else:
            sp = v["sparsity"]
            lines.append(f"{arm:<11} {fmt(v['sparse_acc']):<24} {fmt(v['dense_acc']):<24} "
                         f"{100 * sp['mean']:.3f}%")
    return "\n".join(lines)


def targets(s):
    """Issue 14's targets at 90 %, on the means: AC/DC's sparse model within 1
    point of dense and >= GMP; AC/DC's dense model within 0.3 of dense."""
    if "dense" not in s:
        return []
    base = s["dense"]["acc"]["mean"]
    out = []
    for arm in (a for a in s if a.startswith("acdc90")):
        sp, dn = s[arm]["sparse_acc"]["mean"], s[arm]["dense_acc"]
        out.append(f"target {arm}: sparse - dense baseline = {sp - base:+.2f} (>= -1: {'met' if sp - base >= -1 else 'MISSED'})")
        if "gmp90" in s:
            g = s["gmp90"]["sparse_acc"]["mean"]
            out.append(f"target {arm}: sparse - gmp90 = {sp - g:+.2f} (>= 0: {'met' if sp >= g else 'MISSED'})")
        if dn is not None:
            d = dn["mean"] - base
            out.append(f"target {arm}: dense model - dense baseline = {d:+.2f} (>= -0.3: {'met' if d >= -0.3 else 'MISSED'})")
    return out


def timing(args):
    import torchvision

    name, bs, size, steps = ("resnet18", 2, 32, 2) if args.quick else \
        ("resnet50", args.timing_batch, args.timing_size, args.timing_steps)
    torch.manual_seed(0)
    plain_model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(bs, 3, size, size)
    y = torch.randint(0, 10, (bs,))
    base = fxcompress.compile(copy.deepcopy(plain_model), {"rules": []}, example_inputs=x[:1])
    pol = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "sparsity": {"sparsity": 0.9}}],
           "schedule": {"sparsity": {"unit": "step", "warmup": 0, "final": 0}}}
    t = time.perf_counter()
    masked = fxcompress.compile(copy.deepcopy(plain_model), pol, example_inputs=x[:1])
    opts = {"plain": torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9),
            "masked": torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9)}
    masked.attach_optimizer(opts["masked"])  # computes the 90 % global mask
    mask_s = time.perf_counter() - t
    models = {"plain": base, "masked": masked}
    times = {"plain": [], "masked": []}
    for i in range(steps + 1):  # the first step of each is a warm-up
        for k in (["plain", "masked"] if i % 2 == 0 else ["masked", "plain"]):
            m, opt = models[k], opts[k]
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
            m.step()
            if i:
                times[k].append(time.perf_counter() - t)
    state = original_names(masked.state_dict())
    dense_b, compact_b = nbytes(state), nbytes(compact(state))
    zeros, numel = sparsity_of(state)
    out = {"model": name, "batch": bs, "size": size, "steps": steps, "threads": torch.get_num_threads(),
           "plain_ms": 1e3 * statistics.median(times["plain"]), "masked_ms": 1e3 * statistics.median(times["masked"]),
           "mask_compute_s": mask_s, "dense_bytes": dense_b, "compact_bytes": compact_b,
           "weight_sparsity": zeros / numel}
    out["ratio"] = out["masked_ms"] / out["plain_ms"]
    print(f"{name} batch {bs} {size}x{size}, {out['threads']} threads: step plain {out['plain_ms']:.1f} ms, "
          f"with masks {out['masked_ms']:.1f} ms, ratio {out['ratio']:.3f} (medians of {steps} alternated steps)")
    print(f"checkpoint at {100 * out['weight_sparsity']:.2f}% weight sparsity: dense {dense_b} bytes, "
          f"bitmask + values {compact_b} bytes ({100 * compact_b / dense_b:.1f}%)")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.timing:
        out = timing(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "timing": out}, f, indent=2)
        return 0
    torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS + EXTRA_ARMS]
    if bad:
        print(f"unknown arm(s) {bad}; choose from {ARMS}", file=sys.stderr)
        return 2
    bundle = load_data("digits", upscale=args.upscale if args.upscale != 8 else None)
    data = {"xtr": bundle.train.images, "ytr": bundle.train.labels,
            "xte": bundle.test.images, "yte": bundle.test.labels}
    print(f"digits {len(data['ytr'])} train / {len(data['yte'])} test at {args.upscale}px; ResNet-{args.depth}"
          f"{f' x{args.width:g}' if args.width != 1 else ''}; {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr} " + ("cosine to 0" if args.lr_schedule == "cosine" else "decays at 50%/75%"), flush=True)
    results, ctrl, history = [], None, None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        res, c, h, spe = run_seed(seed, data, args, arms)
        results.append(res)
        ctrl, history = (c, h) if c is not None and ctrl is None else (ctrl, history)
        parts = []
        for arm in arms:
            r = res[arm]
            if arm == "dense":
                parts.append(f"dense {r['acc']:.2f}")
            else:
                d = f"/{r['dense_acc']:.2f}" if "dense_acc" in r else ""
                parts.append(f"{arm} {r['sparse_acc']:.2f}{d} @{100 * r['sparsity']:.2f}%")
        print(f"seed {seed}: " + "  ".join(parts) + f"  [{sum(r['train_s'] for r in res.values()):.0f} s]",
              flush=True)
        for arm in arms:
            for ph in res[arm].get("phases", []) if seed == args.first_seed else []:
                print(f"    {arm} compressed phase steps {ph['start_step']}-{ph['end_step']}: sparsity "
                      f"{100 * ph['at_start']:.4f}% at start, {100 * ph['at_end']:.4f}% at end")
            if seed == args.first_seed and res[arm].get("dense_step"):
                print(f"    {arm} dense model: after step {res[arm]['dense_step']} of {res[arm]['steps']}")
    summary = summarise(results, arms)
    print(format_summary(summary, len(results)))
    for line in targets(summary):
        print(line)
    for arm in arms:
        b = results[0][arm].get("bytes")
        if b:
            print(f"{arm} checkpoint (seed {args.first_seed}): dense {b['dense']} bytes, bitmask + values "
                  f"{b['compact']} bytes ({100 * b['compact'] / b['dense']:.1f}%)")
    if args.plot and ctrl is not None:
        from fxcompress.plots_sparsity import plot_sparsity

        path = plot_sparsity(history, ctrl.phases, ctrl.unit, os.path.dirname(os.path.abspath(args.plot)),
                             os.path.basename(args.plot), steps_per_epoch=spe)
        print(f"schedule plot: {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seeds": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
