"""Compile every torchvision classification model with a select-only policy and
check outputs and every parameter gradient are bitwise equal to the original.

    .venv/bin/python tools/identity_all.py [--json] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torchvision.models as tvm
from tqdm import tqdm

from fxcompress.table import format_table
from fxcompress.verify import check_identity


def config_for(name: str):
    """Smallest input each architecture accepts (keeps the run short)."""
    kwargs, size = {"num_classes": 10}, 64
    if name.startswith("vit_"):
        patch = 14 if "_14" in name else 16 if "_16" in name else 32
        kwargs["image_size"], size = 2 * patch, 2 * patch
    elif name.startswith("swin"):
        size = 64
    elif name.startswith("maxvit"):
        size = 224
    elif name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
        size = 75 if name == "inception_v3" else 32
    return kwargs, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="*", help="model names (default: all)")
    args = ap.parse_args(argv)
    names = args.only or tvm.list_models(module=tvm)
    rows, results = [], []
    for name in tqdm(names, desc="models", disable=args.json):
        kwargs, size = config_for(name)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            model = tvm.get_model(name, weights=None, **kwargs)
            r = check_identity(model, (torch.randn(2, 3, size, size),))
            res = {"model": name, "input": size, "outputs_equal": r.outputs_equal, "grads_equal": r.grads_equal,
                   "params": r.params, "selected": r.selected, "auto_leaves": r.auto_leaves, "error": None}
        except Exception as e:  # report and continue: one model must not hide the others
            res = {"model": name, "input": size, "outputs_equal": False, "grads_equal": False,
                   "params": 0, "selected": 0, "auto_leaves": [], "error": f"{type(e).__name__}: {e}"[:120]}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(res)
        rows.append([name, size, res["selected"], res["params"], res["outputs_equal"], res["grads_equal"],
                     ",".join(res["auto_leaves"]) or "-", res["error"] or ""])
    ok = sum(r["outputs_equal"] and r["grads_equal"] for r in results)
    if args.json:
        json.dump({"models": results, "identical": ok, "total": len(results)}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(["model", "input", "selected", "params", "outputs==", "grads==", "auto-leaves", "error"],
                           rows))
        print(f"\n{ok}/{len(results)} models bitwise identical (outputs and every parameter gradient)")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
