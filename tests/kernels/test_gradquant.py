"""gradquant kernels: the Triton path (under TRITON_INTERPRET=1) must produce
the reference's codes and decoded values; both must be unbiased."""
import pytest
import torch

from fxcompress.distributed import levels as L
from fxcompress.distributed.wire import Layout, split, unpack_codes
from fxcompress.kernels import dispatch, gradquant as G

pytestmark = pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")

CASES = [  # bits, levels, norm, numel, bucket
    (3, L.exponential_levels(3, 0.4), "l2", 1000, 256),
    (2, L.ternary_levels(), "linf", 700, 128),
    (4, L.uniform_levels(4), "l2", 512, 512),
    (1, L.uniform_levels(1), "linf", 37, 64),
    (8, L.uniform_levels(8), "l2", 300, 64),
]


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    assert dispatch.use_triton(torch.zeros(1))


def _grad(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g)


def _near_ties(x, levels, norms, bucket, seed):
    """Coordinates whose rounding probability is within float noise of their
    uniform draw: the only ones where a 1-ulp norm difference may flip a code."""
    lv = torch.as_tensor(levels, dtype=torch.float32)
    r = (x / (norms.repeat_interleave(bucket)[: x.numel()] + G.EPS)).clamp(-1, 1)
    k = torch.searchsorted(lv[1:-1].contiguous(), r, right=True)
    p = (r - lv[k]) / (lv[k + 1] - lv[k])
    u = G.uniform_reference(seed, torch.arange(x.numel()))
    return (p - u).abs() < 1e-5


@pytest.mark.parametrize("bits, levels, norm, n, bucket", CASES)
def test_triton_encode_matches_reference(triton_path, bits, levels, norm, n, bucket):
    x = _grad(n, seed=bits)
    ref = G.encode_reference(x, levels, bits, bucket, norm, seed=11)
    tri = G.encode(x, levels, bits, bucket, norm, seed=11)  # dispatches to Triton
    layout = Layout(n, bucket, bits)
    assert tri.shape == ref.shape == (layout.nbytes,)
    (n_ref, c_ref), (n_tri, c_tri) = split(ref, layout), split(tri, layout)
    assert torch.allclose(n_ref, n_tri, rtol=2e-6, atol=0)
    codes_ref, codes_tri = unpack_codes(c_ref, bits, n), unpack_codes(c_tri, bits, n)
    differ = codes_ref != codes_tri
    assert not (differ & ~_near_ties(x, levels, n_ref, bucket, 11)).any()
    assert differ.sum() <= 1
    assert torch.equal(tri[layout.norm_bytes + layout.code_bytes:], torch.zeros(layout.pad_bytes, dtype=torch.uint8))


@pytest.mark.parametrize("bits, levels, norm, n, bucket", CASES)
def test_triton_decode_matches_reference_exactly(triton_path, bits, levels, norm, n, bucket):
    msgs = torch.stack([G.encode_reference(_grad(n, seed=w), levels, bits, bucket, norm, seed=w)
                        for w in range(3)])
    ref = G.decode_reference(msgs, levels, bits, n, bucket)
    tri = G.decode(msgs, levels, bits, n, bucket)
    assert torch.equal(ref, tri)


def test_triton_quantize_is_unbiased(triton_path):
    # 100 copies of x, one per bucket: every copy gets its own counters, so
    # one kernel launch gives 100 independent draws
    levels, x, n = L.exponential_levels(3, 0.3), _grad(512, seed=5), 100
    copies = x.repeat(n)
    draws = G.decode(G.encode(copies, levels, 3, 512, "l2", seed=9), levels, 3, copies.numel(), 512).view(n, -1)
    per_draw = ((draws - x) ** 2).sum(1).mean()
    # E||mean of n - x||^2 = per-draw error / n for an unbiased quantizer
    assert ((draws.mean(0) - x) ** 2).sum() < 2.0 * per_draw / n


def test_uniform_stream_is_uniform():
    u = G.uniform_reference(123, torch.arange(1 << 16))
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi2 = (((counts - 4096) ** 2) / 4096).sum()
    assert chi2 < 40  # 15 dof: p ~ 5e-4
    # neighbouring indices must not be correlated (the counter feeds the hash)
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.02


def test_reference_path_is_used_without_the_flag(monkeypatch):
    monkeypatch.delenv("FXC_FORCE_TRITON", raising=False)
    assert dispatch.backend_for(torch.zeros(1)) == "torch"
