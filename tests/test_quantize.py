"""Post-training quantization used to evaluate PSGD: weights on the symmetric
b-bit grid, activations clipped at max_c(beta_c + 6 gamma_c)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.errors import BadInput
from fxcompress.quantize import (FakeQuantAct, authors_first_last_bits, quantize_activations,
                                 quantize_weights, weight_layers)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = F.relu(y + x)  # residual: the BN on the add's input sets the clip
        x = x.mean((2, 3)).relu()  # no BN upstream: running max
        return self.fc(x)


def model(seed=0):
    torch.manual_seed(seed)
    m = Block()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def on_grid(w, bits):
    L = 2 ** (bits - 1) - 1
    delta = w.abs().max() / L
    levels = torch.arange(-L, L + 1, dtype=torch.float32) * delta
    return levels[(w.reshape(-1, 1) - levels).abs().argmin(1)].reshape(w.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_go_to_the_nearest_grid_point(bits):
    m = model()
    q = quantize_weights(m, bits)
    for (name, orig), (_, new) in zip(weight_layers(m), weight_layers(q)):
        assert torch.equal(new.weight, on_grid(orig.weight.detach(), bits)), name
        assert new.weight.unique().numel() <= 2 ** bits - 1
        assert not torch.equal(new.weight, orig.weight)  # a copy: the original is untouched
    assert torch.equal(q.fc.bias, m.fc.bias)


def test_first_last_rules():
    m = model()
    q = quantize_weights(m, 2, first_last_bits=authors_first_last_bits(2), last_bias=True)
    assert torch.equal(q.conv1.weight, on_grid(m.conv1.weight.detach(), 8))
    assert torch.equal(q.conv2.weight, on_grid(m.conv2.weight.detach(), 2))
    assert torch.equal(q.fc.weight, on_grid(m.fc.weight.detach(), 8))
    assert torch.equal(q.fc.bias, on_grid(m.fc.bias.detach(), 8))
    assert authors_first_last_bits(4) is None
    k = quantize_weights(m, 2, keep_first_last=True)
    assert torch.equal(k.conv1.weight, m.conv1.weight) and torch.equal(k.fc.weight, m.fc.weight)
    assert torch.equal(k.conv2.weight, on_grid(m.conv2.weight.detach(), 2))
    assert quantize_weights(m, 4, inplace=True) is m
    assert torch.equal(m.conv2.weight, on_grid(model().conv2.weight.detach(), 4))  # same seed: the original weights


@pytest.mark.parametrize("bits", [0, 1, 9, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(BadInput):
        quantize_weights(model(), bits)


def test_activation_clipping_from_bn():
    m = model().requires_grad_(False)
    gm = quantize_activations(m, 4)
    clips = dict(gm.fxc_actq)
    assert len(clips) == 3 and "fxc_actq_" in gm.code
    expected1 = float((m.bn1.bias + 6 * m.bn1.weight).max())
    expected2 = float((m.bn2.bias + 6 * m.bn2.weight).max())
    values = sorted(v for v in clips.values() if v is not None)
    assert values == pytest.approx(sorted([expected1, expected2]), rel=0, abs=0)
    assert [v for v in clips.values() if v is None] == [None]  # the ReLU after the mean
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        out = gm(x)
    assert out.shape == (2, 3)
    # the first ReLU's output is on its grid: multiples of x_max / 15, in [0, x_max]
    acts = {}
    gm.get_submodule("fxc_actq_act").register_forward_hook(lambda mod, i, o: acts.setdefault("a", o))
    with torch.no_grad():
        gm(x)
    steps = acts["a"] / (expected1 / 15)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.max() <= 15 + 1e-4


def test_activation_quantization_at_16_bits_is_nearly_exact_and_dynamic_mode():
    m = model()
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(quantize_activations(m, 16)(x), ref, atol=1e-3)
        gm = quantize_activations(m, 8, clip="dynamic")
        assert all(v is None for _, v in gm.fxc_actq)
        assert torch.allclose(gm(x), ref, atol=0.05)


def test_fake_quant_running_max():
    fq = FakeQuantAct(2)
    fq(torch.tensor([0.0, 3.0]))
    assert float(fq.x_max) == 3.0
    out = fq(torch.tensor([0.0, 1.0, 13.0]))
    assert float(fq.x_max) == pytest.approx(0.9 * 3 + 0.1 * 13)
    assert out.max() == pytest.approx(float(fq.x_max))


def test_bad_activation_settings():
    with pytest.raises(BadInput):
        quantize_activations(model(), 1)
    with pytest.raises(BadInput):
        quantize_activations(model(), 4, clip="bnn")
    with pytest.raises(BadInput):
        quantize_activations(nn.Linear(3, 3), 4)


def test_evaluate_command_on_a_psgd_run(tmp_path, capsys):
    import json
    import os

    from fxcompress.cli import main
    from fxcompress.training import TrainConfig, train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = str(tmp_path / "run")
    train(TrainConfig(policy=os.path.join(root, "policies", "psgd_w2.yaml"), depth=8, epochs=1, batch_size=32,
                      train_limit=64, test_limit=40, upscale=8, run_dir=run_dir, progress=False, plots=False))
    assert main(["evaluate", run_dir, "--w-bits", "2", "--a-bits", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_images"] == 40 and res["w_bits"] == 2 and res["first_last"] == 8
    assert 0 <= res["quant_acc"] <= 1 and res["drop"] == pytest.approx(res["fp_acc"] - res["quant_acc"])
    assert main(["evaluate", os.path.join(run_dir, "final_model.pt"), "--w-bits", "4"]) == 0
    assert "W4A32" in capsys.readouterr().out
    assert main(["evaluate", run_dir, "--w-bits", "9"]) == 2
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
