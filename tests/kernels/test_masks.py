"""Magnitude / N:M mask kernels: Triton (interpreter) equals the torch reference."""
import pytest
import torch

from fxcompress.errors import ShapeError
from fxcompress.kernels import masks


def weights(shape, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w.view(-1)[::7] = 0.25   # many exact ties
    w.view(-1)[::11] = -0.25
    return w


@pytest.mark.parametrize("shape, in_dim", [((16, 8, 3, 3), 1), ((24, 32), 1), ((32, 12), 0)])
def test_nm_triton_equals_reference(monkeypatch, shape, in_dim):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    w = weights(shape)
    ref = masks.nm_mask_reference(w, 2, 4, in_dim)
    mask, out = masks.nm_mask_triton(w, 2, 4, in_dim, rows=256)  # one large block covers the tensor
    assert torch.equal(mask, ref)
    assert torch.equal(out, w * ref)
    groups = mask.movedim(in_dim, -1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    assert torch.equal(masks.nm_mask(w, 2, 4, in_dim), ref)  # dispatch takes the kernel when forced


def test_topk_triton_equals_reference(monkeypatch):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    w = weights((64, 40), seed=1)
    for k in (1, 257, 1000, 2559):
        (ref,) = masks.topk_masks([w.abs() + 1e-4], k)
        mask, out = masks.topk_mask_triton(w, k, block=1024)
        assert int(mask.sum()) == k
        assert torch.equal(mask, ref), k
        assert torch.equal(out, w * ref)


def test_nm_needs_a_multiple_of_m():
    with pytest.raises(ShapeError, match="multiple of M=4"):
        masks.nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ShapeError, match="N <= M"):
        masks.nm_mask(torch.randn(4, 8), 5, 4)


def test_kept_count_is_ceil_without_float_noise():
    assert masks.kept_count(10, 0.9) == 1      # 10 * 0.1 = 1.0000000000000002 in floats
    assert masks.kept_count(11, 0.9) == 2      # ceil(1.1)
    assert masks.kept_count(100, 0.0) == 100
