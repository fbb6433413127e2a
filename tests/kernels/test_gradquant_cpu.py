"""Gradient quantization's C path (gradquant_cpu.c): the same message bytes
and the same decoded mean as the torch reference (same random stream), at
1, 2 and 3 threads, for ragged sizes, both norms and several widths."""
import pytest
import torch

from fxcompress.kernels import gradquant as G

pytestmark = pytest.mark.skipif(G.cpu_lib() is None, reason="no C compiler: the reference is the CPU path")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_c_encode_decode_equal_reference(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(threads)
        for numel, bucket in ((5, 8), (77_777, 512), (3 * 8192, 8192), (600_001, 8192)):
            for bits, levels in ((2, [-1.0, -0.2, 0.3, 1.0]), (3, torch.linspace(-1, 1, 8).tolist()),
                                 (8, torch.linspace(-1, 1, 200).tolist())):
                x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen)
                for norm in ("l2", "linf"):
                    ref = G.encode_reference(x, levels, bits, bucket, norm, seed=numel + bits)
                    assert torch.equal(G.encode_c(x, levels, bits, bucket, norm, seed=numel + bits), ref)
                msgs = torch.stack([G.encode_reference(torch.randn(numel, generator=gen), levels, bits, bucket,
                                                       seed=s) for s in range(3)])
                assert torch.equal(G.decode_c(msgs, levels, bits, numel, bucket),
                                   G.decode_reference(msgs, levels, bits, numel, bucket))
    finally:
        torch.set_num_threads(before)


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
