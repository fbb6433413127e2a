"""The training loop behind `fxcompress train`: a model, a policy, real data.

One run = seed, build the model, compile it with the policy (if any), train
with SGD/Adam under a step or cosine schedule, evaluate each epoch, and keep a
run directory:

    RUN_DIR/report.json     config, data, model, every figure of every epoch
    RUN_DIR/checkpoint.pt   written after each epoch; resumes the run exactly
    RUN_DIR/final_model.pt  the trained weights (state_dict)
    RUN_DIR/plots/*.png     curves, method figures, per-layer pictures
    RUN_DIR/baseline/...    the same for the uncompressed baseline (--baseline)

Data-parallel (`nproc > 1`, or under torchrun): N workers joined by
torch.distributed (gloo on CPU, NCCL on GPU) train one model through
DistributedDataParallel, with the policy's `communication:` section as the
DDP comm hook (fxcompress/distributed; full-precision all-reduce when the
policy has none, and for the baseline). `batch_size` stays the global batch:
each worker takes `batch_size // nproc` images a step from its shard of the
same seeded epoch permutation, so a run has the number of steps, learning-rate
schedule and averaged gradient of the single-process run. Only rank 0 writes
the run directory and evaluates (the model it saves is the one it tests);
per-epoch figures add the bytes each worker puts on the wire per step beside
what fp32 would send. A checkpoint holds every rank's RNG state and the hook's
state (learned levels, refit position), so a stopped run resumes where it
left off. Bitwise equal to an uninterrupted run with fp32 all-reduce; with a
quantizing hook not quite, because a fresh DDP hands its first step's
gradients over in its initial bucket layout (parameter order), which the
uninterrupted run had already rebuilt, so that one step quantizes other
buckets with other random streams.

Determinism: the data order and the augmentation of epoch e come from
generators seeded by (seed, e), not from a running stream, and the global
RNGs are saved in each checkpoint; so a run stopped after any epoch and
resumed ends bitwise equal to one that never stopped (on CPU), and a baseline
sees exactly the batches the compressed run saw.

Controllers are driven duck-typed (`attach_optimizer`, `on_epoch_start`,
`step`, `on_epoch_end`, `figures`), so a plain nn.Module trains too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .errors import BadInput, RunFailure

CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"
FINAL_MODEL = "final_model.pt"
BASELINE_DIR = "baseline"
FORMAT = 1
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

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --- checks -----------------------------------------------------------------------

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


# --- seeds and RNG state ---------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    # A fixed mix, not Python's hash() (salted per process for str, and we
    # need the same number in a resumed process).
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % 2**63


def rng_state() -> Dict[str, Any]:
    """Every global RNG as tensors and plain values, so weights_only loading reads it."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
             "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                        "gauss": py_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- data, model, optimizer ------------------------------------------------------

def build_data(cfg: TrainConfig, channels: Optional[int] = None):
    from .data import load_data, parse_spec

    kind, _ = parse_spec(cfg.data)
    upscale = cfg.upscale
    if upscale is None and kind == "digits":
        upscale = DIGITS_DEFAULT_UPSCALE
    bundle = load_data(cfg.data, upscale=upscale, channels=channels)
    if cfg.train_limit:
        bundle.train = _limit(bundle.train, cfg.train_limit)
    if cfg.test_limit:
        bundle.test = _limit(bundle.test, cfg.test_limit)
    return bundle


def _limit(ds, n: int):
    return ds if n >= len(ds) else Subset(ds, list(range(n)))


def _image_set(ds):
    """The ImageSet under a Subset (to reach its augmentation generator)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    from .loading import build_torchvision

    return build_torchvision(name, num_classes=num_classes)[0]


def model_channels(cfg: TrainConfig) -> Optional[int]:
    """torchvision models expect RGB: grey data is repeated into 3 channels for them."""
    return 3 if cfg.model and cfg.model.startswith("torchvision:") else None


def build_model(cfg: TrainConfig, bundle) -> Tuple[nn.Module, Dict[str, Any]]:
    if cfg.model is None:
        from .models import default_model

        return default_model(bundle, cfg.depth), {"kind": "builtin", "name": f"resnet{cfg.depth}_cifar",
                                                  "depth": cfg.depth}
    if cfg.model.startswith("torchvision:"):
        name = cfg.model.split(":", 1)[1]
        return _torchvision_model(name, bundle.num_classes), {"kind": "torchvision", "name": name}
    from .loading import load_model

    loaded = load_model(cfg.model, cfg.model_fn)
    return loaded.model, loaded.source


def check_model_fits(model: nn.Module, example: torch.Tensor, num_classes: int, what: str) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:
        raise BadInput(f"{what} fails on a data batch of shape {tuple(example.shape)}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''} (try --upscale or another --data)") from None
    finally:
        model.train()
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape != (example.shape[0], num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise BadInput(f"{what} returns {shape} for a batch of {example.shape[0]}; "
                       f"training needs logits of shape ({example.shape[0]}, {num_classes}) for this data")


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def decay_epochs(cfg: TrainConfig) -> List[int]:
    if cfg.decay_epochs:
        return sorted(cfg.decay_epochs)
    # The seeds decay at 50 % and 75 % of training (e.g. 82 and 123 of 164).
    return sorted({max(1, round(cfg.epochs * 0.5)), max(1, round(cfg.epochs * 0.75))})


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of epoch `epoch` (0-based): a pure function, so resuming needs no scheduler state."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= e for e in decay_epochs(cfg))
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))


def _hook(model: nn.Module, name: str, *args) -> Any:
    fn = getattr(model, name, None)
    return fn(*args) if callable(fn) else None


def _figures(model: nn.Module) -> Dict[str, float]:
    raw = _hook(model, "figures") or {}
    out = {}
    for k, v in raw.items():
        if torch.is_tensor(v):
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


class EpochFigures:
    """The model's figures over one epoch: `add` after every training step,
    `result` gives the epoch's figures.

    Every key is the mean over the steps that reported it (a last, partial
    batch weighs as one step), except two, per controller prefix
    ("activations." for "activations.ratio"):
    - `<p>ratio`, when `<p>saved_mb` and `<p>fp32_mb` are reported too: total
      fp32 MB over total stored MB of the epoch (0.0 when nothing was
      stored, as the controllers report it), not a mean of ratios;
    - `<p>avg_bits`, when `<p>fp32_mb` is reported: weighted by the step's
      fp32 MB (4 bytes an element, so by elements saved).
    """

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.weighted: Dict[str, List[float]] = {}  # avg_bits key -> [sum(bits * fp32_mb), sum(fp32_mb)]

    def add(self, figures: Dict[str, float]) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
            prefix, last = _split_key(k)
            weight = figures.get(prefix + "fp32_mb") if last == "avg_bits" else None
            if weight is not None:
                acc = self.weighted.setdefault(k, [0.0, 0.0])
                acc[0] += v * weight
                acc[1] += weight

    def result(self) -> Dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        for k in out:
            prefix, last = _split_key(k)
            saved, fp32 = self.sums.get(prefix + "saved_mb"), self.sums.get(prefix + "fp32_mb")
            if last == "ratio" and saved is not None and fp32 is not None:
                out[k] = fp32 / saved if saved > 0 else 0.0
            elif k in self.weighted and self.weighted[k][1] > 0:
                out[k] = self.weighted[k][0] / self.weighted[k][1]
        return out


def _split_key(key: str) -> Tuple[str, str]:
    """'activations.ratio' -> ('activations.', 'ratio'); 'ratio' -> ('', 'ratio')."""
    head, dot, last = key.rpartition(".")
    return head + dot, last


# --- one run ------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one training run holds; `history` is the per-epoch record."""

    cfg: TrainConfig
    label: str
    run_dir: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bundle: Any
    device: torch.device
    source: Dict[str, Any]
    compressed: bool
    history: List[Dict[str, Any]] = field(default_factory=list)
    compile_report: Optional[Dict[str, Any]] = None
    # data-parallel: the DDP wrapper trained through, the comm hook's state
    ddp: Optional[nn.Module] = None
    comm: Any = None
    rank: int = 0
    world: int = 1
    backend: Optional[str] = None


def _make_loader(cfg: TrainConfig, ds, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, 0))
    order = torch.randperm(len(ds), generator=gen)
    batch = cfg.batch_size
    aug_stream = 1
    if world > 1:
        # Every rank draws the same permutation and takes every world-th image
        # of it (DistributedSampler's split, with our per-epoch seeds); the
        # shards are cut to one length, since DDP needs every rank to take
        # the same number of steps. Augmentation draws differ per rank.
        per_rank = len(ds) // world
        order = order[rank::world][:per_rank]
        batch = cfg.batch_size // world
        aug_stream = 1 if rank == 0 else 10_000 + rank
    _image_set(ds).generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, aug_stream))
    # The loader draws a base seed from its generator when iterated: give it
    # ours, so the global RNG (the model's) is untouched by data loading.
    # A last batch of one image would break BatchNorm in training mode.
    return DataLoader(ds, batch_size=batch, sampler=order.tolist(), generator=gen,
                      drop_last=len(order) % batch == 1)


def evaluate(model: nn.Module, ds, device: torch.device, batch_size: int = 500) -> Tuple[float, float]:
    """(mean loss, accuracy) on `ds` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum())
            n += y.numel()
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def train_epoch(run: Run, epoch: int, progress: bool) -> Dict[str, Any]:
    cfg, model, opt = run.cfg, run.model, run.optimizer
    lr = lr_at(cfg, epoch)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    _hook(model, "on_epoch_start", epoch)
    loader = _make_loader(cfg, run.bundle.train, epoch, run.rank, run.world)
    forward = run.ddp if run.ddp is not None else model
    bar = _progress(len(loader), f"{run.label} {epoch + 1}/{cfg.epochs}", progress and run.rank == 0)
    loss_sum, correct, n = 0.0, 0, 0
    epoch_figures = EpochFigures()
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        out = forward(x)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise RunFailure(f"{run.label}: loss became {loss.item()} in epoch {epoch + 1} (try a smaller --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _hook(model, "step")
        epoch_figures.add(_figures(model))
        loss_sum += loss.item() * y.numel()
        correct += int((out.detach().argmax(1) == y).sum())
        n += y.numel()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100 * correct / n:.1f}%", refresh=False)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if run.world > 1:
        # the epoch's loss, accuracy and throughput over all workers' images
        totals = torch.tensor([loss_sum, correct, n], dtype=torch.float64, device=run.device)
        dist.all_reduce(totals)
        loss_sum, correct, n = float(totals[0]), int(totals[1]), int(totals[2])
    _hook(model, "on_epoch_end", epoch)
    # Figures describe the whole training epoch: read after every step (the
    # activation figures are those of the latest forward, so one read at the
    # end would describe only the last, maybe partial, batch), never after
    # the evaluation forwards, which save nothing for backward.
    figures = epoch_figures.result() if epoch_figures.counts else _figures(model)
    if run.comm is not None:
        figures.update({k: float(v) for k, v in run.comm.figures().items()})
    if run.rank == 0:
        test_loss, test_acc = evaluate(model, run.bundle.test, run.device, cfg.eval_batch_size)
    else:  # rank 0 tests the model it saves; the others go on to the next step
        test_loss = test_acc = float("nan")
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
            "test_loss": test_loss, "test_acc": test_acc, "time_s": train_time,
            "img_per_s": n / train_time if train_time > 0 else 0.0, "figures": figures}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def epoch_line(run: Run, rec: Dict[str, Any]) -> str:
    parts = [f"{run.label} epoch {rec['epoch']}/{run.cfg.epochs}", f"loss {rec['train_loss']:.4f}",
             f"train {100 * rec['train_acc']:.2f}%", f"test {100 * rec['test_acc']:.2f}%",
             f"lr {rec['lr']:.4g}", f"{rec['img_per_s']:.0f} img/s", f"{rec['time_s']:.1f} s"]
    parts += [f"{k} {v:.4g}" for k, v in rec["figures"].items()]
    return "  ".join(parts)


# --- checkpoints ----------------------------------------------------------------------

def save_checkpoint(run: Run) -> Optional[str]:
    """Write the checkpoint (rank 0; every rank must call it: the RNG states are gathered)."""
    path = os.path.join(run.run_dir, CHECKPOINT)
    rng = rng_state()
    rng_ranks = None
    if run.world > 1:
        rng_ranks = [None] * run.world if run.rank == 0 else None
        dist.gather_object(rng, rng_ranks, dst=0)
    if run.rank != 0:
        return None
    state = {"format": FORMAT, "epoch": len(run.history), "model": run.model.state_dict(),
             "optimizer": run.optimizer.state_dict(), "schedule": {"kind": run.cfg.schedule,
                                                                    "lr": run.history[-1]["lr"]},
             "rng": rng, "history": run.history}
    if run.world > 1:
        state["rng_ranks"] = rng_ranks
        state["world"] = run.world
    if run.comm is not None:
        state["comm"] = run.comm.state_dict()
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"no checkpoint to resume from: {path}") from None
    except Exception as e:
        raise BadInput(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInput(f"{path} is not an fxcompress training checkpoint (format {FORMAT})")
    return state


def restore(run: Run, state: Dict[str, Any]) -> None:
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInput(f"{run.run_dir}: the checkpoint does not fit the model this run builds: "
                       f"{str(e).splitlines()[0]}") from None
    if run.comm is not None:
        if "comm" not in state:
            raise BadInput(f"{run.run_dir}: the checkpoint has no communication state; it was not written by "
                           f"a data-parallel run")
        run.comm.load_state_dict(state["comm"])
    run.history = list(state["history"])
    if run.world > 1:
        if state.get("world") != run.world:
            raise BadInput(f"{run.run_dir}: the checkpoint was written by {state.get('world', 1)} workers, "
                           f"this run has {run.world}")
        set_rng_state(state["rng_ranks"][run.rank])
    else:
        set_rng_state(state["rng"])


# --- reports --------------------------------------------------------------------------

def summarise(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    total_time = sum(h["time_s"] for h in history)
    # Images over time, not a mean of per-epoch rates: one stalled epoch on a
    # shared machine must weigh by how long it took.
    images = sum(h["img_per_s"] * h["time_s"] for h in history)
    return {"epochs": len(history), "test_acc": last["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in history), "train_acc": last["train_acc"],
            "train_loss": last["train_loss"], "test_loss": last["test_loss"],
            "time_per_epoch_s": total_time / len(history), "img_per_s": images / total_time if total_time else 0.0,
            "figures": dict(last["figures"])}


def file_digest(path: Optional[str]) -> Optional[str]:
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_report(run: Run, status: str) -> Dict[str, Any]:
    params = sum(p.numel() for p in run.model.parameters())
    return {"label": run.label, "status": status, "run_dir": run.run_dir, "config": asdict(run.cfg),
            "policy_sha256": file_digest(run.cfg.policy),
            "data": run.bundle.describe(), "model": {**run.source, "parameters": params},
            "compressed": run.compressed, "device": str(run.device), "epochs": run.history,
            "final": summarise(run.history), "compile": run.compile_report,
            "distributed": _distributed_report(run)}


def _distributed_report(run: Run) -> Optional[Dict[str, Any]]:
    if run.world <= 1:
        return None
    out = {"nproc": run.world, "backend": run.backend, "batch_per_worker": run.cfg.batch_size // run.world,
           "global_batch": run.cfg.batch_size, "written_by_rank": run.rank}
    if run.comm is not None:
        out["communication"] = _jsonable(asdict(run.comm.config))
        out["wire"] = {k: float(v) for k, v in run.comm.figures().items()}
        out["refits"] = _jsonable(run.comm.refits)
    return out


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


# --- building and running ---------------------------------------------------------------

def prepare_run(cfg: TrainConfig, run_dir: str, label: str, use_policy: bool, bundle=None) -> Run:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    bundle = bundle or build_data(cfg, model_channels(cfg))
    # Seed right before building, so the compressed model and its baseline
    # start from the same initial weights.
    seed_everything(cfg.seed)
    model, source = build_model(cfg, bundle)
    what = f"model {source.get('name') or source.get('path')}"
    example = bundle.example_batch(2)
    check_model_fits(model, example, bundle.num_classes, what)
    compile_report = None
    compressed = bool(use_policy and cfg.policy)
    if compressed:
        from .compiled import compile as fx_compile

        model = fx_compile(model, cfg.policy, (example,))
        compile_report = _hook(model, "report")
    model = model.to(device)
    if cfg.compile:
        if compressed:
            model.compile_with(cfg.compile)
        else:
            model.compile(backend=cfg.compile, dynamic=False)  # in place: state_dict names unchanged
    optimizer = make_optimizer(cfg, model.parameters())
    _hook(model, "attach_optimizer", optimizer)
    run = Run(cfg, label, run_dir, model, optimizer, bundle, device, source, compressed,
              compile_report=_jsonable(compile_report))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from .distributed import CommunicationConfig
        from .distributed.hook import wrap

        comm = _communication(cfg) if use_policy else None
        # the baseline, and a policy without a communication: section, all-reduce in fp32
        comm = comm or CommunicationConfig(method="fp32")
        run.ddp, run.comm = wrap(model, comm, device)
        run.rank, run.world, run.backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    # Whatever the compiler drew from the RNG, training starts from one state
    # (on each rank its own: stochastic methods must not draw alike on all).
    seed_everything(derived_seed(cfg.seed, 0, 2) if run.rank == 0 else derived_seed(cfg.seed, 0, 20_000 + run.rank))
    return run


def _communication(cfg: TrainConfig):
    """The policy's `communication:` section, or None."""
    if not cfg.policy:
        return None
    from .policy import load_policy

    return load_policy(cfg.policy).section("communication")


def _jsonable(obj):
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=str))


def execute(run: Run, log: Optional[Callable[[str], None]] = None) -> str:
    """Train `run` from its current epoch; returns "done" or "stopped"."""
    cfg = run.cfg
    if run.rank == 0:
        os.makedirs(run.run_dir, exist_ok=True)
    log = log if (log and run.rank == 0) else (lambda s: None)
    stop = cfg.stop_after or cfg.epochs
    for epoch in range(len(run.history), cfg.epochs):
        if epoch >= stop:
            break
        rec = train_epoch(run, epoch, cfg.progress)
        run.history.append(rec)
        save_checkpoint(run)
        if run.rank == 0:
            write_json(os.path.join(run.run_dir, REPORT), run_report(run, "running"))
        log(epoch_line(run, rec))
    status = "done" if len(run.history) >= cfg.epochs else "stopped"
    if run.rank == 0:
        finish(run, status)
    return status


def finish(run: Run, status: str) -> None:
    if status == "done":
        torch.save({"format": FORMAT, "model": run.source, "data": run.bundle.describe(),
                    "epochs": len(run.history), "state_dict": run.model.state_dict()},
                   os.path.join(run.run_dir, FINAL_MODEL))
    report = run_report(run, status)
    if hasattr(run.model, "controllers"):
        report["controllers"] = _jsonable({n: _hook(c, "report") for n, c in run.model.controllers.items()})
    write_json(os.path.join(run.run_dir, REPORT), report)


def new_run_dir(base: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(base, stamp), 1
    while os.path.exists(path):
        path, i = os.path.join(base, f"{stamp}-{i}"), i + 1
    return path


def _claim_run_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, REPORT)) or os.path.exists(os.path.join(path, CHECKPOINT)):
        raise BadInput(f"--run-dir {path} already holds a run; continue it with --resume {path} "
                       "or choose another --run-dir")
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"--run-dir {path} exists and is not a folder")
    return path  # created by the first epoch, so a run that fails to start leaves nothing behind


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train per `cfg` (and its baseline with cfg.baseline) in a new run directory."""
    check_config(cfg)
    run_dir = _claim_run_dir(cfg.run_dir or new_run_dir())
    # Absolute paths, so that --resume works from any working directory.
    policy = os.path.abspath(cfg.policy) if isinstance(cfg.policy, str) else cfg.policy
    model = cfg.model
    if model and not model.startswith("torchvision:"):
        model = os.path.abspath(model)
    cfg = dataclasses.replace(cfg, run_dir=run_dir, policy=policy, model=model)
    return _launch(cfg, {}, log)


def resume(run_dir: str, log: Optional[Callable[[str], None]] = None,
           **overrides) -> Dict[str, Any]:
    """Continue the run in `run_dir` where its last checkpoint left it.

    Only settings that do not change the result may be overridden: device,
    progress, plots, stop_after.
    """
    allowed = {"device", "progress", "plots", "stop_after"}
    bad = set(overrides) - allowed
    if bad:
        raise BadInput(f"--resume continues a run as it was configured; these cannot change: {', '.join(sorted(bad))}")
    report_path = os.path.join(run_dir, REPORT)
    if not os.path.isfile(report_path):
        raise BadInput(f"--resume {run_dir}: no {REPORT} there (not a run directory)")
    try:
        with open(report_path) as f:
            saved = json.load(f)
        cfg = TrainConfig.from_dict(saved["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"--resume {run_dir}: {REPORT} is unreadable: {e}") from None
    cfg = dataclasses.replace(cfg, **{"run_dir": run_dir, "stop_after": None, **overrides})
    check_config(cfg)
    if saved.get("policy_sha256") != file_digest(cfg.policy):
        raise BadInput(f"--resume {run_dir}: the policy file {cfg.policy} changed since the run started; "
                       "a resumed run must use the same policy")
    return _launch(cfg, {"resumed": True}, log)


# --- data-parallel workers ----------------------------------------------------------------

class StreamLog:
    """A picklable `log` that prints to stdout or stderr (the spawned workers' rank 0 logs with it)."""

    def __init__(self, stream: str = "stdout"):
        self.stream = stream

    def __call__(self, text: str) -> None:
        print(text, file=getattr(sys, self.stream), flush=True)


def _launch(cfg: TrainConfig, extra: Dict[str, Any], log) -> Dict[str, Any]:
    """One process, N spawned workers (cfg.nproc > 1), or this process's rank under torchrun."""
    from .distributed.launch import default_backend, init_from_env, run_data_parallel, under_torchrun

    if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        world = int(os.environ["WORLD_SIZE"])
        if cfg.nproc not in (1, world):
            raise BadInput(f"--nproc {cfg.nproc} differs from torchrun's {world} workers; drop --nproc "
                           f"under torchrun")
        cfg = dataclasses.replace(cfg, nproc=world)
        device = resolve_device(cfg.device)
        init_from_env(default_backend(device.type))
        rank = dist.get_rank()
        # every rank must train in the same run directory: rank 0's
        names = [cfg.run_dir]
        dist.broadcast_object_list(names, src=0)
        cfg = dataclasses.replace(cfg, run_dir=names[0])
        try:
            return _ddp_entry(rank, world, cfg, extra, log)  # None on ranks other than 0
        finally:
            dist.destroy_process_group()
    if cfg.nproc > 1:
        device = resolve_device(cfg.device)
        if log is not None:
            try:
                pickle.dumps(log)
            except Exception:
                log = StreamLog("stdout")
        results = run_data_parallel(_ddp_entry, cfg.nproc, (cfg, extra, log), backend=default_backend(device.type),
                                    threads_per_worker=cfg.threads)
        return results[0]
    return _train_job(cfg, extra, log)


def _ddp_entry(rank: int, world: int, cfg: TrainConfig, extra: Dict[str, Any], log) -> Optional[Dict[str, Any]]:
    """One worker of a data-parallel run (spawned, or a torchrun rank); rank 0 returns the result."""
    if resolve_device(cfg.device).type == "cuda":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    result = _train_job(cfg, extra, log if rank == 0 else None)
    return result if rank == 0 else None


def _train_job(cfg: TrainConfig, extra: Dict[str, Any], log) -> Dict[str, Any]:
    run_dir = cfg.run_dir
    bundle = build_data(cfg, model_channels(cfg))
    main = prepare_run(cfg, run_dir, "compressed" if cfg.policy else "run", use_policy=True, bundle=bundle)
    _resume_if_saved(main)
    if log:
        log(describe_run(main))
        if main.world == 1 and _communication(cfg) is not None:
            log(f"note: the policy's communication: section applies only to data-parallel training "
                f"(--nproc > 1); this run has one process")
    status = execute(main, log)
    result = {"run_dir": run_dir, **extra, "main": run_report(main, status), "baseline": None}
    base = None
    if cfg.baseline and status == "done":
        base_cfg = dataclasses.replace(cfg, run_dir=os.path.join(run_dir, BASELINE_DIR), stop_after=None)
        base = prepare_run(base_cfg, base_cfg.run_dir, "baseline", use_policy=False, bundle=bundle)
        _resume_if_saved(base)
        execute(base, log)
        result["baseline"] = run_report(base, "done")
    result["status"] = status
    if cfg.baseline and base is not None:
        result["comparison"] = comparison_rows(result["main"], result["baseline"])
    if main.rank != 0:
        return result
    if cfg.plots:
        result["plots"] = _plots(main, base)
    write_json(os.path.join(run_dir, REPORT), _job_report(main, status, result))
    return result


def describe_run(run: Run) -> str:
    b = run.bundle
    params = sum(p.numel() for p in run.model.parameters())
    name = run.source.get("name") or os.path.basename(run.source.get("path", "model"))
    text = (f"data {b.name}: {len(b.train)} train / {len(b.test)} test images, {b.in_channels}x{b.image_size}x"
            f"{b.image_size}, {b.num_classes} classes; model {name} ({params / 1e6:.2f} M parameters); "
            f"policy {run.cfg.policy or 'none'}; device {run.device}; run dir {run.run_dir}")
    if run.world > 1:
        comm = run.comm.config
        wire = "fp32 all-reduce" if comm.full_precision else f"{comm.method} {comm.resolved_bits}-bit"
        text += (f"; {run.world} {run.backend} workers x {run.cfg.batch_size // run.world} images a step, "
                 f"gradients as {wire}")
    if run.history:
        text += f"; resuming after epoch {len(run.history)}"
    return text


def _job_report(main: Run, status: str, result: Dict[str, Any]) -> Dict[str, Any]:
    report = run_report(main, status)
    if hasattr(main.model, "controllers"):
        report["controllers"] = _jsonable({n: _hook(c, "report") for n, c in main.model.controllers.items()})
    for key in ("baseline", "comparison", "plots", "resumed"):
        if key in result:
            report[key] = result[key]
    return report


def _resume_if_saved(run: Run) -> None:
    path = os.path.join(run.run_dir, CHECKPOINT)
    if run.world == 1:
        if os.path.isfile(path):
            restore(run, load_checkpoint(path))
        return
    # rank 0 reads (the run directory may exist on its machine only) and sends
    # the checkpoint, or the error, to every rank, so all fail or resume alike
    box = [None]
    if run.rank == 0 and os.path.isfile(path):
        try:
            box[0] = ("ok", load_checkpoint(path))
        except BadInput as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return
    kind, state = box[0]
    if kind == "error":
        raise BadInput(state)
    if run.device.type == "cuda":
        state = _to_cpu(state)
    restore(run, state)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _plots(main: Run, base: Optional[Run]) -> List[str]:
    from .plots import write_plots

    reports = {}
    if hasattr(main.model, "controllers"):
        reports = _jsonable({n: _hook(c, "report") for n, c in main.model.controllers.items()}) or {}
    title = f"{main.source.get('name', 'model')} on {main.bundle.name}"
    written = write_plots(main.run_dir, main.history, reports, base.history if base else None, title)
    if base is not None:
        written += write_plots(base.run_dir, base.history, None, None, title + " (baseline)")
    return written


# --- the side-by-side table --------------------------------------------------------------

def comparison_rows(main: Dict[str, Any], base: Dict[str, Any]) -> List[List[Any]]:
    """[measure, compressed, baseline, difference] rows for the final table."""
    m, b = main["final"], base["final"]

    def pct(v):
        return None if v is None else round(100 * v, 2)

    rows = [["test accuracy (%)", pct(m.get("test_acc")), pct(b.get("test_acc"))],
            ["best test accuracy (%)", pct(m.get("best_test_acc")), pct(b.get("best_test_acc"))],
            ["train accuracy (%)", pct(m.get("train_acc")), pct(b.get("train_acc"))],
            ["train loss", m.get("train_loss"), b.get("train_loss")],
            ["test loss", m.get("test_loss"), b.get("test_loss")],
            ["time/epoch (s)", m.get("time_per_epoch_s"), b.get("time_per_epoch_s")],
            ["throughput (img/s)", m.get("img_per_s"), b.get("img_per_s")],
            ["parameters", main["model"]["parameters"], base["model"]["parameters"]]]
    for name, v in m.get("figures", {}).items():
        rows.append([name, v, b.get("figures", {}).get(name)])
    out = []
    for name, a, c in rows:
        diff = a - c if isinstance(a, (int, float)) and isinstance(c, (int, float)) else None
        out.append([name, a, c, diff])
    return out


def comparison_table(rows: List[List[Any]]) -> str:
    from .table import format_table

    return format_table(["", "compressed", "baseline", "difference"], rows)
