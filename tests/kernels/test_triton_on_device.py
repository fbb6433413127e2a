"""Every Triton kernel family against its torch reference on the CPU, through
the public API, on the device the run is for.

- GPU mode (FXC_GPU_CHECK=1, what tools/gpu_check.sh sets, with
  TRITON_INTERPRET=0): the kernels are compiled and run on CUDA at sizes
  spanning many blocks; a machine without CUDA or Triton FAILS here, it
  does not skip.
- Otherwise (CI, this CPU machine): the same comparisons under the Triton
  interpreter (FXC_FORCE_TRITON=1, TRITON_INTERPRET=1 from tests/conftest.py)
  at small sizes, so the file itself is checked on every run.

Every test first asserts that the Triton path is the one that runs, so a
dispatch change can never turn this into a reference-against-reference check.
Bitwise where the kernels promise it (codes, masks, decoded values,
PSGD's scaled gradient, int8); gradient quantization's norms within a few
ulp (a reduction's order) and codes equal except at draws within float
noise of a tie (the same rule as tests/kernels/test_gradquant.py).
"""
import importlib.util
import os

import pytest
import torch

from fxcompress.kernels import absmax_int8, dispatch
from fxcompress.kernels import actpack as ap
from fxcompress.kernels import gradquant as G
from fxcompress.kernels import scaled_grad as sg

GPU_MODE = os.environ.get("FXC_GPU_CHECK", "") == "1"
# elements per tensor: many blocks on the GPU; a few blocks when interpreted
N = 1 << 21 if GPU_MODE else 1 << 13  # odd powers of two (see test_fixed_width)
HAS_MASKS = importlib.util.find_spec("fxcompress.kernels.masks") is not None


@pytest.fixture(scope="module")
def device():
    if GPU_MODE:
        if os.environ.get("TRITON_INTERPRET", "") == "1":
            pytest.fail("FXC_GPU_CHECK=1 with TRITON_INTERPRET=1: the kernels would be interpreted, not compiled")
        if not torch.cuda.is_available():
            pytest.fail("FXC_GPU_CHECK=1 but torch sees no CUDA device")
        if not dispatch.triton_available():
            pytest.fail("FXC_GPU_CHECK=1 but triton does not import")
        return torch.device("cuda")
    if not dispatch.triton_available():
        pytest.skip("triton not installed: the interpreter check needs it")
    return torch.device("cpu")


@pytest.fixture
def paths(monkeypatch, device):
    """ref(): the torch reference on the CPU; tri(): the Triton path on `device`."""

    class Paths:
        def ref(self):
            monkeypatch.setenv("FXC_FORCE_TRITON", "0")
            monkeypatch.setenv("FXC_CPU_FAST", "0")

        def tri(self):
            monkeypatch.setenv("FXC_FORCE_TRITON", "1")
            assert dispatch.backend_for(torch.zeros(1, device=device)) == "triton"

    return Paths()


def _x(n, seed=0, relu=False):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    x[: n // 7] = 0.0  # zeros for the zero-value families
    return x.relu() if relu else x


def _same_parts(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.cpu(), q.cpu()), "packed bytes differ from the reference"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("signed", [True, False])
def test_fixed_width(paths, device, bits, rounding, signed):
    # N + 1 elements (odd: a ragged last byte; divisible by 3 as N is an odd
    # power of two): per-channel scales at odd widths, one scale otherwise
    x = _x(N + 1, seed=bits, relu=not signed)
    x3 = x.view(1, 3, -1) if bits % 2 else x.view(1, 1, -1)
    paths.ref()
    p_ref = ap.quant_pack(x3, bits, rounding, seed=3, signed=signed)
    y_ref = ap.unpack(p_ref)
    paths.tri()
    p = ap.quant_pack(x3.to(device), bits, rounding, seed=3, signed=signed)
    _same_parts(p.parts, p_ref.parts)
    assert torch.equal(ap.unpack(p).cpu(), y_ref)


def test_masks(paths, device):
    m = torch.rand(N + 3, generator=torch.Generator().manual_seed(0)) > 0.4
    paths.ref()
    r = ap.pack_mask(m)
    paths.tri()
    t = ap.pack_mask(m.to(device))
    assert torch.equal(t.bits.cpu(), r.bits)
    assert torch.equal(ap.unpack_mask(t).cpu(), m)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zvc(paths, device, rounding):
    x = _x(N, seed=1, relu=True).view(4, 8, -1)
    paths.ref()
    r = ap.zvc_pack(x, 4, rounding, seed=2)
    y_ref = ap.zvc_unpack(r)
    paths.tri()
    t = ap.zvc_pack(x.to(device), 4, rounding, seed=2)
    assert t.nnz == r.nnz
    assert torch.equal(t.mask.bits.cpu(), r.mask.bits)
    _same_parts(t.codes, r.codes)
    assert torch.equal(ap.zvc_unpack(t).cpu(), y_ref)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_mixed_widths(paths, device, rounding):
    x = _x(N, seed=2).view(4, 16, -1)
    bits_c = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 2, 2, 4, 4, 8, 12, 16, 3])
    paths.ref()
    r = ap.mixed_pack(x, bits_c, rounding, seed=4)
    y_ref = ap.mixed_unpack(r)
    paths.tri()
    t = ap.mixed_pack(x.to(device), bits_c, rounding, seed=4)
    for (i_t, a), (i_r, b) in zip(t.groups, r.groups):
        assert torch.equal(i_t.cpu(), i_r) and a.bits == b.bits
        _same_parts(a.parts, b.parts)
    assert torch.equal(ap.mixed_unpack(t).cpu(), y_ref)


def test_mixed_zvc(paths, device):
    x = _x(N, seed=3, relu=True).view(4, 8, -1)
    bits_c = torch.tensor([1, 2, 3, 4, 8, 12, 16, 5])
    nnz_c = (x > 0).sum(dim=(0, 2))
    paths.ref()
    r = ap.mixed_zvc_pack(x, bits_c, ap.pack_mask(x > 0), nnz_c, "stochastic", seed=5)
    y_ref = ap.mixed_zvc_unpack(r)
    paths.tri()
    xd = x.to(device)
    t = ap.mixed_zvc_pack(xd, bits_c, ap.pack_mask(xd > 0), nnz_c.to(device), "stochastic", seed=5)
    for (_, a, na), (_, b, nb) in zip(t.groups, r.groups):
        assert na == nb
        _same_parts(a.parts, b.parts)
    assert torch.equal(ap.mixed_zvc_unpack(t).cpu(), y_ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_psgd_scaled_grad(paths, device, bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(N, generator=gen) * 0.1
    g = torch.randn(N, generator=gen)
    L = sg.levels_for(bits)
    delta = (w.abs().max() * 0.8 / L).reshape(1)
    k = torch.arange(-L - 1, L + 1, dtype=torch.float32)
    w[: k.numel()] = (k + 0.5) * delta  # exact ties
    ref = sg.scaled_grad_reference(g, w, delta, L, 150.0, 1e-3, False)
    paths.tri()
    out = sg.scaled_grad(g.to(device), w.to(device), delta.to(device), L, 150.0, 1e-3, False)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("bits,norm", [(3, "l2"), (2, "linf"), (8, "l2")])
def test_gradient_quantization(paths, device, bits, norm):
    from fxcompress.distributed import levels as L
    from fxcompress.distributed.wire import Layout, split, unpack_codes

    levels = L.exponential_levels(bits, 0.4) if bits == 3 else L.uniform_levels(bits)
    bucket = 2048 if GPU_MODE else 512
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(N + 11, generator=gen) * torch.rand(N + 11, generator=gen)
    ref = G.encode_reference(x, levels, bits, bucket, norm, seed=7)
    paths.tri()
    tri = G.encode(x.to(device), levels, bits, bucket, norm, seed=7).cpu()
    layout = Layout(x.numel(), bucket, bits)
    (n_ref, c_ref), (n_tri, c_tri) = split(ref, layout), split(tri, layout)
    assert torch.allclose(n_ref, n_tri, rtol=4e-6, atol=0), "bucket norms differ beyond a reduction's rounding"
    differ = unpack_codes(c_ref, bits, x.numel()) != unpack_codes(c_tri, bits, x.numel())
    # a code may differ only where the draw sits within float noise of the
    # rounding probability (a 1-ulp norm difference flips it)
    lv = torch.as_tensor(levels, dtype=torch.float32)
    r = (x / (n_ref.repeat_interleave(bucket)[: x.numel()] + G.EPS)).clamp(-1, 1)
    kk = torch.searchsorted(lv[1:-1].contiguous(), r, right=True)
    p = (r - lv[kk]) / (lv[kk + 1] - lv[kk])
    near_tie = (p - G.uniform_reference(7, torch.arange(x.numel()))).abs() < 1e-5
    assert not (differ & ~near_tie).any(), f"{int(differ.sum())} codes differ away from ties"
    msgs = torch.stack([ref, G.encode_reference(x.flip(0), levels, bits, bucket, norm, seed=8)])
    assert torch.equal(G.decode(msgs.to(device), levels, bits, x.numel(), bucket).cpu(),
                       G.decode_reference(msgs, levels, bits, x.numel(), bucket))


@pytest.mark.parametrize("group", [32, 128])
def test_absmax_int8(paths, device, group):
    x = torch.randn(N, generator=torch.Generator().manual_seed(group)) * 3
    x[:group] = 0
    q_ref, s_ref = absmax_int8.quantize_reference(x, group)
    paths.tri()
    q, s = absmax_int8.quantize(x.to(device), group)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.skipif(not HAS_MASKS, reason="no sparsity mask kernel (fxcompress/kernels/masks.py) in this tree")
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsity_nm_mask(paths, device, n, m):
    from fxcompress.kernels import masks

    w = torch.randn(256, N // 256, generator=torch.Generator().manual_seed(n))
    w[:, :m] = 0.5  # ties: the lower index is kept
    ref = masks.nm_mask_reference(w, n, m)
    paths.tri()
    assert torch.equal(masks.nm_mask(w.to(device), n, m).cpu(), ref)


@pytest.mark.skipif(not HAS_MASKS, reason="no sparsity mask kernel (fxcompress/kernels/masks.py) in this tree")
def test_sparsity_topk_mask(paths, device):
    from fxcompress.kernels import masks

    w = torch.randn(N, generator=torch.Generator().manual_seed(9))
    w[:64] = 0.25  # a run of equal magnitudes straddling the threshold
    k = masks.kept_count(N, 0.9)
    w[k - 32: k + 32] = w.abs().sort(descending=True).values[k - 1]
    paths.ref()
    m_ref, o_ref = masks.topk_mask(w, k)
    paths.tri()
    m, o = masks.topk_mask(w.to(device), k)
    assert int(m.sum()) == k
    assert torch.equal(m.cpu(), m_ref) and torch.equal(o.cpu(), o_ref)
