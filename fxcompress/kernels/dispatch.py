"""The one place that decides: Triton kernel or torch reference.

Triton runs on CUDA tensors. Everything else takes the torch reference,
which is also the oracle the tests compare kernels with. Setting
FXC_FORCE_TRITON=1 (with TRITON_INTERPRET=1 set before triton is imported)
sends CPU tensors through the Triton kernels too, which is how the tests run
the kernels on a machine without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def force_triton() -> bool:
    return os.environ.get("FXC_FORCE_TRITON", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return force_triton() and os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_for(t: torch.Tensor) -> str:
    return "triton" if use_triton(t) else "torch"
