"""Runs the passes in the order given, linting and recompiling after each
that changed the graph, and names the pass in any error.

The pass list is handed down, never looked up: compile() (or a command)
resolves it once (`fxcompress.passes.resolve_passes`) and gives the same
list to the policy loader, the planner and `run_passes`.
"""
from __future__ import annotations

import time
from typing import Dict, Sequence, Tuple

import torch.fx as fx

from ..errors import BadInput, FxcError, RunFailure
from ..plan import Plan
from .base import Pass, PassResult


def check_passes(passes: Sequence[type]) -> Tuple[type, ...]:
    """`passes` as a tuple, after checking that each is a Pass subclass, that
    names and policy keys are unique, that a pass with a schedule or settings
    section has a key to name it by, and that every `after`/`before` between
    two passes of the list holds."""
    passes = tuple(passes)
    where: Dict[str, int] = {}
    keys: Dict[str, str] = {}
    for i, cls in enumerate(passes):
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise BadInput(f"pass list: item {i} is {cls!r}, not a Pass subclass")
        if cls.name in where:
            raise BadInput(f"pass list: two passes are named '{cls.name}'")
        where[cls.name] = i
        if cls.key is not None:
            if cls.key in keys:
                raise BadInput(f"pass list: passes '{keys[cls.key]}' and '{cls.name}' both take policy key "
                               f"'{cls.key}'")
            keys[cls.key] = cls.name
        elif cls.schedule_config is not None or cls.settings_config is not None:
            raise BadInput(f"pass '{cls.name}' declares a schedule or settings section but no policy key to "
                           "name it by (set `key`)")
    for i, cls in enumerate(passes):
        for other in cls.after:
            if other in where and where[other] > i:
                raise BadInput(f"pass list: '{cls.name}' must run after '{other}' ({cls.__name__}.after), "
                               f"but the list has {_order(passes)}")
        for other in cls.before:
            if other in where and where[other] < i:
                raise BadInput(f"pass list: '{cls.name}' must run before '{other}' ({cls.__name__}.before), "
                               f"but the list has {_order(passes)}")
    return passes


def _order(passes: Sequence[type]) -> str:
    return " -> ".join(p.name for p in passes)


def run_passes(gm: fx.GraphModule, plan: Plan, passes: Sequence[type]
               ) -> Tuple[fx.GraphModule, Dict[str, PassResult], Dict[str, float]]:
    passes = check_passes(passes)
    results: Dict[str, PassResult] = {}
    timings: Dict[str, float] = {}
    for cls in passes:
        p: Pass = cls()
        if p.key and not plan.selected(p.key):
            continue  # nothing in the plan for this pass
        if p.key and plan.policy is not None:
            # validated by the policy loader, with defaults for absent settings
            p.schedule = plan.policy.schedule.get(p.key)
            p.settings = plan.policy.settings.get(p.key)
        t0 = time.perf_counter()
        try:
            result = p.run(gm, plan)
        except FxcError:
            raise
        except Exception as e:
            raise RunFailure(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        if result is None:
            raise RunFailure(f"pass '{p.name}' returned no PassResult")
        bad = [n for n in result.inserted if not n.startswith("fxc_")]
        if bad:
            raise RunFailure(f"pass '{p.name}' inserted names without the fxc_ prefix: {bad[:3]}")
        if result.modified:
            try:
                gm.graph.lint()
                gm.recompile()
            except Exception as e:
                raise RunFailure(f"pass '{p.name}' left a broken graph: {type(e).__name__}: {e}") from e
        timings[p.name] = time.perf_counter() - t0
        results[p.name] = result
    return gm, results, timings
