"""Fused kernels: one family per file, each with a torch reference and a
Triton kernel, chosen in `dispatch.use_triton`."""
from .dispatch import backend_for, triton_available, use_triton  # noqa: F401
