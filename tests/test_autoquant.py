"""AutoQuant's bound, measured: on a real model (the default CIFAR ResNet-20)
and a real batch (digits), the relative squared weight-gradient error of every
convolution and linear layer under `auto` stays within e = 2^-eps_bits."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress.data import load_data
from fxcompress.models import resnet_cifar


@pytest.fixture(scope="module")
def batch():
    bundle = load_data("digits", upscale=16)
    xs, ys = zip(*[bundle.train[i] for i in range(64)])
    return torch.stack(xs), torch.tensor(ys), bundle


def _weight_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n.replace("graph_module.", ""): p.grad.clone() for n, p in model.named_parameters()
            if p.dim() >= 2}  # conv and linear weights


@pytest.mark.parametrize("eps_bits", [0, 4])
def test_weight_gradient_error_within_bound(batch, eps_bits):
    x, y, bundle = batch
    torch.manual_seed(0)
    model = resnet_cifar(20, bundle.num_classes, bundle.in_channels)
    ref = copy.deepcopy(model)
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "eps_bits": eps_bits, "stats_every": 1}}]}
    cm = fxcompress.compile(model, policy, example_inputs=x[:2])
    # step 0: statistics (stored at `bits` meanwhile); no weight update
    _weight_grads(cm, x, y)
    cm.step()
    ctrl = cm.controllers["activations"]
    assert all(s.dx2 is not None for s in ctrl._specs.values() if s.rule in ("conv", "linear", "bn"))
    g = _weight_grads(cm, x, y)
    g0 = _weight_grads(ref, x, y)
    e = 2.0 ** -eps_bits
    worst = 0.0
    for n in g0:
        rel = float((g[n] - g0[n]).pow(2).sum() / g0[n].pow(2).sum())
        assert rel <= e, (n, rel, e)
        worst = max(worst, rel)
    assert worst > 0  # the activations really were quantized
    bits = cm.figures()["activations.avg_bits"]
    assert 1 < bits < 16


def test_tighter_bound_means_more_bits(batch):
    x, y, bundle = batch
    out = []
    for eps_bits in (0, 6):
        torch.manual_seed(0)
        model = resnet_cifar(20, bundle.num_classes, bundle.in_channels)
        policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                           "activations": {"mode": "auto", "eps_bits": eps_bits}}]}
        cm = fxcompress.compile(model, policy, example_inputs=x[:2])
        _weight_grads(cm, x, y)
        cm.step()
        _weight_grads(cm, x, y)
        out.append(cm.figures()["activations.avg_bits"])
    # e shrinks 64x: the allowed error (dx2) shrinks 64x, about 3 more bits
    assert out[1] == pytest.approx(out[0] + 3, abs=1.0)


def test_statistics_schedule(batch):
    x, y, bundle = batch
    torch.manual_seed(0)
    model = resnet_cifar(8, bundle.num_classes, bundle.in_channels)
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "stats_every": 3, "window": 2}}]}
    cm = fxcompress.compile(model, policy, example_inputs=x[:2])
    ctrl = cm.controllers["activations"]
    key = ctrl.groups[0][0]
    sizes = []
    for step in range(8):
        assert ctrl._specs[key].collect == (step % 3 == 0)
        _weight_grads(cm, x[:16], y[:16])
        cm.step()
        sizes.append(len(ctrl.snapshots.get(key, [])))
    assert sizes == [1, 1, 1, 2, 2, 2, 2, 2]  # snapshots at steps 0, 3, 6; the window keeps 2
