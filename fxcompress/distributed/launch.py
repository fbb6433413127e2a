"""Start N data-parallel workers, or join the ones torchrun started.

Two ways in, one worker body:

* `run_data_parallel(train_fn, nproc, args)` spawns `nproc` processes on this
  machine (torch.multiprocessing, spawn), sets the same environment torchrun
  would (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), initialises the
  process group and calls `train_fn(rank, world_size, *args)` in each. It
  returns the per-rank return values in rank order.
* Under torchrun (RANK and WORLD_SIZE already set) call `init_from_env()` and
  then the same `train_fn` yourself.

`train_fn` must be importable by name (a module-level function): spawned
processes unpickle it.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import BadInput, RunFailure

MAX_PROCS = 256


def default_backend(device: Optional[str] = None) -> str:
    """NCCL for CUDA workers, gloo for CPU ones."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if str(device).startswith("cuda") else "gloo"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: Optional[str] = None, timeout_s: float = 300.0):
    """Join the process group described by torchrun's environment variables.
    Returns (rank, world_size). Idempotent."""
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _worker(local_rank: int, train_fn, nproc: int, port: int, backend: str, args: Sequence[Any],
            out_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc),
                      OMP_NUM_THREADS=str(threads))
    # N workers share the machine's cores; oversubscribing them makes every
    # collective wait for the slowest, oversubscribed rank
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{local_rank}.pt")
    try:
        init_from_env(backend)
        result = train_fn(local_rank, nproc, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as e:  # reported by the parent with the rank that failed
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(),
                    "exit_code": getattr(e, "exit_code", 1)}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_data_parallel(train_fn: Callable[..., Any], nproc: int, args: Sequence[Any] = (),
                      backend: Optional[str] = None, threads_per_worker: int = 1) -> List[Any]:
    """Run `train_fn(rank, world_size, *args)` in `nproc` fresh processes joined
    by a process group; returns each rank's result, rank 0 first."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= MAX_PROCS:
        raise BadInput(f"--nproc must be an integer in 1..{MAX_PROCS}, got {nproc!r}")
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise BadInput(f"--nproc {nproc} with NCCL needs {nproc} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="fxc_ddp_") as out_dir:
        try:
            mp.start_processes(_worker, args=(train_fn, nproc, free_port(), backend, tuple(args), out_dir,
                                              threads_per_worker),
                               nprocs=nproc, join=True, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _first_error(out_dir, nproc) or RunFailure(f"a worker failed: {e}") from None
        results = []
        for rank in range(nproc):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RunFailure(f"rank {rank} finished without a result")
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                raise RunFailure(f"rank {rank}: {rec['error']}")
            results.append(rec["result"])
        return results


def _first_error(out_dir: str, nproc: int):
    """The first failing rank's error, as BadInput when the user can fix it."""
    for rank in range(nproc):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        if os.path.exists(path):
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                cls = BadInput if rec.get("exit_code") == 2 else RunFailure
                return cls(f"rank {rank}: {rec['error']}")
    return None
