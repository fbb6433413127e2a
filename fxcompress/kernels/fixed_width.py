"""Fixed-width activation packing: fused quantize+pack and unpack+dequantize
of a tensor at one bit width (AC-GC), and the raw code packer the other
families reuse (masks, zero-value codes, window indices).

Layout. A tensor is viewed as (A, C, B) with one scale per C: per-channel
(NCHW: A=N, C=channels, B=H*W) or per-group (A=1, C=groups, B=group size).
Codes are packed in flat memory order, so no copy is needed to make a
channel contiguous. The quantizer is kernels/rounding.py's.

Bit widths. 1, 2, 4 and 8 bits pack 8/b codes into each byte. Any other
width 3..16 is split into power-of-two *slices* (e.g. 7 = 4+2+1 bits,
12 = 8+4): each slice is packed the same way, so every width costs exactly b
bits per element and one kernel template serves all of them.

Three paths, one layout, chosen by dispatch.backend_for: Triton (CUDA
tensors, or CPU under the interpreter with FXC_FORCE_TRITON=1), the C loops
of actpack_cpu.c on CPU, and the torch reference, the readable oracle all
paths are tested against bit for bit.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import BadInput
from . import bufpool
from .actpack_cpu import lib as _lib
from .counter_hash import mix32_triton
from .dispatch import backend_for
from .rounding import ROUNDINGS, check_bits, codes_reference, grid, grid_kind, mix_seed, multipliers, slices

# ---------------------------------------------------- torch reference (CPU)

def pack_codes_reference(codes: torch.Tensor, width: int, shift: int) -> torch.Tensor:
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
    codes = codes_reference(x3, k, bits, signed, stoch, key)
    return [pack_codes_reference(codes, w, s) for w, s in slices(bits)]


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
    off = grid(bits, signed)[1]
    return ((codes.to(torch.float32) - off).view(shape3) * kinv.view(1, -1, 1)).to(dtype)


def _stats_ref(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row max|x| and the global minimum (signed or not), in one read."""
    xf = x3.to(torch.float32)
    return xf.abs().amax(dim=(0, 2)), xf.amin()



# ------------------------------------------------- CPU fused path (C, ctypes)

def _quant_pack_c(x3, k, bits, signed, stoch, key) -> List[torch.Tensor]:
    lib = _lib()
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
    lib = _lib()
    codes = torch.empty(n, dtype=torch.int32)
    for i, ((w, s), p) in enumerate(zip(slices(bits), parts)):
        lib.fxc_unpack_codes(p.contiguous().data_ptr(), n, w, s, int(i == 0), codes.data_ptr())
    return codes


def _unpack_dequant_c(parts, kinv, bits, signed, shape3, dtype) -> torch.Tensor:
    lib = _lib()
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
    lib = _lib()
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
    if x3.dtype == torch.float32 and x3.is_contiguous() and x3.numel() and backend_for(x3, _lib) == "c":
        amax = torch.empty(x3.shape[1], dtype=torch.float32)
        mn = torch.empty((), dtype=torch.float32)
        nnz = torch.empty(x3.shape[1], dtype=torch.int64)
        if _lib().fxc_stats_nnz(x3.data_ptr(), x3.numel(), x3.shape[1], x3.shape[2], amax.data_ptr(),
                                mn.data_ptr(), nnz.data_ptr()):
            raise MemoryError("fxc_stats_nnz: out of memory for per-thread accumulators")
        return amax, mn, nnz
    amax, mn = _stats_ref(x3)
    return amax, mn, (x3 > 0).sum(dim=(0, 2))


def stats(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row max|x| and the global minimum (is the tensor signed?)."""
    if x3.dtype == torch.float32 and x3.is_contiguous() and x3.numel() and backend_for(x3, _lib) == "c":
        amax = torch.empty(x3.shape[1], dtype=torch.float32)
        mn = torch.empty((), dtype=torch.float32)
        if _lib().fxc_stats(x3.data_ptr(), x3.numel(), x3.shape[1], x3.shape[2], amax.data_ptr(), mn.data_ptr()):
            raise MemoryError("fxc_stats: out of memory for per-thread accumulators")
        return amax, mn
    return _stats_ref(x3)



# ------------------------------------------------------------ Triton kernels

_kernels = {}
_mix32 = None  # counter_hash.mix32_triton(), set when the kernels are built


def _build_kernels():
    import triton
    import triton.language as tl

    # a module global, not a local: jit code (and the interpreter) resolves
    # the functions it calls among the module's globals
    global _mix32
    _mix32 = mix32_triton()

    @triton.jit
    def pack_kernel(x_ptr, k_ptr, out_ptr, n, n_bytes, C, B, key, shift, off, hi,
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
                # counter_hash's finaliser, as uniform_reference draws it
                h = _mix32(((idx + key) & 0xFFFFFFFF).to(tl.uint32))
                v = v + (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
            else:
                v = v + 0.5
            q = v + off
            q = tl.minimum(tl.maximum(q, 0.0), hi)
            code = q.to(tl.int32)
        s = (code >> shift) & ((1 << W) - 1)
        s = tl.where(m, s, 0)
        val = tl.sum(s << (j * W)[None, :], axis=1)
        tl.store(out_ptr + byte, val.to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def unpack_kernel(in_ptr, acc_ptr, out_ptr, kinv_ptr, n, C, B, shift, off,
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
    _, off, hi = grid(bits, signed)
    out = []
    for w, s in slices(bits):
        nb = -(-n // (8 // w))
        o = torch.empty(nb, dtype=torch.uint8, device=x3.device)
        launch = (max(1, triton.cdiv(nb, _BLOCK_BYTES)),)
        pack_kernel[launch](xf, k if k is not None else xf, o, n, nb, C, B, key, s, off, hi,
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
    off = grid(bits, signed)[1]
    acc = torch.empty(n if len(sl) > 1 else 1, dtype=torch.int32, device=dev)
    out = torch.empty(n, dtype=torch.int32 if raw else torch.float32, device=dev)
    launch = (max(1, triton.cdiv(n, _BLOCK_ELEMS)),)
    for i, ((w, s), p) in enumerate(zip(sl, parts)):
        unpack_kernel[launch](p, acc, out, kinv if kinv is not None else out, n, shape3[1], shape3[2], s, off,
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
    stoch = rounding == "stochastic"
    signed = grid_kind(signed, stoch)  # from here on the grid kind (rounding.py)
    k, kinv = multipliers(amax, bits, signed)
    key = mix_seed(seed) if stoch else 0
    path = backend_for(x3, _lib)
    if path == "triton":
        parts = _quant_pack_triton(x3, k, bits, signed, stoch, key)
    elif path == "c":
        parts = _quant_pack_c(x3, k, bits, signed, stoch, key)
    else:
        parts = _quant_pack_ref(x3, k, bits, signed, stoch, key)
    return Packed(parts, kinv, bits, signed, tuple(shape if shape is not None else x3.shape),
                  tuple(x3.shape), x3.dtype)


def unpack(p: Packed) -> torch.Tensor:
    path = backend_for(p.parts[0], _lib)
    if path == "triton":
        out = _unpack_triton(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    elif path == "c":
        out = _unpack_dequant_c(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    else:
        out = _unpack_dequant_ref(p.parts, p.kinv, p.bits, p.signed, p.shape3, p.dtype)
    return out.reshape(p.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> List[torch.Tensor]:
    """Pack non-negative integer codes < 2^bits (masks, indices, zvc codes)."""
    check_bits(bits)
    flat = codes.reshape(-1)
    path = backend_for(flat, _lib)
    if path == "triton":
        return _quant_pack_triton(flat.view(1, 1, -1), None, bits, False, False, 0, raw=True)
    if path == "c":
        return _pack_codes_c(flat, bits)
    flat = flat.to(torch.int32)
    return [pack_codes_reference(flat, w, s) for w, s in slices(bits)]


def unpack_codes(parts: Sequence[torch.Tensor], bits: int, n: int) -> torch.Tensor:
    """int32 codes back from `pack_codes`."""
    path = backend_for(parts[0], _lib)
    if path == "triton":
        return _unpack_triton(parts, None, bits, False, (1, 1, n), torch.int32, raw=True)
    if path == "c":
        return _unpack_codes_c(parts, bits, n)
    return _unpack_codes_ref(parts, bits, n)

