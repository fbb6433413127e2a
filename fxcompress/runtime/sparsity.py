"""AC/DC at training time (SPEC section 3): masked weights and the phase schedule.

`MaskedWeight` is the node the graph calls between a weight and its op:
`w * mask`, with `mask` a boolean buffer (so in the state dict). Plain tensor
code, the same in every phase (a dense phase's mask is all ones), so
torch.compile sees one graph for the whole run and no Python state decides
anything inside it. The multiply also masks the gradient: d(w*m)/dw = m.

`SparsityController` walks the schedule. In a compressed phase the masks are
fixed at its start (fresh, by magnitude) and the weights are multiplied by
them after every optimizer step (weight decay and momentum would otherwise
move pruned weights off zero). At decompression the masks become all ones;
the pruned weights are 0 then and train again from 0, and every momentum
buffer of the optimizer is zeroed, so the first dense step starts from no
momentum (the authors' --reset_momentum_after_recycling: their SGD zeroes the
momentum of all its parameters, biases and BatchNorm included, on the first
step of each decompressed phase).

Phases are counted in epochs (changed at `on_epoch_start`) or in optimizer
steps. In steps, the step that ends a phase is counted in `step()` and the
change is made by the loop's next hook: `snapshot_due()` right after it,
except when it answers "dense" (the loop saves the model first: the "dense"
snapshot is the model after the last step of the last dense phase, exactly
as in epochs); then `figures()`, which the loop asks next, or the next
`step()`/epoch hook. A one-shot forward pre-hook on the masked-weight modules
also makes it before the next forward of a loop that asks neither (eager
mode: torch.compile does not see hooks added after it traced).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..kernels.masks import kept_count, magnitude_scores, nm_mask, topk_masks
from ..plots_sparsity import plot_sparsity
from .controller import Controller

SPARSE, DENSE = "sparse", "dense"


class MaskedWeight(nn.Module):
    """w * mask. One per selected parameter, shared by all its uses."""

    def __init__(self, param_name: str, shape: Sequence[int], device=None):
        super().__init__()
        self.param_name = param_name
        self.register_buffer("mask", torch.ones(tuple(shape), dtype=torch.bool, device=device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask

    def fxc_constructor(self):
        """For fxcompress.export: name and shape; the mask travels in the weights file."""
        return (MaskedWeight, (self.param_name, tuple(self.mask.shape)), {})

    def extra_repr(self) -> str:
        return f"{self.param_name}, shape={tuple(self.mask.shape)}"


@dataclass
class Member:
    """One masked parameter and how its mask is chosen."""

    name: str
    kind: str            # "global", "uniform" or "nm"
    sparsity: float
    n: int
    m: int
    in_dim: int          # the input dimension (N:M groups run along it)
    dense: bool = False  # kept dense (first/last layer of a uniform rule)


def phase_starts(sched) -> List[Tuple[int, str]]:
    """The schedule as (start, phase) pairs, from 0, in order; the last phase
    runs to the end of training."""
    if sched.compress_at:
        marks = [(s, SPARSE) for s in sched.compress_at] + [(s, DENSE) for s in sched.decompress_at]
        marks.sort()
    else:
        w, c, d, f = sched.resolved()
        marks, start = [], w
        while start + c < f:  # a compressed phase that ends before the final one
            marks += [(start, SPARSE), (start + c, DENSE)]
            start += c + d
        marks.append((f, SPARSE))
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, DENSE))
    return marks


class SparsityController(Controller):
    kind = "sparsity"

    def __init__(self, members: List[Member], params: Dict[str, nn.Parameter],
                 modules: Dict[str, MaskedWeight], schedule):
        super().__init__()
        self.members = members
        self.params = params          # not submodules: the graph module owns them
        self.masked = modules
        self.unit = schedule.unit
        self.phases = phase_starts(schedule)
        self.epoch = 0
        self.steps = 0
        self.steps_in_epoch = 0
        self.steps_per_epoch: Optional[int] = None
        self.phase_index = -1
        self.momentum_resets = 0
        self.log: List[Dict[str, Any]] = []  # one entry per phase entered
        self._sparsity = 0.0
        self.emptied: List[str] = []  # layers a mask ever removed completely
        self._hooks: List[Any] = []  # the pending phase change's forward pre-hooks (step units)

    # --------------------------------------------------------------- schedule
    def position(self) -> int:
        return self.epoch if self.unit == "epoch" else self.steps

    def index_at(self, pos: int) -> int:
        i = 0
        for j, (start, _) in enumerate(self.phases):
            if start <= pos:
                i = j
        return i

    def phase(self) -> str:
        return self.phases[max(self.phase_index, 0)][1]

    def _sync(self) -> None:
        i = self.index_at(self.position())
        if i == self.phase_index:
            return
        kind = self.phases[i][1]
        prev = self.phase() if self.phase_index >= 0 else None
        self.phase_index = i
        if kind == SPARSE:
            self.compress()
        elif prev == SPARSE:
            self.decompress()
        self.log.append({"phase": kind, "start": self.position(), "unit": self.unit, "epoch": self.epoch,
                         "step": self.steps, "sparsity": self.measured_sparsity(), **self.counts()})

    # --------------------------------------------------------------- masks
    @torch.no_grad()
    def compress(self) -> None:
        """Fresh masks by magnitude, then the weights multiplied by them."""
        new: Dict[str, torch.Tensor] = {}
        groups: Dict[float, List[Member]] = {}
        for mb in self.members:
            w, old = self.params[mb.name], self.masked[mb.name].mask
            if mb.dense:
                new[mb.name] = torch.ones_like(old)
            elif mb.kind == "global":
                groups.setdefault(mb.sparsity, []).append(mb)
            elif mb.kind == "uniform":
                (new[mb.name],) = topk_masks([magnitude_scores(w, old)], kept_count(w.numel(), mb.sparsity))
            else:
                new[mb.name] = nm_mask(w, mb.n, mb.m, mb.in_dim)
        for s, mbs in groups.items():
            scores = [magnitude_scores(self.params[mb.name], self.masked[mb.name].mask) for mb in mbs]
            k = kept_count(sum(x.numel() for x in scores), s)
            for mb, mask in zip(mbs, topk_masks(scores, k)):
                new[mb.name] = mask
        for name, mask in new.items():
            self.masked[name].mask.copy_(mask)
        self.apply_masks()
        self._sparsity = self._mask_sparsity()
        emptied = [mb.name for mb in self.members if not mb.dense and not bool(self.masked[mb.name].mask.any())]
        fresh = [n for n in emptied if n not in self.emptied]
        if fresh:
            # one global threshold can take a whole small layer (a stem conv, the
            # classifier): the network then cannot learn; say so once per layer
            warnings.warn(f"AC/DC: the mask removed every weight of {', '.join(fresh)} "
                          f"(step {self.steps}); keep them dense with first_last_dense: true or a rule "
                          f"that leaves them out", RuntimeWarning, stacklevel=1)
            self.emptied += fresh

    @torch.no_grad()
    def apply_masks(self) -> None:
        ws = [self.params[mb.name] for mb in self.members]
        ms = [self.masked[mb.name].mask for mb in self.members]
        torch._foreach_mul_(ws, ms)

    @torch.no_grad()
    def decompress(self) -> None:
        for mb in self.members:
            self.masked[mb.name].mask.fill_(True)
        self.reset_momentum()
        self._sparsity = 0.0

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Zero the momentum of every parameter the optimizer holds (SGD's
        momentum_buffer, Adam's first moment), as the authors' SGD does: the
        first dense step then starts without the history of the sparse
        phase, for the restored weights and for the rest of the network."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                for key in ("momentum_buffer", "exp_avg"):
                    if isinstance(st.get(key), torch.Tensor):
                        st[key].zero_()
        self.momentum_resets += 1

    def _mask_sparsity(self) -> float:
        total = sum(self.masked[mb.name].mask.numel() for mb in self.members)
        zeros = sum(int((~self.masked[mb.name].mask).sum()) for mb in self.members)
        return zeros / max(total, 1)

    def measured_sparsity(self) -> float:
        """Zeros among the selected weights, counted now."""
        total = sum(self.params[mb.name].numel() for mb in self.members)
        zeros = sum(int((self.params[mb.name] == 0).sum()) for mb in self.members)
        return zeros / max(total, 1)

    def counts(self) -> Dict[str, int]:
        return {"weights": sum(self.params[mb.name].numel() for mb in self.members),
                "kept": sum(int(self.masked[mb.name].mask.sum()) for mb in self.members)}

    def layer_table(self) -> List[Dict[str, Any]]:
        """Per-layer sparsity of the current masks."""
        rows = []
        for mb in self.members:
            mask = self.masked[mb.name].mask
            rows.append({"weight": mb.name, "kind": "dense" if mb.dense else mb.kind, "numel": mask.numel(),
                         "sparsity": round(1.0 - int(mask.sum()) / mask.numel(), 6)})
        return rows

    # --------------------------------------------------------------- loop hooks
    def attach_optimizer(self, optimizer) -> None:
        super().attach_optimizer(optimizer)
        self._sync()

    def on_epoch_start(self, epoch: int) -> None:
        self.flush()
        self.epoch = epoch
        self.steps_in_epoch = 0
        self._sync()

    def step(self) -> None:
        self.flush()
        self.steps += 1
        self.steps_in_epoch += 1
        if self.phase() == SPARSE:
            self.apply_masks()
        if self.unit == "step":
            self._defer()

    def _defer(self) -> None:
        """The phase ends here: change it at the loop's next hook (module doc).
        (Never in state(): state_dict() reads the masks first.)"""
        if self.index_at(self.steps) != self.phase_index and not self._hooks:
            self._hooks = [m.register_forward_pre_hook(self._pre_forward) for m in self.masked.values()]

    def pending(self) -> bool:
        """A phase change counted in steps and not made yet (see the module doc)."""
        return bool(self._hooks)

    def flush(self) -> None:
        """Make a pending phase change now."""
        if self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._sync()

    def _pre_forward(self, module, args):
        self.flush()  # the first masked weight of the forward: every mask is updated before any is used

    def on_epoch_end(self, epoch: int) -> None:
        self.flush()
        if self.steps_per_epoch is None and self.steps_in_epoch:
            self.steps_per_epoch = self.steps_in_epoch

    def _next_boundary(self) -> Optional[Tuple[int, str]]:
        i = self.phase_index + 1
        return self.phases[i] if 0 <= i < len(self.phases) else None

    def snapshot_due(self) -> Optional[str]:
        """"dense" at the end of the last decompressed phase, "sparse" at the
        end of every epoch of the final compressed phase (the file then holds
        the sparse model at the end of training).

        Both are the model after the last step of their phase. In epochs
        that step is the last of the epoch before the final phase (steps per
        epoch as counted in the first epoch); in steps it is the step whose
        count reaches the final phase's start (the change waits until the
        loop has saved it, so the weights saved are still dense). Any other
        answer makes a pending change now."""
        label = self._due()
        if label != DENSE:
            self.flush()
        return label

    def _due(self) -> Optional[str]:
        nxt = self._next_boundary()
        at_epoch_end = self.steps_per_epoch is not None and self.steps_in_epoch == self.steps_per_epoch
        final_next = nxt is not None and nxt is self.phases[-1] and nxt[1] == SPARSE and self.phase() == DENSE
        if final_next:
            if self.unit == "step" and self.steps == nxt[0]:
                return DENSE
            if self.unit == "epoch" and at_epoch_end and self.epoch + 1 == nxt[0]:
                return DENSE
        if self.phase_index == len(self.phases) - 1 and self.phase() == SPARSE and at_epoch_end:
            return SPARSE
        return None

    # --------------------------------------------------------------- figures
    def figures(self) -> Dict[str, float]:
        self.flush()  # asked after the snapshots were saved: the phase in effect from here
        return {"sparse": 1.0 if self.phase() == SPARSE else 0.0, "sparsity": self._sparsity}

    def report(self) -> Dict[str, Any]:
        return {"phase": self.phase(), "sparsity": self.measured_sparsity(), "unit": self.unit,
                "schedule": [list(p) for p in self.phases], "phases": list(self.log),
                "momentum_resets": self.momentum_resets, "emptied_layers": list(self.emptied),
                "layers": self.layer_table(),
                # {layer: number}: the run's layers.png draws it as a bar chart
                "layer_sparsity": {r["weight"]: r["sparsity"] for r in self.layer_table()}}

    def plots(self, history, out_dir: str) -> List[str]:
        return [plot_sparsity(history, self.phases, self.unit, out_dir)]

    # --------------------------------------------------------------- state
    def state(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "steps_in_epoch": self.steps_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "phase_index": self.phase_index,
                "momentum_resets": self.momentum_resets, "log": list(self.log), "mask_sparsity": self._sparsity,
                "emptied": list(self.emptied)}

    def load_state(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.epoch, self.steps = state["epoch"], state["steps"]
        self.steps_in_epoch, self.steps_per_epoch = state["steps_in_epoch"], state["steps_per_epoch"]
        self.phase_index, self.momentum_resets = state["phase_index"], state["momentum_resets"]
        self.log, self._sparsity = list(state["log"]), state["mask_sparsity"]
        self.emptied = list(state.get("emptied", []))
        if self.unit == "step":
            self._defer()  # saved between a phase's last step and the next forward

