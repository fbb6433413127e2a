"""Runs the passes in order, linting and recompiling after each that changed
the graph, and names the pass in any error."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from ..errors import FxcError, RunFailure
from ..plan import Plan
from .base import Pass, PassResult


def run_passes(gm: fx.GraphModule, plan: Plan, passes: Optional[Sequence[type]] = None
               ) -> Tuple[fx.GraphModule, Dict[str, PassResult], Dict[str, float]]:
    if passes is None:
        from . import PASS_ORDER

        passes = PASS_ORDER
    results: Dict[str, PassResult] = {}
    timings: Dict[str, float] = {}
    for cls in passes:
        p: Pass = cls()
        if getattr(cls, "settings_config", None) is not None:  # pass-wide settings, defaults when absent
            p.settings = (plan.policy.settings.get(p.key) if plan.policy else None) or cls.settings_config()
        if p.key and not plan.selected(p.key):
            continue  # nothing in the plan for this pass
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
