"""The run's .pt files: the checkpoint (written after every epoch, restored
into a run with every rank's RNG state and the communication hook's), the
final model and snapshots (weights), and reading any of them back with
weights_only and one-line errors."""
from __future__ import annotations

import os
import pickle
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..errors import BadInput, RunFailure
from .seeds import rng_state, set_rng_state

if TYPE_CHECKING:
    from .build import Run


CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "final_model.pt"
FORMAT = 1
MODELS_DIR = "models"  # snapshots a controller asks for: RUN/models/<label>.pt


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


def read_pt(path: str, what: str) -> Any:
    """torch.load(weights_only=True) of `path`, or a one-line BadInput that
    names the file and says what is wrong with it."""
    if os.path.isdir(path):
        raise BadInput(f"{what} {path} is a folder, not a .pt file")
    if not os.path.isfile(path):
        raise BadInput(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A pickled object (torch.save(model)) is readable but not as weights;
        # anything else the weights-only unpickler refuses is not a torch file.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise BadInput(f"{what} {path} holds a pickled Python object ({found.group(1)}), not a state_dict; "
                           f"save model.state_dict() instead") from None
        raise BadInput(_damaged(path, what)) from None
    except Exception:
        # a truncated zip gives OSError [Errno 22], a text file KeyError, an
        # empty one EOFError: to the user all say the same thing
        raise BadInput(_damaged(path, what)) from None


def _damaged(path: str, what: str) -> str:
    return (f"{what} {path} is damaged ({os.path.getsize(path)} bytes, truncated or not a PyTorch file) "
            f"and cannot be read")


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise BadInput(f"no checkpoint to resume from: {path}")
    state = read_pt(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInput(f"{path} is not an fxcompress training checkpoint (format {FORMAT})")
    return state


def save_weights(run: Run, path: str, **extra: Any) -> str:
    """The model's weights in the final-model format (final_model.pt, snapshots)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"format": FORMAT, "model": run.source, "data": run.bundle.describe(),
                "epochs": len(run.history), **extra, "state_dict": run.model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def save_snapshot(run: Run, label: str) -> Optional[str]:
    """RUN/models/<label>.pt, the weights now (rank 0 writes)."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise RunFailure(f"a controller asked for a snapshot labelled {label!r}; a label is letters, digits, "
                         f"'_', '.' and '-'")
    if run.rank != 0:
        return None
    return save_weights(run, os.path.join(run.run_dir, MODELS_DIR, f"{label}.pt"), label=label)


def snapshots(run_dir: str) -> Dict[str, str]:
    """{label: path} of the snapshots saved in a run directory."""
    folder = os.path.join(run_dir, MODELS_DIR)
    if not os.path.isdir(folder):
        return {}
    return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".pt")}


def weights_path(source: str, what: str) -> str:
    """The weights file of a run directory (final model, else the last checkpoint) or `source` itself."""
    if os.path.isdir(source):
        for name in (FINAL_MODEL, CHECKPOINT):
            path = os.path.join(source, name)
            if os.path.isfile(path):
                return path
        raise BadInput(f"{what} {source}: neither {FINAL_MODEL} nor {CHECKPOINT} there (not a finished or "
                       f"started run)")
    if not os.path.isfile(source):
        raise BadInput(f"{what} {source}: no such run directory or weights file")
    return source


def read_weights(path: str, what: str) -> Dict[str, torch.Tensor]:
    """The model state_dict in a final model, snapshot, checkpoint or plain
    state_dict file, under the original model's names."""
    return original_names(_model_state(path, what))


def _model_state(path: str, what: str) -> Dict[str, Any]:
    state = read_pt(path, what)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]  # final_model.pt, a snapshot
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # checkpoint.pt
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for k, v in state.items()
                                              if not k.endswith("_extra_state")):
        raise BadInput(f"{what} {path} holds no model state_dict")
    return state


def original_names(state: Dict[str, Any]) -> Dict[str, Any]:
    """A CompressedModel's state_dict back to the original model's names:
    drop the graph_module. prefix, controller state and anything fxc_."""
    out = {}
    for k, v in state.items():
        if k.startswith("controllers."):
            continue
        k = k.removeprefix("graph_module.")
        if any(p.startswith("fxc_") for p in k.split(".")):
            continue
        out[k] = v
    return out


def _pass_made(key: str) -> bool:
    return any(p.startswith("fxc_") for p in key.split("."))


def load_init(model: torch.nn.Module, path: str, compiled: bool) -> Tuple[Dict[str, Any], str]:
    """Load --init weights into `model` (not strict); ({path, loaded, missing,
    unexpected, skipped}, one line saying so).

    Into the plain model under the original names (before compiling, so the
    passes see the trained weights), or into a CompressedModel under its own
    names: then what a pass keeps (fxc_ modules: quantizer ranges, ...) comes
    along where the names match, and a pass's load hooks run (CAMP fills its
    low-precision norms from the loaded ones). Controller state of the other
    run never comes along: this is a new run. An original tensor of another
    shape is bad input; a pass's tensor of another shape is skipped."""
    raw = _model_state(path, "--init")
    if compiled:
        state = {k if k.startswith("graph_module.") else "graph_module." + k: v
                 for k, v in raw.items() if not k.startswith("controllers.")}
    else:
        state = original_names(raw)
    own = model.state_dict()
    skipped = []
    for k, v in list(state.items()):
        if k in own and torch.is_tensor(own[k]) and tuple(v.shape) != tuple(own[k].shape):
            if not _pass_made(k):
                raise BadInput(f"--init {path}: {k.removeprefix('graph_module.')} has shape {tuple(v.shape)} "
                               f"there but {tuple(own[k].shape)} in this model; the weights are for another model")
            skipped.append(k)
            del state[k]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and not k.startswith("controllers.")]
    unexpected = list(result.unexpected_keys)
    info = {"path": path, "loaded": len(state) - len(unexpected), "missing": missing, "unexpected": unexpected,
            "skipped": skipped}
    line = f"--init {path}: loaded {info['loaded']} tensors"
    if missing:
        line += f"; missing (left as initialised): {_names(missing)}"
    if unexpected:
        line += f"; unexpected (ignored): {_names(unexpected)}"
    if skipped:
        line += f"; of another shape (ignored): {_names(skipped)}"
    return info, line


def _names(keys: List[str], most: int = 8) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


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
