"""The gradient quantizers of SPEC section 4 behind one class.

| method   | levels                       | norm | learned        |
|----------|------------------------------|------|----------------|
| qsgd     | uniform linspace(-1, 1, 2^b) | L2   | no             |
| qsgdinf  | uniform                      | Linf | no             |
| nuqsgd   | +-0.5^j                      | L2   | no             |
| terngrad | {-1, 0, 1} (2 bits)          | Linf | no             |
| alq      | any 2^b levels               | L2   | mixture of TN  |
| alqn     | any 2^b levels               | L2   | pooled TN      |
| amq      | +-p^j                        | L2   | mixture of TN  |
| amqn     | +-p^j                        | L2   | pooled TN      |

A quantizer normalises each bucket of `bucket_size` coordinates by its norm,
rounds every coordinate stochastically and without bias to one of the two
levels around it, and sends b-bit codes plus one fp32 norm per bucket
(fxcompress/distributed/wire.py). Encoding and decoding run in
fxcompress/kernels/gradquant.py (Triton on GPU, torch elsewhere).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import BadInput, closest
from ..kernels import gradquant
from . import levels as lv
from .config import ADAPTIVE, FULL_PRECISION, METHODS, CommunicationConfig, default_norm
from .wire import Layout, check_bits, check_bucket_size


def check_method(method: str) -> str:
    if method not in METHODS:
        hint = closest(str(method), METHODS)
        raise BadInput(f"unknown gradient quantization method {method!r}; choose one of {', '.join(METHODS)}"
                       + (f" (did you mean '{hint}'?)" if hint else ""))
    return method


class Quantizer:
    """One method at one bit width; holds the current levels (and AMQ's p)."""

    def __init__(self, method: str = "alq", bits: Optional[int] = None, bucket_size: int = 8192,
                 norm: Optional[str] = None, num_top_buckets: int = 50, alq_sweeps: int = 30,
                 amq_lr: float = 0.7, amq_epochs: int = 40, distribution: str = "truncnorm"):
        self.method = check_method(method)
        if self.method in FULL_PRECISION:
            raise BadInput(f"method {method!r} sends full precision; it has no quantizer")
        if self.method == "terngrad":
            if bits not in (None, 2):
                raise BadInput(f"terngrad has three levels and always sends 2 bits, got bits={bits}")
            bits = 2
        self.bits = check_bits(3 if bits is None else bits)
        self.bucket_size = check_bucket_size(bucket_size)
        self.norm = norm or default_norm(self.method)
        if self.norm not in gradquant.NORMS:
            raise BadInput(f"norm must be l2 or linf, got {self.norm!r}")
        self.num_top_buckets = num_top_buckets
        self.alq_sweeps, self.amq_lr, self.amq_epochs = alq_sweeps, amq_lr, amq_epochs
        if distribution not in ("truncnorm", "empirical"):
            raise BadInput(f"distribution must be truncnorm or empirical, got {distribution!r}")
        self.distribution = distribution
        self.p: Optional[float] = None
        self.set_levels(lv.initial_levels(self.method, self.bits))

    @classmethod
    def from_config(cls, cfg: CommunicationConfig) -> "Quantizer":
        return cls(cfg.method, cfg.resolved_bits, cfg.bucket_size, cfg.resolved_norm, cfg.num_top_buckets,
                   cfg.alq_sweeps, cfg.amq_lr, cfg.amq_epochs, cfg.distribution)

    # ------------------------------------------------------------ levels
    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE

    def set_levels(self, levels) -> None:
        levels = lv.check_levels(levels)
        if len(levels) > (1 << self.bits):
            raise BadInput(f"{len(levels)} levels do not fit in {self.bits} bits")
        self.levels = levels
        # float32 is what both encode paths compare against; keep one copy
        self.levels32 = torch.as_tensor(levels, dtype=torch.float32)

    def stats(self, x: torch.Tensor) -> lv.BucketStats:
        """Per-bucket mean / std / norm of the normalised coordinates of x."""
        flat = x.detach().reshape(-1).to(torch.float32)
        xb = gradquant.bucket_matrix(flat, self.bucket_size)
        norms = gradquant.bucket_norms(xb, self.norm)
        counts = torch.full((xb.shape[0],), float(self.bucket_size), device=xb.device)
        counts[-1] = flat.numel() - (xb.shape[0] - 1) * self.bucket_size  # the partial last bucket
        r = xb / (norms[:, None] + gradquant.EPS)
        mean = r.sum(dim=1) / counts
        var = (r * r).sum(dim=1) / counts - mean * mean
        samples = None
        if self.distribution == "empirical":
            rows = r.cpu().numpy()
            samples = [rows[i, : int(c)].copy() for i, c in enumerate(counts.tolist())]
        return lv.BucketStats(mean.double().cpu().numpy(), var.clamp_min(0).sqrt().double().cpu().numpy(),
                              norms.double().cpu().numpy(), samples)

    def fit(self, stats: lv.BucketStats) -> np.ndarray:
        """Refit the levels of an adaptive method to gradient statistics."""
        if not self.adaptive:
            return self.levels
        levels, p = lv.fit_levels(self.method, self.bits, stats, self.num_top_buckets, self.alq_sweeps,
                                  self.amq_lr, self.amq_epochs, previous_p=self.p,
                                  distribution=self.distribution)
        if p is not None:
            self.p = p
        self.set_levels(levels)
        return self.levels

    # -------------------------------------------------------- encode/decode
    def layout(self, numel: int) -> Layout:
        return Layout(numel, self.bucket_size, self.bits)

    def encode(self, x: torch.Tensor, seed: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x -> one wire message (into `out`, a reused uint8 buffer, if given)."""
        levels = self.levels32.to(x.device)
        return gradquant.encode(x.reshape(-1), levels, self.bits, self.bucket_size, self.norm, seed, out=out)

    def decode(self, messages: torch.Tensor, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of one or more ranks' messages (rows) -> float32 (numel,)
        (into `out` if given)."""
        levels = self.levels32.to(messages.device)
        return gradquant.decode(messages, levels, self.bits, numel, self.bucket_size, out=out)

    def quantize(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Q(x): what a receiver reconstructs, in x's shape and dtype."""
        return self.decode(self.encode(x, seed), x.numel()).view(x.shape).to(x.dtype)

    def expected_error(self, x: torch.Tensor) -> float:
        """E||Q(x) - x||^2 given the current levels, exactly: each coordinate's
        rounding variance (r - lo)(hi - r) scaled by its bucket's norm^2."""
        xb = gradquant.bucket_matrix(x.detach(), self.bucket_size).double()
        norms = gradquant.bucket_norms(xb, self.norm)
        r = (xb / (norms[:, None] + gradquant.EPS)).clamp(-1, 1)
        levels = self.levels32.to(device=xb.device, dtype=torch.float64)
        k = torch.searchsorted(levels[1:-1].contiguous(), r.contiguous(), right=True)
        var = (r - levels[k]) * (levels[k + 1] - r)
        return float((norms ** 2 * var.sum(dim=1)).sum())

    def describe(self) -> dict:
        return {"method": self.method, "bits": self.bits, "bucket_size": self.bucket_size, "norm": self.norm,
                "distribution": self.distribution,
                "levels": [float(v) for v in self.levels], "p": self.p}

    def state_dict(self) -> dict:
        return {"levels": [float(v) for v in self.levels], "p": self.p}

    def load_state_dict(self, state: dict) -> None:
        self.set_levels(state["levels"])
        self.p = state.get("p")
