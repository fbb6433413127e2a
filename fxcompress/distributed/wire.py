"""The bit-packed wire format of one quantized gradient tensor.

One message is a flat uint8 tensor:

    [ num_buckets x fp32 norm (little-endian bytes) ][ packed codes ][ 0-3 zero bytes ]

Codes are level indices of `bits` bits. Every 8 consecutive codes (in
coordinate order) fill exactly `bits` bytes, code k of a group sitting at bit
offset bits*k of that little-endian group, so a code spans at most two
adjacent bytes. The code stream is padded with zero codes to a multiple of 8.
A message's size depends only on (numel, bucket_size, bits), which is what an
all_gather of equal-sized tensors needs; norms and codes travel in one
collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config
from ..errors import BadInput

GROUP = 8  # codes per packed group: 8 codes of b bits fill exactly b bytes


@dataclass(frozen=True)
class Layout:
    numel: int
    bucket_size: int
    bits: int

    @property
    def num_buckets(self) -> int:
        return max(1, -(-self.numel // self.bucket_size))

    @property
    def num_groups(self) -> int:
        return -(-self.numel // GROUP)

    @property
    def norm_bytes(self) -> int:
        return 4 * self.num_buckets

    @property
    def code_bytes(self) -> int:
        return self.num_groups * self.bits

    @property
    def pad_bytes(self) -> int:
        # rows of a gathered (world, nbytes) tensor stay 4-byte aligned, so
        # each rank's norms can be viewed as float32 in place
        return (-(self.norm_bytes + self.code_bytes)) % 4

    @property
    def nbytes(self) -> int:
        return self.norm_bytes + self.code_bytes + self.pad_bytes

    def compression_vs_fp32(self) -> float:
        return 4.0 * self.numel / self.nbytes


def check_bits(bits: int) -> int:
    return config.check_bits("bits", bits, 1, 8, "codes are packed into bytes")


def check_bucket_size(bucket_size: int) -> int:
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < GROUP \
            or bucket_size % GROUP:
        raise BadInput(f"bucket_size must be a positive multiple of {GROUP} (each bucket packs into whole "
                       f"bytes), got {bucket_size!r}")
    return bucket_size


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any integer dtype, values < 2^bits) -> packed uint8, reference path."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % GROUP
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, GROUP)
    shifts = torch.arange(GROUP, device=flat.device, dtype=torch.int64) * bits
    # at most 8 x 8 = 64 bits: the top byte may land in int64's sign bit, which
    # is harmless because every byte is masked out again below
    word = (groups << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Packed uint8 -> int64 codes, the first `numel` of them, reference path."""
    check_bits(bits)
    groups = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(GROUP, device=packed.device, dtype=torch.int64) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]


def assemble(norms: torch.Tensor, packed: torch.Tensor, layout: Layout) -> torch.Tensor:
    return torch.cat([norms.to(torch.float32).contiguous().view(torch.uint8), packed,
                      packed.new_zeros(layout.pad_bytes)])


def split(message: torch.Tensor, layout: Layout):
    """message (..., nbytes) uint8 -> (norms (..., num_buckets) fp32, packed (..., code_bytes))."""
    if message.shape[-1] != layout.nbytes:
        raise BadInput(f"message has {message.shape[-1]} bytes, layout {layout} needs {layout.nbytes}")
    norms = message[..., : layout.norm_bytes].view(torch.float32)
    return norms, message[..., layout.norm_bytes: layout.norm_bytes + layout.code_bytes]
