"""The passes, in the one order they run.

Order matters: passes that change how weights reach their ops (scaled
gradients, masks, dual precision) run before the activation pass, so that the
activation pass sees the final ops whose saved tensors it compresses.
"""
from .activations import ActivationsPass
from .base import Pass, PassResult, add_submodule, fxc_name  # noqa: F401
from .dual_precision import DualPrecisionPass
from .scaled_grad import ScaledGradPass

PASS_ORDER: list = [ScaledGradPass, DualPrecisionPass, ActivationsPass]  # activations last: it wraps the final ops
