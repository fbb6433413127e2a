"""kernels/auto_pack.py (AutoQuant's widths, grouping and packing in two C
calls per tensor) against the torch/numpy reference of the three steps it
replaces (runtime/widths.auto_bits, then mixed_pack or mixed_zvc_pack):
the same widths, groups, bytes, decoded values and byte accounting, at 1, 2
and 3 threads."""
import pytest
import torch

from fxcompress.kernels import actpack as ap, actpack_cpu
from fxcompress.kernels.auto_pack import PackedAuto, auto_pack, auto_unpack
from fxcompress.runtime.widths import auto_bits

pytestmark = pytest.mark.skipif(actpack_cpu.lib() is None, reason="no C compiler: the reference is the CPU path")


def _bn(C, gen, dx2):
    return {"numer": dx2 * 1e3, "K": float(C), "gamma2": torch.rand(C, generator=gen),
            "inv_std2": torch.rand(C, generator=gen) * 10, "nnz2": torch.rand(C, generator=gen) * 1e4,
            "gz2_max": torch.rand(C, generator=gen) * 1e-6, "ggamma2": torch.rand(C, generator=gen) * 1e-4}


def _reference(x3, amax, signed, dx2, bn, rounding, seed, nnz=None, mask=None, spread=False):
    """What runtime/activations.py did per tensor before auto_pack: the
    width rule, then the group packers (FXC_CPU_FAST=0 set by the caller)."""
    A, C, B = x3.shape
    if nnz is not None:
        n = float(nnz.sum())
        scale = A * C * B / n if (n and spread) else 1.0
        bits_c = auto_bits(amax, False, C, dx2, bn, 8, scale, counts=nnz)
        return ap.mixed_zvc_pack(x3, bits_c, mask, nnz, rounding, seed, amax), bits_c
    bits_c = auto_bits(amax, signed, C, dx2, bn, 8, counts=torch.full((C,), A * B))
    return ap.mixed_pack(x3, bits_c, rounding, seed, amax, signed), bits_c


def _cases():
    gen = torch.Generator().manual_seed(5)
    for i, shape in enumerate([(4, 24, 9, 11), (2, 70, 3, 3), (8, 16, 40, 41), (3, 5, 1, 1), (2, 300, 2, 2)]):
        x = torch.randn(shape, generator=gen) * torch.rand(shape[1], 1, 1, generator=gen) ** 3 * 5
        for zvc in (False, True):
            for rounding in ("nearest", "stochastic"):
                dx2 = float(10 ** (-torch.rand(1, generator=gen) * 6))
                bn = _bn(shape[1], gen, dx2) if (i + zvc) % 2 else None
                yield x.relu() if zvc else x, zvc, rounding, dx2, bn, bool(i % 2)


def test_auto_pack_equals_reference_at_1_2_3_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        for x, zvc, rounding, dx2, bn, spread in _cases():
            x3 = ap.view3(x, "channel")
            amax, mn, nnz = ap.stats_nnz(x3)
            signed = float(mn) < 0
            mask = ap.pack_mask(x > 0) if zvc else None
            monkeypatch.setenv("FXC_CPU_FAST", "0")
            ref, bits_c = _reference(x3, amax, signed, dx2, bn, rounding, 7, nnz if zvc else None, mask,
                                     spread and bn is None)
            y_ref = (ap.mixed_zvc_unpack(ref) if zvc else ap.mixed_unpack(ref)).reshape(x.shape)
            monkeypatch.setenv("FXC_CPU_FAST", "1")
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                p = auto_pack(x3, amax, signed, dx2, bn, 8, rounding, 7, nnz if zvc else None, mask,
                              spread=spread and bn is None, shape=x.shape)
                assert isinstance(p, PackedAuto)
                assert len(p.groups) == len(ref.groups)
                for got, want in zip(p.groups, ref.groups):
                    assert torch.equal(got[0], want[0].to(torch.int32))  # channels of the group
                    assert got[1].bits == want[1].bits and torch.equal(got[1].kinv, want[1].kinv)
                    assert all(torch.equal(a, b) for a, b in zip(got[1].parts, want[1].parts))
                    assert got[2:] == want[2:]  # non-zeros per group (zvc)
                assert p.nbytes() == ref.nbytes() and p.code_bits() == ref.code_bits()
                y = auto_unpack(p)
                assert y.shape == x.shape and torch.equal(y, y_ref), (x.shape, zvc, rounding, n)
    finally:
        torch.set_num_threads(before)


def test_auto_pack_declines_what_it_does_not_take(monkeypatch):
    """None (the caller takes the step-by-step path) off the C path: no C
    loops, float64, BatchNorm terms of another length."""
    x3 = ap.view3(torch.randn(2, 4, 3, 3), "channel")
    amax = ap.stats(x3)[0]
    assert auto_pack(x3.double(), amax, True, 1e-3, None, 8, "nearest", 0) is None
    bad = _bn(3, torch.Generator().manual_seed(0), 1e-3)
    assert auto_pack(x3, amax, True, 1e-3, bad, 8, "nearest", 0) is None
    monkeypatch.setenv("FXC_CPU_FAST", "0")
    assert auto_pack(x3, amax, True, 1e-3, None, 8, "nearest", 0) is None
