"""Training-time state that a pass creates and the training loop drives."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn


class Controller(nn.Module):
    """Base class for a pass's training-time state.

    A controller is an nn.Module so that the CompressedModel's state_dict holds
    it: tensors go in buffers, everything else is returned by `state()` and
    restored by `load_state()` (plain Python values and tensors only, so that
    `torch.load(weights_only=True)` reads a checkpoint back).
    The training loop calls, in order: `attach_optimizer` once, then per epoch
    `on_epoch_start`, per training step `extra_loss` (before backward), `step`
    and `snapshot_due` (after the optimizer step), then `on_epoch_end`; and
    `plots` once after training.
    """

    #: short name used in reports and per-epoch lines
    kind: str = "controller"

    def __init__(self):
        super().__init__()
        self.optimizer = None

    # --- hooks the training loop calls -------------------------------------
    def attach_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def step(self) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def extra_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """A term the loop adds to the loss before backward (None: nothing)."""
        return None

    def snapshot_due(self) -> Optional[str]:
        """Called after every `step()`: a label makes the loop save the model's
        weights now as RUN/models/<label>.pt (None: no snapshot)."""
        return None

    def plots(self, history: List[Dict[str, Any]], out_dir: str) -> List[str]:
        """Called once after training with the per-epoch records (their
        "figures" hold this controller's figures()); returns the PNGs written."""
        return []

    # --- figures ------------------------------------------------------------
    def figures(self) -> Dict[str, float]:
        """Numbers the training loop prints per epoch (name -> value)."""
        return {}

    def report(self) -> Dict[str, Any]:
        """Everything worth writing to report.json (JSON-serialisable)."""
        return self.figures()

    # --- state ----------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {}

    def load_state(self, state: Dict[str, Any]) -> None:
        pass

    def get_extra_state(self):
        return self.state()

    def set_extra_state(self, state):
        self.load_state(state)
