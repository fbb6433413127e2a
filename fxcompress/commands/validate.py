"""fxcompress validate P.yaml [MODEL]: check a policy, and its rules against a model."""
from __future__ import annotations

import argparse

from ..compiled import compile
from ..loading import example_inputs, load_model
from ..policy import load_policy
from .common import add_json_arg, print_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="check a policy file (and its rules against a model)",
                       description="Parse and check POLICY. With MODEL, also trace the model and check "
                       "that every rule matches a node its treatment applies to.")
    p.add_argument("policy", help="policy YAML file")
    p.add_argument("model", nargs="?", help="optional model .py file or torchvision:NAME")
    p.add_argument("--model-fn", help="function or class in the file that builds the model")
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help="example input shape, e.g. 1,3,32,32")
    p.add_argument("--input-dtype", default="float32")
    add_json_arg(p)
    return p


def run(args) -> int:
    passes = args.passes  # resolved once by cli.main
    policy = load_policy(args.policy, passes)
    result = {"policy": args.policy, "ok": True, "rules": len(policy.rules)}
    if args.model:
        loaded = load_model(args.model, args.model_fn)
        inputs = example_inputs(loaded, args.input_shape, args.input_dtype) \
            if (args.input_shape or loaded.example_inputs_fn or loaded.source["kind"] == "torchvision") else None
        cm = compile(loaded.model, policy, inputs, passes=passes, dry_run=True)
        result["model"] = args.model
        result["selected_nodes"] = len(cm.plan.selected_entries)
        result["auto_leaves"] = [a.path for a in cm.trace_info.auto_leaves]
    if args.json:
        print_json(result)
    else:
        extra = f", {result['selected_nodes']} nodes selected in {args.model}" if args.model else ""
        print(f"{args.policy}: ok ({result['rules']} rules{extra})")
    return 0
