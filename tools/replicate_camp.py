"""Replicate CAMP's accuracy-energy trade-off on the embedded digits data
(issue 15, SPEC section 5).

Per seed, the built-in CIFAR ResNet, SGD with a step schedule:
- FP: full precision;
- all-1-bit and all-4-bit: every layer but the first conv and the last
  linear quantized (DoReFa, `policies/camp_w4.yaml` with high_bits 1 / 4),
  trained from scratch;
- CAMP supervised (`camp_sp.yaml`): from the all-4-bit model's weights
  (the low norms start as copies of its norms), hard gate, cross-entropy;
- CAMP RL (`camp_rl.yaml`) at each --alphas value: from the all-4-bit
  model (default), or with --rl-from sp from the supervised CAMP model, as
  the authors' README trains it.
Depth matters more than image size for the trade-off: the full-precision
first conv's share of the all-4-bit BOPs is the same at any image size
(both scale with the pixels) and falls with depth (8: 43 %, 14: 26 %,
20: 19 %). --w-rl 1 instead of the SPEC's 0.01: the authors' 0.01 is
spread over 200 epochs; in a few epochs the gates would not move.
Accuracy is the test accuracy in eval mode, where every sample runs only the
path its gate chose; energy is the BOPs per sample at the test set's gate
usage, relative to the all-4-bit network (fxcompress/bops.py).

    .venv/bin/python tools/replicate_camp.py --seeds 5 --jobs 5 --depth 14 --epochs 10 --camp-epochs 6 \
        --warmup-epochs 6 --warmup-high 0.25 --warmup-lr 0.05 --alphas 1.25,1.5,2 --w-rl 1 \
        --png docs/camp_energy.png --json docs/camp_energy.json   # BENCHMARKS.md, round 3
    .venv/bin/python tools/replicate_camp.py --seeds 5 --jobs 5 --depth 14 --epochs 10 --camp-epochs 6 \
        --warmup-epochs 6 --warmup-high 0.25 --warmup-lr 0.05 --alphas "" --energies 2,4 --skip fp,w1,sp,w4c \
        --png docs/camp_energy_round4.png --json docs/camp_energy_round4.json   # round 4: sp + energy term
    .venv/bin/python tools/replicate_camp.py --quick   # seconds: the pipeline end to end (energy with a target)
    .venv/bin/python tools/replicate_camp.py --seeds 1 --epochs 2 --camp-epochs 1 --alphas 0.1   # smoke run
    .venv/bin/python tools/replicate_camp.py --timing --timing-batch 256 --usage 0.1,0.5   # routed vs both, wall time

--timing (no training): one CAMP model, gates set so that a fraction
--usage of the samples takes the high path in every block; eval wall time of
routed inference against both paths on every sample (masked), the same
batches interleaved, medians. Timing needs a quiet machine. On CPU the 1-bit
path is simulated in fp32 and costs as much time as the 4-bit one, so the
routed/both ratio is about (1 + u) / 2 with the default post-gate (the low
path runs for every sample, it feeds the gate) and about 1/2 with
--pre-gate; the BOPs energy is what a low-bit kernel would save.
"""
from __future__ import annotations

import argparse
import copy
import json
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12, help="epochs of the FP, 1-bit and 4-bit models")
    p.add_argument("--camp-epochs", type=int, default=6, help="epochs of each CAMP stage (sp, then rl)")
    p.add_argument("--depth", type=int, default=8, help="ResNet depth 6n+2 (default 8)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--upscale", type=int, default=8, help="digits image side (native 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--camp-lr", type=float, default=0.01, help="CAMP stages (the authors: 0.01 from the 4-bit model)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--alphas", default="0.1,1,4", help="RL alpha values, comma-separated")
    p.add_argument("--energies", default="",
                   help="recipe option (not in the SPEC): supervised CAMP with the loss's energy term (settings "
                   "energy) at each weight, comma-separated, from the same start as RL (warm-up included); "
                   "WEIGHT:TARGET also sets settings energy_target (only the energy above TARGET is penalised)")
    p.add_argument("--w-rl", type=float, default=0.01)
    p.add_argument("--rl-from", choices=("w4", "sp"), default="w4",
                   help="RL starts from the all-4-bit model (issue 15; default) or the supervised CAMP model "
                   "(the authors' README)")
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="recipe option (not in the SPEC; 0 = off): before RL, train both paths of the CAMP model "
                   "from the 4-bit weights this many epochs under a random gate (settings warmup_epochs); every "
                   "alpha starts from that warmed-up model")
    p.add_argument("--warmup-lr", type=float, help="warm-up learning rate (default: --camp-lr)")
    p.add_argument("--warmup-high", type=float, default=0.5, help="warm-up: probability of the high path per sample")
    p.add_argument("--rl-baseline", action="store_true",
                   help="recipe option (not in the SPEC): RL subtracts each gate's batch-mean return")
    p.add_argument("--distill", type=float, default=0.0,
                   help="recipe option (not in the SPEC; 0 = off): weight of the per-block low-to-high feature "
                   "distillation, in the warm-up and the RL stage")
    p.add_argument("--kd", type=float, default=0.0,
                   help="recipe option (not in the SPEC; 0 = off): in the warm-up and the CAMP stages, the loss is "
                   "(1 - KD) * CE + KD * T^2 * KL(teacher || model) at temperature --kd-t, the teacher the frozen "
                   "all-4-bit model the CAMP model starts from (keeps the shared weights serving the 4-bit path)")
    p.add_argument("--kd-t", type=float, default=2.0, help="--kd temperature")
    p.add_argument("--val", type=float, default=0.0,
                   help="hold out this fraction of the training set and report on it instead of the test set "
                   "(for choosing alpha and epochs without looking at the test set)")
    p.add_argument("--skip", default="", help="rows not to train, comma-separated: fp, w1, sp, w4c")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process each")
    p.add_argument("--cache", help="keep the 4-bit and warmed-up models here (per seed and the settings that "
                   "make them) and reuse them in later runs with the same settings")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long check of the whole pipeline: 1 seed, ResNet-8, 1 epoch a stage, warm-up 1, "
                   "energies 2:0.7, no RL, no fp/1-bit/sp rows (overrides those flags)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="write the energy-accuracy plot here")
    p.add_argument("--from-json", nargs="+",
                   help="no training: the table (and --png) from the seeds saved --json files hold (several files: "
                   "runs with the same settings and different seeds, pooled)")
    p.add_argument("--timing", action="store_true", help="only the routed-inference timing")
    p.add_argument("--usage", default="0.5",
                   help="--timing: fraction of samples on the high path (comma-separated: one line each)")
    p.add_argument("--timing-batch", type=int, default=256)
    p.add_argument("--timing-reps", type=int, default=20)
    p.add_argument("--gate-bits", type=int, default=4,
                   help="bits of the gate's 3x3 conv (policy gate_bits; the gate's BOPs count in the energy)")
    p.add_argument("--gate-channels", type=int, default=8, help="width of the gate's 3x3 conv (policy gate_channels)")
    p.add_argument("--pre-gate", action="store_true",
                   help="the gate reads the block input, so the low path is routed too (training and --timing)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.jobs, args.depth, args.epochs, args.camp_epochs = 1, 1, 8, 1, 1
        args.warmup_epochs, args.alphas, args.energies, args.skip = 1, "", "2:0.7", "fp,w1,sp,w4c"
    return args


def camp_policy(mode, gate=None, **settings):
    """policies/camp_*.yaml as dicts (the same rules), settings overridden;
    `gate` (an args namespace) sets the dual blocks' gate_bits and gate_channels."""
    import yaml

    name = {"fixed": "camp_w4.yaml", "sp": "camp_sp.yaml", "rl": "camp_rl.yaml"}[mode]
    with open(os.path.join(ROOT, "policies", name)) as f:
        pol = yaml.safe_load(f)
    pol["settings"]["dual_precision"].update(settings)
    if gate is not None:
        for rule in pol["rules"]:
            if "low_bits" in rule.get("dual_precision", {}):
                rule["dual_precision"].update(gate_bits=gate.gate_bits, gate_channels=gate.gate_channels)
    return pol


def fixed_policy(bits):
    pol = camp_policy("fixed")
    pol["rules"][0]["dual_precision"]["high_bits"] = bits
    return pol


def batches(x, y, bs, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(y), generator=g)
    n = len(y) - (1 if len(y) % bs == 1 else 0)  # no batch of one (BatchNorm)
    for i in range(0, n, bs):
        idx = order[i:i + bs]
        yield x[idx], y[idx]


def kd_loss(out, ref, t):
    """Hinton's distillation term: T^2 * KL(softmax(ref / T) || softmax(out / T)), batch mean."""
    return t * t * F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(ref / t, 1), reduction="batchmean",
                            log_target=True)


def train(model, data, args, seed, epochs, lr, teacher=None):
    """SGD, step schedule; with a teacher (--kd), CE is mixed with distillation to its logits."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    kd = getattr(args, "kd", 0.0) if teacher is not None else 0.0
    if kd:
        teacher.eval()
    hook = getattr(model, "extra_loss", None)
    for epoch in range(epochs):
        decays = (max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75)))
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** sum(epoch >= d for d in decays)
        model.train()
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(epoch)
        for xb, yb in batches(data["xtr"], data["ytr"], args.batch_size, seed, epoch):
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if kd:
                with torch.no_grad():
                    ref = teacher(xb)
                loss = (1 - kd) * loss + kd * kd_loss(out, ref, args.kd_t)
            extra = hook(out, yb) if hook else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(model, "step"):
                model.step()
        if hasattr(model, "on_epoch_end"):
            model.on_epoch_end(epoch)
    return model


@torch.no_grad()
def evaluate(model, data):
    """[test accuracy %, relative energy at the test set's gate usage, mean usage, per-block usage]."""
    model.eval()
    ctls = getattr(model, "controllers", None)
    ctl = ctls["dual_precision"] if ctls is not None and "dual_precision" in ctls else None
    if ctl is not None:
        ctl.reset_eval()
    correct = 0
    for i in range(0, len(data["yte"]), 500):
        correct += int((model(data["xte"][i:i + 500]).argmax(1) == data["yte"][i:i + 500]).sum())
    acc = 100.0 * correct / len(data["yte"])
    if ctl is None or not ctl.blocks:
        return [acc, None if ctl is None else ctl.cost.relative({}), None, None]
    usage = ctl.eval_usage()
    mean = sum(usage.values()) / len(usage) if usage else None
    return [acc, ctl.cost.relative(usage), mean, usage]


def evaluate_forced(model, data, path):
    """evaluate() with every gate forced to one path (0: low, 1: high)."""
    blocks = model.controllers["dual_precision"].blocks.values()
    for b in blocks:
        b.force = path
    try:
        return evaluate(model, data)
    finally:
        for b in blocks:
            b.force = None


def train_usage(model):
    """Per-block high-path usage over the last training epoch (sampled actions in RL)."""
    return model.controllers["dual_precision"].report()["blocks"]


def build(args, channels, seed):
    torch.manual_seed(seed)
    return resnet_cifar(args.depth, 10, channels, args.width)


def energy_settings(text):
    """--energies: "2,4:0.65" -> [(2.0, 0.0), (4.0, 0.65)] (weight, target; 0 = no target)."""
    out = []
    for item in str(text).split(","):
        if item.strip():
            w, _, t = item.partition(":")
            out.append((float(w), float(t) if t.strip() else 0.0))
    return out


def energy_key(e):
    w, t = e
    return f"{w}" + (f":{t}" if t else "")


def cached(args, seed, what, keys, make):
    """make() -> a state dict, kept under --cache by the arguments that determine it."""
    if not args.cache:
        return make()
    import hashlib

    if what != "w4" and getattr(args, "kd", 0.0):
        keys = keys + ("kd", "kd_t")
    if what != "w4" and (getattr(args, "gate_bits", 4), getattr(args, "gate_channels", 8)) != (4, 8):
        keys = keys + ("gate_bits", "gate_channels")
    ident = json.dumps({k: getattr(args, k) for k in keys} | {"seed": seed, "what": what}, sort_keys=True)
    path = os.path.join(args.cache, f"{what}_s{seed}_{hashlib.sha1(ident.encode()).hexdigest()[:12]}.pt")
    # (--kd and the gate flags add their keys only when set, so older caches stay valid)
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    state = make()
    os.makedirs(args.cache, exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return state


#: the settings that make a result: --from-json pools files only where all of them agree
POOLED_SAME = ("depth", "width", "upscale", "batch_size", "lr", "camp_lr", "weight_decay", "epochs", "camp_epochs",
               "alphas", "energies", "w_rl", "rl_from", "warmup_epochs", "warmup_lr", "warmup_high", "rl_baseline",
               "distill", "kd", "kd_t", "val", "pre_gate", "gate_bits", "gate_channels")
W4_KEYS = ("depth", "width", "upscale", "batch_size", "lr", "weight_decay", "epochs", "val")
WARM_KEYS = W4_KEYS + ("camp_lr", "rl_from", "warmup_epochs", "warmup_lr", "warmup_high", "distill",
                       "pre_gate")


def run_seed(seed, data, args, alphas, energies=()):
    t0 = time.perf_counter()
    ex = data["xte"][:2]
    ch = data["xtr"].shape[1]
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    res = {"seed": seed}
    w4 = fxcompress.compile(build(args, ch, seed), fixed_policy(4), ex)
    w4.load_state_dict(cached(args, seed, "w4", W4_KEYS,
                              lambda: train(w4, data, args, seed, args.epochs, args.lr).state_dict()))
    cost = w4.controllers["dual_precision"].cost
    res["w4"] = evaluate(w4, data)
    if "fp" not in skip:
        fp = train(build(args, ch, seed), data, args, seed, args.epochs, args.lr)
        res["fp"] = [evaluate(fp, data)[0], sum(c.macs for c in cost.layers) * 32 * 32 / cost.reference, None, None]
    if "w1" not in skip:
        w1 = fxcompress.compile(build(args, ch, seed), fixed_policy(1), ex)
        res["w1"] = evaluate(train(w1, data, args, seed, args.epochs, args.lr), data)
    if "w4c" not in skip:
        # the 4-bit model trained on for as many epochs as the CAMP RL models get
        # after it (warm-up + RL), at the CAMP learning rate: what the extra
        # epochs alone are worth
        w4c = fxcompress.compile(build(args, ch, seed), fixed_policy(4), ex)
        w4c.load_state_dict(w4.state_dict())
        w4c = train(w4c, data, args, seed + 7919, args.warmup_epochs + args.camp_epochs, args.camp_lr)
        res["w4c"] = evaluate(w4c, data)
    sp = None
    if "sp" not in skip or args.rl_from == "sp":
        sp = fxcompress.compile(build(args, ch, seed), camp_policy("sp", args, pre_gate=args.pre_gate), ex)
        sp.load_state_dict(w4.state_dict(), strict=False)  # gates new; low norms from the 4-bit norms
        sp = train(sp, data, args, seed, args.camp_epochs, args.camp_lr)
        res["sp"] = evaluate(sp, data)
    start = sp.state_dict() if args.rl_from == "sp" else w4.state_dict()
    teacher = w4 if args.kd else None  # --kd: the CAMP stages distil from the frozen 4-bit model
    if args.warmup_epochs:
        warm = fxcompress.compile(build(args, ch, seed), camp_policy(
            "rl", args, pre_gate=args.pre_gate, warmup_epochs=args.warmup_epochs, warmup_high=args.warmup_high,
            distill=args.distill), ex)
        warm.load_state_dict(start, strict=False)

        def warm_up():
            return train(warm, data, args, seed + 104729, args.warmup_epochs, args.warmup_lr or args.camp_lr,
                         teacher).state_dict()
        # (every model is built right after torch.manual_seed(seed): a cached start changes no later result)
        warm.load_state_dict(cached(args, seed, "warm", WARM_KEYS, warm_up))
        res["warm"] = evaluate(warm, data)  # the gates as they started: what warm-up alone gives
        res["warm_low"] = evaluate_forced(warm, data, 0.0)  # and its 1-bit paths alone
        start = warm.state_dict()
    res["rl"] = {}
    res["rl_train_usage"] = {}
    for a in alphas:
        rl = fxcompress.compile(build(args, ch, seed), camp_policy("rl", args, alpha=a, w_rl=args.w_rl, pre_gate=args.pre_gate,
                                                                  rl_baseline=args.rl_baseline,
                                                                  distill=args.distill), ex)
        rl.load_state_dict(start, strict=False)
        rl = train(rl, data, args, seed, args.camp_epochs, args.camp_lr, teacher)
        res["rl_train_usage"][str(a)] = train_usage(rl)
        res["rl"][str(a)] = evaluate(rl, data)
    res["spe"] = {}
    res["spe_train_usage"] = {}
    for e in energies:
        spe = fxcompress.compile(build(args, ch, seed), camp_policy("sp", args, energy=e[0], energy_target=e[1],
                                                                   pre_gate=args.pre_gate, distill=args.distill), ex)
        spe.load_state_dict(start, strict=False)
        spe = train(spe, data, args, seed, args.camp_epochs, args.camp_lr, teacher)
        res["spe_train_usage"][energy_key(e)] = train_usage(spe)
        res["spe"][energy_key(e)] = evaluate(spe, data)
    res["train_s"] = time.perf_counter() - t0
    return res


def floats(text):
    return [float(a) for a in str(text).split(",") if a.strip()]


def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def rows(results, alphas, energies=()):
    names = [("FP", lambda r: r.get("fp")), ("all 1-bit", lambda r: r.get("w1")), ("all 4-bit", lambda r: r["w4"]),
             ("all 4-bit, trained on", lambda r: r.get("w4c")), ("CAMP sp", lambda r: r.get("sp")),
             ("CAMP after warm-up (gates untrained)", lambda r: r.get("warm")),
             ("CAMP after warm-up, every gate low", lambda r: r.get("warm_low"))] + [
        (f"CAMP rl a={a}", (lambda a: lambda r: r["rl"][str(a)])(a)) for a in alphas] + [
        (f"CAMP sp energy={e[0]}" + (f" target={e[1]}" if e[1] else ""),
         (lambda k: lambda r: r.get("spe", {}).get(k))(energy_key(e))) for e in energies]
    out = []
    for name, get0 in names:
        if any(get0(r) is None for r in results):
            continue  # a row this run did not train
        get = get0
        acc = mean_sd([get(r)[0] for r in results])
        energy = mean_sd([get(r)[1] for r in results])
        usage = mean_sd([get(r)[2] for r in results])
        out.append({"name": name, "acc": acc[0], "acc_sd": acc[1], "energy": energy[0], "energy_sd": energy[1],
                    "usage": usage[0]})
    return out


def table(summary, n, split="test"):
    lines = [f"| network | {split} accuracy (%) | energy vs all-4-bit | high-path usage |", "|---|---|---|---|"]
    for r in summary:
        usage = "-" if r["usage"] is None else f"{r['usage']:.2f}"
        lines.append(f"| {r['name']} | {r['acc']:.2f} ± {r['acc_sd']:.2f} | {r['energy']:.3f} ± {r['energy_sd']:.3f} "
                     f"| {usage} |")
    lines.append(f"({n} seeds, mean ± sd)")
    return "\n".join(lines)


def plot(results, summary, path, split="test"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    # a colour per row (ten default colours repeat past ten rows): tab20's dark shades, then its light ones
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for i, r in enumerate(summary):
        if r["name"] == "FP":
            continue  # 3-6x the 4-bit energy: off the scale of the figure; in the table
        ax.errorbar(r["energy"], r["acc"], xerr=r["energy_sd"], yerr=r["acc_sd"], fmt=markers[i % len(markers)],
                    color=colors[(2 * i + (i >= 10)) % 20], label=r["name"], capsize=3)
    fp = next((r for r in summary if r["name"] == "FP"), None)
    if fp is not None:
        ax.axhline(fp["acc"], ls="--", color="grey", label=f"FP ({fp['energy']:.1f}x energy)")
    w4 = next(r for r in summary if r["name"] == "all 4-bit")
    # the target: energy <= 0.7x at accuracy >= 4-bit - 0.5 points
    lo, hi = ax.get_ylim()
    ax.fill_between([ax.get_xlim()[0], 0.7], w4["acc"] - 0.5, max(hi, w4["acc"] + 0.5), color="green", alpha=0.08,
                    label="target: <= 0.7x, >= 4-bit - 0.5")
    ax.set_ylim(lo, hi)
    ax.set(xlabel="energy (BOPs) relative to the all-4-bit network", ylabel=f"{split} accuracy (%)",
           title=f"CAMP on digits ({len(results)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not over, the points
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- timing ------------------------------------------------------------------------------

def calibrate(model, x, usage):
    """Gate biases such that a fraction `usage` of x takes the high path in every block."""
    ctl = model.controllers["dual_precision"]
    model.eval()
    for b in ctl.blocks.values():
        seen = []
        h = b.gate.register_forward_hook(lambda m, i, o: seen.append(torch.log(o[:, 1] / o[:, 0])))
        with torch.no_grad():
            model(x)
        h.remove()
        b.gate.fc.bias.data[1] += -torch.quantile(seen[0], 1 - usage) + 1e-6


def timing(args, data, usage_target):
    torch.manual_seed(0)
    model = fxcompress.compile(build(args, data["xtr"].shape[1], 0), camp_policy("sp", args, pre_gate=args.pre_gate),
                               data["xte"][:2])
    x = data["xtr"][:args.timing_batch]
    ctl = model.controllers["dual_precision"]
    for b in ctl.blocks.values():
        torch.nn.init.normal_(b.gate.fc.weight, std=1.0)
    calibrate(model, x, usage_target)
    ctl.reset_eval()
    times = {True: [], False: []}
    with torch.no_grad():
        for routed in (True, False):  # warm-up
            for b in ctl.blocks.values():
                b.set_routed(routed)
            model(x)
        ctl.reset_eval()
        for rep in range(args.timing_reps):
            for routed in (True, False):
                for b in ctl.blocks.values():
                    b.set_routed(routed)
                t0 = time.perf_counter()
                model(x)
                times[routed].append(time.perf_counter() - t0)
    usage = ctl.eval_usage()
    routed_ms, both_ms = (1000 * statistics.median(times[k]) for k in (True, False))
    return {"batch": args.timing_batch, "pre_gate": args.pre_gate, "usage": sum(usage.values()) / len(usage), "routed_ms": routed_ms,
            "both_ms": both_ms, "ratio": routed_ms / both_ms, "reps": args.timing_reps,
            "energy": ctl.cost.relative(usage)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_data("digits", upscale=args.upscale if args.upscale != 8 else None)
    data = {"xtr": bundle.train.images, "ytr": bundle.train.labels,
            "xte": bundle.test.images, "yte": bundle.test.labels}
    if args.val and not args.timing:
        # a fixed split of the training set; the test set is not used at all
        order = torch.randperm(len(data["ytr"]), generator=torch.Generator().manual_seed(2718))
        nv = int(round(args.val * len(order)))
        vi, ti = order[:nv], order[nv:]
        data = {"xtr": data["xtr"][ti], "ytr": data["ytr"][ti], "xte": data["xtr"][vi], "yte": data["ytr"][vi]}
    if args.timing:
        out = []
        for u in floats(args.usage):
            t = timing(args, data, u)
            out.append(t)
            print(f"routed eval{' (pre-gate)' if args.pre_gate else ''}, ResNet-{args.depth} at {args.upscale}px, "
                  f"batch {t['batch']}, high-path usage "
                  f"{t['usage']:.2f}: routed {t['routed_ms']:.1f} ms, both paths {t['both_ms']:.1f} ms, ratio "
                  f"{t['ratio']:.3f} (medians of {t['reps']} interleaved runs; BOPs energy {t['energy']:.3f})",
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "timing": out if len(out) > 1 else out[0]}, f, indent=2)
        return 0
    if args.from_json:
        saved = []
        for path in args.from_json:
            with open(path) as f:
                saved.append(json.load(f))
        saved_args = saved[0]["args"]
        for path, other in zip(args.from_json[1:], saved[1:]):
            differ = [k for k in POOLED_SAME if other["args"].get(k) != saved_args.get(k)]
            if differ:
                print(f"--from-json: {path} was run with other {', '.join(differ)} than {args.from_json[0]}: "
                      "only runs that differ in their seeds pool", file=sys.stderr)
                return 2
        results = sorted((r for one in saved for r in one["seeds"]), key=lambda r: r["seed"])
        if len({r["seed"] for r in results}) != len(results):
            print("--from-json: a seed appears in two files", file=sys.stderr)
            return 2
        alphas = floats(saved_args["alphas"])
        energies = energy_settings(saved_args.get("energies", ""))
        print(f"{', '.join(args.from_json)}: seeds {[r['seed'] for r in results]} of a run with " +
              " ".join(f"--{k.replace('_', '-')} {v}" for k, v in saved_args.items()
                       if k in ("seeds", "depth", "upscale", "epochs", "camp_epochs", "alphas", "w_rl", "rl_from", "warmup_epochs",
                                "warmup_high", "warmup_lr", "rl_baseline", "distill", "kd", "kd_t", "energies", "val")))
        summary = rows(results, alphas, energies)
        print(table(summary, len(results), "validation" if saved_args.get("val") else "test"))
        if args.png:
            print("wrote", plot(results, summary, args.png, "validation" if saved_args.get("val") else "test"))
        return 0
    alphas, energies = floats(args.alphas), energy_settings(args.energies)
    print(f"digits {len(data['ytr'])} train / {len(data['yte'])} {'validation' if args.val else 'test'} at {args.upscale}px; ResNet-{args.depth}; "
          f"{args.epochs} epochs (FP, 1-bit, 4-bit), {args.camp_epochs} per CAMP stage; RL alphas {alphas}; sp energy weights {energies}",
          flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results = []

    def show(r):
        results.append(r)
        if args.json:  # after every seed, so a stopped run keeps the seeds it finished
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "seeds": sorted(results, key=lambda r: r["seed"])}, f, indent=2)
        print(f"seed {r['seed']}: " + "  ".join(
            f"{k} {r[k][0]:.2f}" + (f" @{r[k][1]:.3f}" if r[k][1] is not None else "")
            + (f" u{r[k][2]:.2f}" if r[k][2] is not None else "")
            for k in ("fp", "w1", "w4", "w4c", "sp", "warm", "warm_low") if k in r) + "  " +
              "  ".join(f"rl a={a} {v[0]:.2f} @{v[1]:.3f} u{v[2]:.2f} [" +
                        " ".join(f"{u:.2f}" for u in v[3].values()) + "]" for a, v in r["rl"].items()) + "  " +
              "  ".join(f"sp e={e} {v[0]:.2f} @{v[1]:.3f} u{v[2]:.2f} [" +
                        " ".join(f"{u:.2f}" for u in v[3].values()) + "]" for e, v in r.get("spe", {}).items()) +
              f"  [{r['train_s']:.0f} s]", flush=True)

    if args.jobs > 1:
        # one process a seed (each seeds its own generators, so the results equal a serial run's)
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                    initargs=(args.threads,)) as pool:
            for fut in cf.as_completed([pool.submit(run_seed, s, data, args, alphas, energies) for s in seeds]):
                show(fut.result())
        results.sort(key=lambda r: r["seed"])
    else:
        for seed in seeds:
            show(run_seed(seed, data, args, alphas, energies))
    summary = rows(results, alphas, energies)
    print(table(summary, len(results), "validation" if args.val else "test"))
    if args.png:
        print("wrote", plot(results, summary, args.png, "validation" if args.val else "test"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seeds": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
