"""What a compressed save stores in place of a saved tensor, besides the
packed quantized forms of kernels/actpack.py: the tensor itself, its shape
only, a 1-bit mask, or a max-pool argmax as the offset inside its window."""
from __future__ import annotations

import math

import torch

from ..kernels import actpack


class _Kept:
    """A tensor stored as it is (parameter, tiny, integer)."""

    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


class _ShapeOnly:
    """Backward needs only the shape (and layout) of this tensor."""

    __slots__ = ("shape", "stride", "dtype", "device")

    def __init__(self, t):
        self.shape, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device

    def nbytes(self) -> int:
        return 0


class _Mask:
    """1 bit per element; decoded to `on`/`off` values of the original dtype.
    A ReLU's mask may carry `stats`: ((A, C, B), per-channel max|x|, the
    minimum, per-channel count of x > 0) of the same tensor, taken in the
    same read, for the next op's quantized save of it (not stored bytes: a
    few per channel, for this forward)."""

    __slots__ = ("packed", "on", "off", "dtype", "stride", "stats")

    def __init__(self, packed, on, off, dtype, stats=None):
        self.packed, self.on, self.off, self.dtype, self.stats = packed, on, off, dtype, stats

    def nbytes(self) -> int:
        return self.packed.nbytes()


class _WindowIndex:
    """Max-pool argmax as the offset inside its pooling window."""

    __slots__ = ("parts", "bits", "shape", "geom", "width")

    def __init__(self, parts, bits, shape, geom, width):
        self.parts, self.bits, self.shape, self.geom, self.width = parts, bits, shape, geom, width

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts)


def _nbytes(obj) -> int:
    if isinstance(obj, _Kept):
        return obj.t.numel() * obj.t.element_size()
    return obj.nbytes()



# max-pool indices

def _encode_window_index(idx: torch.Tensor, geom: dict) -> _WindowIndex:
    kh, kw = geom["kernel"]
    bits = max(1, math.ceil(math.log2(kh * kw)))
    local = actpack.window_local(idx, geom)
    return _WindowIndex(actpack.pack_codes(local, bits), bits, tuple(idx.shape), dict(geom), geom["in_w"])


def _decode_window_index(obj: _WindowIndex) -> torch.Tensor:
    n = 1
    for s in obj.shape:
        n *= s
    local = actpack.unpack_codes(obj.parts, obj.bits, n).view(obj.shape)
    return actpack.window_global(local.contiguous(), obj.geom, obj.width)

