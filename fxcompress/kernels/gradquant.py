"""Gradient quantization kernels: encode (normalise + stochastic round + pack)
and decode (unpack + scale + average over ranks), for the ALQ/AMQ DDP hook.

Wire format: fxcompress/distributed/wire.py. Randomness comes from a
counter-based hash of (seed, coordinate index) rather than a stateful RNG, so
the Triton kernel and the torch reference draw the *same* uniform number for
each coordinate and their codes can be compared one by one; it also makes a
rank's codes reproducible from (seed, step, rank, bucket) alone.

All paths work in float32. The C path (gradquant_cpu.c, on CPU) takes the
bucket norms from torch and is bitwise equal to the reference. Triton's norm
is a reduction whose order differs, so a coordinate whose rounding
probability lies within an ulp of its uniform draw may round differently
there; everything else is identical.
"""
from __future__ import annotations

import ctypes
import os

import torch

from ..distributed.wire import GROUP, Layout, assemble, check_bits, check_bucket_size, pack_codes, split, unpack_codes
from ..errors import BadInput
from .counter_hash import MASK32, mix32, mix32_tensor, mix32_triton, to_uniform
from .cbuild import load_library, on_torch_threads
from .dispatch import backend_for

EPS = 1e-7  # r = x / (||x|| + EPS): an all-zero bucket encodes as zeros, not NaN
NORMS = ("l2", "linf")


# ------------------------------------------------------------------ hashing

def stream_keys(seed: int):
    """Two 32-bit keys derived from a seed; the kernels only see the keys."""
    k1 = mix32(seed & MASK32)
    return k1, mix32(k1 ^ 0x5BD1E995)


def uniform_reference(seed: int, index: torch.Tensor) -> torch.Tensor:
    """u in [0, 1) on a 2^-24 grid (exact in float32) for each index: the
    finaliser twice, (index + k1) then xor k2."""
    k1, k2 = stream_keys(seed)
    h = mix32_tensor((index.to(torch.int64) + k1) & MASK32)
    return to_uniform(mix32_tensor(h.bitwise_xor_(k2)))


# ------------------------------------------------------- torch reference

def _levels32(levels) -> torch.Tensor:
    return torch.as_tensor(levels, dtype=torch.float32)


def bucket_matrix(x: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """Flat x -> (num_buckets, bucket_size), zero-padded (zeros change neither norm)."""
    flat = x.reshape(-1).to(torch.float32)
    nb = max(1, -(-flat.numel() // bucket_size))
    pad = nb * bucket_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(nb, bucket_size)


def bucket_norms(xb: torch.Tensor, norm: str) -> torch.Tensor:
    return xb.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(xb, dim=1)


def round_reference(r: torch.Tensor, levels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding of r in [-1, 1] to a level index: up with
    probability (r - lo) / (hi - lo), so E[level] = r."""
    r = r.clamp(-1.0, 1.0)
    k = torch.searchsorted(levels[1:-1].contiguous(), r.contiguous(), right=True)
    lo, hi = levels[k], levels[k + 1]
    p = (r - lo) / (hi - lo)
    return k + (u < p).to(k.dtype)


def encode_reference(x, levels, bits, bucket_size, norm="l2", seed=0) -> torch.Tensor:
    lv = _levels32(levels).to(x.device)
    xb = bucket_matrix(x, bucket_size)
    norms = bucket_norms(xb, norm)
    r = (xb / (norms[:, None] + EPS)).reshape(-1)[: x.numel()]
    u = uniform_reference(seed, torch.arange(x.numel(), device=x.device))
    codes = round_reference(r, lv, u)
    return assemble(norms, pack_codes(codes, bits), Layout(x.numel(), bucket_size, bits))


def decode_reference(messages, levels, bits, numel, bucket_size) -> torch.Tensor:
    """Mean over ranks of the decoded messages (rows), in rank order."""
    layout = Layout(numel, bucket_size, bits)
    msgs = messages.reshape(-1, layout.nbytes)
    lv = _levels32(levels).to(msgs.device)
    bucket = torch.arange(numel, device=msgs.device) // bucket_size
    acc = torch.zeros(numel, dtype=torch.float32, device=msgs.device)
    all_norms, all_packed = split(msgs, layout)
    for w in range(msgs.shape[0]):
        codes = unpack_codes(all_packed[w], bits, numel)
        acc = acc + lv[codes] * all_norms[w][bucket]
    return acc / msgs.shape[0]


# ------------------------------------------------------------------ Triton

try:  # CPU-only installs have no triton; the torch reference serves them
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:
    _mix = mix32_triton()

    @triton.jit
    def _encode_kernel(x_ptr, levels_ptr, norms_ptr, codes_ptr, numel, bucket_size, key1, key2,
                       BLOCK: tl.constexpr, NUM_LEVELS: tl.constexpr, BITS: tl.constexpr,
                       LINF: tl.constexpr):
        # one program per bucket: the norm is a reduction over the whole bucket
        b = tl.program_id(0)
        start = b * bucket_size
        offs = tl.arange(0, BLOCK)
        idx = start + offs
        valid = (offs < bucket_size) & (idx < numel)
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if LINF:
            nrm = tl.max(tl.abs(x), axis=0)
        else:
            nrm = tl.sqrt(tl.sum(x * x, axis=0))
        tl.store(norms_ptr + b, nrm)
        r = x / (nrm + 1e-7)  # EPS
        r = tl.minimum(tl.maximum(r, -1.0), 1.0)
        k = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(1, NUM_LEVELS - 1):
            k += (r >= tl.load(levels_ptr + j)).to(tl.int32)
        lo = tl.load(levels_ptr + k)
        hi = tl.load(levels_ptr + k + 1)
        p = (r - lo) / (hi - lo)
        # uint32 arithmetic wraps mod 2^32, which the torch path gets by masking
        h = _mix(idx.to(tl.uint32) + key1.to(tl.uint32))
        h = _mix(h ^ key2.to(tl.uint32))
        u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
        code = k + (u < p).to(tl.int32)
        code = tl.where(valid, code, 0)  # padding codes are zero, as in the reference
        groups = tl.reshape(code.to(tl.int64), [BLOCK // 8, 8])
        shifts = tl.arange(0, 8).to(tl.int64) * BITS
        word = tl.sum(groups << shifts[None, :], axis=1)
        gidx = tl.arange(0, BLOCK // 8)
        g = start // 8 + gidx
        gvalid = (gidx * 8 < bucket_size) & (g * 8 < numel)
        for i in tl.static_range(BITS):
            tl.store(codes_ptr + g * BITS + i, ((word >> (8 * i)) & 255).to(tl.uint8), mask=gvalid)

    @triton.jit
    def _decode_kernel(codes_ptr, norms_ptr, levels_ptr, out_ptr, numel, bucket_size, world,
                       codes_stride, norms_stride, BLOCK: tl.constexpr, BITS: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        bitpos = (offs % 8) * BITS
        byte = (offs // 8) * BITS + bitpos // 8
        shift = bitpos % 8
        spans = valid & (shift + BITS > 8)  # the code continues into the next byte
        bucket = offs // bucket_size
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for w in range(world):  # ranks in order, as the reference sums them
            row = codes_ptr + w * codes_stride
            b0 = tl.load(row + byte, mask=valid, other=0).to(tl.int32)
            b1 = tl.load(row + byte + 1, mask=spans, other=0).to(tl.int32)
            code = ((b0 | (b1 << 8)) >> shift) & ((1 << BITS) - 1)
            lvl = tl.load(levels_ptr + code, mask=valid, other=0.0)
            nrm = tl.load(norms_ptr + w * norms_stride + bucket, mask=valid, other=0.0)
            acc = acc + lvl * nrm
        tl.store(out_ptr + offs, acc / world, mask=valid)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def encode_triton(x, levels, bits, bucket_size, norm="l2", seed=0) -> torch.Tensor:
    layout = Layout(x.numel(), bucket_size, bits)
    flat = x.reshape(-1).contiguous()
    lv = _levels32(levels).to(flat.device).contiguous()
    msg = torch.zeros(layout.nbytes, dtype=torch.uint8, device=flat.device)
    norms, codes = split(msg, layout)
    if flat.numel() == 0:
        norms.zero_()
        return msg
    k1, k2 = stream_keys(seed)
    _encode_kernel[(layout.num_buckets,)](
        flat, lv, norms, codes, flat.numel(), bucket_size, k1, k2,
        BLOCK=_next_pow2(bucket_size), NUM_LEVELS=lv.numel(), BITS=bits, LINF=(norm == "linf"))
    return msg


def decode_triton(messages, levels, bits, numel, bucket_size, block: int = 4096) -> torch.Tensor:
    layout = Layout(numel, bucket_size, bits)
    msgs = messages.reshape(-1, layout.nbytes).contiguous()
    world = msgs.shape[0]
    norms, codes = split(msgs, layout)
    lv = _levels32(levels).to(msgs.device).contiguous()
    out = torch.empty(numel, dtype=torch.float32, device=msgs.device)
    if numel == 0:
        return out
    grid = (triton.cdiv(numel, block),)
    _decode_kernel[grid](codes, norms, lv, out, numel, bucket_size, world,
                        msgs.stride(0), norms.stride(0), BLOCK=block, BITS=bits)
    return out


# ------------------------------------------------- CPU fast path (C, ctypes)

_SRC_CPU = os.path.join(os.path.dirname(__file__), "gradquant_cpu.c")


def _declare(lib) -> None:
    P, I64, I, U32, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
    lib.fxc_gq_encode.argtypes = [P, I64, I64, P, P, I, I, U32, U32, F, P]
    lib.fxc_gq_decode.argtypes = [P, I64, I64, I64, I64, I64, P, I, I, P]
    lib.fxc_gq_set_threads.argtypes = [I]
    for f in (lib.fxc_gq_encode, lib.fxc_gq_decode, lib.fxc_gq_set_threads):
        f.restype = None
    lib.fxc_gq_linf_norms.argtypes = [P, I64, I64, P]
    lib.fxc_gq_linf_norms.restype = None
    lib.fxc_gq_simd.argtypes = [I]  # 0: the plain loops instead of the AVX2 ones (tests compare both)
    lib.fxc_gq_simd.restype = I


def cpu_lib():
    """gradquant_cpu.c compiled (None without a compiler), on torch's threads."""
    return on_torch_threads(load_library(_SRC_CPU, "gradquant", _declare), "fxc_gq_set_threads")


def _norms_like_reference(flat: torch.Tensor, bucket_size: int, norm: str, out: torch.Tensor) -> torch.Tensor:
    """bucket_norms(bucket_matrix(x)) into `out` without copying x: l2 with
    the full buckets as a view, the ragged last one padded alone (the same
    rows the reference reduces, so the same norms); linf in C."""
    n = flat.numel()
    if norm == "linf" and n:  # a max, exact in any order: C, without amax's full-size |x|
        cpu_lib().fxc_gq_linf_norms(flat.data_ptr(), n, bucket_size, out.data_ptr())
        return out
    full = n // bucket_size
    if full:
        rows = flat[: full * bucket_size].view(full, bucket_size)
        if norm == "l2":  # straight into the message
            torch.linalg.vector_norm(rows, dim=1, out=out[:full])
        else:
            out[:full] = bucket_norms(rows, norm)
    if n % bucket_size or not full:
        out[full:] = bucket_norms(bucket_matrix(flat[full * bucket_size:], bucket_size), norm)
    return out


def _check_out(out, numel: int, dtype: torch.dtype, what: str, cpu: bool = False) -> None:
    if out is not None and (out.dtype != dtype or out.numel() != numel
                            or (cpu and (out.device.type != "cpu" or not out.is_contiguous()))):
        raise BadInput(f"{what} buffer must be a {'contiguous CPU ' if cpu else ''}{dtype} tensor of {numel} "
                       f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")


def _out_buffer(out, numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A caller's reusable output buffer, checked, or a fresh one. Reusing
    one matters: a fresh large buffer is fresh pages, and the kernel's
    first touch of each page costs more than its work."""
    if out is None:
        return torch.empty(numel, dtype=dtype)
    _check_out(out, numel, dtype, what, cpu=True)
    return out if out.dim() == 1 else out.view(-1)


def encode_c(x, levels, bits, bucket_size, norm="l2", seed=0, out=None) -> torch.Tensor:
    layout = Layout(x.numel(), bucket_size, bits)
    flat = x.reshape(-1)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.to(torch.float32).contiguous()
    lv = _levels32(levels).contiguous()
    msg = _out_buffer(out, layout.nbytes, torch.uint8, "message")
    norms, codes = split(msg, layout)
    _norms_like_reference(flat, bucket_size, norm, norms)
    msg[layout.norm_bytes + layout.code_bytes:].zero_()
    k1, k2 = stream_keys(seed)
    cpu_lib().fxc_gq_encode(flat.data_ptr(), flat.numel(), bucket_size, norms.data_ptr(), lv.data_ptr(), lv.numel(),
                            bits, k1, k2, EPS, codes.data_ptr())
    return msg


def decode_c(messages, levels, bits, numel, bucket_size, out=None) -> torch.Tensor:
    layout = Layout(numel, bucket_size, bits)
    msgs = messages.reshape(-1, layout.nbytes)
    if not msgs.is_contiguous():
        msgs = msgs.contiguous()
    lv = _levels32(levels).contiguous()
    res = _out_buffer(out, numel, torch.float32, "output")
    cpu_lib().fxc_gq_decode(msgs.data_ptr(), msgs.shape[0], layout.nbytes, layout.norm_bytes, numel, bucket_size,
                            lv.data_ptr(), lv.numel(), bits, res.data_ptr())
    return res


# ---------------------------------------------------------------- public

def _check(levels, bits, bucket_size, norm):
    check_bits(bits)
    check_bucket_size(bucket_size)
    if norm not in NORMS:
        raise BadInput(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    n = len(levels)
    if not 2 <= n <= (1 << bits):
        raise BadInput(f"{n} levels do not fit in {bits}-bit codes (at most {1 << bits})")


def encode(x: torch.Tensor, levels, bits: int, bucket_size: int = 8192, norm: str = "l2",
           seed: int = 0, out: torch.Tensor = None) -> torch.Tensor:
    """Quantize flat gradient x to one wire message (uint8, `Layout.nbytes`),
    written into `out` when given (reused across steps, it saves fresh
    pages); returns the message."""
    _check(levels, bits, bucket_size, norm)
    _check_out(out, Layout(x.numel(), bucket_size, bits).nbytes, torch.uint8, "message")
    path = backend_for(x, cpu_lib)
    if path == "c" and x.is_floating_point():
        return encode_c(x, levels, bits, bucket_size, norm, seed, out=out)
    if path == "triton":
        msg = encode_triton(x, levels, bits, bucket_size, norm, seed)
    else:
        msg = encode_reference(x, levels, bits, bucket_size, norm, seed)
    return msg if out is None else out.copy_(msg.view(out.shape))


def decode(messages: torch.Tensor, levels, bits: int, numel: int, bucket_size: int = 8192,
           out: torch.Tensor = None) -> torch.Tensor:
    """Average of the gradients in `messages` (one row per rank) -> float32
    (numel,), written into `out` when given (it must not overlap
    `messages`); returns it."""
    _check(levels, bits, bucket_size, "l2")
    _check_out(out, numel, torch.float32, "output")
    path = backend_for(messages, cpu_lib)
    if path == "c" and (out is None or (out.is_contiguous() and out.device.type == "cpu")):
        return decode_c(messages, levels, bits, numel, bucket_size, out=out)
    if path == "triton":
        mean = decode_triton(messages, levels, bits, numel, bucket_size)
    else:
        mean = decode_reference(messages, levels, bits, numel, bucket_size)
    return mean if out is None else out.copy_(mean.view(out.shape))


__all__ = ["encode", "decode", "encode_reference", "decode_reference", "encode_triton", "decode_triton",
           "encode_c", "decode_c",
           "uniform_reference", "stream_keys", "GROUP"]
