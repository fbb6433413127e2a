"""Fused kernels: one family per file, each with a torch reference (the
oracle) and Triton and/or C fast paths, chosen in `dispatch.backend_for`."""
from .dispatch import backend_for, triton_available, use_triton  # noqa: F401
