"""Checkpoints: written after every epoch, read back with weights_only, and
restored into a run (every rank's RNG state and the communication hook's)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
import torch.distributed as dist

from ..errors import BadInput
from .seeds import rng_state, set_rng_state

if TYPE_CHECKING:
    from .build import Run


CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "final_model.pt"
FORMAT = 1


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


def resume_if_saved(run: Run) -> None:
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
