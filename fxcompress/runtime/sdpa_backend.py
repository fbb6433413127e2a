"""Which scaled_dot_product_attention backend an op runs under compressed
saves (runtime/activations.py's fxc_save and probe.py's replays)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa_backend(spec, args):
    """Attention under compressed saves runs scaled_dot_product_attention's
    math backend: the fused (flash) backward recomputes the probabilities as
    exp(q k^T - logsumexp) with the forward's exact logsumexp, and from
    quantized q and k that is no longer a softmax (a score error d scales a
    probability by e^d): vit_b_16's gradients overflowed to NaN at 2 bits.
    The math backend saves the softmax output itself (in [0, 1], its error
    linear in the backward). Decided once per node: the SDPA function, or a
    module that is or holds nn.MultiheadAttention or is not torch.nn's own;
    fixed widths only: under `auto` the probe measures each attention's own
    backward at each width (the fused one, amplification included) and
    widens it until within e, and the math backend's extra saved softmax
    measured a larger total error there (tests/test_autoquant.py's ViT: 1.0 e
    against 0.71 e with the fused backward)."""
    attends = getattr(spec, "_attends", None)  # (a spec pickled before this attribute)
    if attends is None:
        attends = spec._fn is torch.nn.functional.scaled_dot_product_attention
        if spec._fn is None and spec._method is None and isinstance(args[0], nn.Module):
            mod = args[0]
            attends = (not type(mod).__module__.startswith("torch.nn.")
                       or any(isinstance(m, nn.MultiheadAttention) for m in mod.modules()))
        attends = attends and spec.settings.mode != "auto"
        if not torch.compiler.is_compiling():
            # cached in eager only: under dynamo the decision is traced once
            # per compile anyway, and an attribute written while tracing
            # would be a side effect dynamo replays
            spec._attends = attends
    # Under torch.compile (fxc_save's compiled branch) the context is traced:
    # AOT autograd then records the math decomposition instead of the fused
    # _scaled_dot_product_flash_attention_for_cpu (or the GPU flash/efficient
    # kernels), for the reason above.
    return sdpa_kernel([SDPBackend.MATH]) if attends else contextlib.nullcontext()
