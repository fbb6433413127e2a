"""Starting and resuming a run: one process, N spawned data-parallel workers,
or this process's rank under torchrun."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch.distributed as dist

from ..distributed.launch import default_backend, init_from_env, run_data_parallel, under_torchrun
from ..errors import BadInput
from ..passes import resolve_passes
from .build import build_data, communication, model_channels, prepare_run
from .checkpoint import resume_if_saved, weights_path
from .config import TrainConfig, check_config, resolve_device
from .loop import execute
from .rundir import (BASELINE_DIR, REPORT, claim_run_dir, comparison_rows, describe_run, file_digest, job_report,
                     new_run_dir, run_plots, run_report, write_json)


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None,
          passes: Optional[Sequence[type]] = None) -> Dict[str, Any]:
    """Train per `cfg` (and its baseline with cfg.baseline) in a new run directory.
    `passes`: the compile's pass list (default fxcompress.passes.DEFAULT_PASSES)."""
    passes = resolve_passes(passes)
    check_config(cfg)
    if cfg.init is not None:
        weights_path(cfg.init, "--init")  # fail before the run directory is claimed
    run_dir = claim_run_dir(cfg.run_dir or new_run_dir())
    # Absolute paths, so that --resume works from any working directory.
    policy = os.path.abspath(cfg.policy) if isinstance(cfg.policy, str) else cfg.policy
    model = cfg.model
    if model and not model.startswith("torchvision:"):
        model = os.path.abspath(model)
    init = os.path.abspath(cfg.init) if cfg.init else cfg.init
    cfg = dataclasses.replace(cfg, run_dir=run_dir, policy=policy, model=model, init=init)
    return _launch(cfg, {}, log, passes)


def resume(run_dir: str, log: Optional[Callable[[str], None]] = None, passes: Optional[Sequence[type]] = None,
           **overrides) -> Dict[str, Any]:
    """Continue the run in `run_dir` where its last checkpoint left it.

    Only settings that do not change the result may be overridden: device,
    progress, plots, stop_after. `passes`: as train()'s (the same list).
    """
    passes = resolve_passes(passes)
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
    return _launch(cfg, {"resumed": True}, log, passes)


class StreamLog:
    """A picklable `log` that prints to stdout or stderr (the spawned workers' rank 0 logs with it)."""

    def __init__(self, stream: str = "stdout"):
        self.stream = stream

    def __call__(self, text: str) -> None:
        print(text, file=getattr(sys, self.stream), flush=True)


def _launch(cfg: TrainConfig, extra: Dict[str, Any], log, passes: Tuple[type, ...]) -> Dict[str, Any]:
    """One process, N spawned workers (cfg.nproc > 1), or this process's rank under torchrun."""
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
            return _ddp_entry(rank, world, cfg, extra, log, passes)  # None on ranks other than 0
        finally:
            dist.destroy_process_group()
    if cfg.nproc > 1:
        device = resolve_device(cfg.device)
        if log is not None:
            try:
                pickle.dumps(log)
            except Exception:
                log = StreamLog("stdout")
        results = run_data_parallel(_ddp_entry, cfg.nproc, (cfg, extra, log, passes), backend=default_backend(device.type),
                                    threads_per_worker=cfg.threads)
        return results[0]
    return _train_job(cfg, extra, log, passes)


def _ddp_entry(rank: int, world: int, cfg: TrainConfig, extra: Dict[str, Any], log,
               passes: Tuple[type, ...]) -> Optional[Dict[str, Any]]:
    """One worker of a data-parallel run (spawned, or a torchrun rank); rank 0 returns the result."""
    if resolve_device(cfg.device).type == "cuda":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    result = _train_job(cfg, extra, log if rank == 0 else None, passes)
    return result if rank == 0 else None


def _train_job(cfg: TrainConfig, extra: Dict[str, Any], log, passes: Tuple[type, ...]) -> Dict[str, Any]:
    run_dir = cfg.run_dir
    bundle = build_data(cfg, model_channels(cfg))
    main = prepare_run(cfg, run_dir, "compressed" if cfg.policy else "run", use_policy=True, bundle=bundle,
                       passes=passes)
    resume_if_saved(main)
    if log:
        log(describe_run(main))
        if main.init_line:
            log(main.init_line)
        if main.world == 1 and communication(cfg, passes) is not None:
            log(f"note: the policy's communication: section applies only to data-parallel training "
                f"(--nproc > 1); this run has one process")
    status = execute(main, log)
    result = {"run_dir": run_dir, **extra, "main": run_report(main, status), "baseline": None}
    base = None
    if cfg.baseline and status == "done":
        base_cfg = dataclasses.replace(cfg, run_dir=os.path.join(run_dir, BASELINE_DIR), stop_after=None)
        base = prepare_run(base_cfg, base_cfg.run_dir, "baseline", use_policy=False, bundle=bundle)
        resume_if_saved(base)
        execute(base, log)
        result["baseline"] = run_report(base, "done")
    result["status"] = status
    if cfg.baseline and base is not None:
        result["comparison"] = comparison_rows(result["main"], result["baseline"])
    if main.rank != 0:
        return result
    if cfg.plots:
        result["plots"] = run_plots(main, base)
    write_json(os.path.join(run_dir, REPORT), job_report(main, status, result))
    return result
