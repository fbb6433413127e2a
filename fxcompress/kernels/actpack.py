"""Activation packing: fused quantize+pack and unpack+dequantize (AC-GC).

Layout. A tensor is viewed as (A, C, B) with one scale per C: per-channel
(NCHW: A=N, C=channels, B=H*W) or per-group (A=1, C=groups, B=group size).
Codes are packed in flat memory order, so no copy is needed to make a
channel contiguous.

Quantizer (SPEC section 1), per scale row c with m_c = max|x_c|:
    signed    q = floor(x*k_c + r) clipped to [-2^(b-1), 2^(b-1)-1],  k_c = 2^(b-1)/(m_c+1e-6)
    unsigned  q = floor(x*k_c + r) clipped to [0, 2^b-1],             k_c = 2^b/(m_c+1e-6)
r = 0.5 (round to nearest) or u in [0,1) (stochastic, unbiased). The stored
code is q + 2^(b-1) (signed) or q; decoding is (code - offset) / k_c.
(Computed as trunc(clamp(x*k + r + offset, 0, 2^b - 1)), see _codes_ref.)

Bit widths. 1, 2, 4 and 8 bits pack 8/b codes into each byte. Any other
width 3..16 is split into power-of-two *slices* (e.g. 7 = 4+2+1 bits,
12 = 8+4): each slice is packed the same way, so every width costs exactly b
bits per element and one kernel template serves all of them.

Randomness. Stochastic rounding draws u from a counter-based hash of
(seed, flat index): no full-size random tensor is created, and the Triton
kernel and the torch reference draw the *same* u for each element, so the
two paths agree bit for bit in both rounding modes.

Three paths, one layout. Triton (CUDA tensors, or CPU under the
interpreter with FXC_FORCE_TRITON=1); on CPU a small C file
(actpack_cpu.c: one loop per pack/unpack, compiled once with the system
compiler, loaded with ctypes; FXC_CPU_FAST=0 turns it off); and the torch
reference, the readable oracle all paths are tested against bit for bit.
torch.compile of the reference was measured as the CPU option and rejected:
with dynamic shapes it generated slow code (0.3-0.5 GB/s), with static ones
every activation shape paid its own 10-60 s compile (see _cpu_lib).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import config
from ..errors import BadInput
from .dispatch import use_triton
from . import bufpool
from .cbuild import cpu_fast_enabled, load_library

EPS = 1e-6
MASK32 = 0xFFFFFFFF
# multipliers of a 32-bit xor-shift-multiply finaliser; below 2^31 so the
# int64 products of the torch path never overflow
_M1, _M2 = 0x6C8E9CF5, 0x2D2A5F3B
ROUNDINGS = ("nearest", "stochastic")


# ----------------------------------------------------------------- helpers

def check_bits(bits: int) -> None:
    """Entry guard of the public pack functions (a policy's widths were checked at load)."""
    config.check_bits("activation bits", bits, 1, 16)


def slices(bits: int) -> List[Tuple[int, int]]:
    """(width, shift) of each power-of-two slice of a `bits`-bit code, high first."""
    check_bits(bits)
    out, rem = [], bits
    for w in (8, 8, 4, 2, 1):
        if rem >= w:
            rem -= w
            out.append((w, rem))
    return out


def mix_seed(seed: int) -> int:
    """A 32-bit key from any integer seed (the kernels only see the key)."""
    h = (seed * 0x9E3779B1 + 0x7F4A7C15) & MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 15
    return h


def uniform_reference(idx: torch.Tensor, key: int) -> torch.Tensor:
    """u in [0,1) on a 2^-24 grid (exact in float32) for each int64 index."""
    h = (idx + key) & MASK32
    h = h ^ (h >> 16)
    h = (h * _M1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _M2) & MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def multipliers(amax: torch.Tensor, bits: int, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """k_c (scaled grid units per unit of x) and 1/k_c, both float32."""
    levels = float(1 << (bits - 1)) if signed else float(1 << bits)
    k = levels / (amax.to(torch.float32) + EPS)
    return k, 1.0 / k


def _qrange(bits: int, signed: bool) -> Tuple[float, float, int]:
    if signed:
        return -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1), 1 << (bits - 1)
    return 0.0, float((1 << bits) - 1), 0


# ---------------------------------------------------- torch reference (CPU)
# Each function is one fused loop under torch.compile; eager they are correct
# but slow. Arguments that change the generated code (bits, widths, flags)
# are plain Python ints so that each combination compiles once.

def _codes_ref(x3: torch.Tensor, k: torch.Tensor, bits: int, signed: bool, stoch: bool, key: int) -> torch.Tensor:
    """int32 codes in flat order for x viewed as (A, C, B).

    code = trunc(clamp(x*k + r + off, 0, 2^bits - 1)): the offset is added
    before clamping so that truncation is floor; every path does these float
    operations in this order, which keeps them bitwise equal."""
    v = x3.to(torch.float32) * k.view(1, -1, 1)
    if stoch:
        idx = torch.arange(x3.numel(), device=x3.device, dtype=torch.int64).view(x3.shape)
        v = v + uniform_reference(idx, key)
    else:
        v = v + 0.5
    off = _qrange(bits, signed)[2]
    v = (v + float(off)).clamp_(0.0, float((1 << bits) - 1))
    return v.to(torch.int32).reshape(-1)


def _pack_codes_ref(codes: torch.Tensor, width: int, shift: int) -> torch.Tensor:
    """Pack slice (codes >> shift) & (2^width-1), 8/width per byte, low bits first."""
    per = 8 // width
    n = codes.numel()
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    s = (codes.view(-1, per) >> shift) & ((1 << width) - 1)
    sh = torch.arange(per, device=codes.device, dtype=torch.int32) * width
    return (s << sh).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _quant_pack_ref(x3, k, bits: int, signed: bool, stoch: bool, key: int) -> List[torch.Tensor]:
    codes = _codes_ref(x3, k, bits, signed, stoch, key)
    return [_pack_codes_ref(codes, w, s) for w, s in slices(bits)]


def _unpack_codes_ref(parts: Sequence[torch.Tensor], bits: int, n: int) -> torch.Tensor:
    codes = None
    for (w, s), p in zip(slices(bits), parts):
        per = 8 // w
        sh = torch.arange(per, device=p.device, dtype=torch.int32) * w
        c = ((p.to(torch.int32).view(-1, 1) >> sh) & ((1 << w) - 1)).reshape(-1)[:n]
        c = c << s
        codes = c if codes is None else codes | c
    return codes


def _unpack_dequant_ref(parts, kinv, bits: int, signed: bool, shape3: Tuple[int, int, int], dtype):
    n = shape3[0] * shape3[1] * shape3[2]
    codes = _unpack_codes_ref(parts, bits, n)
    off = _qrange(bits, signed)[2]
    return ((codes - off).to(torch.float32).view(shape3) * kinv.view(1, -1, 1)).to(dtype)


def _stats_ref(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row max|x| and the global minimum (signed or not), in one read."""
    xf = x3.to(torch.float32)
    return xf.abs().amax(dim=(0, 2)), xf.amin()


# ------------------------------------------------- CPU fused path (C, ctypes)

_SRC = os.path.join(os.path.dirname(__file__), "actpack_cpu.c")


def _declare(lib) -> None:
    import ctypes

    P, I64, I, U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    lib.fxc_quant_pack.argtypes = [P, P, I64, I64, I64, I, I, I, I, I, U32, P]
    lib.fxc_pack_codes.argtypes = [P, I64, I, I, P]
    lib.fxc_unpack_codes.argtypes = [P, I64, I, I, I, P]
    lib.fxc_unpack_dequant.argtypes = [P, P, I64, I64, I64, I, I, P]
    lib.fxc_dequant_codes.argtypes = [P, P, I64, I64, I64, I, I, P]
    lib.fxc_pack_mask.argtypes = [P, I64, P]
    lib.fxc_unpack_mask.argtypes = [P, I64, P]
    lib.fxc_stats.argtypes = [P, I64, I64, I64, P, P]
    lib.fxc_dequant_scatter.argtypes = [P, P, I64, I64, I64, P, I64, I, I, P]
    lib.fxc_unpack_scatter.argtypes = [P, P, P, I, P, I64, I64, I64, P, I64, I, I, P]
    lib.fxc_unpack_mask_values.argtypes = [P, I64, ctypes.c_float, ctypes.c_float, P]
    lib.fxc_pack_gt.argtypes = [P, I64, ctypes.c_float, P]
    lib.fxc_stats_nnz.argtypes = [P, I64, I64, I64, P, P, P]
    lib.fxc_group_widths.argtypes = [I64, P, P, I, ctypes.c_float, P, P, P, P, P, P, P]
    lib.fxc_group_widths.restype = I
    lib.fxc_window_local.argtypes = [P, I64, I64, I64, I64, I, I, I, I, I, I, I, P]
    lib.fxc_window_global.argtypes = [P, I64, I64, I64, I64, I, I, I, I, I, I, I, P]
    lib.fxc_window_local.restype = lib.fxc_window_global.restype = None
    for f, extra in (("fxc_mixed_pack", [P, P, I64, I64, I64, P, I, P, P, P, P, P, I, I, P, P]),
                     ("fxc_mixed_unpack", [P, P, P, P, P, I64, I64, I64, P, I, P, P, I, P]),
                     ("fxc_mixed_zvc_pack", [P, P, I64, I64, I64, P, I, P, P, P, P, P, P, I, P, P]),
                     ("fxc_mixed_zvc_unpack", [P, P, P, P, P, I64, I64, I64, P, I, P, P, P, P])):
        getattr(lib, f).argtypes = extra
        getattr(lib, f).restype = I
    for f in ("fxc_quant_pack", "fxc_pack_codes", "fxc_unpack_codes", "fxc_unpack_dequant",
              "fxc_dequant_codes", "fxc_pack_mask", "fxc_unpack_mask", "fxc_stats",
              "fxc_unpack_mask_values", "fxc_dequant_scatter", "fxc_unpack_scatter", "fxc_stats_nnz",
              "fxc_pack_gt"):
        getattr(lib, f).restype = None


def _cpu_lib():
    """The compiled C loops, or None (no compiler: the torch reference runs).

    Built and loaded by kernels/cbuild.py. Measured alternatives
    (ARCHITECTURE.md recipe, 8 MB tensor, 1 thread): eager torch
    0.06-0.7 GB/s; torch.compile with dynamic shapes 0.3-0.5 GB/s; static
    shapes 1.8 GB/s but one 10-60 s compile per tensor shape."""
    return load_library(_SRC, "actpack", _declare)


def _use_c(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and cpu_fast_enabled() and _cpu_lib() is not None


def _quant_pack_c(x3, k, bits, signed, stoch, key) -> List[torch.Tensor]:
    lib = _cpu_lib()
    xf = x3.contiguous()
    if xf.dtype != torch.float32:
        xf = xf.float()
    k = k.contiguous()
    n = xf.numel()
    out = []
    for w, s in slices(bits):
        o = torch.empty(-(-n // (8 // w)), dtype=torch.uint8)
        lib.fxc_quant_pack(xf.data_ptr(), k.data_ptr(), n, x3.shape[1], x3.shape[2], bits, w, s,
                           int(signed), int(stoch), key, o.data_ptr())
        out.append(o)
    return out


def _unpack_codes_c(parts, bits, n) -> torch.Tensor:
    lib = _cpu_lib()
    codes = torch.empty(n, dtype=torch.int32)
    for i, ((w, s), p) in enumerate(zip(slices(bits), parts)):
        lib.fxc_unpack_codes(p.contiguous().data_ptr(), n, w, s, int(i == 0), codes.data_ptr())
    return codes


def _unpack_dequant_c(parts, kinv, bits, signed, shape3, dtype) -> torch.Tensor:
    lib = _cpu_lib()
    n = shape3[0] * shape3[1] * shape3[2]
    out = bufpool.empty(shape3, torch.float32)
    kinv = kinv.contiguous()
    if len(parts) == 1:
        lib.fxc_unpack_dequant(parts[0].data_ptr(), kinv.data_ptr(), n, shape3[1], shape3[2], bits,
                               int(signed), out.data_ptr())
    else:
        codes = _unpack_codes_c(parts, bits, n)
        lib.fxc_dequant_codes(codes.data_ptr(), kinv.data_ptr(), n, shape3[1], shape3[2], bits,
                              int(signed), out.data_ptr())
    return out if dtype == torch.float32 else out.to(dtype)


def _pack_codes_c(codes: torch.Tensor, bits: int) -> List[torch.Tensor]:
    lib = _cpu_lib()
    c = codes.reshape(-1).to(torch.int32).contiguous()
    n = c.numel()
    out = []
    for w, s in slices(bits):
        o = torch.empty(-(-n // (8 // w)), dtype=torch.uint8)
        lib.fxc_pack_codes(c.data_ptr(), n, w, s, o.data_ptr())
        out.append(o)
    return out


def stats_nnz(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """stats() plus the per-row count of elements > 0 (int64), in the same read."""
    if x3.dtype == torch.float32 and x3.is_contiguous() and x3.numel() and _use_c(x3):
        amax = torch.empty(x3.shape[1], dtype=torch.float32)
        mn = torch.empty((), dtype=torch.float32)
        nnz = torch.empty(x3.shape[1], dtype=torch.int64)
        _cpu_lib().fxc_stats_nnz(x3.data_ptr(), x3.numel(), x3.shape[1], x3.shape[2], amax.data_ptr(),
                                 mn.data_ptr(), nnz.data_ptr())
        return amax, mn, nnz
    amax, mn = _stats_ref(x3)
    return amax, mn, (x3 > 0).sum(dim=(0, 2))


def stats(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row max|x| and the global minimum (is the tensor signed?)."""
    if x3.dtype == torch.float32 and x3.is_contiguous() and x3.numel() and _use_c(x3):
        amax = torch.empty(x3.shape[1], dtype=torch.float32)
        mn = torch.empty((), dtype=torch.float32)
        _cpu_lib().fxc_stats(x3.data_ptr(), x3.numel(), x3.shape[1], x3.shape[2], amax.data_ptr(), mn.data_ptr())
        return amax, mn
    return _stats_ref(x3)


# ------------------------------------------------------------ Triton kernels

_kernels = {}


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def pack_kernel(x_ptr, k_ptr, out_ptr, n, n_bytes, C, B, key, shift,
                    BITS: tl.constexpr, W: tl.constexpr, SIGNED: tl.constexpr, STOCH: tl.constexpr,
                    RAW: tl.constexpr, BLOCK: tl.constexpr):
        # One template for every width: BITS is the code width, W the width
        # of the slice this launch packs (1, 2, 4 or 8), RAW packs integer
        # codes given as input (masks, zvc codes) instead of quantizing.
        PER: tl.constexpr = 8 // W
        pid = tl.program_id(0)
        byte = pid * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, PER)
        idx = byte[:, None].to(tl.int64) * PER + j[None, :]
        m = idx < n
        if RAW:
            code = tl.load(x_ptr + idx, mask=m, other=0).to(tl.int32)
        else:
            x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
            c = (idx // B) % C
            k = tl.load(k_ptr + c, mask=m, other=0.0)
            v = x * k
            if STOCH:
                # the same 32-bit hash as uniform_reference, in uint32 arithmetic
                h = ((idx + key) & 0xFFFFFFFF).to(tl.uint32)
                h = h ^ (h >> 16)
                h = h * 0x6C8E9CF5
                h = h ^ (h >> 15)
                h = h * 0x2D2A5F3B
                h = h ^ (h >> 16)
                v = v + (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
            else:
                v = v + 0.5
            q = v + (2.0 ** (BITS - 1) if SIGNED else 0.0)
            q = tl.minimum(tl.maximum(q, 0.0), 2.0 ** BITS - 1.0)
            code = q.to(tl.int32)
        s = (code >> shift) & ((1 << W) - 1)
        s = tl.where(m, s, 0)
        val = tl.sum(s << (j * W)[None, :], axis=1)
        tl.store(out_ptr + byte, val.to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def unpack_kernel(in_ptr, acc_ptr, out_ptr, kinv_ptr, n, C, B, shift,
                      BITS: tl.constexpr, W: tl.constexpr, SIGNED: tl.constexpr, FIRST: tl.constexpr,
                      LAST: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr):
        # Slices are added into an int32 accumulator; the LAST launch
        # dequantizes (or, RAW, writes the integer codes).
        PER: tl.constexpr = 8 // W
        pid = tl.program_id(0)
        e = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        m = e < n
        b = tl.load(in_ptr + e // PER, mask=m, other=0).to(tl.int32)
        code = ((b >> ((e % PER).to(tl.int32) * W)) & ((1 << W) - 1)) << shift
        if not FIRST:
            code = code | tl.load(acc_ptr + e, mask=m, other=0)
        if LAST:
            if RAW:
                tl.store(out_ptr + e, code, mask=m)
            else:
                off = 2.0 ** (BITS - 1) if SIGNED else 0.0
                kinv = tl.load(kinv_ptr + (e // B) % C, mask=m, other=0.0)
                tl.store(out_ptr + e, (code.to(tl.float32) - off) * kinv, mask=m)
        else:
            tl.store(acc_ptr + e, code, mask=m)

    return pack_kernel, unpack_kernel


def _get_kernels():
    if not _kernels:
        _kernels["pack"], _kernels["unpack"] = _build_kernels()
    return _kernels["pack"], _kernels["unpack"]


# Large blocks: under TRITON_INTERPRET=1 programs run one at a time.
_BLOCK_BYTES = 4096
_BLOCK_ELEMS = 16384


def _quant_pack_triton(x3, k, bits, signed, stoch, key, raw=False) -> List[torch.Tensor]:
    import triton

    pack_kernel, _ = _get_kernels()
    xf = x3.contiguous().reshape(-1)
    n = xf.numel()
    C, B = (x3.shape[1], x3.shape[2]) if x3.dim() == 3 else (1, 1)
    out = []
    for w, s in slices(bits):
        nb = -(-n // (8 // w))
        o = torch.empty(nb, dtype=torch.uint8, device=x3.device)
        grid = (max(1, triton.cdiv(nb, _BLOCK_BYTES)),)
        pack_kernel[grid](xf, k if k is not None else xf, o, n, nb, C, B, key, s,
                          BITS=bits, W=w, SIGNED=bool(signed), STOCH=bool(stoch), RAW=bool(raw),
                          BLOCK=_BLOCK_BYTES)
        out.append(o)
    return out


def _unpack_triton(parts, kinv, bits, signed, shape3, dtype, raw=False) -> torch.Tensor:
    import triton

    _, unpack_kernel = _get_kernels()
    n = shape3[0] * shape3[1] * shape3[2]
    dev = parts[0].device
    sl = slices(bits)
    acc = torch.empty(n if len(sl) > 1 else 1, dtype=torch.int32, device=dev)
    out = torch.empty(n, dtype=torch.int32 if raw else torch.float32, device=dev)
    grid = (max(1, triton.cdiv(n, _BLOCK_ELEMS)),)
    for i, ((w, s), p) in enumerate(zip(sl, parts)):
        unpack_kernel[grid](p, acc, out, kinv if kinv is not None else out, n, shape3[1], shape3[2], s,
                            BITS=bits, W=w, SIGNED=bool(signed), FIRST=(i == 0), LAST=(i == len(sl) - 1),
                            RAW=bool(raw), BLOCK=_BLOCK_ELEMS)
    return out.view(shape3).to(dtype) if not raw else out


# ------------------------------------------------------------- public API

class Packed:
    """A quantized tensor: packed slices plus what decoding needs."""

    __slots__ = ("parts", "kinv", "bits", "signed", "shape", "shape3", "dtype", "stride")

    def __init__(self, parts, kinv, bits, signed, shape, shape3, dtype, stride=None):
        self.parts, self.kinv, self.bits, self.signed = parts, kinv, bits, signed
        self.shape, self.shape3, self.dtype, self.stride = shape, shape3, dtype, stride

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts) + (self.kinv.numel() * 4 if self.kinv is not None else 0)


def view3(x: torch.Tensor, granularity: str, group_size: int = 256, channel_dim: int = 1) -> torch.Tensor:
    """x as (A, C, B) with one scale per C (x must be contiguous)."""
    n = x.numel()
    if granularity == "group" or x.dim() < 2:
        g = min(group_size, n) if granularity == "group" else n
        if n % g:
            # ragged tail: fall back to the largest divisor, never a copy
            g = next(d for d in range(g, 0, -1) if n % d == 0)
        return x.view(1, n // g, g)
    if granularity != "channel":
        raise BadInput(f"granularity must be 'channel' or 'group', got {granularity!r}")
    cd = channel_dim % x.dim()
    a = 1
    for s in x.shape[:cd]:
        a *= s
    return x.view(a, x.shape[cd], n // (a * x.shape[cd]))


def quant_pack(x3: torch.Tensor, bits: int, rounding: str = "nearest", seed: int = 0,
               amax: Optional[torch.Tensor] = None, signed: Optional[bool] = None,
               shape=None) -> Packed:
    """Quantize x (viewed as (A, C, B)) to `bits` per element and pack it."""
    check_bits(bits)
    if rounding not in ROUNDINGS:
        raise BadInput(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not x3.is_floating_point():
        raise BadInput(f"quant_pack takes floating tensors, got {x3.dtype}")
    if amax is None or signed is None:
        a, mn = stats(x3)
        amax = a if amax is None else amax
        signed = bool(mn < 0) if signed is None else signed
    k, kinv = multipliers(amax, bits, signed)
    stoch = rounding == "stochastic"
    key = mix_seed(seed) if stoch else 0
    if use_triton(x3):
        parts = _quant_pack_triton(x3, k, bits, signed, stoch, key)
    elif _use_c(x3):
        parts = _quant_pack_c(x3, k, bits, signed, stoch, key)
    else:
        parts = _quant_pack_ref(x3, k, bits, signed, stoch, key)
    return Packed(parts, kinv, bits, signed, tuple(shape if shape is not None else x3.shape),
                  tuple(x3.shape), x3.dtype)


def unpack(p: Packed) -> torch.Tensor:
    if use_triton(p.parts[0]):
        out = _unpack_triton(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    elif _use_c(p.parts[0]):
        out = _unpack_dequant_c(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    else:
        out = _unpack_dequant_ref(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    return out.reshape(p.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> List[torch.Tensor]:
    """Pack non-negative integer codes < 2^bits (masks, indices, zvc codes)."""
    check_bits(bits)
    flat = codes.reshape(-1)
    if use_triton(flat):
        return _quant_pack_triton(flat.view(1, 1, -1), None, bits, False, False, 0, raw=True)
    if _use_c(flat):
        return _pack_codes_c(flat, bits)
    flat = flat.to(torch.int32)
    return [_pack_codes_ref(flat, w, s) for w, s in slices(bits)]


def unpack_codes(parts: Sequence[torch.Tensor], bits: int, n: int) -> torch.Tensor:
    """int32 codes back from `pack_codes`."""
    if use_triton(parts[0]):
        return _unpack_triton(parts, None, bits, False, (1, 1, n), torch.int32, raw=True)
    if _use_c(parts[0]):
        return _unpack_codes_c(parts, bits, n)
    return _unpack_codes_ref(parts, bits, n)


# ---------------------------------------------------------------- 1-bit masks

class PackedMask:
    __slots__ = ("bits", "shape", "n")

    def __init__(self, bits, shape, n):
        self.bits, self.shape, self.n = bits, shape, n

    def nbytes(self) -> int:
        return self.bits.numel()


def _mask_pack_ref(m: torch.Tensor) -> torch.Tensor:
    return _pack_codes_ref(m.reshape(-1).to(torch.int32), 1, 0)


def _mask_unpack_ref(b: torch.Tensor, n: int) -> torch.Tensor:
    sh = torch.arange(8, device=b.device, dtype=torch.int32)
    return ((b.to(torch.int32).view(-1, 1) >> sh) & 1).reshape(-1)[:n].to(torch.bool)


def pack_mask(m: torch.Tensor) -> PackedMask:
    """A boolean tensor in 1 bit per element."""
    if use_triton(m):
        bits = pack_codes(m.to(torch.uint8), 1)[0]
    elif _use_c(m):
        mb = m.contiguous().view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
        bits = torch.empty(-(-m.numel() // 8), dtype=torch.uint8)
        _cpu_lib().fxc_pack_mask(mb.data_ptr(), m.numel(), bits.data_ptr())
    else:
        bits = _mask_pack_ref(m)
    return PackedMask(bits, tuple(m.shape), m.numel())


def pack_mask_gt(x: torch.Tensor, thr: float = 0.0) -> PackedMask:
    """pack_mask(x > thr) in one pass on the CPU fast path (a ReLU's result)."""
    if x.dtype == torch.float32 and x.is_contiguous() and _use_c(x) and not use_triton(x):
        bits = torch.empty(-(-x.numel() // 8), dtype=torch.uint8)
        _cpu_lib().fxc_pack_gt(x.data_ptr(), x.numel(), float(thr), bits.data_ptr())
        return PackedMask(bits, tuple(x.shape), x.numel())
    return pack_mask(x > thr)


def unpack_mask_values(p: PackedMask, on: float, off: float, dtype=torch.float32) -> torch.Tensor:
    """The mask decoded straight to values: `on` where set, `off` elsewhere."""
    if p.bits.device.type == "cpu" and dtype == torch.float32 and _use_c(p.bits):
        out = bufpool.empty((p.n,), torch.float32)
        _cpu_lib().fxc_unpack_mask_values(p.bits.data_ptr(), p.n, float(on), float(off), out.data_ptr())
        return out.view(p.shape)
    m = unpack_mask(p)
    return torch.where(m, torch.tensor(on, dtype=dtype, device=m.device), torch.tensor(off, dtype=dtype,
                                                                                        device=m.device))


def unpack_mask(p: PackedMask) -> torch.Tensor:
    if use_triton(p.bits):
        return unpack_codes([p.bits], 1, p.n).to(torch.bool).view(p.shape)
    if _use_c(p.bits):
        out = torch.empty(p.n, dtype=torch.uint8)
        _cpu_lib().fxc_unpack_mask(p.bits.data_ptr(), p.n, out.data_ptr())
        return out.view(torch.bool).view(p.shape)
    return _mask_unpack_ref(p.bits, p.n).view(p.shape)


# ----------------------------------------------------- zero-value compression

class PackedZVC:
    """Zero-value compression: 1 mask bit per element plus `bits` per non-zero."""

    __slots__ = ("mask", "codes", "nnz", "kinv", "bits", "signed", "shape", "shape3", "dtype")

    def __init__(self, mask, codes, nnz, kinv, bits, signed, shape, shape3, dtype):
        self.mask, self.codes, self.nnz, self.kinv = mask, codes, nnz, kinv
        self.bits, self.signed, self.shape, self.shape3, self.dtype = bits, signed, shape, shape3, dtype

    def nbytes(self) -> int:
        return self.mask.nbytes() + sum(c.numel() for c in self.codes) + self.kinv.numel() * 4


def zvc_pack(x3: torch.Tensor, bits: int, rounding: str = "nearest", seed: int = 0,
             amax: Optional[torch.Tensor] = None, signed: Optional[bool] = None, shape=None) -> PackedZVC:
    check_bits(bits)
    if amax is None or signed is None:
        a, mn = stats(x3)
        amax = a if amax is None else amax
        signed = bool(mn < 0) if signed is None else signed
    k, kinv = multipliers(amax, bits, signed)
    nz = x3 != 0
    stoch = rounding == "stochastic"
    key = mix_seed(seed) if stoch else 0
    # Codes of every element, then only the non-zeros kept: the code of an
    # exact zero decodes to exactly zero, so the mask restores them losslessly.
    codes = _codes_ref(x3, k, bits, signed, stoch, key)
    nzc = codes[nz.reshape(-1)]
    return PackedZVC(pack_mask(nz), pack_codes(nzc, bits), int(nzc.numel()), kinv, bits, signed,
                     tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype)


def zvc_unpack(p: PackedZVC) -> torch.Tensor:
    n = p.shape3[0] * p.shape3[1] * p.shape3[2]
    off = _qrange(p.bits, p.signed)[2]
    codes = torch.full((n,), off, dtype=torch.int32, device=p.kinv.device)
    if p.nnz:
        codes[unpack_mask(p.mask).reshape(-1)] = unpack_codes(p.codes, p.bits, p.nnz)
    x = (codes - off).to(torch.float32).view(p.shape3) * p.kinv.view(1, -1, 1)
    return x.to(p.dtype).reshape(p.shape)


# ----------------------------------------------------- per-channel bit widths

class PackedMixed:
    """Channels grouped by bit width (AutoQuant): one Packed per width."""

    __slots__ = ("groups", "shape", "shape3", "dtype", "C", "order", "c_args")

    def __init__(self, groups, shape, shape3, dtype, C, order=None):
        self.groups, self.shape, self.shape3, self.dtype, self.C = groups, shape, shape3, dtype, C
        # the groups' channel indices as one int32 tensor (their idx are views
        # of it), and the C unpack's arguments, when the C path made it
        self.order = order
        self.c_args = None

    def nbytes(self) -> int:
        return sum(p.nbytes() + idx.numel() * 4 for idx, p in self.groups)

    def element_bits(self) -> float:
        """Average stored bits per element (payload only)."""
        n = self.shape3[0] * self.shape3[1] * self.shape3[2]
        return 8.0 * sum(sum(q.numel() for q in p.parts) for _, p in self.groups) / max(n, 1)


def mixed_pack(x3: torch.Tensor, bits_c: torch.Tensor, rounding: str = "nearest", seed: int = 0,
               amax: Optional[torch.Tensor] = None, signed: Optional[bool] = None, shape=None) -> PackedMixed:
    """x (A, C, B) with channel c stored at bits_c[c] bits (1..16)."""
    if amax is None or signed is None:
        a, mn = stats(x3)
        amax = a if amax is None else amax
        signed = bool(mn < 0) if signed is None else signed
    if x3.dtype == torch.float32 and x3.is_contiguous() and _use_c(x3) and not use_triton(x3):
        return _mixed_pack_c(x3, bits_c.detach(), rounding, seed, amax, signed, shape)
    # grouping in numpy: a few thousand channels, where torch's per-op
    # overhead showed in the step time
    bnp = np.clip(bits_c.detach().cpu().numpy().astype(np.int64), 1, 16)
    widths = np.unique(bnp).tolist()
    groups = []
    for i, b in enumerate(widths):
        if len(widths) == 1:
            idx = torch.arange(x3.shape[1], device=x3.device)
            groups.append((idx.to(torch.int32), quant_pack(x3, int(b), rounding, seed + i, amax, signed)))
            continue
        idx = torch.from_numpy(np.nonzero(bnp == b)[0]).to(x3.device)
        sub = x3.index_select(1, idx)  # one copy of these channels only
        groups.append((idx.to(torch.int32), quant_pack(sub, int(b), rounding, seed + i, amax[idx], signed)))
    return PackedMixed(groups, tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype,
                       x3.shape[1])


_SLICE_ARRAYS: dict = {}


def _slice_arrays(widths: Tuple[int, ...]):
    """(bits, nparts, slice widths, slice shifts) C arrays, stride 5 per
    group, for a tuple of group widths (cached: the same few recur)."""
    import ctypes

    arr = _SLICE_ARRAYS.get(widths)
    if arr is None:
        G = len(widths)
        sls = [slices(b) + [(0, 0)] * (5 - len(slices(b))) for b in widths]
        arr = ((ctypes.c_int * G)(*widths), (ctypes.c_int * G)(*[len(slices(b)) for b in widths]),
               (ctypes.c_int * (5 * G))(*[w for sl in sls for w, _ in sl]),
               (ctypes.c_int * (5 * G))(*[h for sl in sls for _, h in sl]))
        _SLICE_ARRAYS[widths] = arr
    return arr


class _Groups:
    """Width groups of a per-channel-width tensor laid out for one C call
    (fxc_group_widths): channels sorted by width (stable, so ascending within
    a group, as the per-group path has them), group starts, per group its
    width and slices, and k, 1/k of every channel in sorted order (what
    multipliers() gives each width group, bit for bit)."""

    def __init__(self, bits: torch.Tensor, amax: torch.Tensor, signed: bool, nnz: Optional[torch.Tensor] = None):
        C = bits.numel()
        b64 = bits if (bits.dtype == torch.int64 and bits.is_contiguous()) else bits.to(torch.int64).contiguous()
        b64 = b64.clamp(1, 16)
        a = amax if (amax.dtype == torch.float32 and amax.is_contiguous()) else amax.to(torch.float32).contiguous()
        self.order = torch.empty(C, dtype=torch.int32)
        self.start = np.empty(17, dtype=np.int64)
        widths = np.empty(16, dtype=np.int32)
        self.k = torch.empty(C, dtype=torch.float32)
        self.kinv = torch.empty(C, dtype=torch.float32)
        self.gnnz = None
        n64 = None
        if nnz is not None:
            n64 = nnz if (nnz.dtype == torch.int64 and nnz.is_contiguous()) else nnz.to(torch.int64).contiguous()
            self.gnnz = np.zeros(16, dtype=np.int64)
        G = _cpu_lib().fxc_group_widths(C, b64.data_ptr(), a.data_ptr(), int(signed), EPS, self.order.data_ptr(),
                                        self.start.ctypes.data, widths.ctypes.data, self.k.data_ptr(),
                                        self.kinv.data_ptr(), None if n64 is None else n64.data_ptr(),
                                        None if self.gnnz is None else self.gnnz.ctypes.data)
        self.G = G
        self.widths = [int(w) for w in widths[:G]]
        self.slices = [slices(w) for w in self.widths]
        self.c_start = self.start.ctypes.data
        self.c_bits, self.c_np, self.c_w, self.c_sh = _slice_arrays(tuple(self.widths))


def _alloc_parts(grp: _Groups, counts: Sequence[int]):
    """One byte buffer for every group's slices; per group its part views
    (counts: codes per group) and the out-pointer array (stride 5)."""
    import ctypes

    sizes = [[-(-n // (8 // w)) for w, _ in sl] for sl, n in zip(grp.slices, counts)]
    buf = torch.empty(sum(map(sum, sizes)), dtype=torch.uint8)
    base, off = buf.data_ptr(), 0
    parts, ptrs = [], []
    for sz in sizes:
        ps = []
        for nb in sz:
            ps.append(buf[off:off + nb])
            ptrs.append(base + off)
            off += nb
        ptrs.extend([None] * (5 - len(sz)))
        parts.append(ps)
    return parts, (ctypes.c_void_p * len(ptrs))(*ptrs)


def _unpack_args(grp: _Groups, outs):
    """What the one-call unpack needs, made once at pack time (the pointers
    stay valid while the packed object holds its parts and scales)."""
    import ctypes

    kinv = grp.kinv.data_ptr()
    return (outs, grp.c_w, grp.c_sh, grp.c_np,
            (ctypes.c_void_p * grp.G)(*[kinv + 4 * int(grp.start[g]) for g in range(grp.G)]),
            grp.start, grp.c_bits)


def _mixed_pack_c(x3, bits_c, rounding, seed, amax, signed, shape) -> PackedMixed:
    """mixed_pack's C path: every width group in one call, bit for bit the
    per-group packing (same channel order, k, seeds)."""
    import ctypes

    stoch = rounding == "stochastic"
    A, C, B = x3.shape
    grp = _Groups(bits_c, amax, signed)
    st = grp.start
    parts, outs = _alloc_parts(grp, [A * int(st[g + 1] - st[g]) * B for g in range(grp.G)])
    keys = (ctypes.c_uint32 * grp.G)(*[mix_seed(seed + i) if stoch else 0 for i in range(grp.G)])
    rc = _cpu_lib().fxc_mixed_pack(x3.data_ptr(), grp.k.data_ptr(), A, C, B, grp.order.data_ptr(), grp.G,
                                   grp.c_start, grp.c_bits, grp.c_np, grp.c_w, grp.c_sh, int(signed), int(stoch),
                                   keys, outs)
    if rc:
        raise MemoryError("fxc_mixed_pack: out of memory for a channel index")
    groups = []
    for g, b in enumerate(grp.widths):
        s, e = int(st[g]), int(st[g + 1])
        sh3 = (A, e - s, B)
        groups.append((grp.order[s:e], Packed(parts[g], grp.kinv[s:e], b, signed, sh3, sh3, x3.dtype)))
    out = PackedMixed(groups, tuple(shape if shape is not None else x3.shape), tuple(x3.shape), x3.dtype, C,
                      grp.order)
    out.c_args = _unpack_args(grp, outs)
    return out


def _group_arrays(groups, order):
    """(order32, start, bits, nparts, widths, shifts, parts, kinv) C arrays
    for fxc_mixed_unpack / fxc_mixed_zvc_unpack from stored groups."""
    import ctypes

    G = len(groups)
    if order is None:
        order = torch.cat([g[0] for g in groups]).to(torch.int32)
    start = np.zeros(G + 1, dtype=np.int64)
    np.cumsum([g[0].numel() for g in groups], out=start[1:])
    packs = [g[1] for g in groups]
    bits, nps, w, sh = _slice_arrays(tuple(p.bits for p in packs))
    parts = (ctypes.c_void_p * (5 * G))(*_part_ptrs(packs))
    kinv = [p.kinv if p.kinv.is_contiguous() else p.kinv.contiguous() for p in packs]
    return (order, start, bits, nps, w, sh, parts, (ctypes.c_void_p * G)(*[t.data_ptr() for t in kinv]), kinv)


def _part_ptrs(packs):
    out = []
    for p in packs:
        ptrs = [q.data_ptr() for q in p.parts]
        out.extend(ptrs + [None] * (5 - len(ptrs)))
    return out


def mixed_unpack(p: PackedMixed) -> torch.Tensor:
    if p.dtype == torch.float32 and len(p.groups) > 1 and _use_c(p.groups[0][0]) \
            and not use_triton(p.groups[0][1].parts[0]):
        A, C, B = p.shape3
        if p.c_args is not None:  # made at pack time
            parts, w, sh, nps, kinv, start, bits = p.c_args
            order = p.order
        else:
            order, start, bits, nps, w, sh, parts, kinv, keep = _group_arrays(p.groups, p.order)
        out = bufpool.empty(p.shape3, torch.float32)
        rc = _cpu_lib().fxc_mixed_unpack(parts, w, sh, nps, kinv, A, C, B, order.data_ptr(), len(p.groups),
                                         start.ctypes.data, bits, int(p.groups[0][1].signed), out.data_ptr())
        if rc:
            raise MemoryError("fxc_mixed_unpack: out of memory for a channel index")
        return out.reshape(p.shape)
    if len(p.groups) == 1:
        return unpack(p.groups[0][1]).reshape(p.shape)
    dev = p.groups[0][0].device
    out = torch.empty(p.shape3, dtype=p.dtype, device=dev)
    for idx, g in p.groups:
        out.index_copy_(1, idx.to(torch.int64), unpack(g))
    return out.reshape(p.shape)


# ------------------------------- per-channel bits, zeros given by a shared mask

class PackedMixedZVC:
    """AutoQuant widths with zero-value packing for an unsigned tensor whose
    non-zero pattern is already stored as a 1-bit mask by another save (the
    ReLU that produced it): only the codes of the elements > 0 are kept, per
    width group, and `mask` is a reference to that shared mask (its bytes
    belong to the save that made it, and are counted there, once)."""

    __slots__ = ("groups", "mask", "shape", "shape3", "dtype", "C", "order", "c_args")

    def __init__(self, groups, mask, shape, shape3, dtype, C, order=None):
        self.groups, self.mask, self.shape, self.shape3, self.dtype, self.C = groups, mask, shape, shape3, dtype, C
        self.order, self.c_args = order, None  # as PackedMixed's

    def nbytes(self) -> int:
        """Codes, scales and channel indices; not the shared mask."""
        return sum(sum(q.numel() for q in g.parts) + g.kinv.numel() * 4 + idx.numel() * 4
                   for idx, g, _ in self.groups)


def mixed_zvc_pack(x3: torch.Tensor, bits_c: torch.Tensor, mask: PackedMask, nnz_c: torch.Tensor,
                   rounding: str = "nearest", seed: int = 0, amax: Optional[torch.Tensor] = None,
                   shape=None) -> PackedMixedZVC:
    """x (A, C, B) >= 0, channel c at bits_c[c] bits, only the elements > 0
    stored; `mask` holds (x > 0) (1 bit per element, flat order) and nnz_c
    the count of elements > 0 per channel. The stochastic draw of an element
    is indexed by its position in its width group (zeros included)."""
    if rounding not in ROUNDINGS:
        raise BadInput(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if amax is None:
        amax = stats(x3)[0]
    stoch = rounding == "stochastic"
    if x3.dtype == torch.float32 and x3.is_contiguous() and _use_c(x3) and not use_triton(x3):
        return _mixed_zvc_pack_c(x3, bits_c.detach(), nnz_c.detach(), mask, stoch, seed, amax, shape)
    bnp = np.clip(bits_c.detach().cpu().numpy().astype(np.int64), 1, 16)
    nnp = nnz_c.detach().cpu().numpy().astype(np.int64)
    A, C, B = x3.shape
    groups = []
    for i, b in enumerate(np.unique(bnp).tolist()):
        b = int(b)
        inp = np.nonzero(bnp == b)[0]
        idx = torch.from_numpy(inp).to(x3.device)
        k, kinv = multipliers(amax[idx], b, False)
        key = mix_seed(seed + i) if stoch else 0
        nnz = int(nnp[inp].sum())
        sub = x3.index_select(1, idx)
        codes = _codes_ref(sub, k, b, False, stoch, key)[(sub > 0).reshape(-1)]
        parts = pack_codes(codes, b) if nnz else [torch.empty(0, dtype=torch.uint8, device=x3.device)
                                                   for _ in slices(b)]
        groups.append((idx.to(torch.int32), Packed(parts, kinv, b, False, (A, idx.numel(), B), (A, idx.numel(), B),
                                                   x3.dtype), nnz))
    return PackedMixedZVC(groups, mask, tuple(shape if shape is not None else x3.shape), tuple(x3.shape),
                          x3.dtype, C)


def _mixed_zvc_pack_c(x3, bits_c, nnz_c, mask, stoch, seed, amax, shape) -> PackedMixedZVC:
    """mixed_zvc_pack's C path: every width group in one call, bit for bit
    the per-group packing (same channel order, k, seeds, nnz per group)."""
    import ctypes

    A, C, B = x3.shape
    grp = _Groups(bits_c, amax, False, nnz_c)
    gnnz = grp.gnnz
    parts, outs = _alloc_parts(grp, [int(v) for v in gnnz[:grp.G]])
    keys = (ctypes.c_uint32 * grp.G)(*[mix_seed(seed + i) if stoch else 0 for i in range(grp.G)])
    rc = _cpu_lib().fxc_mixed_zvc_pack(x3.data_ptr(), grp.k.data_ptr(), A, C, B, grp.order.data_ptr(), grp.G,
                                       grp.c_start, gnnz.ctypes.data, grp.c_bits, grp.c_np, grp.c_w, grp.c_sh,
                                       int(stoch), keys, outs)
    if rc:
        raise MemoryError("fxc_mixed_zvc_pack: out of memory for a channel index")
    groups = []
    st = grp.start
    for g, b in enumerate(grp.widths):
        s, e = int(st[g]), int(st[g + 1])
        sh3 = (A, e - s, B)
        groups.append((grp.order[s:e], Packed(parts[g], grp.kinv[s:e], b, False, sh3, sh3, x3.dtype), int(gnnz[g])))
    out = PackedMixedZVC(groups, mask, tuple(shape if shape is not None else x3.shape), tuple(x3.shape),
                         x3.dtype, C, grp.order)
    out.c_args = _unpack_args(grp, outs) + (gnnz,)
    return out


def mixed_zvc_unpack(p: PackedMixedZVC) -> torch.Tensor:
    A, C, B = p.shape3
    dev = p.groups[0][0].device
    if p.dtype == torch.float32 and _use_c(p.groups[0][0]) and not use_triton(p.groups[0][1].parts[0]):
        if p.c_args is not None:  # made at pack time
            parts, w, sh, nps, kinv, start, bits, gnnz = p.c_args
            order = p.order
        else:
            order, start, bits, nps, w, sh, parts, kinv, keep = _group_arrays([g[:2] for g in p.groups], p.order)
            gnnz = np.array([g[2] for g in p.groups], dtype=np.int64)
        out = bufpool.empty(p.shape3, torch.float32)
        mbits = p.mask.bits if p.mask.bits.is_contiguous() else p.mask.bits.contiguous()
        rc = _cpu_lib().fxc_mixed_zvc_unpack(parts, w, sh, nps, kinv, A, C, B, order.data_ptr(), len(p.groups),
                                             start.ctypes.data, gnnz.ctypes.data, mbits.data_ptr(), out.data_ptr())
        if rc:
            raise MemoryError("fxc_mixed_zvc_unpack: out of memory for a channel index")
        return out.reshape(p.shape)
    m = unpack_mask(p.mask).reshape(p.shape3)
    out = torch.empty(p.shape3, dtype=p.dtype, device=dev)
    for idx, g, nnz in p.groups:
        i64 = idx.to(torch.int64)
        sm = m.index_select(1, i64)
        codes = torch.zeros(sm.shape, dtype=torch.int32, device=dev)
        if nnz:
            codes[sm] = unpack_codes(g.parts, g.bits, nnz)
        out.index_copy_(1, i64, (codes.to(torch.float32) * g.kinv.view(1, -1, 1)).to(p.dtype))
    return out.reshape(p.shape)


# ------------------------------------------- max-pool indices as window slots

def _window_geom(geom: dict) -> Tuple[int, int, int, int, int, int, int]:
    """(kw, sh, sw, ph, pw, dh, dw) of a max-pool geometry dict."""
    _, kw = geom["kernel"]
    sh, sw = geom["stride"]
    ph, pw = geom["padding"]
    dh, dw = geom["dilation"]
    return kw, sh, sw, ph, pw, dh, dw


def window_local(idx: torch.Tensor, geom: dict) -> torch.Tensor:
    """Max-pool indices (flat input positions, int64, (..., OH, OW)) as the
    position inside each output's window (int32, 0..kh*kw-1)."""
    kw, sh, sw, ph, pw, dh, dw = _window_geom(geom)
    W = geom["in_w"]
    OH, OW = idx.shape[-2], idx.shape[-1]
    if idx.dtype == torch.int64 and idx.is_contiguous() and idx.numel() and _use_c(idx):
        out = torch.empty(idx.shape, dtype=torch.int32)
        _cpu_lib().fxc_window_local(idx.data_ptr(), idx.numel() // (OH * OW), OH, OW, W, kw, sh, sw, ph, pw, dh, dw,
                                    out.data_ptr())
        return out
    ih, iw = idx // W, idx % W
    oh = torch.arange(OH, device=idx.device).view(-1, 1)
    ow = torch.arange(OW, device=idx.device).view(1, -1)
    return (((ih - oh * sh + ph) // dh) * kw + (iw - ow * sw + pw) // dw).to(torch.int32)


def window_global(local: torch.Tensor, geom: dict, W: int) -> torch.Tensor:
    """window_local's inverse: int64 flat input positions."""
    kw, sh, sw, ph, pw, dh, dw = _window_geom(geom)
    OH, OW = local.shape[-2], local.shape[-1]
    if local.dtype == torch.int32 and local.is_contiguous() and local.numel() and _use_c(local):
        out = bufpool.empty(local.shape, torch.int64)
        _cpu_lib().fxc_window_global(local.data_ptr(), local.numel() // (OH * OW), OH, OW, W, kw, sh, sw, ph, pw, dh,
                                     dw, out.data_ptr())
        return out
    local = local.to(torch.int64)
    oh = torch.arange(OH, device=local.device).view(-1, 1)
    ow = torch.arange(OW, device=local.device).view(1, -1)
    ih = oh * sh - ph + (local // kw) * dh
    iw = ow * sw - pw + (local % kw) * dw
    return ih * W + iw
