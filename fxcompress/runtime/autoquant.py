"""AutoQuant: per-layer, per-channel bit widths from AC-GC's error bound.

The controller of the activations pass. For every node in `auto` mode it
turns gradient statistics into an error budget dx2 (allowed squared error
per element of the saved tensor), from which `runtime/widths.py` picks the
bits of each channel at every step, with a fresh max|x_c| (SPEC section 1):

- input of convolution(s)/linear(s) i (linear = 1x1 conv; a tensor that
  several convolutions read, like a ResNet block input feeding conv1 and the
  downsample, is one group with one budget, and so is stored once):
      dx2 = e * sum_i |dL/dW_i|^2 / (2 * numel(x) * sum_i u_i |dL/dy_i|^2),
      u_i = kernel area / stride product;
- input of BatchNorm, per channel k: see runtime.widths.bn_dx2;
- any other op (LayerNorm, GELU, attention, ...): no formula; the width is
  measured at statistics steps by replaying the op alone at increasing
  widths until its local gradient error is within e, BatchNorm's criterion
  (runtime/probe.py).

Per tensor, runtime/widths.py turns the budget into widths (the SPEC rule
per channel, then spend_slack: both budgets bound a sum over the tensor, so
the slack whole-bit rounding leaves is spent on the cheapest channels while
the sum stays within the bound); a ReLU output stores only its non-zeros
(the ReLU's mask is shared), and its budget is spread over those.

Statistics schedule: a snapshot is measured in the forward/backward of step
0 and then of every `stats_every`-th step; the budget uses the mean of the
last `window` snapshots (a measured width: the largest in the window). A
node whose statistics step passed no gradient through it is measured again
at the following steps (up to `window` of them). Until its first snapshot
exists, an auto node is stored at the config's `bits`.

Measuring a snapshot (runtime/statistics.py) costs a few tensor hooks (gradient norms of the
outputs, weights and BN inputs) on those steps only.

The controller also reports, for every mode, what the last forward stored:
`saved_mb` (packed), `fp32_mb` (the same saved tensors uncompressed, each
storage once), `ratio` and `avg_bits`.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .activations_config import ActivationsSettings
from .controller import Controller
from .measure import saved_figures
from .probe import measure


def _finite(*values) -> bool:
    """Every statistic (float or tensor) finite: a step with NaN/inf gradients
    (a diverging step, an overflow step of a gradient scaler) is skipped, as
    one where no gradient arrived, so it never reaches the window's means."""
    return all(bool(torch.isfinite(v).all()) if torch.is_tensor(v) else math.isfinite(float(v)) for v in values)


class AutoQuantController(Controller):
    kind = "activations"

    def __init__(self, specs: List[nn.Module], groups: List[List[str]], settings: ActivationsSettings):
        super().__init__()
        # specs are submodules of the graph module already; a plain dict keeps
        # them out of this module's state_dict (no duplicate entries)
        self._specs = {s.node: s for s in specs}
        self.groups = [list(g) for g in groups]  # conv/linear nodes sharing one input
        self.bn_nodes = [s.node for s in specs if s.settings.mode == "auto" and s.rule == "bn"]
        # ops without a bound: widths measured by replaying the op (runtime/probe.py)
        self.probe_nodes = [s.node for s in specs if s.settings.mode == "auto" and s.rule == "quant"]
        self.settings = settings  # stats_every, window (checked when the policy was loaded)
        self.steps = 0
        self.snapshots: Dict[str, deque] = {}
        self._arm()

    @property
    def auto(self) -> bool:
        return bool(self.groups or self.bn_nodes or self.probe_nodes)

    def _units(self) -> List[List[str]]:
        """Nodes that share one snapshot (a conv group), keyed by the first."""
        return [list(g) for g in self.groups] + [[n] for n in self.bn_nodes + self.probe_nodes]

    def _arm(self) -> None:
        """Collect at step 0 and every `stats_every` steps. A node whose
        statistics step saw no gradient through it (a zero-initialised
        classifier head, as in torchvision's ViT, passes none back at step
        0) has no usable snapshot: it is measured again at the next steps,
        up to `window` of them, instead of waiting `stats_every` steps."""
        phase = self.steps % self.settings.stats_every
        for unit in self._units():
            retry = phase < self.settings.window and not self.snapshots.get(unit[0])
            for n in unit:
                self._specs[n].collect = self.auto and (phase == 0 or retry)

    def _collecting(self) -> bool:
        return any(s.collect for s in self._specs.values())

    # --- training-loop hooks ---------------------------------------------------------
    def step(self) -> None:
        if self._collecting():
            self._take_snapshot()
            self._update_budgets()
        self.steps += 1
        self._arm()

    def _take_snapshot(self) -> None:
        for g in self.groups:
            snaps = [self._specs[n].snapshot for n in g]
            if not all("gy2" in s and "gw2" in s for s in snaps):
                continue  # the node did not run with grad this step
            if sum(s["gy2"] for s in snaps) == 0.0:
                continue  # no gradient reached these layers: no information
            rec = {"gw2": sum(s["gw2"] for s in snaps), "uy2": sum(s["u"] * s["gy2"] for s in snaps),
                   "numel": snaps[0]["numel"]}
            if not _finite(rec["gw2"], rec["uy2"]):
                continue  # a NaN/inf gradient says nothing either, and would poison the window
            self.snapshots.setdefault(g[0], deque(maxlen=self.settings.window)).append(rec)
        for n in self.bn_nodes:
            s = self._specs[n].snapshot
            if not all(k in s for k in ("sgx2", "nnz2", "gz2_max", "ggamma2", "inv_std2")) or s["sgx2"] == 0.0:
                continue
            rec = {k: s[k] for k in ("sgx2", "nnz2", "gz2_max", "ggamma2", "inv_std2", "gamma2", "K", "NHW")}
            if not _finite(*rec.values()):
                continue
            self.snapshots.setdefault(n, deque(maxlen=self.settings.window)).append(rec)
        if self.probe_nodes:
            for n in self.probe_nodes:
                got = measure(self._specs[n])  # measured in the backward, as a rule
                if got is not None:
                    self.snapshots.setdefault(n, deque(maxlen=self.settings.window)).append(got)
        for s in self._specs.values():
            s.snapshot = {}

    def _update_budgets(self) -> None:
        for g in self.groups:
            win = self.snapshots.get(g[0])
            if not win:
                continue
            e = 2.0 ** -self._specs[g[0]].settings.eps_bits
            gw2 = sum(r["gw2"] for r in win) / len(win)
            uy2 = sum(r["uy2"] for r in win) / len(win)
            dx2 = e * max(gw2, 1e-16) / (2.0 * win[-1]["numel"] * max(uy2, 1e-16))
            for n in g:
                self._specs[n].dx2 = dx2
        for n in self.bn_nodes:
            win = self.snapshots.get(n)
            if not win:
                continue
            spec = self._specs[n]
            e = 2.0 ** -spec.settings.eps_bits

            def mean(k):
                vals = [r[k] if torch.is_tensor(r[k]) else torch.tensor(float(r[k])) for r in win]
                return torch.stack([v.double() for v in vals]).mean(0)

            spec.bn_terms = {"numer": e * float(mean("sgx2")) * win[-1]["NHW"], "K": float(win[-1]["K"]),
                             "gamma2": mean("gamma2"), "inv_std2": mean("inv_std2"), "nnz2": mean("nnz2"),
                             "gz2_max": mean("gz2_max"), "ggamma2": mean("ggamma2")}
            spec.dx2 = 1.0  # marks "budget known"; the per-channel value comes from bn_terms
        for n in self.probe_nodes:
            win = self.snapshots.get(n)
            if win:
                self._specs[n].measured_bits = int(max(r["bits"] for r in win))

    # --- figures -----------------------------------------------------------------------
    def figures(self) -> Dict[str, float]:
        f = saved_figures(_Holder(self._specs))
        return {"saved_mb": f["stored_bytes"] / 2**20, "fp32_mb": f["fp32_bytes"] / 2**20,
                "ratio": f["ratio"] if f["stored_bytes"] else 0.0, "avg_bits": f["avg_bits"]}

    def report(self) -> Dict[str, Any]:
        f = saved_figures(_Holder(self._specs))
        out = self.figures()
        out["nodes"] = {n: {k: float(v) for k, v in d.items()} for n, d in f["nodes"].items()}
        out["budgets"] = {n: (float(s.dx2) if isinstance(s.dx2, (int, float)) else None)
                          for n, s in self._specs.items() if s.settings.mode == "auto" and s.rule != "quant"}
        out["measured_bits"] = {n: self._specs[n].measured_bits for n in self.probe_nodes}
        out["steps"] = self.steps
        return out

    # --- state -------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {"steps": self.steps,
                "snapshots": {k: [dict(r) for r in v] for k, v in self.snapshots.items()}}

    def load_state(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.steps = int(state.get("steps", 0))
        self.snapshots = {k: deque(v, maxlen=self.settings.window) for k, v in state.get("snapshots", {}).items()}
        self._update_budgets()
        self._arm()


class _Holder(nn.Module):
    """Lets saved_figures walk the specs without registering them here."""

    def __init__(self, specs):
        super().__init__()
        self._list = list(specs.values())

    def modules(self):
        return iter(self._list)
