"""`fxcompress.compile` and the CompressedModel it returns."""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import policy as policy_mod
from .errors import BadInput, RunFailure
from .passes import resolve_passes, run_passes
from .passes.base import PassResult
from .plan import Plan, make_plan
from .policy import Policy
from .report import Report, plan_rows
from .tracing import TraceInfo, propagate_shapes, trace


class CompressedModel(nn.Module):
    """The rewritten model plus the state its passes need while training.

    It shares parameters with the model it was compiled from (like
    torch.fx.GraphModule does), so optimising either trains both.
    """

    def __init__(self, graph_module: fx.GraphModule, plan: Plan, controllers: Dict[str, nn.Module],
                 trace_info: TraceInfo, original_code: str, results: Dict[str, PassResult],
                 timings: Dict[str, float]):
        super().__init__()
        self.graph_module = graph_module
        self.controllers = nn.ModuleDict(controllers)
        self.plan = plan
        self.trace_info = trace_info
        self.original_code = original_code
        self.pass_results = results
        self.timings = timings

    def forward(self, *args, **kwargs):
        compiled = self.__dict__.get("_compiled")  # set by compile(backend=...); not a submodule
        if compiled is not None:
            return compiled(*args, **kwargs)
        return self.graph_module(*args, **kwargs)

    def compile_with(self, backend: Optional[str] = "inductor", **options) -> "CompressedModel":
        """torch.compile the rewritten graph in place (runtime/compile_support.py:
        compile-friendly ops, activation hooks inlined into the compiled graph);
        `backend=None` goes back to eager. Returns self."""
        from .runtime.compile_support import CompiledCall

        self.__dict__["_compiled"] = None if backend is None else CompiledCall(self.graph_module, backend, **options)
        return self

    @property
    def code(self) -> str:
        return self.graph_module.code

    # --- training-loop hooks: fan out to every controller ------------------
    def attach_optimizer(self, optimizer) -> None:
        for c in self.controllers.values():
            c.attach_optimizer(optimizer)

    def on_epoch_start(self, epoch: int) -> None:
        for c in self.controllers.values():
            c.on_epoch_start(epoch)

    def step(self) -> None:
        # runs every optimizer step: _modules directly, not Module.__getattr__
        for c in self._modules["controllers"]._modules.values():
            c.step()

    def on_epoch_end(self, epoch: int) -> None:
        for c in self.controllers.values():
            c.on_epoch_end(epoch)

    def extra_loss(self, outputs, targets) -> Optional[torch.Tensor]:
        terms = [t for c in self._modules["controllers"]._modules.values()
                 if (t := c.extra_loss(outputs, targets)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def snapshot_due(self) -> List[str]:
        return [label for c in self._modules["controllers"]._modules.values()
                if (label := c.snapshot_due()) is not None]

    def plots(self, history, out_dir: str) -> List[str]:
        return [path for c in self.controllers.values() for path in c.plots(history, out_dir)]

    def figures(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, c in self.controllers.items():
            for k, v in c.figures().items():
                out[f"{name}.{k}"] = v
        return out

    def report(self) -> Report:
        """Plan, leaves, pass notes, controller figures: a dict that prints as
        readable tables (fxcompress.report.Report; `.to_dict()` for a plain one)."""
        info = self.trace_info
        return Report(
            auto_leaves=[vars(a) for a in info.auto_leaves],
            leaf_modules=list(info.leaf_modules),
            trace={"fixed_args": dict(info.fixed_args),
                   "leaf_containers": [asdict(c) for c in info.leaf_containers]},
            plan=[e.as_dict() for _, e in plan_rows(self.plan)],  # graph order
            passes={name: {"inserted": r.inserted, "notes": r.notes} for name, r in self.pass_results.items()},
            controllers={name: c.report() for name, c in self.controllers.items()},
            timings_s=dict(self.timings),
        )


def _as_inputs(example_inputs) -> Optional[Tuple[Any, ...]]:
    if example_inputs is None:
        return None
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise BadInput(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def load_policy(source: Union[str, os.PathLike, Dict[str, Any], Policy, None],
                passes: Optional[Sequence[type]] = None) -> Policy:
    """A policy file (or dict) validated against `passes` (default: the
    default pass list), as compile() would load it."""
    return policy_mod.load_policy(source, resolve_passes(passes))


def compile(model: nn.Module, policy: Union[str, Dict[str, Any], Policy, None] = None,
            example_inputs: Union[torch.Tensor, Sequence[Any], None] = None,
            passes: Optional[Sequence[type]] = None, *, dry_run: bool = False,
            backend: Optional[str] = None) -> CompressedModel:
    """Trace `model`, resolve `policy` against its graph and rewrite it.

    `example_inputs` (a tensor or a tuple) fills shapes and dtypes, which the
    plan, the report and shape-dependent passes use. `passes` is the pass
    list (default fxcompress.passes.DEFAULT_PASSES), resolved here once: the
    policy is validated against it, the plan made with it, and exactly these
    passes run, in this order. `dry_run=True` stops after the plan (nothing
    rewritten, no controllers), which validates everything a real run would.
    `backend` ("inductor", "aot_eager", "eager"): also torch.compile the
    result (CompressedModel.compile_with); None: eager.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"compile() takes an nn.Module, got {type(model).__name__}")
    passes = resolve_passes(passes)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    pol = policy_mod.load_policy(policy, passes)
    timings["policy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = _as_inputs(example_inputs)
    gm, info = trace(model, pol.trace.leaf_modules, pol.trace.concrete_args, pol.trace.auto_leaf,
                     n_inputs=None if inputs is None else len(inputs))
    original_code = gm.code
    timings["trace"] = time.perf_counter() - t0
    if inputs is not None:
        t0 = time.perf_counter()
        propagate_shapes(gm, inputs)
        timings["shapes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_plan(gm, pol, passes)
    timings["plan"] = time.perf_counter() - t0
    results: Dict[str, PassResult] = {}
    if not dry_run:
        t0 = time.perf_counter()
        gm, results, _ = run_passes(gm, plan, passes)
        timings["passes"] = time.perf_counter() - t0
    controllers: Dict[str, nn.Module] = {}
    for r in results.values():
        for name, c in r.controllers.items():
            if name in controllers:
                raise RunFailure(f"two passes created a controller named {name!r}")
            controllers[name] = c
    cm = CompressedModel(gm, plan, controllers, info, original_code, results, timings)
    return cm.compile_with(backend) if backend is not None else cm
