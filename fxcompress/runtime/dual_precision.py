"""CAMP at run time: the gate, the per-sample choice, routing, and the RL loss.

A dual block (passes/dual_precision.py) runs as these graph nodes:

    low  = <the block's ops, 1-bit weights and activations, its own norms>(x)
    p    = self.fxc_dual_B.gate(low)                # (B, 2) softmax; gate(x) with the pre-gate
    m    = self.fxc_dual_B(p)                        # (B,) 1 = high path
    xh   = self.fxc_dual_B.route_high(x, m)          # eval: only the samples with m = 1
    high = <the block's ops, 4-bit, the original norms>(xh)
    out  = self.fxc_dual_B.merge(low, high, m)

How m is chosen (`DualBlock.forward`):
- training, supervised ("sp"): hard 0/1 from p_high > 0.5 with the
  straight-through gradient of p_high (m = hard + p - p.detach()).
- training, reinforcement ("rl"): m sampled from Bernoulli(p_high), no
  gradient; log pi(m) is kept for the controller's `extra_loss`.
- eval (both): p_high > 0.5.
In training both paths run on the whole batch and merge as
(1 - m) * low + m * high (BatchNorm in training mode needs the whole batch).
In eval, route_high/route_low pick the samples by index and merge scatters
the results back, so each sample runs only the path its gate chose (the low
path runs for every sample when the gate reads its output; with the pre-gate
it runs only for its own samples). The samples are independent in eval, so
the output equals the masked two-path output (tested); `set_routed(False)`
runs both paths on every sample instead (the timing comparison).

The RL loss (SPEC section 5), per sample b and gate i of N (forward order):
r_i = alpha / N * (1 - a_i), terminal reward -CE_b, return
R_i = sum_{j>=i} gamma^(j-i) r_j + gamma^(N-i) (-CE_b) (0-based i), loss =
sum_i mean_b(-log pi_i,b * w_rl * R_i,b). Each sample is credited with its own
cross-entropy (the authors' code broadcast gives every sample the batch mean).
Option `rl_baseline` (settings; off by default, not in the SPEC): R_i,b -
mean_b R_i,b in place of R_i,b, the usual REINFORCE baseline (same expected
gradient up to the sample's own share of the mean, less variance).
Option `energy` (settings; 0 = off, not in the SPEC; mode sp only): the
supervised loss gets energy * E, E the relative energy (fxcompress/bops.py)
at the batch's hard gate choices; its gradient reaches each gate through the
same straight-through m as the cross-entropy's. Without it the supervised
gates have no reason to pick the low path (every gate ends high). It is the
RL objective's expected value (CE - reward, with each block's saving weighted
by its BOPs instead of alpha / N each), differentiated straight through
instead of by REINFORCE, so it needs no sampling.
Option `energy_target` (settings; 0 = off): the term becomes
energy * max(0, E - energy_target). A batch at or under the budget adds
nothing, so the cross-entropy alone moves the gates there (toward the 4-bit
path, the more accurate one) and the usage settles at the budget instead of
falling on toward all-low as the plain term does with every step.
Option `distill` (settings; 0 = off, not in the SPEC): in training both paths
run on the whole batch, and distill * sum over blocks of
mean((low - high.detach())^2) is added (through extra_loss), so the 1-bit
path learns to give the next block what the 4-bit path gives it.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bops import CostModel
from ..quantizers.dorefa import quantize_activation, quantize_weight
from .controller import Controller

_EPS = 1e-6


class Gate(nn.Module):
    """conv3x3 stride 2 -> BN -> ReLU -> global average pool -> 1x1 conv to 2
    logits -> softmax. `bits` quantizes the 3x3 conv's weights and input and
    the pooled features (DoReFa; None: full precision); `signed` says whether
    its input can be negative.

    The 1x1 head stays full precision (2 x channels MACs, nothing in the
    BOPs): DoReFa k-bit weights are tanh(w) / max|tanh(w)|, so a quantized
    head's logits would have a fixed scale whatever its weights' size. The
    head starts at zero; the first optimizer step would then blow its tiny
    update up to weights of +-1 and saturate every gate (p_high 0.73 -> ~0.005
    in one step on digits), after which REINFORCE has nothing left to sample.
    In full precision the head's size is the gate's confidence, and it grows
    only as fast as the gradients say."""

    def __init__(self, channels: int, hidden: int, bits: Optional[int], signed: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc = nn.Conv2d(hidden, 2, 1)
        self.bits, self.signed = bits, signed
        # start undecided-leaning-high: the block behaves as the 4-bit model it was trained from
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.conv.weight, self.fc.weight
        if self.bits is not None:
            x = quantize_activation(x, self.bits, self.signed)
            w1 = quantize_weight(w1, self.bits)
        h = F.relu(self.bn(F.conv2d(x, w1, None, 2, 1)))
        h = F.adaptive_avg_pool2d(h, 1)
        if self.bits is not None:
            h = quantize_activation(h, self.bits)
        return torch.softmax(F.conv2d(h, w2, self.fc.bias).flatten(1), dim=1)


def _bernoulli(p: torch.Tensor) -> torch.Tensor:
    """One Bernoulli(p) sample per element, as u < p with u uniform: the
    same draws from the same generator state eager and compiled (AOT
    decomposes torch.bernoulli into another use of the generator, so a
    compiled RL step sampled other gates than eager's at the same seed;
    tools/bench_compile.py compares the two)."""
    return (torch.rand_like(p) < p).to(p.dtype)


def _merged(mod: nn.Module) -> bool:
    """Whether Route/Merge combine the two paths by the mask instead of
    routing sub-batches: in training, when routing is off, and under
    torch.compile, where the routed sub-batches' sizes are data-dependent
    (nonzero), which a compiled graph cannot hold without a graph break per
    block (fullgraph failed). Compiled eval gives the same outputs (m is 0
    or 1; tested) without the routed compute saving: routed inference is
    eager's."""
    return mod.training or not mod.routed or torch.compiler.is_compiling()


def _hard(m: torch.Tensor) -> torch.Tensor:
    return m > 0.5


class Route(nn.Module):
    """Training: x as it is. Eval (routed): the samples of x whose choice is
    `high` (m = 1) or not (m = 0)."""

    def __init__(self, high: bool):
        super().__init__()
        self.high = high
        self.routed = True

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if _merged(self):
            return x
        keep = _hard(m) if self.high else ~_hard(m)
        return x[keep.nonzero().squeeze(1)]


class Merge(nn.Module):
    """(1 - m) * low + m * high; in routed eval, scatter the two sub-batches back."""

    def __init__(self, pre_gate: bool):
        super().__init__()
        self.pre_gate = pre_gate
        self.routed = True
        #: the distill option: keep the latest training forward's path outputs
        self.keep = False
        self.pair: Optional[tuple] = None

    def forward(self, low: torch.Tensor, high: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if _merged(self):
            if self.training and self.keep:
                self.pair = (low, high)
            m = m.reshape((-1,) + (1,) * (low.dim() - 1)).to(low.dtype)
            return low * (1 - m) + high * m
        hard = _hard(m)
        hi = hard.nonzero().squeeze(1)
        if self.pre_gate:
            out = high.new_empty((m.shape[0],) + tuple(high.shape[1:]))
            out.index_copy_(0, (~hard).nonzero().squeeze(1), low)
        elif torch.is_grad_enabled() and low.requires_grad:
            out = low.clone()
        else:
            # post-gate inference: the low path's output (every sample) has
            # been read by the gate and nothing else reads it; the high rows
            # go into it, saving a copy of the whole batch
            out = low
        return out.index_copy_(0, hi, high)


class DualBlock(nn.Module):
    """One dual-precision block: its gate, choice, routing, low-path norms and
    quantizers, and gate statistics (non-persistent buffers)."""

    def __init__(self, name: str, gate: Gate, mode: str, pre_gate: bool):
        super().__init__()
        self.block = name
        self.mode = mode
        self.pre_gate = pre_gate
        self.gate = gate
        self.route_high = Route(high=True)
        self.route_low = Route(high=False)
        self.merge = Merge(pre_gate)
        self.low_norms = nn.ModuleDict()   # copies of the block's norms for the low path
        self.quant = nn.ModuleDict()       # weight and activation quantizers of both paths
        self._norm_sources: Dict[str, str] = {}  # low norm key -> original module path
        self.register_buffer("last_usage", torch.zeros(()), persistent=False)
        self.register_buffer("train_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("train_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("eval_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("eval_count", torch.zeros((), dtype=torch.float64), persistent=False)
        #: RL: log pi(a) of the latest training forward (B,), and a
        self.log_prob: Optional[torch.Tensor] = None
        self.action: Optional[torch.Tensor] = None
        #: sp: the latest training forward's m (B,), straight-through (the energy option)
        self.choice: Optional[torch.Tensor] = None
        #: tests and the timing tool: force every sample to one path (0 or 1)
        self.force: Optional[float] = None
        #: warm-up (the controller sets it for the first `warmup_epochs`): in
        #: training each sample takes the high path with this probability,
        #: whatever the gate says, so both paths train before the gate does
        self.warm: Optional[float] = None

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        p = probs[:, 1]
        if self.force is not None:
            m = torch.full_like(p, float(self.force))
        elif not self.training:
            m = _hard(p).to(p.dtype)
        elif self.warm is not None:
            # no gradient to the gate and no log pi: the RL term skips these steps
            m = _bernoulli(torch.full_like(p.detach(), float(self.warm)))
        elif self.mode == "rl":
            a = _bernoulli(p.detach().clamp(_EPS, 1 - _EPS))
            self.action = a
            self.log_prob = a * torch.log(p.clamp_min(_EPS)) + (1 - a) * torch.log((1 - p).clamp_min(_EPS))
            m = a
        else:
            hard = _hard(p).to(p.dtype)
            m = hard + p - p.detach()
            self.choice = m
        with torch.no_grad():
            used = _hard(m).to(torch.float64).sum()
            if self.training:
                self.last_usage.copy_(used / max(m.shape[0], 1))
                self.train_sum.add_(used)
                self.train_count.add_(m.shape[0])
            else:
                self.eval_sum.add_(used)
                self.eval_count.add_(m.shape[0])
        return m

    def set_routed(self, routed: bool) -> None:
        for r in (self.route_high, self.route_low, self.merge):
            r.routed = routed

    def extra_repr(self) -> str:
        return f"block={self.block!r}, mode={self.mode}, pre_gate={self.pre_gate}"

    def fxc_constructor(self):
        """How fxcompress.export rebuilds this block: plain values only; the
        weights file carries the gate, the low-path norms (running stats
        included), PACT clips and the usage counters."""
        gate = {"channels": self.gate.conv.in_channels, "hidden": self.gate.conv.out_channels,
                "bits": self.gate.bits, "signed": self.gate.signed}
        return rebuild_dual_block, (self.block, self.mode, self.pre_gate, gate), {
            "low_norms": {k: (type(m), _init_args(m)) for k, m in self.low_norms.items()},
            "quant": {k: (type(m), _init_args(m)) for k, m in self.quant.items()},
            "norm_sources": dict(self._norm_sources),
            "routed": (self.route_high.routed, self.route_low.routed, self.merge.routed), "force": self.force}


def _init_args(m: nn.Module) -> Dict[str, Any]:
    """The constructor arguments a torch norm or a quantizer keeps as
    same-named attributes; tensors (PACT's alpha) come from the weights file,
    and `bias`/`affine`-style flags stored as a Parameter or None become bools."""
    out = {}
    for p in list(inspect.signature(type(m).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(m, p.name):
            continue
        value = getattr(m, p.name)
        if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if not isinstance(value, torch.Tensor):
            out[p.name] = value
    return out


def rebuild_dual_block(block: str, mode: str, pre_gate: bool, gate: Dict[str, Any],
                       low_norms: Dict[str, Any], quant: Dict[str, Any], norm_sources: Dict[str, str],
                       routed=(True, True, True), force: Optional[float] = None) -> DualBlock:
    """A DualBlock from what `DualBlock.fxc_constructor` returns (the
    exported module.py calls it; values are loaded after)."""
    b = DualBlock(block, Gate(**gate), mode, pre_gate)
    for key, (cls, kwargs) in low_norms.items():
        b.low_norms[key] = cls(**kwargs)
    for key, (cls, kwargs) in quant.items():
        b.quant[key] = cls(**kwargs)
    b._norm_sources = dict(norm_sources)
    b.route_high.routed, b.route_low.routed, b.merge.routed = routed
    b.force = force
    return b


def fill_low_norms(root: nn.Module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook of the graph module. Loading an all-4-bit
    model (no low-path norms in its state_dict): each low path's norms start
    as copies of the block's own loaded norms. On the root module, because a
    module's hook sees only the keys under its own prefix."""
    for name, block in root.named_modules():
        if not isinstance(block, DualBlock):
            continue
        for key, src in block._norm_sources.items():
            for item in block.low_norms[key].state_dict():
                dst, orig = f"{prefix}{name}.low_norms.{key}.{item}", f"{prefix}{src}.{item}"
                if dst not in state_dict and orig in state_dict:
                    state_dict[dst] = state_dict[orig].clone()


def usage_of(sums: torch.Tensor, counts: torch.Tensor) -> Optional[float]:
    c = float(counts)
    return float(sums) / c if c > 0 else None


class DualPrecisionController(Controller):
    """Gate usage and relative energy (figures, report, plots), and the RL term.

    Figures per training step: `usage` (mean over blocks of the fraction of
    samples on the high path) and `energy` (BOPs relative to the all-4-bit
    network at that usage). report(): per block the usage over the last
    training epoch and over the last evaluation, the energy of both, and the
    per-layer BOPs table.
    """

    kind = "dual_precision"

    def __init__(self, blocks: Dict[str, DualBlock], cost: CostModel, mode: str = "sp", alpha: float = 0.1,
                 gamma: float = 1.0, w_rl: float = 0.01, warmup_epochs: int = 0, warmup_high: float = 0.5,
                 rl_baseline: bool = False, distill: float = 0.0, energy: float = 0.0,
                 energy_target: float = 0.0):
        super().__init__()
        self._blocks: Dict[str, DualBlock] = dict(blocks)  # plain dict: the graph module owns them
        self.cost = cost
        self.mode, self.alpha, self.gamma, self.w_rl = mode, alpha, gamma, w_rl
        #: the first warmup_epochs train both paths under a random gate
        #: (high with probability warmup_high) and leave the gate as it is
        self.warmup_epochs, self.warmup_high = warmup_epochs, warmup_high
        self.rl_baseline = rl_baseline
        #: option (not in the SPEC; 0 = off): weight of the per-block feature
        #: distillation mean((low - high.detach())^2), summed over the blocks
        self.distill = distill
        #: option (not in the SPEC; 0 = off; sp): weight of the relative energy in the loss
        self.energy = energy
        #: option (0 = off): only the energy above this budget is penalised
        self.energy_target = energy_target
        for b in self._blocks.values():
            b.merge.keep = distill > 0
        self.epochs: List[Dict[str, Any]] = []  # per epoch: train/test usage per block

    @property
    def blocks(self) -> Dict[str, DualBlock]:
        return self._blocks

    # --- the RL term ---------------------------------------------------------
    def extra_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        blocks = list(self._blocks.values())
        terms = []
        if self.distill > 0 and blocks and all(b.merge.pair is not None for b in blocks):
            # both paths ran on the whole batch (training): the 1-bit path
            # learns the 4-bit path's block output for every sample
            terms.append(self.distill * sum(F.mse_loss(low, high.detach()) for low, high in
                                            (b.merge.pair for b in blocks)))
        for b in blocks:
            b.merge.pair = None
        if self.energy > 0 and self.mode == "sp" and blocks and all(b.choice is not None for b in blocks):
            # the batch's usage per block, straight-through: E is linear in it
            e = self.cost.relative({n: b.choice.mean() for n, b in self._blocks.items()})
            if self.energy_target > 0:
                e = torch.relu(e - self.energy_target)  # under the budget: no term, no gradient
            terms.append(self.energy * e)
        for b in blocks:
            b.choice = None
        if self.mode == "rl" and blocks and not any(b.log_prob is None for b in blocks):
            terms.append(rl_loss(outputs, targets, [b.log_prob for b in blocks], [b.action for b in blocks],
                                 self.alpha, self.gamma, self.w_rl, self._clear, self.rl_baseline))
        return sum(terms[1:], terms[0]) if terms else None

    def _clear(self) -> None:
        for b in self._blocks.values():
            b.log_prob = b.action = None

    # --- figures ---------------------------------------------------------------
    def _usage(self, which: str) -> Dict[str, Optional[float]]:
        return {n: usage_of(getattr(b, which + "_sum"), getattr(b, which + "_count")) for n, b in self._blocks.items()}

    def figures(self) -> Dict[str, float]:
        if not self._blocks:
            return {}
        usage = {n: float(b.last_usage) for n, b in self._blocks.items()}
        return {"usage": sum(usage.values()) / len(usage), "energy": self.cost.relative(usage)}

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 0:
            self.epochs = []  # a new run (weights from --init may carry an old history)
        warm = self.warmup_high if epoch < self.warmup_epochs else None
        for b in self._blocks.values():
            b.warm = warm
            b.train_sum.zero_()
            b.train_count.zero_()

    def on_epoch_end(self, epoch: int) -> None:
        # the evaluation that follows the epoch counts from zero
        self.epochs.append({"epoch": epoch + 1, "train_usage": self._usage("train")})
        for b in self._blocks.values():
            b.eval_sum.zero_()
            b.eval_count.zero_()

    def eval_usage(self) -> Dict[str, Optional[float]]:
        return self._usage("eval")

    def reset_eval(self) -> None:
        for b in self._blocks.values():
            b.eval_sum.zero_()
            b.eval_count.zero_()

    def report(self) -> Dict[str, Any]:
        train, test = self._usage("train"), self._usage("eval")
        out: Dict[str, Any] = {"mode": self.mode, **self.cost.summary(), "blocks": {
            n: {"train_usage": train[n], "test_usage": test[n]} for n in self._blocks}}
        if all(v is not None for v in train.values()):
            out["train_energy"] = self.cost.relative(train)
        if test and all(v is not None for v in test.values()):
            out["test_energy"] = self.cost.relative(test)
            out["test_usage"] = sum(test.values()) / len(test)
        out["layers"] = [c.as_dict() for c in self.cost.layers]
        out["epochs"] = self.epochs
        return out

    def plots(self, history, out_dir: str) -> List[str]:
        from ..plots_dual_precision import write_plots

        return write_plots(history, self.report(), out_dir)

    def state(self) -> Dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.epochs = list(state.get("epochs", []))


def rl_loss(outputs: torch.Tensor, targets: torch.Tensor, log_probs: List[torch.Tensor], actions: List[torch.Tensor],
            alpha: float, gamma: float, w_rl: float, done=None, baseline: bool = False) -> torch.Tensor:
    """The REINFORCE term for N gates (forward order), each sample credited
    with its own terminal reward -CE_b (module docstring); `baseline`
    subtracts each gate's batch-mean return."""
    ce = F.cross_entropy(outputs.detach(), targets, reduction="none")  # (B,): per sample
    n = len(log_probs)
    ret = -ce
    loss = outputs.new_zeros(())
    for i in reversed(range(n)):
        ret = alpha / n * (1 - actions[i]) + gamma * ret
        adv = ret - ret.mean() if baseline else ret
        loss = loss + (-log_probs[i] * w_rl * adv).mean()
    if done is not None:
        done()
    return loss
