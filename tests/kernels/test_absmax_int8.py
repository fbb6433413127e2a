import pytest
import torch

from fxcompress.errors import ShapeError
from fxcompress.kernels import absmax_int8


@pytest.mark.parametrize("group", [32, 128])
def test_triton_equals_reference_bitwise(monkeypatch, group):
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    x = torch.randn(64 * group, generator=torch.Generator().manual_seed(1)) * 3
    x[:group] = 0  # an all-zero group takes the zero-scale branch
    x[group] = 0.5 * 127 / 3  # exact ties exercise the rounding rule
    q_ref, s_ref = absmax_int8.quantize_reference(x, group)
    q_tri, s_tri = absmax_int8.quantize_triton(x, group, rows=64)
    assert torch.equal(q_ref, q_tri)
    assert torch.equal(s_ref, s_tri)


def test_dispatch_uses_triton_only_when_forced(monkeypatch):
    x = torch.randn(256)
    monkeypatch.delenv("FXC_FORCE_TRITON", raising=False)
    assert absmax_int8.use_triton(x) is False
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")
    assert absmax_int8.use_triton(x) is True


def test_round_trip_error_within_half_step():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    q, s = absmax_int8.quantize(x, 128)
    err = (absmax_int8.dequantize(q, s, 128) - x).reshape(-1, 128).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()
    assert q.abs().max() == 127


def test_bad_group_and_dtype():
    with pytest.raises(ShapeError, match="groups of 100"):
        absmax_int8.quantize(torch.randn(256), 100)
    with pytest.raises(ShapeError, match="dtype"):
        absmax_int8.quantize(torch.ones(256, dtype=torch.int32), 128)
