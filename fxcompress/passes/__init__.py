"""The passes fxcompress runs by default, and how a pass list is chosen.

The list is handed down: compile() and each command call `resolve_passes`
once and give the result to the policy loader, the planner and the manager.
Nothing below this package reads DEFAULT_PASSES, so `compile(passes=[...])`
runs exactly the passes it is given, a test's own pass included.

Order matters and is declared by the passes themselves (`after`/`before`,
checked by manager.check_passes): dual precision first (it copies each
block into two paths, handing the copies its plan entries, so the passes
after it treat both paths), then scaled gradients and masks on the weights
(of both paths), then the activation pass, which wraps the final ops whose
saved tensors it compresses. README "Composing the methods" has the rules.

New passes import from `fxcompress.passes.base`, not from this package.
"""
from typing import Optional, Sequence, Tuple

from .activations import ActivationsPass
from .base import Pass, PassResult, add_submodule, fxc_name  # noqa: F401
from .dual_precision import DualPrecisionPass
from .manager import check_passes, run_passes  # noqa: F401
from .scaled_grad import ScaledGradPass
from .sparsity import SparsityPass

DEFAULT_PASSES: Tuple[type, ...] = (DualPrecisionPass, ScaledGradPass, SparsityPass, ActivationsPass)


def resolve_passes(passes: Optional[Sequence[type]] = None) -> Tuple[type, ...]:
    """The pass list of one compile: `passes`, or DEFAULT_PASSES when None;
    checked (unique names and keys, `after`/`before` honoured)."""
    return check_passes(DEFAULT_PASSES if passes is None else passes)
