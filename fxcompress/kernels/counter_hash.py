"""The counter-based random stream every stochastic kernel draws from.

One 32-bit finaliser (xor-shift-multiply), `mix32`, turns a counter (an
element's flat index plus a key) into well-mixed bits; the top 24 bits give
u in [0, 1) on a 2^-24 grid, exact in float32. A counter-based stream needs
no state and no full-size random tensor, and every path (torch reference,
C loop, Triton kernel) and every split of the work over threads or
programs draws the same u for the same element. The C files spell the same
finaliser (fxc_mix32 in actpack_cpu.c and gradquant_cpu.c) and the Triton
kernels call `mix32_triton`; tests hold them to this reference.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# multipliers of the finaliser; kept below 2^31 so the int64 products of the
# torch path never overflow
MUL1, MUL2 = 0x7FEB352D, 0x2C1B3C6D
U24 = 1.0 / (1 << 24)


def mix32(h: int) -> int:
    """The finaliser on a Python int (keys, seeds)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * MUL1) & MASK32
    h ^= h >> 15
    h = (h * MUL2) & MASK32
    h ^= h >> 16
    return h


def mix32_tensor(h: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int64 tensor of values < 2^32 (a new tensor;
    in-place steps after one copy: the hash is most of a reference
    encoder's time)."""
    h = h.clone()
    h.bitwise_xor_(h >> 16)
    h.mul_(MUL1).bitwise_and_(MASK32)
    h.bitwise_xor_(h >> 15)
    h.mul_(MUL2).bitwise_and_(MASK32)
    return h.bitwise_xor_(h >> 16)


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """Hashed bits -> u in [0, 1) (float32, 2^-24 grid)."""
    return (h >> 8).to(torch.float32) * U24


_triton_mix = []


def mix32_triton():
    """The finaliser as a Triton jit function (uint32 arithmetic wraps mod
    2^32, which the torch path gets by masking); built on first use."""
    if not _triton_mix:
        # imported here, not at the top (CPU runs need no triton), and made a
        # module global because jit code resolves names among its globals
        global tl
        import triton
        import triton.language as tl  # noqa: F401

        @triton.jit
        def mix(h):
            # literals, not MUL1 / MUL2: jit code cannot read module globals
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x2C1B3C6D
            return h ^ (h >> 16)

        _triton_mix.append(mix)
    return _triton_mix[0]
