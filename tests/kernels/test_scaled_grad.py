"""The fused scaled-gradient kernel equals its torch reference bit for bit
(under the Triton interpreter), ties and clipping included."""
import pytest
import torch

from fxcompress.kernels import scaled_grad as sg


def _case(n, bits, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen) * 0.1
    g = torch.randn(n, generator=gen)
    L = sg.levels_for(bits)
    delta = (w.abs().max() * 0.8 / L).reshape(1)  # a range a bit narrower: some weights clip
    # exact ties (k + 1/2) * delta, grid points and zeros, to pin rounding down
    k = torch.arange(-L - 1, L + 1, dtype=torch.float32)
    w[: k.numel()] = (k + 0.5) * delta
    w[k.numel(): 2 * k.numel()] = k * delta
    w[-3:] = 0.0
    return g.to(dtype), w.to(dtype), delta


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("eps,zero", [(0.0, False), (1e-3, False), (0.0, True)])
def test_triton_equals_reference(monkeypatch, bits, eps, zero):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    g, w, delta = _case(3000, bits, seed=bits)
    ref = sg.scaled_grad_reference(g, w, delta, sg.levels_for(bits), 150.0, eps, zero)
    from fxcompress.kernels.dispatch import backend_for
    assert backend_for(g) == "triton"
    out = sg.scaled_grad(g, w, delta, sg.levels_for(bits), 150.0, eps, zero)
    assert out.dtype == g.dtype and out.shape == g.shape
    assert torch.equal(out, ref)


def test_triton_odd_lambda_and_half_precision(monkeypatch):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    g, w, delta = _case(1500, 4, seed=7)
    out = sg.scaled_grad(g, w, delta, 7, 0.1234567, 0.0, False)
    assert torch.equal(out, sg.scaled_grad_reference(g, w, delta, 7, 0.1234567))
    gh, wh = g.to(torch.bfloat16), w.to(torch.bfloat16)
    out = sg.scaled_grad(gh, wh, delta, 7, 150.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sg.scaled_grad_reference(gh, wh, delta, 7, 150.0))


def test_reference_rounds_half_to_even():
    d = torch.tensor([1.0])
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 9.0])
    assert sg.quantize_reference(w, d, 7).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 7.0]


def test_shape_mismatch_is_an_error():
    from fxcompress.errors import ShapeError

    with pytest.raises(ShapeError):
        sg.scaled_grad(torch.zeros(3), torch.zeros(4), torch.ones(1), 7, 1.0)
