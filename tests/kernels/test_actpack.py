"""Activation packing: Triton (interpreted) == C fast path == torch reference,
bit for bit, in both rounding modes (the stochastic draws come from the same
counter-based hash); round-trip error bounds; unbiased stochastic rounding;
exact masks and zero-value compression."""
import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import BadInput
from fxcompress.kernels import actpack as ap, actpack_cpu, fixed_width as fw


def _x(shape=(3, 5, 7, 9), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("signed", [True, False, ap.SIGNED_ALL])
def test_all_paths_bitwise_equal(monkeypatch, bits, rounding, signed):
    x = _x()
    if not signed:
        x = x.relu()
    x3 = ap.view3(x, "channel")
    k, kinv = ap.multipliers(x3.abs().amax(dim=(0, 2)), bits, signed)
    key = ap.mix_seed(7) if rounding == "stochastic" else 0
    stoch = rounding == "stochastic"
    ref = fw._quant_pack_ref(x3, k, bits, signed, stoch, key)
    tri = fw._quant_pack_triton(x3, k, bits, signed, stoch, key)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))
    y_ref = fw._unpack_dequant_ref(ref, kinv, bits, signed, tuple(x3.shape), torch.float32)
    y_tri = fw._unpack_triton(ref, kinv, bits, signed, tuple(x3.shape), torch.float32)
    assert torch.equal(y_ref, y_tri)
    if actpack_cpu.lib() is not None:
        c = fw._quant_pack_c(x3, k, bits, signed, stoch, key)
        assert all(torch.equal(a, b) for a, b in zip(ref, c))
        assert torch.equal(y_ref, fw._unpack_dequant_c(ref, kinv, bits, signed, tuple(x3.shape), torch.float32))


def test_public_api_takes_triton_when_forced(monkeypatch):
    x = _x((2, 4, 33))  # 264 elements: a ragged last byte at 3 bits
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    p_t = ap.quant_pack(ap.view3(x, "group", 8), 3, "stochastic", seed=1, shape=x.shape)
    y_t = ap.unpack(p_t)
    monkeypatch.setenv("FXC_FORCE_TRITON", "0")
    p_r = ap.quant_pack(ap.view3(x, "group", 8), 3, "stochastic", seed=1, shape=x.shape)
    assert all(torch.equal(a, b) for a, b in zip(p_t.parts, p_r.parts))
    assert torch.equal(y_t, ap.unpack(p_r))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_round_trip_error_and_size(bits, granularity):
    x = _x((4, 8, 16, 16))
    x3 = ap.view3(x, granularity, 64)
    p = ap.quant_pack(x3, bits, "nearest", shape=x.shape)
    y = ap.unpack(p)
    step = p.kinv.view(1, -1, 1)
    err = ((y - x).view(x3.shape).abs() / step)
    # half a step everywhere: the grid reaches each channel's extremes
    assert err.max() <= 0.5 + 1e-4
    assert sum(q.numel() for q in p.parts) == x.numel() * bits // 8


def _draws_at_the_extremes(signed: bool, copies: int):
    """Two channels of values that reach each channel's max|x| (and, signed,
    its negative), in the top grid cell and in between, each repeated
    `copies` times (every copy draws its own u)."""
    top = torch.tensor([1.0, 0.999, 0.97, 0.71, 0.5, 0.33, 0.02, 0.0])
    row = torch.cat([top, -top[:4]]) if signed else top
    rows = torch.stack([row * 2.5, row * 0.3])  # (2 channels, values)
    return rows.unsqueeze(0).repeat(copies, 1, 1).permute(1, 0, 2).reshape(1, 2, -1).contiguous(), rows


@pytest.mark.parametrize("signed", [ap.SIGNED_ALL, ap.SIGNED_ZERO, ap.UNSIGNED])
@pytest.mark.parametrize("path", ["reference", "c", "triton"])
def test_stochastic_rounding_is_unbiased_at_every_width(signed, path):
    """Mean of many stochastic draws == the input, at every width 1..8, on
    values that reach the channel's maximum. The grid must contain the
    extremes: with 2^b/m (codes clipped to the top) the top cell always
    rounded down, a bias of up to a whole step this test sees at any width.
    Tolerance: each draw is value + step * (Bernoulli(p) - p), so the mean of
    n draws has standard deviation <= step / (2 sqrt(n)); allowed 5 of those."""
    copies = 2000 if path != "triton" else 500
    x3, rows = _draws_at_the_extremes(signed, copies)
    amax = x3.abs().amax(dim=(0, 2))
    if path == "c" and actpack_cpu.lib() is None:
        pytest.skip("no C compiler")
    for bits in range(1, 9):
        k, kinv = ap.multipliers(amax, bits, signed)
        key = ap.mix_seed(bits)
        pack = {"reference": fw._quant_pack_ref, "c": fw._quant_pack_c, "triton": fw._quant_pack_triton}[path]
        parts = pack(x3, k, bits, signed, True, key)
        y = fw._unpack_dequant_ref(parts, kinv, bits, signed, tuple(x3.shape), torch.float32)
        mean = y.view(2, copies, -1).mean(1)
        step = kinv.view(2, 1)
        tol = 5 * step / (2 * copies ** 0.5)
        err = (mean - rows).abs()
        assert (err <= tol).all(), (bits, signed, path, (err / step).max().item())
        # the extremes are on the grid (up to the 1e-6 guard in the scale):
        # nearly every draw of max|x| decodes to it
        ext = y.view(2, copies, -1)[:, :, 0]
        assert ((ext - rows[:, :1]).abs() <= 1e-5 * rows[:, :1]).float().mean() > 0.99


@pytest.mark.parametrize("path", ["reference", "c", "triton"])
def test_signed_grids_levels(monkeypatch, path):
    """Signed stochastic rounding uses all 2^b codes (4 levels at 2 bits:
    -m, -m/3, m/3, m), round to nearest keeps 0 on the grid (3 levels at 2
    bits); both reach the channel's extremes. Through the public packers."""
    if path == "c" and actpack_cpu.lib() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("FXC_CPU_FAST", "1" if path == "c" else "0")
    monkeypatch.setenv("FXC_FORCE_TRITON", "1" if path == "triton" else "0")
    x = torch.linspace(-1.0, 1.0, 4001).view(1, 1, -1) * 2.0
    m = 2.0 + ap.EPS
    for bits in (1, 2, 3):
        p = ap.quant_pack(x, bits, "stochastic", seed=5)
        assert p.signed == ap.SIGNED_ALL
        lv = torch.unique(ap.unpack(p))
        want = -m + torch.arange(2 ** bits) * (2 * m / (2 ** bits - 1))
        assert lv.numel() == 2 ** bits and torch.allclose(lv, want, atol=1e-5), (bits, lv)
        z = ap.zvc_pack(x, bits, "stochastic", seed=5)
        assert z.signed == ap.SIGNED_ALL and torch.unique(ap.zvc_unpack(z)[x != 0]).numel() == 2 ** bits
        mx = ap.mixed_pack(x.repeat(1, 2, 1), torch.tensor([bits, bits + 1]), "stochastic", seed=5)
        assert torch.unique(ap.mixed_unpack(mx)[0, 0]).numel() == 2 ** bits
        assert torch.unique(ap.mixed_unpack(mx)[0, 1]).numel() == 2 ** (bits + 1)
    n = ap.quant_pack(x, 2, "nearest")
    assert n.signed == ap.SIGNED_ZERO
    lv = torch.unique(ap.unpack(n))
    assert lv.numel() == 3 and torch.allclose(lv, torch.tensor([-m, 0.0, m]), atol=1e-5)


def test_stochastic_rounding_seed_changes_the_stream():
    x = torch.tensor([0.13, -0.61, 0.37, -0.93]).repeat(500).view(1, 1, -1)
    amax = torch.tensor([1.0])
    p = ap.quant_pack(x, 2, "stochastic", seed=3, amax=amax, signed=True)
    p2 = ap.quant_pack(x, 2, "stochastic", seed=4, amax=amax, signed=True)
    assert not torch.equal(p.parts[0], p2.parts[0])


def test_mask_zvc_and_mixed_exact_where_promised():
    m = torch.rand(1001, generator=torch.Generator().manual_seed(0)) > 0.3
    pm = ap.pack_mask(m)
    assert torch.equal(ap.unpack_mask(pm), m) and pm.nbytes() == 126
    x = _x((2, 6, 10, 10)).relu()
    z = ap.zvc_pack(ap.view3(x, "channel"), 8, shape=x.shape)
    y = ap.zvc_unpack(z)
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))  # zeros restored exactly
    assert z.nnz == int((x != 0).sum())
    assert z.nbytes() == 150 + -(-z.nnz * 8 // 8) + 6 * 4  # mask + codes + scales
    bits_c = torch.tensor([2, 3, 3, 8, 16, 5])
    mx = ap.mixed_pack(ap.view3(x, "channel"), bits_c, shape=x.shape)
    err = (ap.mixed_unpack(mx) - x).abs().amax(dim=(0, 2, 3))
    amax = x.abs().amax(dim=(0, 2, 3))
    assert (err <= amax / 2.0 ** bits_c * 1.0001 + 1e-6).all()


def test_bad_bits_and_rounding():
    with pytest.raises(BadInput, match="1..16"):
        ap.quant_pack(_x().view(1, 1, -1), 17)
    with pytest.raises(BadInput, match="rounding"):
        ap.quant_pack(_x().view(1, 1, -1), 2, "up")
    assert ap.slices(7) == [(4, 3), (2, 1), (1, 0)] and ap.slices(16) == [(8, 8), (8, 0)]


def test_cpu_fast_path_helpers_equal_reference(monkeypatch):
    if actpack_cpu.lib() is None:
        pytest.skip("no C compiler: the torch reference is the CPU path")
    x = _x((3, 6, 5, 7))
    x3 = ap.view3(x, "channel")
    a_c, m_c = ap.stats(x3)
    a_r, m_r = fw._stats_ref(x3)
    assert torch.equal(a_c, a_r) and torch.equal(m_c, m_r)
    m = x > 0.3
    pm = ap.pack_mask(m)
    assert torch.equal(ap.pack_mask_gt(x, 0.3).bits, pm.bits)
    assert torch.equal(ap.unpack_mask_values(pm, 2.5, -1.0), torch.where(m, 2.5, -1.0))
    bits_c = torch.tensor([2, 3, 3, 7, 16, 5])
    mx = ap.mixed_pack(x3, bits_c, "stochastic", seed=2, shape=x.shape)
    fast = ap.mixed_unpack(mx)
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    mx_ref = ap.mixed_pack(x3, bits_c, "stochastic", seed=2, shape=x.shape)
    for (_, a), (_, b) in zip(mx.groups, mx_ref.groups):
        assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts))
    assert torch.equal(fast, ap.mixed_unpack(mx_ref))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (4, 5, 2, 2), (2, 3, 40, 41), (2, 16, 8, 8)])
def test_mixed_zvc_with_shared_mask(monkeypatch, rounding, shape):
    """Per-channel widths, only the elements > 0 stored, the non-zero pattern
    taken from a mask stored elsewhere (a ReLU's): C == torch reference bit
    for bit (rows of any length and alignment), zeros exact, each non-zero
    within a grid step (half a step rounding to nearest), and the bytes
    are the non-zeros' codes only (the mask is not counted twice)."""
    x = _x(shape, seed=3).relu()
    x3 = ap.view3(x, "channel")
    C = x3.shape[1]
    bits_c = torch.tensor([1, 2, 3, 8, 16, 5, 7, 12] * 2)[:C]
    amax, mn, nnz_c = ap.stats_nnz(x3)
    assert torch.equal(nnz_c, (x3 > 0).sum(dim=(0, 2))) and float(mn) >= 0
    mask = ap.pack_mask(x > 0)
    z = ap.mixed_zvc_pack(x3, bits_c, mask, nnz_c, rounding, seed=5, amax=amax, shape=x.shape)
    y = ap.mixed_zvc_unpack(z)
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))
    step = (amax + ap.EPS) / (2.0 ** bits_c.float() - 1)  # the unsigned grid's step
    err = (y - x).abs().amax(dim=(0, 2, 3))
    assert (err <= step * 1.0001 + 1e-6).all()
    payload = sum(sum(-(-n * w // 8) for w, _ in ap.slices(g.bits)) for _, g, n in z.groups)
    assert z.nbytes() == payload + C * 4 + C * 4  # codes + scales + channel indices
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    z_ref = ap.mixed_zvc_pack(x3, bits_c, mask, nnz_c, rounding, seed=5, amax=amax, shape=x.shape)
    for (_, a, na), (_, b, nb) in zip(z.groups, z_ref.groups):
        assert na == nb and all(torch.equal(p, q) for p, q in zip(a.parts, b.parts))
    assert torch.equal(ap.mixed_zvc_unpack(z_ref), y)
    monkeypatch.setenv("FXC_CPU_FAST", "1")
    assert torch.equal(ap.mixed_zvc_unpack(z_ref), y)


def test_cpu_sel_packers_equal_reference_all_widths(monkeypatch):
    """The channel-subset packer writes every slice of a width in one pass."""
    if actpack_cpu.lib() is None:
        pytest.skip("no C compiler: the torch reference is the CPU path")
    x = _x((3, 16, 3, 5), seed=4)
    x3 = ap.view3(x, "channel")
    bits_c = torch.arange(1, 17)
    for rounding in ("nearest", "stochastic"):
        mx = ap.mixed_pack(x3, bits_c, rounding, seed=1, shape=x.shape)
        monkeypatch.setenv("FXC_CPU_FAST", "0")
        mx_ref = ap.mixed_pack(x3, bits_c, rounding, seed=1, shape=x.shape)
        monkeypatch.setenv("FXC_CPU_FAST", "1")
        for (_, a), (_, b) in zip(mx.groups, mx_ref.groups):
            assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts))
        assert torch.equal(ap.mixed_unpack(mx), ap.mixed_unpack(mx_ref))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2), (5, 3, 2, 1)])
def test_window_index_c_equals_reference(monkeypatch, kernel, stride, padding, dilation):
    """Max-pool indices as window positions and back: the C loops give the
    torch reference's codes and restore the exact indices max_pool2d made."""
    torch.manual_seed(kernel + stride)
    x = torch.randn(2, 3, 13, 11)
    _, idx = F.max_pool2d(x, kernel, stride, padding, dilation, return_indices=True)
    geom = {"kernel": (kernel, kernel), "stride": (stride, stride), "padding": (padding, padding),
            "dilation": (dilation, dilation), "in_w": 11}
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    ref = ap.window_local(idx, geom)
    monkeypatch.setenv("FXC_CPU_FAST", "1")
    fast = ap.window_local(idx, geom)
    assert ref.dtype == fast.dtype == torch.int32 and torch.equal(fast, ref)
    assert int(fast.min()) >= 0 and int(fast.max()) < kernel * kernel
    assert torch.equal(ap.window_global(fast, geom, 11), idx)
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    assert torch.equal(ap.window_global(ref, geom, 11), idx)
