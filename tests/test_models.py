"""The built-in CIFAR ResNet family."""
import pytest
import torch
import torch.fx as fx

from fxcompress.errors import BadInput
from fxcompress.models import ShortcutA, default_model, resnet_cifar

# Parameter counts of the CIFAR ResNets with option-A shortcuts (He et al. 2016, Table 6).
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(depth):
    m = resnet_cifar(depth, 10, 3)
    n = sum(p.numel() for p in m.parameters())
    assert round(n / 1e6, 2) == PAPER_PARAMS_M[depth]
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # depth counts convs plus the final linear layer


@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_and_trace(size):
    m = resnet_cifar(20, 7, 1).eval()
    x = torch.randn(2, 1, size, size)
    gm = fx.symbolic_trace(m)
    assert torch.equal(gm(x), m(x)) and m(x).shape == (2, 7)
    # the weightless shortcut traces into plain ops (a policy can match op: pad)
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert len(pads) == 2


def test_option_a_shortcut_subsamples_and_zero_pads():
    s = ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = s(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert list(s.parameters()) == []


def test_default_model_sized_for_data():
    class Bundle:
        num_classes, in_channels = 100, 3

    m = default_model(Bundle(), depth=32)
    assert m.fc.out_features == 100 and m.conv1.in_channels == 3 and m.depth == 32


@pytest.mark.parametrize("depth", [19, 0, 2, "20", True])
def test_bad_depth(depth):
    with pytest.raises(BadInput, match="6n\\+2"):
        resnet_cifar(depth)


def test_learns_one_batch():
    torch.manual_seed(0)
    m = resnet_cifar(8, 4, 1)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
