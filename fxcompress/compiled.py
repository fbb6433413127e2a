"""`fxcompress.compile` and the CompressedModel it returns."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from .config import to_dict
from .errors import BadInput, RunFailure
from .passes.base import PassResult
from .plan import Plan, make_plan
from .policy import Policy, load_policy
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

    def figures(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, c in self.controllers.items():
            for k, v in c.figures().items():
                out[f"{name}.{k}"] = v
        return out

    def report(self) -> Dict[str, Any]:
        return {
            "auto_leaves": [vars(a) for a in self.trace_info.auto_leaves],
            "leaf_modules": list(self.trace_info.leaf_modules),
            "plan": self.plan.to_json()["nodes"],
            "passes": {name: {"inserted": r.inserted, "notes": r.notes} for name, r in self.pass_results.items()},
            "controllers": {name: c.report() for name, c in self.controllers.items()},
            "timings_s": dict(self.timings),
        }


def _as_inputs(example_inputs) -> Optional[Tuple[Any, ...]]:
    if example_inputs is None:
        return None
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise BadInput(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def compile(model: nn.Module, policy: Union[str, Dict[str, Any], Policy, None] = None,
            example_inputs: Union[torch.Tensor, Sequence[Any], None] = None,
            passes: Optional[Sequence[type]] = None, backend: Optional[str] = None) -> CompressedModel:
    """Trace `model`, resolve `policy` against its graph and rewrite it.

    `example_inputs` (a tensor or a tuple) fills shapes and dtypes, which the
    plan, the report and shape-dependent passes use. `backend` ("inductor",
    "aot_eager", "eager"): also torch.compile the result
    (CompressedModel.compile_with); None: eager.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"compile() takes an nn.Module, got {type(model).__name__}")
    from .passes.manager import run_passes

    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    pol = load_policy(policy)
    timings["policy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm, info = trace(model, pol.trace.leaf_modules, pol.trace.concrete_args, pol.trace.auto_leaf)
    original_code = gm.code
    timings["trace"] = time.perf_counter() - t0
    inputs = _as_inputs(example_inputs)
    if inputs is not None:
        t0 = time.perf_counter()
        propagate_shapes(gm, inputs)
        timings["shapes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_plan(gm, pol)
    timings["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm, results, pass_times = run_passes(gm, plan, passes)
    timings["passes"] = time.perf_counter() - t0
    controllers: Dict[str, nn.Module] = {}
    for r in results.values():
        for name, c in r.controllers.items():
            if name in controllers:
                raise RunFailure(f"two passes created a controller named {name!r}")
            controllers[name] = c
    cm = CompressedModel(gm, plan, controllers, info, original_code, results, timings)
    return cm.compile_with(backend) if backend is not None else cm
