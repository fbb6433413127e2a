"""Every torchvision classification model under every shipped policy: transform,
then one forward + backward + optimizer step + controller step at a small input.

    .venv/bin/python tools/zoo.py [--policies policies/a.yaml ...] [--only NAME ...] [--json]

A cell is `ok` (with the transform time), `n/a` when fxcompress refuses the
pair as bad input (the plan's own one-line reason: a rule that matches nothing,
a method that needs blocks the model does not have), or the error class when
the run itself failed. Communication-only policies (`communication:` and no
rules) change no graph; they are exercised by `fxcompress train --nproc 2` and
listed here as such.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from tqdm import tqdm

# this checkout's fxcompress, not whichever one is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxcompress  # noqa: E402
from fxcompress.errors import BadInput, PolicyError, TraceError  # noqa: E402
from fxcompress import load_policy  # noqa: E402
from fxcompress.table import format_table  # noqa: E402

from identity_all import config_for  # noqa: E402  (same small inputs as the identity check)


def policy_files(root: str):
    return sorted(glob.glob(os.path.join(root, "policies", "*.yaml")))


def communication_only(path: str) -> bool:
    pol = load_policy(path)
    return not pol.rules and pol.section("communication") is not None


def run_pair(name: str, policy: str) -> dict:
    kwargs, size = config_for(name)
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, **kwargs)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, 1])
    t0 = time.perf_counter()
    try:
        cm = fxcompress.compile(model, policy, example_inputs=x)
    except (PolicyError, BadInput, TraceError) as e:
        return {"status": "n/a", "reason": str(e).splitlines()[0][:160]}
    transform_s = time.perf_counter() - t0
    opt = torch.optim.SGD(cm.parameters(), lr=0.01, momentum=0.9)
    cm.attach_optimizer(opt)
    cm.train()
    out = cm(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    cm.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")
    return {"status": "ok", "transform_s": round(transform_s, 3)}


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="*", help="policy files (default: every policies/*.yaml)")
    ap.add_argument("--only", nargs="*", help="model names (default: all torchvision classification models)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = args.policies or policy_files(root)
    names = args.only or tvm.list_models(module=tvm)
    graph_policies, comm = [], []
    for p in policies:
        (comm if communication_only(p) else graph_policies).append(p)
    short = [os.path.splitext(os.path.basename(p))[0] for p in graph_policies]
    results, rows, failed = [], [], 0
    for name in tqdm(names, desc="models", disable=args.json):
        row = [name]
        for p, s in zip(graph_policies, short):
            try:
                r = run_pair(name, p)
            except Exception as e:  # one pair must not hide the others: record the class and go on
                r = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:200]}
                failed += 1
            results.append({"model": name, "policy": s, **r})
            if args.json:  # one line per pair as it finishes: a long chunked run keeps what it did
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            row.append(f"ok {r['transform_s']:.2f}s" if r["status"] == "ok" else
                       "n/a" if r["status"] == "n/a" else r["reason"].split(":")[0])
        rows.append(row)
    if args.json:
        json.dump({"results": results, "communication_only": [os.path.basename(p) for p in comm],
                   "errors": failed}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(["model"] + short, rows))
        na = [r for r in results if r["status"] == "n/a"]
        if na:
            print("\nnot applicable (the plan's reason):")
            for r in na:
                print(f"  {r['model']} x {r['policy']}: {r['reason']}")
        errs = [r for r in results if r["status"] == "error"]
        if errs:
            print("\nerrors:")
            for r in errs:
                print(f"  {r['model']} x {r['policy']}: {r['reason']}")
        ok = sum(r["status"] == "ok" for r in results)
        print(f"\n{ok} ok, {len(na)} not applicable, {len(errs)} errors over {len(results)} model-policy pairs")
        if comm:
            print("communication-only policies (no graph change; run with train --nproc 2): "
                  + ", ".join(os.path.basename(p) for p in comm))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
