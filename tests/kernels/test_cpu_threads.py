"""The C loops at any thread count: the same bytes as the torch reference at
1, 2 and 3 threads (3 on a 2-core machine too: an odd split), on tensors
large enough to be cut into a piece per thread."""
import pytest
import torch

from fxcompress.kernels import actpack as ap, actpack_cpu

pytestmark = pytest.mark.skipif(actpack_cpu.lib() is None, reason="no C compiler: the reference is the CPU path")


def _outputs(x):
    """Everything the packers produce for x, as a flat list of tensors."""
    out = []
    x3 = ap.view3(x, "channel")
    xr = x.relu()
    xr3 = ap.view3(xr, "channel")
    a, mn = ap.stats(x3)
    a2, mn2, nnz = ap.stats_nnz(xr3)
    out += [a, mn, a2, mn2, nnz]
    for bits, signed in ((3, True), (8, False), (12, True), (1, False), (2, True), (4, False)):
        p = ap.quant_pack(x3 if signed else xr3, bits, "stochastic", seed=bits, signed=signed)
        out += list(p.parts) + [ap.unpack(p)]
    bits_c = torch.arange(x3.shape[1]) % 9 + 1
    mx = ap.mixed_pack(x3, bits_c, "stochastic", seed=2)
    out += [q for _, g in mx.groups for q in g.parts] + [ap.mixed_unpack(mx)]
    m = ap.pack_mask_gt(xr, 0.0)
    out += [m.bits, ap.pack_mask(xr > 0).bits, ap.unpack_mask(m), ap.unpack_mask_values(m, 1.0, 0.0)]
    z = ap.mixed_zvc_pack(xr3, bits_c, m, nnz, "stochastic", seed=4, amax=a2)
    out += [q for _, g, _ in z.groups for q in g.parts] + [ap.mixed_zvc_unpack(z)]
    codes = (torch.arange(x.numel()) % 7).to(torch.int32)
    parts = ap.pack_codes(codes, 3)
    out += list(parts) + [ap.unpack_codes(parts, 3, x.numel())]
    return out


def _assert_c_equals_reference(monkeypatch, run):
    """run()'s tensors with the C loops at 1, 2 and 3 threads: the same dtype
    and bytes as with the torch reference (FXC_CPU_FAST=0)."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FXC_CPU_FAST", "0")
        ref = run()
        monkeypatch.setenv("FXC_CPU_FAST", "1")
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = run()
            assert len(got) == len(ref)
            for i, (g, r) in enumerate(zip(got, ref)):
                assert g.dtype == r.dtype and torch.equal(g, r), (n, i)
    finally:
        torch.set_num_threads(before)


def test_c_loops_equal_reference_at_1_2_3_threads(monkeypatch):
    x = torch.randn(8, 24, 40, 41, generator=torch.Generator().manual_seed(0))  # 315 K elements
    _assert_c_equals_reference(monkeypatch, lambda: _outputs(x))


def test_psgd_scaling_equal_reference_at_1_2_3_threads():
    """PSGD's C scaling loop shares the weights out among threads: the same
    bits as scaled_grad_reference at any thread count."""
    from fxcompress.kernels import scaled_grad as sg

    if sg.cpu_lib() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(n, generator=gen) for n in (70_000, 3, 50_000, 129, 90_001)]
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    deltas = [float(w.abs().max()) / 7 for w in ws]
    zero = [False, True, False, False, True]
    ref = [sg.scaled_grad_reference(g, w, torch.tensor(d), 7, 0.5, 1e-3 if i % 2 else 0.0, z)
           for i, (g, w, d, z) in enumerate(zip(gs, ws, deltas, zero))]
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = sg.scale_many_cpu(gs, ws, deltas, [7] * 5, [0.5] * 5, [1e-3 if i % 2 else 0.0 for i in range(5)],
                                    zero)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zero_value_streams_cut_per_thread_equal_reference(monkeypatch, rounding):
    """AutoQuant's zero-value packing of a ReLU output cuts each width
    group's stream into a piece per thread where the mask says a piece's
    codes start on a byte: groups large enough to be cut (several 64 K
    element pieces), rows of odd length (B = 61 * 59), whole channels and
    long runs of zeros (a piece start must walk past them), 1..16-bit
    widths; the same bytes and decoded values as the torch reference at 1,
    2 and 3 threads."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, 61, 59, generator=gen).relu_()  # 2-bit group: 324 K elements
    x[:, 5] = 0  # a whole channel of zeros
    x[2:4, :, 3:50] = 0  # long zero runs across channels
    x[:, 7] = x[:, 7].abs() + 0.1  # a dense channel
    xr3 = ap.view3(x, "channel")
    widths = [2, 3, 2, 16, 2, 5, 3, 2] * 5  # few groups: 2 and 3 bits hold most channels

    def run():
        a, _, nnz = ap.stats_nnz(xr3)
        m = ap.pack_mask_gt(x, 0.0)
        z = ap.mixed_zvc_pack(xr3, torch.tensor(widths), m, nnz, rounding, seed=9, amax=a)
        return [q for _, g, _ in z.groups for q in g.parts] + [ap.mixed_zvc_unpack(z)]

    _assert_c_equals_reference(monkeypatch, run)


def test_relu_mask_with_statistics_equal_separate_passes():
    """fxc_pack_gt_stats (a ReLU's mask and the next save's statistics in one
    read, cut at multiples of 8 rows) gives pack_mask_gt's bytes and
    stats_nnz's values at 1, 2 and 3 threads: rows of odd length, a row
    count not a multiple of 8, negative values and NaN."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 13, 41, 37, generator=gen)  # 91 rows of 1517: 138 K elements
    x[3, 2, 5, 7] = float("nan")
    x[:, 4] = x[:, 4].relu()
    x3 = ap.view3(x, "channel")
    want = [ap.pack_mask_gt(x, 0.0).bits, *ap.stats_nnz(x3)]
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            m, amax, mn, nnz = ap.pack_mask_gt_stats(x3, x.shape)
            assert m.shape == tuple(x.shape) and m.n == x.numel()
            for i, (g, r) in enumerate(zip([m.bits, amax, mn, nnz], want)):
                assert g.dtype == r.dtype and torch.equal(g, r), (n, i)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rounding,shape", [("nearest", (4, 64, 30, 30)), ("stochastic", (4, 64, 30, 30)),
                                            ("nearest", (600, 64, 2, 2)), ("stochastic", (2400, 64, 1, 1))])
def test_width_groups_share_one_parallel_region_equal_reference(monkeypatch, rounding, shape):
    """AutoQuant's per-channel widths: all width groups of a tensor run in
    one parallel region, small groups (below a piece each) spread over the
    threads and large ones cut into pieces. Many small groups (13 widths,
    ~18 K elements each) and a mix of one large group with small ones, signed
    and unsigned, plain and zero-value packing: the same bytes and decoded
    values as the torch reference at 1, 2 and 3 threads; rows of 900, 4
    (resnet's 2x2 maps: the short-row decode) and 1 element."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=gen)  # 150-230 K elements
    xr = x.relu()
    x3, xr3 = ap.view3(x, "channel"), ap.view3(xr, "channel")
    many = torch.arange(64) % 13 + 1
    mix = torch.tensor([3] * 40 + [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16] * 2)
    clip = torch.tensor([0, 20, 3, 5] * 16)  # outside 1..16: clamped, as the reference does

    def run():
        out = []
        a, _, nnz = ap.stats_nnz(xr3)
        m = ap.pack_mask_gt(xr, 0.0)
        for bits_c in (many, mix, clip):
            mx = ap.mixed_pack(x3, bits_c, rounding, seed=6)
            out += [q for _, g in mx.groups for q in g.parts] + [ap.mixed_unpack(mx)]
            mu = ap.mixed_pack(xr3, bits_c, rounding, seed=7)
            out += [q for _, g in mu.groups for q in g.parts] + [ap.mixed_unpack(mu)]
            z = ap.mixed_zvc_pack(xr3, bits_c, m, nnz, rounding, seed=8, amax=a)
            out += [q for _, g, _ in z.groups for q in g.parts] + [ap.mixed_zvc_unpack(z)]
        return out

    _assert_c_equals_reference(monkeypatch, run)
