"""Arguments and steps shared by the commands that take a model and a policy."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from ..compiled import CompressedModel, compile
from ..loading import LoadedModel, example_inputs, load_model
from ..policy import load_policy


def add_device_arg(p, default=None) -> None:
    p.add_argument("--device", default=default, help="auto, cpu, cuda or cuda:N (default auto)")


def add_json_arg(p, note: str = "") -> None:
    """The one `--json` flag every command has (machines read stdout)."""
    p.add_argument("--json", action="store_true", help="print the result as JSON" + note)


def add_model_args(p: argparse.ArgumentParser, policy_required: bool = True) -> None:
    p.add_argument("model", help="a model .py file, or torchvision:NAME")
    p.add_argument("--policy", "-p", required=policy_required, help="policy YAML file")
    p.add_argument("--model-fn", help="function or class in the file that builds the model "
                   "(default: build_model(), or the only nn.Module class)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,32,32 (repeat for several inputs; "
                   "default: example_inputs() in the file)")
    p.add_argument("--input-dtype", default="float32", help="dtype of the example inputs (default float32)")


def compile_from_args(args, dry_run: bool = False) -> tuple:
    """Load, build inputs and compile with the command's pass list
    (`args.passes`, resolved once by cli.main); `dry_run` resolves the plan
    only."""
    passes = args.passes
    loaded: LoadedModel = load_model(args.model, args.model_fn)
    inputs = example_inputs(loaded, args.input_shape, args.input_dtype)
    policy = load_policy(args.policy, passes)
    cm: CompressedModel = compile(loaded.model, policy, inputs, passes=passes, dry_run=dry_run)
    return loaded, inputs, cm


def print_json(data: Dict[str, Any]) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
