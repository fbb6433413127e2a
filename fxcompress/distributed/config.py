"""The policy's `communication:` section (SPEC section 4).

```yaml
communication:
  method: alq          # qsgd qsgdinf nuqsgd terngrad alq alqn amq amqn fp32 none
  bits: 3              # per coordinate on the wire (terngrad: always 2)
  bucket_size: 8192    # coordinates sharing one norm
  norm: l2             # l2 or linf; default depends on the method
  refit: {iterations: [0, 100, 2000], every: 10000}
  num_top_buckets: 50
  seed: 0
  distribution: truncnorm   # or empirical (not in the paper; see BENCHMARKS.md)
```

Loaded with `fxcompress.config.from_dict(CommunicationConfig, ...)`; `check()`
does the ranges so a bad section is reported at the policy's line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from ..config import ConfigError, check_bits, check_range

Method = Literal["qsgd", "qsgdinf", "nuqsgd", "terngrad", "alq", "alqn", "amq", "amqn", "fp32", "none"]
METHODS = ("qsgd", "qsgdinf", "nuqsgd", "terngrad", "alq", "alqn", "amq", "amqn", "fp32", "none")
#: methods whose levels are learned from gradient statistics
ADAPTIVE = ("alq", "alqn", "amq", "amqn")
#: full-precision all-reduce: no quantizer at all
FULL_PRECISION = ("fp32", "none")
#: QSGDinf and TernGrad scale by the largest coordinate; the rest by the L2 norm
DEFAULT_NORM = {"qsgdinf": "linf", "terngrad": "linf"}
MAX_BITS = 8  # codes are unpacked from at most two adjacent bytes
MAX_BUCKET = 1 << 24


def default_norm(method: str) -> str:
    return DEFAULT_NORM.get(method, "l2")


@dataclass
class RefitSchedule:
    """When adaptive levels are refit: at each listed iteration, then every `every`."""

    iterations: List[int] = field(default_factory=lambda: [0, 100, 2000])
    every: int = 10_000  # 0: only at the listed iterations

    def check(self) -> None:
        for i, it in enumerate(self.iterations):
            if it < 0:
                raise ConfigError(f"iterations[{i}]", f"must be >= 0, got {it}")
        check_range("every", self.every, 0, 10**12)

    def due(self, iteration: int) -> bool:
        if iteration in self.iterations:
            return True
        last = max(self.iterations, default=0)
        return self.every > 0 and iteration > last and (iteration - last) % self.every == 0


@dataclass
class CommunicationConfig:
    method: Method = "alq"
    bits: Optional[int] = None  # None: 3, or 2 for terngrad
    bucket_size: int = 8192
    norm: Optional[Literal["l2", "linf"]] = None  # None: the method's own
    refit: RefitSchedule = field(default_factory=RefitSchedule)
    num_top_buckets: int = 50
    seed: int = 0
    alq_sweeps: int = 30
    amq_lr: float = 0.7
    amq_epochs: int = 40
    verify_levels: bool = True  # all-reduce the levels each refit to prove all ranks agree
    # the model of f the levels are fit to: SPEC's truncated normals, or the
    # normalised coordinates themselves (an option for heavy-tailed gradients)
    distribution: Literal["truncnorm", "empirical"] = "truncnorm"

    def check(self) -> None:
        if self.method == "terngrad" and self.bits not in (None, 2):
            raise ConfigError("bits", f"terngrad has three levels and always sends 2 bits, got {self.bits}")
        if self.bits is not None:
            check_bits("bits", self.bits, 1, MAX_BITS, "codes of 1..8 bits are packed")
        check_range("bucket_size", self.bucket_size, 8, MAX_BUCKET)
        if self.bucket_size % 8:
            raise ConfigError("bucket_size", f"must be a multiple of 8 so each bucket packs into whole bytes, "
                                             f"got {self.bucket_size}")
        check_range("num_top_buckets", self.num_top_buckets, 1, 1_000_000)
        check_range("seed", self.seed, 0, 2**31 - 1)
        check_range("alq_sweeps", self.alq_sweeps, 1, 10_000)
        check_range("amq_lr", self.amq_lr, 1e-6, 100.0)
        check_range("amq_epochs", self.amq_epochs, 1, 100_000)
        if self.refit is not None:
            try:
                self.refit.check()
            except ConfigError as e:
                raise ConfigError("refit." + e.field, e.message) from None

    @property
    def resolved_bits(self) -> int:
        if self.method == "terngrad":
            return 2
        return 3 if self.bits is None else self.bits

    @property
    def resolved_norm(self) -> str:
        return self.norm or default_norm(self.method)

    @property
    def full_precision(self) -> bool:
        return self.method in FULL_PRECISION
