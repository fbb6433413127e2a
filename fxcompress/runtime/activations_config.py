"""The `activations` treatment's settings, as the policy writes them.

Both dataclasses live here, not in the pass, because the runtime keeps them
too: each SaveSpec holds its node's ActivationsConfig (and the exporter
rebuilds it from a dict), the AutoQuant controller holds the pass-wide
ActivationsSettings. Ranges are checked once, by `check()` when the policy
is loaded (fxcompress.config.from_dict); nothing downstream checks again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check_bits, check_range

#: activation codes are stored packed, 1 to 16 bits per element
ACT_BITS = (1, 16)


@dataclass
class ActivationsConfig:
    """Per node (policy rule key `activations`)."""

    #: fixed: `bits` everywhere; auto: AutoQuant picks per-channel bits from the bound
    mode: Literal["fixed", "auto"] = "fixed"
    #: fixed-mode width; under auto the width of ops without a bound and of the first step
    bits: int = 8
    #: zero-value compression: 1 mask bit per element + `bits` per non-zero
    zvc: bool = False
    granularity: Literal["channel", "group"] = "channel"
    group_size: int = 256
    rounding: Literal["nearest", "stochastic"] = "nearest"
    #: saved tensors with fewer elements are kept as they are
    min_numel: int = 1024
    #: 1-bit masks / window indices / shape-only for ReLU, ReLU6, max- and avg-pool
    masks: bool = True
    #: auto: error bound e = 2^-eps_bits (authors' default 0: e = 1)
    eps_bits: float = 0.0
    max_bits: int = 16

    def check(self):
        check_bits("bits", self.bits, *ACT_BITS, "activation bits are stored packed, 1 to 16 per element")
        check_bits("max_bits", self.max_bits, 2, ACT_BITS[1])
        if self.group_size < 1:
            raise ConfigError("group_size", f"must be a positive integer, got {self.group_size}")
        if self.min_numel < 0:
            raise ConfigError("min_numel", f"must be >= 0, got {self.min_numel}")
        check_range("eps_bits", self.eps_bits, -16, 32, "e = 2^-eps_bits")
        if self.mode == "auto" and self.granularity != "channel":
            raise ConfigError("granularity", "auto mode picks bits per channel; use granularity: channel")


@dataclass
class ActivationsSettings:
    """Pass-wide (policy `settings: {activations: {...}}`): the one AutoQuant
    controller's, which no single node's rule can decide."""

    #: collect statistics at step 0 and every stats_every-th step after
    stats_every: int = 100
    #: the budget uses the mean of the last `window` statistics snapshots
    window: int = 10

    def check(self):
        if self.stats_every < 1:
            raise ConfigError("stats_every", f"must be a positive number of steps, got {self.stats_every}")
        if self.window < 1:
            raise ConfigError("window", f"must be a positive number of snapshots, got {self.window}")
