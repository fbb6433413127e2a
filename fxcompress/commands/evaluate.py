"""fxcompress evaluate RUN_DIR|CHECKPOINT --w-bits B [--a-bits A]: post-training
quantization accuracy of a trained run (PSGD's evaluation, SPEC section 2).

The run's report.json says which model and data it used; the command rebuilds
that model, loads the trained weights (final_model.pt, else the last
checkpoint.pt; with --weights LABEL the snapshot models/LABEL.pt), and
measures test accuracy in full precision and with the weights (and
optionally the activations) quantized.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from ..config import check_bits
from ..errors import BadInput
from ..quantize import authors_first_last_bits, quantize_activations, quantize_weights
from ..training import (BASELINE_DIR, MODELS_DIR, REPORT, TrainConfig, build_data, build_model, evaluate,
                        model_channels, read_weights, resolve_device, snapshots, weights_path)
from .common import add_device_arg, add_json_arg, print_json

FP_BITS = 32  # "32" on the command line means "leave in full precision", as the authors' W4A32


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="test accuracy of a trained run after post-training quantization (PSGD)",
        description="Rebuild the model of a training run, load its trained weights and report test "
        "accuracy in full precision and with weights quantized to --w-bits (symmetric per-tensor grid) "
        "and activations to --a-bits (clipped at max_c(beta_c + n*gamma_c) of the BatchNorm before "
        "each ReLU).")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                   help="a run directory of `fxcompress train`, or final_model.pt / checkpoint.pt inside one")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..8, or 32 for full precision (default 4)")
    p.add_argument("--a-bits", type=int, default=FP_BITS,
                   help="activation bits, 2..16, or 32 for full precision (default 32)")
    fl = p.add_mutually_exclusive_group()
    fl.add_argument("--first-last-bits", type=int, metavar="B",
                    help="bits of the first and last layer (default: 8 when --w-bits < 4, else --w-bits; "
                    "the authors' first_last_quant=1)")
    fl.add_argument("--keep-first-last", action="store_true",
                    help="leave the first and last layer in full precision (the authors' first_last_quant=0)")
    p.add_argument("--last-bias", action="store_true", help="quantize the last layer's bias too, as the authors do")
    p.add_argument("--act-clip", type=float, default=6.0, metavar="N",
                   help="activation clipping range beta + N*gamma (default 6, the authors' clipping_range)")
    p.add_argument("--act-dynamic", action="store_true",
                   help="clip activations at a running max instead of the BN range (the authors' act_clipping=0)")
    p.add_argument("--baseline", action="store_true", help="evaluate the run's uncompressed baseline (RUN_DIR/baseline)")
    p.add_argument("--weights", metavar="LABEL",
                   help="evaluate the snapshot RUN_DIR/models/LABEL.pt a method saved during training "
                   "(default: the final model, else the last checkpoint)")
    add_device_arg(p, "auto")
    add_json_arg(p)
    return p


def _locate(source: str, baseline: bool, label: Optional[str]) -> Tuple[str, str]:
    """(run directory, weights file) for RUN_DIR (its final model, else its
    checkpoint, or its snapshot `label`) or a .pt file inside one."""
    if os.path.isdir(source):
        run_dir = os.path.join(source, BASELINE_DIR) if baseline else source
        if label is None:
            return run_dir, weights_path(run_dir, "run directory")
        saved = snapshots(run_dir)
        if label not in saved:
            have = f"it has {', '.join(saved)}" if saved else "it has none"
            raise BadInput(f"--weights {label}: {run_dir} has no snapshot {MODELS_DIR}/{label}.pt ({have})")
        return run_dir, saved[label]
    if os.path.isfile(source):
        if baseline or label is not None:
            raise BadInput(f"--{'baseline' if baseline else 'weights'} takes a RUN_DIR, not a weights file")
        run_dir = os.path.dirname(os.path.abspath(source))
        if os.path.basename(run_dir) == MODELS_DIR and not os.path.isfile(os.path.join(run_dir, REPORT)):
            run_dir = os.path.dirname(run_dir)  # RUN/models/<label>.pt: a snapshot
        return run_dir, source
    raise BadInput(f"{source}: no such run directory or checkpoint file")


def load_run_model(run_dir: str, weights: str):
    """(model with the trained weights, data bundle, training config) of a run."""
    report = os.path.join(run_dir, REPORT)
    if not os.path.isfile(report):
        raise BadInput(f"{run_dir}: no {REPORT} there, so the model and data of this checkpoint are unknown")
    try:
        with open(report) as f:
            cfg = TrainConfig.from_dict(json.load(f)["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{report} is unreadable: {e}") from None
    bundle = build_data(cfg, model_channels(cfg))
    model, _ = build_model(cfg, bundle)
    try:
        model.load_state_dict(read_weights(weights, "weights file"))
    except RuntimeError as e:
        raise BadInput(f"{weights} does not fit the model its run builds: {str(e).splitlines()[0]}") from None
    return model, bundle, cfg


def evaluate_quantized(model: nn.Module, test_set, device, w_bits: int, a_bits: int = FP_BITS,
                       first_last_bits=None, keep_first_last: bool = False, last_bias: bool = False,
                       act_clip: float = 6.0, act_dynamic: bool = False, batch_size: int = 500) -> Dict[str, Any]:
    """Accuracy in full precision and at W{w_bits}A{a_bits}, as fractions."""
    model = model.to(device).eval()
    _, fp = evaluate(model, test_set, device, batch_size)
    q = model
    fl = None
    if w_bits != FP_BITS:
        fl = first_last_bits if first_last_bits is not None else authors_first_last_bits(w_bits)
        q = quantize_weights(model, w_bits, None if keep_first_last else fl, keep_first_last=keep_first_last,
                             last_bias=last_bias)
    if a_bits != FP_BITS:
        q = quantize_activations(q.cpu(), a_bits, "dynamic" if act_dynamic else "bn", act_clip).to(device)
    _, acc = evaluate(q, test_set, device, batch_size) if q is not model else (None, fp)
    return {"w_bits": w_bits, "a_bits": a_bits,
            "first_last": "fp" if keep_first_last else (fl if fl is not None else w_bits),
            "fp_acc": fp, "quant_acc": acc, "drop": fp - acc}


def run(args) -> int:
    if args.w_bits != FP_BITS:
        check_bits("--w-bits", args.w_bits, 2, 8, "or 32: full precision")
    if args.a_bits != FP_BITS:
        check_bits("--a-bits", args.a_bits, 2, 16, "or 32: full precision")
    if args.first_last_bits is not None:
        check_bits("--first-last-bits", args.first_last_bits, 2, 8)
    if not args.act_clip > 0:
        raise BadInput(f"--act-clip must be positive, got {args.act_clip}")
    run_dir, weights = _locate(args.source, args.baseline, args.weights)
    device = resolve_device(args.device)
    model, bundle, cfg = load_run_model(run_dir, weights)
    res = evaluate_quantized(model, bundle.test, device, args.w_bits, args.a_bits, args.first_last_bits,
                             args.keep_first_last, args.last_bias, args.act_clip, args.act_dynamic,
                             cfg.eval_batch_size)
    res = {"run_dir": run_dir, "weights": weights, "data": bundle.name, "test_images": len(bundle.test), **res}
    if args.json:
        print_json(res)
        return 0
    label = f"W{args.w_bits if args.w_bits != FP_BITS else 32}A{args.a_bits}"
    print(f"{weights} on {bundle.name} ({len(bundle.test)} test images)")
    print(f"  full precision   {100 * res['fp_acc']:.2f} %")
    print(f"  {label:<16} {100 * res['quant_acc']:.2f} %  (drop {100 * res['drop']:.2f} points; "
          f"first/last layer: {res['first_last']})")
    return 0
