"""1-bit masks: a boolean tensor (or x > thr straight from floats, a ReLU's
saved result) in one bit per element, flat order, low bit first; decoded
back to booleans or straight to two values (what a ReLU backward reads).
"""
from __future__ import annotations

import torch

from . import bufpool
from .actpack_cpu import lib as _lib
from .dispatch import backend_for
from .fixed_width import pack_codes, pack_codes_reference, unpack_codes

class PackedMask:
    __slots__ = ("bits", "shape", "n")

    def __init__(self, bits, shape, n):
        self.bits, self.shape, self.n = bits, shape, n

    def nbytes(self) -> int:
        return self.bits.numel()


def _mask_pack_ref(m: torch.Tensor) -> torch.Tensor:
    return pack_codes_reference(m.reshape(-1).to(torch.int32), 1, 0)


def _mask_unpack_ref(b: torch.Tensor, n: int) -> torch.Tensor:
    sh = torch.arange(8, device=b.device, dtype=torch.int32)
    return ((b.to(torch.int32).view(-1, 1) >> sh) & 1).reshape(-1)[:n].to(torch.bool)


def pack_mask(m: torch.Tensor) -> PackedMask:
    """A boolean tensor in 1 bit per element."""
    path = backend_for(m, _lib)
    if path == "triton":
        bits = pack_codes(m.to(torch.uint8), 1)[0]
    elif path == "c":
        mb = m.contiguous().view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
        bits = torch.empty(-(-m.numel() // 8), dtype=torch.uint8)
        _lib().fxc_pack_mask(mb.data_ptr(), m.numel(), bits.data_ptr())
    else:
        bits = _mask_pack_ref(m)
    return PackedMask(bits, tuple(m.shape), m.numel())


def pack_mask_gt(x: torch.Tensor, thr: float = 0.0) -> PackedMask:
    """pack_mask(x > thr) in one pass on the CPU fast path (a ReLU's result)."""
    if x.dtype == torch.float32 and x.is_contiguous() and backend_for(x, _lib) == "c":
        bits = torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
        _lib().fxc_pack_gt(x.data_ptr(), x.numel(), float(thr), bits.data_ptr())
        return PackedMask(bits, tuple(x.shape), x.numel())
    return pack_mask(x > thr)


def unpack_mask_values(p: PackedMask, on: float, off: float, dtype=torch.float32) -> torch.Tensor:
    """The mask decoded straight to values: `on` where set, `off` elsewhere."""
    if dtype == torch.float32 and backend_for(p.bits, _lib) == "c":
        out = bufpool.empty((p.n,), torch.float32)
        _lib().fxc_unpack_mask_values(p.bits.data_ptr(), p.n, float(on), float(off), out.data_ptr())
        return out.view(p.shape)
    m = unpack_mask(p)
    return torch.where(m, torch.tensor(on, dtype=dtype, device=m.device), torch.tensor(off, dtype=dtype,
                                                                                        device=m.device))


def unpack_mask(p: PackedMask) -> torch.Tensor:
    path = backend_for(p.bits, _lib)
    if path == "triton":
        return unpack_codes([p.bits], 1, p.n).to(torch.bool).view(p.shape)
    if path == "c":
        out = torch.empty(p.n, dtype=torch.uint8)
        _lib().fxc_unpack_mask(p.bits.data_ptr(), p.n, out.data_ptr())
        return out.view(torch.bool).view(p.shape)
    return _mask_unpack_ref(p.bits, p.n).view(p.shape)
