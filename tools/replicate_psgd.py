"""Replicate PSGD's claim on the embedded digits data (issue 5, SPEC section 2).

Per seed, with the built-in CIFAR ResNet and a step schedule (decays at 50 %
and 75 % of the epochs):
- SGD: plain training; evaluated in full precision and after post-training
  quantization of the weights to each of --bits (first/last layer at 8 bits
  below 4 bits, the authors' first_last_quant rule).
- PSGD at b bits, one model per b as the authors train one per target: the
  same run, compiled with `scaled_grad: {bits: b, start_step: K}` where K is
  the optimizer step of the first LR decay, so scaling starts where the
  authors start PSGD from their SGD checkpoint (epoch 82 of 164, their
  ResNet82.pth). Before K the hooks pass gradients unchanged (tested in
  tests/test_pass_scaled_grad.py), so the first K steps are computed once and
  shared: every PSGD branch starts from the SGD run's weights and optimizer
  state at step K, and sees the same batches after it as the SGD branch.
  At 2 bits the PSGD phase runs without weight decay, as the authors' train.py does.
Then the training-step time of a PSGD model over the plain one: the same
batches, steps interleaved (plain, PSGD, plain, ...), median of each.

    .venv/bin/python tools/replicate_psgd.py --seeds 5 --epochs 20 --depth 8 --upscale 8 --batch-size 32 \
        --width 0.5 --timing-batches 32               # the BENCHMARKS.md table (half-width ResNet-8)
    .venv/bin/python tools/replicate_psgd.py --seeds 1 --epochs 6 --depth 8   # smoke run

--width 0.5 halves the stage widths (8/16/32): at full width plain SGD loses
nothing at W4 on digits, so there is no W4 drop for PSGD to reduce. Use
--first-seed 5 for a held-out set of seeds (the W4 differences are a few test
images a seed; see docs/psgd.md).
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxcompress  # noqa: E402
from fxcompress.data import load_data  # noqa: E402
from fxcompress.models import resnet_cifar  # noqa: E402
from fxcompress.quantize import authors_first_last_bits, quantize_weights  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--depth", type=int, default=20, help="ResNet depth 6n+2 (default 20)")
    p.add_argument("--width", type=float, default=1.0,
                   help="multiplier of the stage widths 16/32/64 (default 1: the paper's ResNet)")
    p.add_argument("--upscale", type=int, default=16, help="digits image side (native 8; default 16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--bits", default="4,3,2", help="target widths, comma-separated")
    p.add_argument("--lambda-s", type=float, default=150.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-steps", type=int, default=30, help="interleaved steps per side (0: skip)")
    p.add_argument("--timing-batches", default="64,128", help="batch sizes of the step-time comparison")
    p.add_argument("--psgd-start-epoch", type=int, default=None,
                   help="epoch PSGD starts at (default: the first LR decay, as the authors)")
    p.add_argument("--timing-only", action="store_true",
                   help="only the step-time comparison, on an untrained model (time does not depend on training)")
    p.add_argument("--quant-last-bias", action="store_true",
                   help="post-training quantization also rounds the last layer's bias to its own grid, "
                        "as the authors' eval.py does (Linear_minmax's bquantizer)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def batches(x, y, bs, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(y), generator=g)
    n = len(y) - (1 if len(y) % bs == 1 else 0)  # no batch of one (BatchNorm)
    for i in range(0, n, bs):
        idx = order[i:i + bs]
        yield x[idx], y[idx]


def lr_at(args, epoch):
    decays = (max(1, round(args.epochs * 0.5)), max(1, round(args.epochs * 0.75)))
    return args.lr * 0.1 ** sum(epoch >= d for d in decays)


def train_epochs(model, opt, data, args, seed, first, last, step_hook=None):
    model.train()
    for epoch in range(first, last):
        for group in opt.param_groups:
            group["lr"] = lr_at(args, epoch)
        for xb, yb in batches(data["xtr"], data["ytr"], args.batch_size, seed, epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step_hook is not None:
                step_hook()


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    correct = 0
    for i in range(0, len(data["yte"]), 500):
        correct += int((model(data["xte"][i:i + 500]).argmax(1) == data["yte"][i:i + 500]).sum())
    return 100.0 * correct / len(data["yte"])


def ptq_accuracy(model, data, bits, last_bias=False):
    return accuracy(quantize_weights(model, bits, authors_first_last_bits(bits), last_bias=last_bias), data)


def make_opt(params, args, wd=None):
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay if wd is None else wd)


def psgd_policy(bits, lambda_s, start_step):
    return {"rules": [
        {"match": {"type": ["Conv2d", "Linear"]},
         "scaled_grad": {"bits": bits, "lambda_s": lambda_s, "start_step": start_step}},
        {"match": {"name": "fc"}, "scaled_grad": {"bias": True}},  # the authors scale the last bias too
    ]}


def run_seed(seed, data, args, bits_list):
    torch.manual_seed(seed)
    model = resnet_cifar(args.depth, 10, data["xtr"].shape[1], args.width)
    opt = make_opt(model.parameters(), args)
    half = max(1, round(args.epochs * 0.5))  # the first LR decay
    if args.psgd_start_epoch is not None:
        half = args.psgd_start_epoch  # PSGD starts here instead
    t0 = time.perf_counter()
    train_epochs(model, opt, data, args, seed, 0, half)
    steps = half * math.ceil(len(data["ytr"]) / args.batch_size)
    warm = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    train_epochs(model, opt, data, args, seed, half, args.epochs)
    out = {"seed": seed, "start_step": steps, "fp": accuracy(model, data),
           "sgd": {b: ptq_accuracy(model, data, b, args.quant_last_bias) for b in bits_list}, "psgd": {}, "psgd_fp": {}, "figures": {}}
    sgd_model = model
    psgd_models = {}
    for b in bits_list:
        m = resnet_cifar(args.depth, 10, data["xtr"].shape[1], args.width)
        m.load_state_dict(warm[0])
        cm = fxcompress.compile(m, psgd_policy(b, args.lambda_s, steps), example_inputs=data["xte"][:2])
        ctrl = cm.controllers["scaled_grad"]
        ctrl.load_state({"steps": steps})  # K optimizer steps already taken (the shared SGD phase)
        o = make_opt(cm.parameters(), args, wd=0.0 if b == 2 else None)
        o.load_state_dict(warm[1])
        if b == 2:
            for g in o.param_groups:
                g["weight_decay"] = 0.0  # load_state_dict restored the SGD phase's value
        train_epochs(cm, o, data, args, seed, half, args.epochs, step_hook=cm.step)
        out["psgd"][b] = ptq_accuracy(cm.graph_module, data, b, args.quant_last_bias)
        out["psgd_fp"][b] = accuracy(cm, data)
        out["figures"][b] = {k: round(v, 4) for k, v in cm.figures().items()}
        psgd_models[b] = (cm, o)
    out["train_s"] = time.perf_counter() - t0
    return out, sgd_model, psgd_models


def step_time_ratio(plain, compiled, data, args, n, batch_size):
    """Median training-step time (forward, backward, SGD step, controller step),
    PSGD over plain, on the same batch, steps interleaved (plain, PSGD, PSGD,
    plain, ...). Both wall time and this thread's CPU time: with one torch
    thread all the work is on this thread, and its CPU time does not count
    the time other processes on a shared machine take the core away."""
    plain, compiled = copy.deepcopy(plain), copy.deepcopy(compiled)
    opts = [make_opt(plain.parameters(), args), make_opt(compiled.parameters(), args)]
    models = [plain, compiled]
    wall, cpu = [[], []], [[], []]
    xb, yb = data["xtr"][:batch_size], data["ytr"][:batch_size]
    for i in range(n + 3):
        for j in (0, 1) if i % 2 == 0 else (1, 0):  # alternate who goes first
            m, o = models[j], opts[j]
            m.train()
            t, c = time.perf_counter(), time.thread_time()
            loss = F.cross_entropy(m(xb), yb)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            if j == 1:
                m.step()
            c, t = time.thread_time() - c, time.perf_counter() - t
            if i >= 3:  # warm-up steps
                wall[j].append(t)
                cpu[j].append(c)
    med = [[statistics.median(v) for v in x] for x in (wall, cpu)]
    return {"batch_size": batch_size, "steps": n,
            "plain_ms": 1e3 * med[0][0], "psgd_ms": 1e3 * med[0][1], "ratio": med[0][1] / med[0][0],
            "plain_cpu_ms": 1e3 * med[1][0], "psgd_cpu_ms": 1e3 * med[1][1], "cpu_ratio": med[1][1] / med[1][0]}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]
    bundle = load_data("digits", upscale=args.upscale if args.upscale != 8 else None)
    data = {"xtr": bundle.train.images, "ytr": bundle.train.labels,
            "xte": bundle.test.images, "yte": bundle.test.labels}
    print(f"digits {len(data['ytr'])} train / {len(data['yte'])} test at {args.upscale}px; "
          f"ResNet-{args.depth}" + (f" x{args.width:g} width" if args.width != 1 else "") + f"; {args.epochs} epochs, decays at 50%/75%; lambda_s {args.lambda_s}", flush=True)
    results, timing = [], None
    if args.timing_only:
        torch.manual_seed(0)
        plain = resnet_cifar(args.depth, 10, data["xtr"].shape[1], args.width)
        cm = fxcompress.compile(copy.deepcopy(plain), psgd_policy(bits_list[0], args.lambda_s, 0),
                                example_inputs=data["xte"][:2])
        args.seeds = 0
        timing = []
        for bs in [int(b) for b in args.timing_batches.split(",")]:
            t = step_time_ratio(plain, cm, data, args, args.timing_steps, bs)
            timing.append(t)
            print(f"step time, ResNet-{args.depth} at {args.upscale}px, batch {bs}: plain {t['plain_ms']:.1f} ms, "
                  f"PSGD W{bits_list[0]} {t['psgd_ms']:.1f} ms, ratio {t['ratio']:.3f}; thread CPU time "
                  f"{t['plain_cpu_ms']:.1f} / {t['psgd_cpu_ms']:.1f} ms, ratio {t['cpu_ratio']:.3f} "
                  f"(medians of {t['steps']} interleaved steps)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "timing": timing}, f, indent=2)
        return 0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        res, sgd_model, psgd = run_seed(seed, data, args, bits_list)
        results.append(res)
        print(f"seed {seed}: FP {res['fp']:.2f}  " + "  ".join(
            f"W{b}: SGD {res['sgd'][b]:.2f} PSGD {res['psgd'][b]:.2f} (PSGD FP {res['psgd_fp'][b]:.2f})"
            for b in bits_list) + f"  [{res['train_s']:.0f} s]", flush=True)
        if seed == args.first_seed and args.timing_steps:
            timing = []
            for bs in [int(b) for b in args.timing_batches.split(",")]:
                t = step_time_ratio(sgd_model, psgd[bits_list[0]][0], data, args, args.timing_steps, bs)
                timing.append(t)
                print(f"step time, batch {bs}: plain {t['plain_ms']:.1f} ms, PSGD W{bits_list[0]} {t['psgd_ms']:.1f} ms, "
                      f"ratio {t['ratio']:.3f}; thread CPU time {t['plain_cpu_ms']:.1f} / {t['psgd_cpu_ms']:.1f} ms, "
                      f"ratio {t['cpu_ratio']:.3f} (medians of {t['steps']} interleaved steps)", flush=True)
    summary = summarise(results, bits_list)
    print(format_summary(summary, bits_list, len(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seeds": results, "summary": summary, "timing": timing}, f, indent=2)
    return 0


def summarise(results, bits_list):
    def ms(vals):
        return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}

    s = {"fp": ms([r["fp"] for r in results])}
    for b in bits_list:
        s[f"sgd_w{b}"] = ms([r["sgd"][b] for r in results])
        s[f"psgd_w{b}"] = ms([r["psgd"][b] for r in results])
        s[f"psgd_fp_w{b}"] = ms([r["psgd_fp"][b] for r in results])
        s[f"sgd_drop_w{b}"] = ms([r["fp"] - r["sgd"][b] for r in results])
        s[f"psgd_drop_w{b}"] = ms([r["fp"] - r["psgd"][b] for r in results])
        # per seed: PSGD quantized better / equal / worse than SGD quantized
        s[f"wins_w{b}"] = [sum(r["psgd"][b] > r["sgd"][b] for r in results),
                           sum(r["psgd"][b] == r["sgd"][b] for r in results),
                           sum(r["psgd"][b] < r["sgd"][b] for r in results)]
    return s


def format_summary(s, bits_list, n):
    lines = [f"mean ± std over {n} seeds (test accuracy %, drop = FP (SGD) - quantized)",
             f"  full precision (SGD): {s['fp']['mean']:.2f} ± {s['fp']['std']:.2f}"]
    for b in bits_list:
        lines.append(f"  W{b}: SGD {s[f'sgd_w{b}']['mean']:.2f} ± {s[f'sgd_w{b}']['std']:.2f} "
                     f"(drop {s[f'sgd_drop_w{b}']['mean']:.2f})   PSGD {s[f'psgd_w{b}']['mean']:.2f} ± "
                     f"{s[f'psgd_w{b}']['std']:.2f} (drop {s[f'psgd_drop_w{b}']['mean']:.2f}; "
                     f"PSGD FP {s[f'psgd_fp_w{b}']['mean']:.2f}); PSGD better/equal/worse in "
                     + "/".join(str(k) for k in s[f"wins_w{b}"]) + " seeds")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
