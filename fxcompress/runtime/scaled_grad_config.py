"""The `scaled_grad` treatment's settings, as the policy writes them.

The dataclass lives here, not in the pass, because the runtime keeps it:
each ScaledGrad module holds its weight's ScaledGradConfig (and the
exporter writes it back as a constructor argument), and runtime/ must not
import passes/. Ranges are checked once, by `check()` when the policy is
loaded (fxcompress.config.from_dict); nothing downstream checks again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, check_bits
from ..quantize import FIRST_LAST_BITS, authors_first_last_bits


@dataclass
class ScaledGradConfig:
    """Per node (policy rule key `scaled_grad`)."""

    #: target weight width b: the symmetric grid has 2^b - 1 levels
    bits: int = 4
    #: lambda_s of the paper: the scale is lambda_s * |w - Q(w)| (+ epsilon)
    lambda_s: float = 150.0
    #: added to the scale; 0 as in the authors' code (gradient exactly 0 on the grid)
    epsilon: float = 0.0
    #: optimizer steps (CompressedModel.step() calls) before scaling starts
    start_step: int = 0
    #: "uniform": the b-bit grid; "zero": the sparse variant (grid {0}, scale lambda_s*|w|)
    grid: Literal["uniform", "zero"] = "uniform"
    #: width of the first and last weight layers when bits < 4 (null: no special case)
    first_last_bits: Optional[int] = FIRST_LAST_BITS
    #: also scale the layer's bias (the authors do it for the last linear layer)
    bias: bool = False

    def check(self):
        check_bits("bits", self.bits, 2, 8, "the symmetric grid needs 2^b - 1 >= 3 levels; PSGD targets 2..8 bits")
        if not (math.isfinite(self.lambda_s) and self.lambda_s > 0):
            raise ConfigError("lambda_s", f"must be a positive number, got {self.lambda_s}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError("epsilon", f"must be a number >= 0, got {self.epsilon}")
        if self.start_step < 0:
            raise ConfigError("start_step", f"must be >= 0 optimizer steps, got {self.start_step}")
        if self.first_last_bits is not None:
            check_bits("first_last_bits", self.first_last_bits, 2, 8)

    def width(self, role: str = "") -> int:
        """The width a weight of this role ("first", "last" or "") really
        gets: quantize.authors_first_last_bits (the one copy of the rule) for
        the first and last layer, else `bits`. The pass, the plan table and
        the ScaledGrad module all ask here."""
        special = authors_first_last_bits(self.bits, self.first_last_bits) if role else None
        return self.bits if special is None else special
