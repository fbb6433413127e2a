"""Time fxcompress.compile (trace + shapes + plan + passes) beside torch.ao's
prepare_qat_fx on the same models, in the same run.

    .venv/bin/python tools/bench_transform.py [--policy P.yaml] [--repeats 7] [--json]

Each repetition builds a fresh model outside the timed region; medians are
reported. Input 1x3x224x224 for both (prepare_qat_fx takes example inputs too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
import torchvision.models as tvm

import fxcompress
from fxcompress.table import format_table

SELECT = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "activations": None}]}  # selects, treats nothing


def time_fxcompress(name, policy, x, repeats):
    times, parts = [], []
    for _ in range(repeats):
        model = tvm.get_model(name, weights=None).train()
        t0 = time.perf_counter()
        cm = fxcompress.compile(model, policy, (x,))
        times.append(time.perf_counter() - t0)
        parts.append(cm.timings)
    keys = parts[0].keys()
    return statistics.median(times), {k: statistics.median(p[k] for p in parts) for k in keys}, cm


def time_prepare_qat(name, x, repeats):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    times = []
    for _ in range(repeats):
        model = tvm.get_model(name, weights=None).train()
        t0 = time.perf_counter()
        prepare_qat_fx(model, get_default_qat_qconfig_mapping(), (x,))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="policy YAML (default: select every Conv2d/Linear, no treatment)")
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    policy = fxcompress.load_policy(args.policy) if args.policy else SELECT
    x = torch.randn(1, 3, 224, 224)
    rows, out = [], []
    for name in args.models:
        time_fxcompress(name, policy, x, 1)  # warm-up: imports, first-call caches
        fx_s, parts, cm = time_fxcompress(name, policy, x, args.repeats)
        qat_s = time_prepare_qat(name, x, args.repeats)
        inserted = sum(len(r.inserted) for r in cm.pass_results.values())
        out.append({"model": name, "fxcompress_s": fx_s, "parts_s": parts, "prepare_qat_fx_s": qat_s,
                    "speedup": qat_s / fx_s, "selected": len(cm.plan.selected_entries), "inserted": inserted})
        rows.append([name, f"{fx_s:.3f}", " ".join(f"{k}={v * 1000:.0f}ms" for k, v in parts.items()),
                     f"{qat_s:.3f}", f"{qat_s / fx_s:.1f}x", len(cm.plan.selected_entries), inserted])
    if args.json:
        json.dump({"policy": args.policy or "select-only", "repeats": args.repeats, "results": out}, sys.stdout,
                  indent=1)
        print()
    else:
        print(f"policy: {args.policy or 'select every Conv2d/Linear, no treatment'}; median of {args.repeats}")
        print(format_table(["model", "fxcompress s", "parts", "prepare_qat_fx s", "speed-up", "selected",
                            "inserted"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
