"""The 1-bit path's convolution on bits (kernels/binary_conv.py)."""
import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress.kernels import binary_conv
from fxcompress.kernels.binary_conv import binary_conv2d
from fxcompress.models import resnet_cifar
from fxcompress.quantizers.dorefa import quantize_weight


def _inputs(n, c, h, co, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, h, h + 1, generator=g) > 0.5).float()  # not square: rows and columns kept apart
    w = quantize_weight(torch.randn(co, c, k, k, generator=g), 1)
    return x, w


@pytest.mark.parametrize("n,c,h,co,k,stride,pad", [
    (3, 16, 8, 16, 3, 1, 1),     # the CIFAR ResNet's first stage
    (2, 70, 9, 20, 3, 2, 1),     # channels over one 64-bit word, stride 2
    (2, 130, 6, 7, 3, 1, 1),     # a receptive field of 1170 bits
    (1, 512, 4, 8, 3, 1, 1),     # 72 words: the vector sum runs in chunks of 31
    (4, 3, 7, 5, 3, 2, 0),       # no padding; 7-column tails (vector of four, then single)
    (2, 32, 6, 64, 1, 2, 0),     # a 1x1 stride-2 shortcut
])
def test_kernel_equals_torch_conv(n, c, h, co, k, stride, pad):
    assert binary_conv._lib() is not None, "the C kernel did not build"
    x, w = _inputs(n, c, h, co, k)
    with torch.no_grad():
        got = binary_conv2d(x, w, None, stride, pad)
        ref = F.conv2d(x, w, None, stride, pad)
    assert got.shape == ref.shape
    # the kernel counts exactly and rounds once; the float conv rounds its partial sums
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    s = w.abs().max()
    assert torch.equal(got, s * (got / s).round())  # an integer count times the weight's magnitude, rounded once


def test_gradient_mode_and_other_shapes_take_torch_conv():
    x, w = _inputs(2, 8, 6, 4, 3)
    x.requires_grad_(True)
    y = binary_conv2d(x, w, None, 1, 1)
    y.sum().backward()  # training: torch.conv2d, so the gradient is torch's
    assert torch.equal(x.grad, torch.autograd.grad(F.conv2d(x, w, None, 1, 1).sum(), x)[0])
    with torch.no_grad():
        bias = torch.randn(4)
        assert torch.equal(binary_conv2d(x, w, bias, 1, 1), F.conv2d(x, w, bias, 1, 1))  # a bias: not the kernel's
        wide_x, wide_w = _inputs(1, 1100, 4, 3, 3)  # 9900 bits a field: over the kernel's 9216
        assert torch.equal(binary_conv2d(wide_x, wide_w, None, 1, 1), F.conv2d(wide_x, wide_w, None, 1, 1))


def test_camp_eval_is_the_same_with_the_kernel_and_without(monkeypatch):
    """The dual-precision pass puts the kernel on the 1-bit path's convs; eval
    outputs equal those of torch.conv2d (FXC_CPU_FAST=0) to float rounding."""
    torch.manual_seed(0)
    pol = {"version": 1, "settings": {"dual_precision": {"mode": "sp"}},
           "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "dual_precision": {"high_bits": 4}},
                     {"match": {"op": ["add", "iadd"]}, "optional": True,
                      "dual_precision": {"low_bits": 1, "high_bits": 4}}]}
    x = torch.rand(16, 3, 16, 16)
    model = fxcompress.compile(resnet_cifar(8, 10, 3), pol, x[:2])
    assert "binary_conv2d" in model.code
    model.eval()
    for b in model.controllers["dual_precision"].blocks.values():
        b.force = 0.0  # every sample on the 1-bit path
    calls = []
    real = binary_conv._lib()
    monkeypatch.setattr(binary_conv, "_lib", lambda: (calls.append(1), real)[1])
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setenv("FXC_CPU_FAST", "0")
        ref = model(x)
    assert len(calls) == 6  # 3 blocks x 2 convs, each on bits (the second forward never asks for the kernel)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4)


def test_bench_tool_checks_and_prints(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_binary_conv.py")
    spec = importlib.util.spec_from_file_location("bench_binary_conv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--batch", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp32 / bits" in out and len([ln for ln in out.splitlines() if ln.rstrip().endswith("x")]) == 5
