"""Gradient quantization's C path (gradquant_cpu.c): the same message bytes
and the same decoded mean as the torch reference (same random stream), for
both loop families (AVX2 and plain) at 1, 2 and 3 threads, for ragged sizes and bucket tails, both norms, several
widths, level sets that fill the codes and ones that do not (the loops
differ), several world sizes, non-finite gradients, and reused buffers."""
import pytest
import torch

from fxcompress.errors import BadInput
from fxcompress.kernels import gradquant as G

pytestmark = pytest.mark.skipif(G.cpu_lib() is None, reason="no C compiler: the reference is the CPU path")

# (bits, levels): all 2^bits levels (the fused loop up to 4 bits), fewer
# than 2^bits (the general loop), and many (bisection, table lookup)
LEVEL_SETS = [
    (1, [-1.0, 1.0]),
    (2, [-1.0, -0.2, 0.3, 1.0]),
    (2, [-1.0, 0.1, 1.0]),
    (3, torch.linspace(-1, 1, 8).tolist()),
    (3, [-1.0, -0.5, 0.0, 0.25, 1.0]),
    (4, torch.linspace(-1, 1, 16).tolist()),
    (5, (torch.linspace(-1, 1, 21) ** 3).tolist()),
    (8, torch.linspace(-1, 1, 200).tolist()),
]
# (numel, bucket): below one group, ragged groups and buckets, a bucket tail
# of one coordinate, and sizes large enough to be cut among threads
SIZES = [(5, 8), (77_777, 512), (3 * 8192, 8192), (8193, 8192), (600_001, 8192)]


def _loop_families():
    """Both C loop families: the AVX2 ones (up to 4 bits, where built) and
    the plain ones the compiler vectorises (everything else, and CPUs
    without AVX2); 1 and 0 for fxc_gq_simd."""
    return (1, 0) if G.cpu_lib().fxc_gq_simd(1) else (0,)


def _each_way(fn):
    """fn() with each loop family at 1, 2 and 3 threads."""
    lib, before = G.cpu_lib(), torch.get_num_threads()
    try:
        out = []
        for simd in _loop_families():
            lib.fxc_gq_simd(simd)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                out.append(((simd, n), fn()))
        return out
    finally:
        lib.fxc_gq_simd(1)
        torch.set_num_threads(before)


def test_c_encode_decode_equal_reference_each_way():
    gen = torch.Generator().manual_seed(0)
    for numel, bucket in SIZES:
        for bits, levels in LEVEL_SETS:
            if bits == 8 and numel > 100_000:
                continue  # the reference's 200-level search is slow; smaller sizes cover the path
            x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen)
            x[::97] = 0.0
            seed = numel + bits
            for norm in ("l2", "linf"):
                ref = G.encode_reference(x, levels, bits, bucket, norm, seed=seed)
                for way, got in _each_way(lambda: G.encode_c(x, levels, bits, bucket, norm, seed=seed)):
                    assert torch.equal(got, ref), (way, numel, bucket, bits, len(levels), norm)
            for world in (1, 2, 3, 4):  # 2 and 4 multiply by 1/world, 3 divides
                msgs = torch.stack([G.encode_reference(torch.randn(numel, generator=gen), levels, bits, bucket,
                                                       seed=s) for s in range(world)])
                ref = G.decode_reference(msgs, levels, bits, numel, bucket)
                for way, got in _each_way(lambda: G.decode_c(msgs, levels, bits, numel, bucket)):
                    assert torch.equal(got, ref), (way, numel, bucket, bits, len(levels), world)


def test_non_finite_gradients_encode_like_the_reference():
    """NaN and inf reach the rounding as NaN (inf / inf): the reference's
    searchsorted puts NaN above every level, and so must the C loops."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    x[10], x[1500], x[2900] = float("nan"), float("inf"), -float("inf")
    for bits, levels in LEVEL_SETS:
        for norm in ("l2", "linf"):
            ref = G.encode_reference(x, levels, bits, 64, norm, seed=3)
            for way, got in _each_way(lambda: G.encode_c(x, levels, bits, 64, norm, seed=3)):
                assert torch.equal(got, ref), (way, bits, len(levels), norm)


def test_reused_buffers_give_the_same_bytes():
    x = torch.randn(50_001, generator=torch.Generator().manual_seed(2))
    lv = torch.linspace(-1, 1, 8).tolist()
    msg = torch.full((G.Layout(x.numel(), 512, 3).nbytes,), 0xAB, dtype=torch.uint8)  # stale bytes
    for seed in (1, 2):
        assert G.encode(x, lv, 3, 512, seed=seed, out=msg) is msg
        assert torch.equal(msg, G.encode_reference(x, lv, 3, 512, seed=seed))
    out = torch.full((x.numel(),), float("nan"))
    msgs = torch.stack([msg, G.encode(x, lv, 3, 512, seed=5)])
    assert G.decode(msgs, lv, 3, x.numel(), 512, out=out) is out
    assert torch.equal(out, G.decode_reference(msgs, lv, 3, x.numel(), 512))
    with pytest.raises(BadInput, match="buffer"):
        G.encode(x, lv, 3, 512, out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(BadInput, match="buffer"):
        G.decode(msgs, lv, 3, x.numel(), 512, out=torch.empty(x.numel(), dtype=torch.uint8))


def test_public_encode_takes_the_c_path(monkeypatch):
    x = torch.randn(1000)
    lv = torch.linspace(-1, 1, 8).tolist()
    fast = G.encode(x, lv, 3, 64, seed=1)
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    assert torch.equal(G.encode(x, lv, 3, 64, seed=1), fast)
    calls = []
    monkeypatch.setattr(G, "encode_c", lambda *a, **k: calls.append(1))
    G.encode(x, lv, 3, 64, seed=1)
    assert not calls  # FXC_CPU_FAST=0: the reference
    monkeypatch.setenv("FXC_CPU_FAST", "1")
    G.encode(x, lv, 3, 64, seed=1)
    assert calls


def test_empty_gradient_is_one_zero_bucket_like_the_reference():
    lv = torch.linspace(-1, 1, 8).tolist()
    for norm in ("l2", "linf"):
        empty = torch.zeros(0)
        assert torch.equal(G.encode_c(empty, lv, 3, 64, norm), G.encode_reference(empty, lv, 3, 64, norm))
