"""The training loop: the learning-rate schedule, one epoch of steps, evaluation,
and the epochs of a run with a checkpoint after each."""
from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..errors import RunFailure
from .checkpoint import save_checkpoint, save_snapshot
from .config import TrainConfig
from .hooks import hook, model_figures, snapshot_labels
from .rundir import REPORT, finish, run_report, write_json
from .seeds import derived_seed

if TYPE_CHECKING:
    from .build import Run


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


def _image_set(ds):
    """The ImageSet under a Subset (to reach its augmentation generator)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


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
    hook(model, "on_epoch_start", epoch)
    loader = _make_loader(cfg, run.bundle.train, epoch, run.rank, run.world)
    forward = run.ddp if run.ddp is not None else model
    bar = _progress(len(loader), f"{run.label} {epoch + 1}/{cfg.epochs}", progress and run.rank == 0)
    loss_sum, extra_sum, correct, n = 0.0, None, 0, 0
    epoch_figures = EpochFigures()
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        out = forward(x)
        loss = F.cross_entropy(out, y)
        # the controllers' own terms (CAMP's), trained with the cross-entropy
        extra = hook(model, "extra_loss", out, y)
        total = loss if extra is None else loss + extra
        if not torch.isfinite(total):
            raise RunFailure(f"{run.label}: loss became {total.item()} in epoch {epoch + 1} (try a smaller --lr)")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        hook(model, "step")
        for label in snapshot_labels(model):
            save_snapshot(run, label)
        epoch_figures.add(model_figures(model))
        loss_sum += loss.item() * y.numel()
        if extra is not None:
            extra_sum = (extra_sum or 0.0) + float(extra.detach()) * y.numel()
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
    # mean over this worker's images, as the epoch's other figures are
    extra_mean = None if extra_sum is None else extra_sum / max(n, 1)
    if run.world > 1:
        # the epoch's loss, accuracy and throughput over all workers' images
        totals = torch.tensor([loss_sum, correct, n], dtype=torch.float64, device=run.device)
        dist.all_reduce(totals)
        loss_sum, correct, n = float(totals[0]), int(totals[1]), int(totals[2])
    hook(model, "on_epoch_end", epoch)
    # Figures describe the whole training epoch: read after every step (the
    # activation figures are those of the latest forward, so one read at the
    # end would describe only the last, maybe partial, batch), never after
    # the evaluation forwards, which save nothing for backward.
    figures = epoch_figures.result() if epoch_figures.counts else model_figures(model)
    if run.comm is not None:
        figures.update({k: float(v) for k, v in run.comm.figures().items()})
    if extra_mean is not None:
        figures["train_extra_loss"] = extra_mean  # train_loss stays the cross-entropy
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
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def epoch_line(run: Run, rec: Dict[str, Any]) -> str:
    parts = [f"{run.label} epoch {rec['epoch']}/{run.cfg.epochs}", f"loss {rec['train_loss']:.4f}",
             f"train {100 * rec['train_acc']:.2f}%", f"test {100 * rec['test_acc']:.2f}%",
             f"lr {rec['lr']:.4g}", f"{rec['img_per_s']:.0f} img/s", f"{rec['time_s']:.1f} s"]
    parts += [f"{k} {v:.4g}" for k, v in rec["figures"].items()]
    return "  ".join(parts)


def execute(run: Run, log: Optional[Callable[[str], None]] = None) -> str:
    """Train `run` from its current epoch; returns "done" or "stopped"."""
    cfg = run.cfg
    report = os.path.join(run.run_dir, REPORT)
    if run.rank == 0:
        os.makedirs(run.run_dir, exist_ok=True)
        if not run.history:
            # The configuration goes down before the first step, so a run
            # stopped in its first epoch (Ctrl-C, a crash) is still a run
            # directory: --resume starts it again from epoch 1, which gives
            # what an uninterrupted run gives (everything is seeded).
            write_json(report, run_report(run, "running"))
    log = log if (log and run.rank == 0) else (lambda s: None)
    stop = cfg.stop_after or cfg.epochs
    try:
        for epoch in range(len(run.history), cfg.epochs):
            if epoch >= stop:
                break
            rec = train_epoch(run, epoch, cfg.progress)
            run.history.append(rec)
            save_checkpoint(run)
            if run.rank == 0:
                write_json(report, run_report(run, "running"))
            log(epoch_line(run, rec))
    except BaseException as e:  # Ctrl-C, or a failed step: the report says so
        if run.rank == 0:
            write_json(report, run_report(run, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"))
        raise
    status = "done" if len(run.history) >= cfg.epochs else "stopped"
    if run.rank == 0:
        finish(run, status)
    return status
