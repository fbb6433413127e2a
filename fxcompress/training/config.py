"""What a training run is configured by: TrainConfig, its checks, the device."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..errors import BadInput

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
# Digits are 8x8; at 16x16 the three ResNet stages see 16, 8 and 4 pixels,
# which keeps the CIFAR architecture meaningful and the main job fast.
DIGITS_DEFAULT_UPSCALE = 16


@dataclass
class TrainConfig:
    model: Optional[str] = None  # model .py, torchvision:NAME, or None: the built-in CIFAR ResNet
    model_fn: Optional[str] = None
    policy: Optional[str] = None  # policy YAML; None trains uncompressed
    data: str = "digits"
    upscale: Optional[int] = None  # None: 16 for digits, the native size otherwise
    depth: int = 20
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    decay_epochs: Optional[List[int]] = None  # step schedule; None: at 50 % and 75 % of the epochs
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    # Intra-op CPU threads. 1 by default: the small convolutions of the main
    # job gain little from a second thread on an idle 2-core machine and lose
    # 2-3x when the other core is busy (measured, BENCHMARKS.md). Part of the
    # config because the thread count changes float summation order, and a
    # resumed run must match bitwise.
    threads: int = 1
    # torch.compile backend for the training forward/backward (inductor,
    # aot_eager, eager); None: eager (runtime/compile_support.py)
    compile: Optional[str] = None
    run_dir: Optional[str] = None
    baseline: bool = False
    progress: bool = True
    train_limit: Optional[int] = None  # first N training images only (smoke tests)
    test_limit: Optional[int] = None
    stop_after: Optional[int] = None  # stop (resumably) after this many epochs
    plots: bool = True
    eval_batch_size: int = 500
    # Data-parallel workers (torch.distributed: gloo on CPU, NCCL on GPU).
    # batch_size is the global batch, split evenly over the workers.
    nproc: int = 1
    # Start from these weights (a run directory or a .pt file) instead of
    # the seeded initialisation; tensors the file lacks keep the latter.
    init: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_config(cfg: TrainConfig) -> None:
    def positive_int(name, v, allow_none=False):
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

    positive_int("epochs", cfg.epochs)
    positive_int("batch_size", cfg.batch_size)
    positive_int("eval_batch_size", cfg.eval_batch_size)
    positive_int("threads", cfg.threads)
    positive_int("nproc", cfg.nproc)
    if cfg.nproc > 1 and (cfg.batch_size % cfg.nproc or cfg.batch_size // cfg.nproc < 2):
        raise BadInput(f"--batch-size {cfg.batch_size} is the global batch and must split evenly into at least "
                       f"2 images per worker over --nproc {cfg.nproc}")
    for name in ("train_limit", "test_limit", "stop_after"):
        positive_int(name, getattr(cfg, name), allow_none=True)
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise BadInput(f"--lr must be a positive number, got {cfg.lr!r}")
    if not (0 <= cfg.weight_decay < 1):
        raise BadInput(f"--weight-decay must lie in [0, 1), got {cfg.weight_decay!r}")
    if not (0 <= cfg.momentum < 1):
        raise BadInput(f"--momentum must lie in [0, 1), got {cfg.momentum!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise BadInput(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise BadInput(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise BadInput("--nesterov needs --optimizer sgd with a non-zero --momentum")
    if not (0 < cfg.gamma <= 1):
        raise BadInput(f"--gamma must lie in (0, 1], got {cfg.gamma!r}")
    for e in cfg.decay_epochs or []:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 < e < cfg.epochs:
            raise BadInput(f"--decay-epochs must be epochs between 1 and {cfg.epochs - 1}, got {e!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise BadInput(f"--seed must be a non-negative integer, got {cfg.seed!r}")
    if cfg.stop_after is not None and cfg.stop_after > cfg.epochs:
        raise BadInput(f"--stop-after {cfg.stop_after} is past --epochs {cfg.epochs}")
    if cfg.policy is not None and isinstance(cfg.policy, str) and not os.path.isfile(cfg.policy):
        raise BadInput(f"policy file not found: {cfg.policy}")
    if cfg.baseline and not cfg.policy:
        raise BadInput("--baseline compares a compressed run with an uncompressed one; give --policy P.yaml")
    if cfg.model is None and cfg.model_fn:
        raise BadInput("--model-fn needs a MODEL file")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev
