"""PSGD at training time: the node the graph calls between a weight and its use.

`ScaledGrad` is identity in forward; its backward multiplies the weight's
gradient by lambda * |w - Q_b(w)| (+ eps), the position-based scale of PSGD
(SPEC section 2), computed by the fused kernel in kernels/scaled_grad.py.

When the range is updated. Once per backward through the node, just
before the gradient is scaled, from the same weights the forward used (the
optimizer has not moved them yet). The authors update their EMA range on
every training forward; in a training loop (forward, backward, step) the two
give the same numbers, and doing it in backward lets one call per step do
range and scale together. What differs, by design: a training-mode forward
that is never differentiated leaves the range alone, and a frozen weight
(no gradient) keeps its range. PSGD still works with a plain training loop
that never calls the controller; the controller's `step()` (after each
optimizer step) only counts steps, which is what `start_step` is measured in.

State. The EMA range is a non-persistent buffer (it follows `.to(device)`),
so the graph module's state_dict keeps exactly the original model's names;
the controller carries the ranges and the step count in its extra state, so
`CompressedModel.state_dict()` still checkpoints all of it.

Speed: one node for all weights. What PSGD adds per weight tensor is a fixed
set of small ops (range, grid step, scale), and on CPU each costs
10-60 us of dispatch whatever the tensor's size. So the pass feeds all
selected weights through one `ScaledGradGroup` node at the top of the graph
(the per-weight `fxc_scaled_grad_*` nodes stay, as identities, so the code
still shows which weight is treated), and one autograd node updates every
range and scales every gradient in backward. On CPU that is one C call
(kernels/scaled_grad_cpu.c, bitwise equal to the torch reference for the
same grid step); elsewhere a handful of `torch._foreach` ops
(`scale_gradients`), with the reference's arithmetic in the same order.
A weight used twice has its range updated once per backward. `ScaledGrad`
alone (outside a group) does the same work for its one weight.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..kernels.dispatch import use_triton
from ..kernels.scaled_grad import CpuBatch, levels_for, quantize_reference, scaled_grad
from .controller import Controller
from .scaled_grad_config import ScaledGradConfig

MOMENTUM = 0.1  # the authors' EMA momentum for the weight range
# delta is clamped away from 0 so an all-zero tensor gives Q = 0, not NaN
TINY = torch.finfo(torch.float32).tiny


class _ScaledGradFn(torch.autograd.Function):
    """One weight: identity forward; backward updates the module's range and,
    once it is active, scales the gradient."""

    @staticmethod
    def forward(ctx, w, module):
        # w itself is saved, not |w - Q(w)|: it is the parameter, so saving it
        # costs no memory, and the scale is recomputed inside the fused kernel.
        ctx.save_for_backward(w)
        ctx.module = module
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        m = ctx.module
        with torch.no_grad():
            m.update_range(w)
        if not m.active:
            return g, None
        return scaled_grad(g, w, m.delta(), m.levels, m.lambda_s, m.epsilon, m.grid == "zero"), None


class _Clock:
    """The optimizer-step count, one object shared by all members of a
    controller: its step() is then one increment, not a module attribute
    write per weight (nn.Module.__setattr__ costs microseconds each)."""

    __slots__ = ("steps",)

    def __init__(self):
        self.steps = 0


class ScaledGrad(nn.Module):
    """Identity on a weight whose gradient gets PSGD's position-based scale.

    config: the node's ScaledGradConfig as the policy loaded it (ranges
    checked there), kept as it is: lambda_s, epsilon (the scale
    lambda*|w - Q(w)| + epsilon), grid ("uniform", or "zero": the sparse
    variant, Q = 0) and start_step (before this many optimizer steps, counted
    by the controller, the gradient passes unchanged) are read from it.
    role: "first", "last" or "" (the first/last-layer rule); `bits`, the grid
    width b (2L + 1 = 2^b - 1 levels), is config.width(role).
    """

    def __init__(self, param_name: str, config: Optional[ScaledGradConfig] = None, role: str = ""):
        super().__init__()
        self.param_name = param_name
        self.config = ScaledGradConfig() if config is None else config
        self.bits = self.config.width(role)
        self.levels = levels_for(self.bits)
        self.role = role  # "first", "last" or "": shown in reports
        self._clock = _Clock()  # the controller hands every member one shared clock
        self._initialized = False
        self.grouped = False  # set by ScaledGradGroup: forward is then the identity
        self._batches = BatchCache()
        # [-r_min, r_max] (both >= 0, so one clamp serves both); persistent=False:
        # see the module docstring
        self.register_buffer("range", torch.zeros(2), persistent=False)
        # The same two flags as tensors, for the compiled path (compile_support):
        # a Python value read there would be a guard, and a guard that changes
        # is a recompile. `started` mirrors `initialized`; `active_t` mirrors
        # `active` and is kept by the controller only when start_step > 0.
        self.register_buffer("started", torch.zeros(1), persistent=False)
        self.register_buffer("active_t", torch.ones(1) if self.start_step == 0 else torch.zeros(1),
                             persistent=False)

    @property
    def initialized(self) -> bool:
        """Whether the EMA range has started. The compiled path sets only the
        `started` tensor; it is read here only while the flag is still False."""
        if not self._initialized and bool(self._buffers["started"]):
            self._initialized = True
        return self._initialized

    @initialized.setter
    def initialized(self, value: bool) -> None:
        self._initialized = bool(value)
        self._buffers["started"].fill_(1.0 if value else 0.0)

    def sync_active(self) -> None:
        """active_t <- active (the controller calls it when the step count moves
        past or back over start_step)."""
        self._buffers["active_t"].fill_(1.0 if self.active else 0.0)

    @property
    def step_count(self) -> int:
        """Optimizer steps counted by the controller (set there: `steps`)."""
        return self._clock.steps

    @property
    def active(self) -> bool:
        return self._clock.steps >= self.start_step

    # the config's values, read where they are kept (no copies to drift)
    lambda_s = property(lambda self: self.config.lambda_s)
    epsilon = property(lambda self: self.config.epsilon)
    grid = property(lambda self: self.config.grid)
    start_step = property(lambda self: self.config.start_step)

    def ema_range(self):
        """(r_min, r_max) as floats."""
        return -float(self.range[0]), float(self.range[1])

    @torch.no_grad()
    def update_range(self, w: torch.Tensor) -> None:
        batch = _cpu_batch(self._batches, (0,), [self], [w])
        if batch is not None:  # the C path, as the group takes: the same ranges bit for bit
            batch.ranges([self.initialized])
            self.initialized = True
            return
        lo, hi = torch.aminmax(w.detach())
        new = torch.stack((lo.neg(), hi)).to(torch.float32).clamp_(min=0.0)  # -min(0, min w), max(0, max w)
        if not self.initialized:
            self.range.copy_(new)  # the first update starts the EMA at the current range
            self.initialized = True
        else:
            self.range.lerp_(new, MOMENTUM)  # r <- (1 - m) r + m new

    def delta(self) -> torch.Tensor:
        """Grid step from the EMA range: max(|r_min|, r_max) / L, one element."""
        return (self.range.amax(0, keepdim=True) / self.levels).clamp_(min=TINY)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.grouped:  # a ScaledGradGroup node did the work on this weight already
            return w
        if not (self.training and torch.is_grad_enabled() and w.requires_grad):
            return w
        if torch.compiler.is_compiling():
            return scaled_grad_compiled([self], [w])[0]
        return _ScaledGradFn.apply(w, self)

    def fxc_constructor(self):
        """For fxcompress.export: the config (written as a ScaledGradConfig
        call) and the role. The step clock is the controller's, which is not
        exported (an exported module starts its own at 0); the EMA range
        travels in the weights file."""
        return (ScaledGrad, (self.param_name, self.config), {"role": self.role})

    def extra_repr(self) -> str:
        return (f"{self.param_name}, bits={self.bits}, lambda_s={self.lambda_s}, epsilon={self.epsilon}, "
                f"grid={self.grid}, start_step={self.start_step}")


_NO_BATCH = object()


class BatchCache(dict):
    """(kind, member indices) -> CpuBatch or None. It holds raw pointers to
    the tensors it was built for, so a copied or pickled module starts with
    an empty cache and builds its own."""

    def __deepcopy__(self, memo):
        return BatchCache()

    def __reduce__(self):
        return (BatchCache, ())


def _cpu_batch(cache: Dict[Any, Any], idx: Tuple[int, ...], members: Sequence["ScaledGrad"],
               ws: Sequence[torch.Tensor]) -> Optional[CpuBatch]:
    """The C batch for these members and weights (cached in `cache` under
    idx, the members' positions), or None when the C path does not apply."""
    b = cache.get(idx, _NO_BATCH)
    # _buffers directly: Module.__getattr__ is slow, and this runs every step
    ranges = [m._buffers["range"] for m in members]
    if b is _NO_BATCH:
        b = CpuBatch.make(ws, ranges, [m.levels for m in members], [m.lambda_s for m in members],
                          [m.epsilon for m in members], [m.grid == "zero" for m in members], MOMENTUM)
        cache[idx] = b
        return b
    if b is not None and not b.matches(ws, ranges):
        return None
    return b


def _mark_initialized(members: Sequence["ScaledGrad"], flags) -> None:
    """After a range update: every member's EMA has started (flags: what
    `initialized` was before it; nothing to write when all were)."""
    if not all(flags):
        for m in members:
            m.initialized = True


def scale_gradients(members: Sequence[ScaledGrad], ws: Sequence[torch.Tensor],
                    gs: Sequence[Optional[torch.Tensor]], deltas: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """g * (lambda * |w - Q(w)| + eps) for many weights at once: kernels.scaled_grad's
    reference arithmetic, op for op in the same order, as one `torch._foreach`
    call per op over all float32 CPU tensors (exactly the same result: the
    foreach ops apply the same elementwise op to each tensor; |q - w| is
    computed in place, equal to |w - q| since IEEE subtraction is
    antisymmetric). Anything else (other dtypes, the Triton path) goes
    through `scaled_grad` tensor by tensor. deltas: one-element tensors."""
    out: List[Optional[torch.Tensor]] = [None] * len(ws)
    uni: List[int] = []
    zero: List[int] = []
    for i, (m, w, g) in enumerate(zip(members, ws, gs)):
        if g is None:
            continue
        if w.dtype == torch.float32 and g.dtype == torch.float32 and g.shape == w.shape and not use_triton(g):
            (zero if m.grid == "zero" else uni).append(i)
        else:
            out[i] = scaled_grad(g, w, deltas[i], m.levels, m.lambda_s, m.epsilon, m.grid == "zero")
    for idx, is_zero in ((uni, False), (zero, True)):
        if not idx:
            continue
        wl = [ws[i] for i in idx]
        if is_zero:
            s = torch._foreach_abs(wl)
        else:
            dl = [deltas[i] for i in idx]
            s = torch._foreach_div(wl, dl)
            torch._foreach_clamp_min_(s, [-float(members[i].levels) for i in idx])
            torch._foreach_clamp_max_(s, [float(members[i].levels) for i in idx])
            torch._foreach_round_(s)
            torch._foreach_mul_(s, dl)  # q = Q(w)
            torch._foreach_sub_(s, wl)
            torch._foreach_abs_(s)
        torch._foreach_mul_(s, [members[i].lambda_s for i in idx])
        eps = [members[i].epsilon for i in idx]
        if any(eps):
            torch._foreach_add_(s, eps)
        torch._foreach_mul_(s, [gs[i] for i in idx])
        for i, t in zip(idx, s):
            out[i] = t
    return out


class _GroupFn(torch.autograd.Function):
    """Identity on the weights (fresh aliases: cheaper for autograd than views
    of the inputs); backward is the group's `_backward`. With a C batch the
    weights are not saved: the batch holds their addresses, and the
    conv/linear calls that read them saved them already, so autograd's check
    that no weight changed before backward still runs there."""

    @staticmethod
    def forward(ctx, group, idx, batch, *ws):
        if batch is None:
            ctx.save_for_backward(*ws)
        ctx.group, ctx.idx, ctx.batch = group, idx, batch
        return tuple(w.detach() for w in ws)

    @staticmethod
    def backward(ctx, *gs):
        ws = None if ctx.batch is not None else ctx.saved_tensors
        return (None, None, None, *ctx.group._backward(ctx.idx, ctx.batch, ws, gs))


class ScaledGradGroup(nn.Module):
    """All PSGD weights of a graph in one node (see the module docstring):
    `forward(*weights)` returns them unchanged; in training with grad it
    hands the weights that need a gradient to one autograd node whose
    backward updates their EMA ranges and scales the active ones' gradients
    together (`_backward`: one C call on CPU, foreach ops elsewhere).
    The members keep their own state (range, step count); they are held in a
    plain list, not as submodules (the graph module owns them)."""

    def __init__(self, members: Sequence[ScaledGrad]):
        super().__init__()
        self._members: List[ScaledGrad] = list(members)
        for m in self._members:
            m.grouped = True
        self._batches = BatchCache()  # C path per member subset (see _cpu_batch)
        self._all = tuple(range(len(self._members)))
        self._levels: Dict[Any, torch.Tensor] = {}
        self._sign: Dict[Any, torch.Tensor] = {}

    @property
    def members(self) -> List[ScaledGrad]:
        return self._members

    def _levels_on(self, device) -> torch.Tensor:
        t = self._levels.get(device)
        if t is None:
            t = torch.tensor([float(m.levels) for m in self._members], dtype=torch.float32, device=device)
            self._levels[device] = t
        return t

    def _sign_on(self, device) -> torch.Tensor:
        t = self._sign.get(device)
        if t is None:
            t = self._sign[device] = torch.tensor([-1.0, 1.0], device=device)
        return t

    @torch.no_grad()
    def update_ranges(self, ws: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every member's EMA range from these weights (as ScaledGrad.update_range,
        batched); returns all grid steps, one float32 tensor of len(members)."""
        return self._ranges(self._all, ws, _cpu_batch(self._batches, self._all, self._members, ws))

    def _ranges(self, idx: Tuple[int, ...], ws: Sequence[torch.Tensor], batch: Optional[CpuBatch]) -> torch.Tensor:
        members = [self._members[i] for i in idx]
        flags = [m.initialized for m in members]
        if batch is not None:
            deltas = batch.ranges(flags)
        else:
            # one aminmax per tensor (cheaper here than foreach max of w and of -w),
            # then every row (min, max) -> (-min, max) and clamped at 0 in two ops
            mm = [t for w in ws for t in torch.aminmax(w.detach())]
            dev = mm[0].device
            new = torch.stack(mm).to(torch.float32).view(len(ws), 2).mul_(self._sign_on(dev)).clamp_(min=0.0)
            ranges = [m.range for m in members]
            news = list(new.unbind(0))
            if all(flags):
                torch._foreach_lerp_(ranges, news, MOMENTUM)
            else:
                for m, r, nw in zip(members, ranges, news):
                    if m.initialized:
                        r.lerp_(nw, MOMENTUM)
                    else:
                        r.copy_(nw)
            rng = torch.stack(ranges)
            levels = self._levels_on(dev)
            if idx != self._all:
                levels = levels[list(idx)]
            deltas = (rng.amax(1) / levels).clamp_(min=TINY)
        _mark_initialized(members, flags)
        return deltas

    def _backward(self, idx: Tuple[int, ...], batch: Optional[CpuBatch], ws: Optional[Sequence[torch.Tensor]],
                  gs: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """Update the ranges of members idx, then scale the active ones' gradients."""
        members = self._members if idx is self._all else [self._members[i] for i in idx]
        active = [m.active for m in members]
        # The C path scales gs in place. That is safe here: these buffers are
        # the weight (or bias) gradients of the conv/linear calls the pass
        # routed through this node (fresh tensors, or autograd's sum of them
        # when a weight has several uses), and nothing else holds them. Not
        # under create_graph, where the gradients are part of a graph.
        if batch is not None and not torch.is_grad_enabled():
            flags = bytes([m.initialized for m in members])
            out = batch.step(gs, flags, bytes(active))
            if out is not None:
                _mark_initialized(members, flags)
                return out
        if ws is None:
            ws = batch.weights()
        with torch.no_grad():
            deltas = self._ranges(idx, ws, batch)
        if not any(active):
            return list(gs)
        on = [i for i, a in enumerate(active) if a]
        d = deltas.unsqueeze(1).unbind(0)
        scaled = scale_gradients([members[i] for i in on], [ws[i] for i in on], [gs[i] for i in on],
                                 [d[i] for i in on])
        out = list(gs)
        for i, t in zip(on, scaled):
            out[i] = t
        return out

    def forward(self, *ws: torch.Tensor):
        if not (self.training and torch.is_grad_enabled()):
            return ws
        if all(w.requires_grad for w in ws):
            idx = self._all
        else:  # frozen weights pass untouched (no gradient, no range update)
            idx = tuple(i for i, w in enumerate(ws) if w.requires_grad)
            if not idx:
                return ws
        sub = ws if idx is self._all else [ws[i] for i in idx]
        members = self._members if idx is self._all else [self._members[i] for i in idx]
        if torch.compiler.is_compiling():
            out = scaled_grad_compiled(members, sub)
        else:
            out = _GroupFn.apply(self, idx, _cpu_batch(self._batches, idx, members, sub), *sub)
        if idx is self._all:
            return out
        full = list(ws)
        for i, t in zip(idx, out):
            full[i] = t
        return tuple(full)

    def fxc_constructor(self):
        """For fxcompress.export: the members, written as references to the
        graph module's own (already rebuilt) ScaledGrad submodules."""
        return (ScaledGradGroup, (list(self._members),), {})

    def extra_repr(self) -> str:
        return ", ".join(m.param_name for m in self._members)


class _CompiledScaleFn(torch.autograd.Function):
    """The compiled path's autograd node: identity on the weights; backward
    scales each gradient by lambda * |w - Q(w)| (+ eps) with the grid step the
    forward computed, as scaled_grad_reference does, op for op, in tensor code
    that dynamo traces and inductor fuses. `consts` per weight: (levels,
    lambda_s, epsilon, zero_grid, gated); gated weights (start_step > 0) take
    their 0/1 `active_t` tensor and pass the gradient unscaled while it is 0."""

    @staticmethod
    def forward(ctx, consts, *tensors):
        n = len(consts)
        ws = tensors[2 * n:]
        ctx.consts = consts
        ctx.save_for_backward(*tensors)
        return tuple(w.view_as(w) for w in ws)

    @staticmethod
    def backward(ctx, *gs):
        consts = ctx.consts
        n = len(consts)
        saved = ctx.saved_tensors
        deltas, acts, ws = saved[:n], saved[n:2 * n], saved[2 * n:]
        out = []
        for (levels, lam, eps, zero, gated), d, a, w, g in zip(consts, deltas, acts, ws, gs):
            if g is None:
                out.append(None)
                continue
            wf = w.to(torch.float32)
            if zero:
                s = wf.abs()
            else:
                q = torch.round(torch.clamp(wf / d, -float(levels), float(levels))) * d
                s = (wf - q).abs()
            s = s * lam
            if eps:
                s = s + eps
            r = (s * g.to(torch.float32)).to(g.dtype)
            if gated:
                r = torch.where(a > 0, r, g)
            out.append(r)
        return (None, *([None] * (2 * n)), *out)


def scaled_grad_compiled(members: Sequence[ScaledGrad], ws: Sequence[torch.Tensor]):
    """PSGD for `ws` as plain tensor code, for torch.compile (fullgraph, no
    recompiles): each member's EMA range is updated here in forward (from the
    same weights the eager path reads in backward: in a training loop the
    same numbers), from tensor state only (`range`, `started`, `active_t`);
    nothing here reads a Python value that changes between steps."""
    deltas, acts, consts = [], [], []
    with torch.no_grad():
        for m, w in zip(members, ws):
            lo, hi = torch.aminmax(w.detach())
            new = torch.stack((lo.neg(), hi)).to(torch.float32).clamp(min=0.0)
            r, started = m._buffers["range"], m._buffers["started"]
            upd = torch.where(started > 0, torch.lerp(r, new, MOMENTUM), new)
            r.copy_(upd)
            started.fill_(1.0)
            deltas.append((upd.amax(0, keepdim=True) / m.levels).clamp(min=TINY))
            acts.append(m._buffers["active_t"])
            consts.append((m.levels, m.lambda_s, m.epsilon, m.grid == "zero", m.start_step > 0))
    return _CompiledScaleFn.apply(tuple(consts), *deltas, *acts, *ws)


def grid_figures(w: torch.Tensor, bits: int, zero_grid: bool = False) -> Dict[str, float]:
    """How close w sits to the grid post-training quantization will use
    (delta from w's own range, as at evaluation): mean |w-Q(w)|/delta,
    fraction within 10 % of delta of a grid point, and the quantization MSE."""
    w = w.detach().to(torch.float32)
    L = levels_for(bits)
    absmax = torch.maximum(-w.min().clamp(max=0), w.max().clamp(min=0))
    delta = (absmax / L).clamp(min=TINY).reshape(1)
    q = torch.zeros_like(w) if zero_grid else quantize_reference(w, delta, L)
    dist = (w - q).abs() / delta
    return {"dist_over_delta": float(dist.mean()), "near_grid": float((dist <= 0.1).float().mean()),
            "quant_mse": float(((w - q) ** 2).mean()), "delta": float(delta)}


class ScaledGradController(Controller):
    """Counts optimizer steps for `start_step` and reports how quantizable the
    weights are. Figures (weighted by tensor size over all PSGD tensors):
    `dist_over_delta` (0.25 for weights spread evenly between grid points,
    falls towards 0 as PSGD pulls them onto the grid), `near_grid` (fraction
    within 0.1 delta of a grid point; 0.2 when spread evenly), `quant_mse`,
    and `active` (fraction of tensors past their start step)."""

    kind = "scaled_grad"

    def __init__(self, layers: Dict[str, ScaledGrad], params: Dict[str, nn.Parameter]):
        super().__init__()
        # Plain dicts, not submodules: the graph module owns these modules and
        # the model owns the parameters; registering them here would duplicate
        # their entries in the CompressedModel's state_dict.
        self._layers: Dict[str, ScaledGrad] = dict(layers)
        self._params: Dict[str, nn.Parameter] = dict(params)
        self._clock = _Clock()
        for m in self._layers.values():
            m._clock = self._clock
        # steps at which some layer starts scaling: its active_t flips then
        self._starts = frozenset(m.start_step for m in self._layers.values() if m.start_step > 0)

    @property
    def layers(self) -> Dict[str, ScaledGrad]:
        return self._layers

    @property
    def steps(self) -> int:
        return self._clock.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._clock.steps = int(value)
        self._sync_active()

    def step(self) -> None:
        self._clock.steps += 1
        if self._clock.steps in self._starts:
            self._sync_active()

    def _sync_active(self) -> None:
        for m in self._layers.values():
            if m.start_step > 0:
                m.sync_active()

    def layer_figures(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, m in self._layers.items():
            f = grid_figures(self._params[name], m.bits, m.grid == "zero")
            out[name] = {"bits": m.bits, "role": m.role, "grid": m.grid, "active": m.active,
                         "ema_range": list(m.ema_range()), **f}
        return out

    def figures(self) -> Dict[str, float]:
        if not self._layers:
            return {}
        per = self.layer_figures()
        sizes = {n: self._params[n].numel() for n in per}
        total = float(sum(sizes.values()))
        fig = {k: sum(per[n][k] * sizes[n] for n in per) / total
               for k in ("dist_over_delta", "near_grid", "quant_mse")}
        fig["active"] = sum(1.0 for m in self._layers.values() if m.active) / len(self._layers)
        return fig

    def report(self) -> Dict[str, Any]:
        return {"steps": self.steps, "figures": self.figures(), "layers": self.layer_figures()}

    def state(self) -> Dict[str, Any]:
        return {"steps": self.steps,
                "layers": {n: {"range": m.range.detach().cpu().clone(), "initialized": m.initialized}
                           for n, m in self._layers.items()}}

    def load_state(self, state: Dict[str, Any]) -> None:
        self._clock.steps = int(state.get("steps", 0))
        self._sync_active()
        for name, s in state.get("layers", {}).items():
            m = self._layers.get(name)
            if m is None:
                continue  # a layer this policy no longer treats
            m.range.copy_(s["range"])
            m.initialized = bool(s["initialized"])
