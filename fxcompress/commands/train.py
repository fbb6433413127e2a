"""fxcompress train [MODEL] --policy P.yaml [--baseline]: train with a compression policy."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import fields

from .. import training
from ..errors import BadInput
from ..training import OPTIMIZERS, SCHEDULES, TrainConfig, comparison_table
from .common import add_device_arg, add_json_arg, print_json

# Flags that define what a run computes; --resume refuses them, since a
# resumed run must continue exactly as it was configured.
CONFIG_FLAGS = ["model", "model_fn", "policy", "data", "upscale", "depth", "epochs", "batch_size", "lr",
                "optimizer", "momentum", "nesterov", "weight_decay", "schedule", "decay_epochs", "gamma",
                "seed", "threads", "compile", "run_dir", "baseline", "train_limit", "test_limit", "nproc", "init"]
RESUME_FLAGS = ["device", "stop_after"]


def _decay_epochs(text: str):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 80,120, got '{text}'") from None


def add_parser(sub) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a model with a compression policy (default: ResNet-20 on embedded digits)",
        description="Train MODEL (default: the built-in CIFAR ResNet sized for the data) on real data, "
        "compressed by --policy; with --baseline also train it uncompressed with the same seed and data "
        "order and print both side by side. Writes a run directory with report.json, checkpoints, the "
        "final model and PNG plots.")
    p.add_argument("model", nargs="?", default=None,
                   help="a model .py file or torchvision:NAME (default: built-in ResNet, see --depth)")
    p.add_argument("--policy", "-p", help="policy YAML file (default: train uncompressed)")
    p.add_argument("--model-fn", help="function or class in MODEL that builds the model")
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"digits, cifar10:PATH, cifar100:PATH or mnist:PATH (default {d.data})")
    g.add_argument("--upscale", type=int, metavar="PIXELS",
                   help="resize images to PIXELS x PIXELS (default: 16 for digits, native otherwise)")
    g.add_argument("--train-limit", type=int, metavar="N", help="use the first N training images only")
    g.add_argument("--test-limit", type=int, metavar="N", help="use the first N test images only")
    g = p.add_argument_group("training")
    g.add_argument("--depth", type=int, help=f"built-in ResNet depth, 6n+2 (default {d.depth})")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, help=f"initial learning rate (default {d.lr})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    g.add_argument("--decay-epochs", type=_decay_epochs, metavar="E1,E2",
                   help="epochs where the step schedule multiplies the rate by --gamma (default: 50%%, 75%%)")
    g.add_argument("--gamma", type=float, help=f"step schedule factor (default {d.gamma})")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    add_device_arg(g)
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training step (default backend inductor; aot_eager, eager)")
    g.add_argument("--threads", type=int, help=f"CPU threads for torch, per worker (default {d.threads})")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel workers through torch.distributed (gloo on CPU, NCCL on GPU, one GPU "
                   "each); the policy's communication: section chooses how gradients travel (default: fp32 "
                   "all-reduce). --batch-size stays the global batch, split over the workers. Under torchrun "
                   "the workers are torchrun's. (default 1)")
    g = p.add_argument_group("run")
    g.add_argument("--baseline", action="store_true", default=None,
                   help="also train without the policy (same seed, same data order) and compare")
    g.add_argument("--run-dir", metavar="DIR", help="where to write the run (default runs/<timestamp>)")
    g.add_argument("--init", metavar="RUN_DIR|WEIGHTS",
                   help="start from the trained weights of another run (its final model, else its last "
                   "checkpoint) or of a .pt state_dict; tensors it lacks keep their seeded initialisation")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    g.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs (resumable with --resume)")
    add_json_arg(g, " (progress goes to stderr)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    return p


def config_from_args(args) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["progress"] = not args.no_progress and sys.stderr.isatty()
    given["plots"] = not args.no_plots
    return TrainConfig(**given)


def run(args) -> int:
    # picklable, so that rank 0 of spawned data-parallel workers logs the same way
    log = training.StreamLog("stderr" if args.json else "stdout")
    if args.resume:
        clashing = [f"--{k.replace('_', '-')}" for k in CONFIG_FLAGS if getattr(args, k, None) is not None]
        if clashing:
            raise BadInput(f"--resume continues the run as it was configured; drop {', '.join(clashing)}")
        overrides = {k: getattr(args, k) for k in RESUME_FLAGS if getattr(args, k) is not None}
        overrides["progress"] = not args.no_progress and sys.stderr.isatty()
        overrides["plots"] = not args.no_plots
        log(f"resuming {args.resume}")
        run_dir = args.resume
        job = functools.partial(training.resume, args.resume, log=log, passes=args.passes, **overrides)
    else:
        cfg = config_from_args(args)
        if cfg.run_dir is None:
            cfg.run_dir = training.new_run_dir()
        run_dir = cfg.run_dir
        job = functools.partial(training.train, cfg, log=log, passes=args.passes)
    try:
        result = job()
    except KeyboardInterrupt:
        if os.path.isfile(os.path.join(run_dir, training.CHECKPOINT)):
            print(f"interrupted; continue with: fxcompress train --resume {run_dir}", file=sys.stderr)
        elif os.path.isfile(os.path.join(run_dir, training.REPORT)):
            print(f"interrupted in the first epoch: no epoch was saved; fxcompress train --resume {run_dir} "
                  f"starts the run again from epoch 1", file=sys.stderr)
        raise
    if result is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    if args.json:
        print_json(result)
        return 0
    _print_summary(result, log)
    return 0


def _print_summary(result, log) -> None:
    main = result["main"]
    if result["status"] != "done":
        log(f"stopped after epoch {len(main['epochs'])}; continue with: fxcompress train --resume {result['run_dir']}")
        return
    f = main["final"]
    log(f"\n{main['label']}: test accuracy {100 * f['test_acc']:.2f}% (best {100 * f['best_test_acc']:.2f}%), "
        f"{f['time_per_epoch_s']:.1f} s/epoch")
    if result.get("comparison"):
        log("\n" + comparison_table(result["comparison"]))
    for path in result.get("plots", []):
        log(f"wrote {path}")
    log(f"run directory: {result['run_dir']}")
