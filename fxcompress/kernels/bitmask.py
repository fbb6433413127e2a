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


def pack_mask_gt_stats(x3: torch.Tensor, shape=None):
    """A ReLU result x (viewed as (A, C, B); `shape` its own) read once for both of its saves:
    (pack_mask_gt(x, 0), per-row max|x|, the minimum, per-row count of x > 0),
    the mask and what stats_nnz gives, in one pass on the CPU fast path;
    None where that path does not apply (the caller takes the two calls)."""
    if not (x3.dtype == torch.float32 and x3.dim() == 3 and x3.is_contiguous() and x3.numel()
            and backend_for(x3, _lib) == "c"):
        return None
    n, C = x3.numel(), x3.shape[1]
    bits = torch.empty(-(-n // 8), dtype=torch.uint8)
    amax = torch.empty(C, dtype=torch.float32)
    mn = torch.empty((), dtype=torch.float32)
    nnz = torch.empty(C, dtype=torch.int64)
    if _lib().fxc_pack_gt_stats(x3.data_ptr(), n, C, x3.shape[2], bits.data_ptr(), amax.data_ptr(), mn.data_ptr(),
                                nnz.data_ptr()):
        raise MemoryError("fxc_pack_gt_stats: out of memory for per-thread accumulators")
    return PackedMask(bits, tuple(shape if shape is not None else x3.shape), n), amax, mn, nnz


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
