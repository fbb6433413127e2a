"""Exporting models rewritten by the sparsity (AC/DC) and dual_precision
(CAMP) passes: the reloaded module.py carries the masks, the gates, the
low-path norms and the routing state, and computes what the compiled model
computes, in training and in (routed) eval."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from fxcompress.export import export
from fxcompress.runtime.dual_precision import DualBlock
from fxcompress.runtime.sparsity import MaskedWeight
from tests.test_export import import_exported
from tests.models.residual import Residual


class ResNet(nn.Module):
    """Small, with two residual blocks; constructor arguments keep the
    source model out of it (every module is rebuilt by a constructor)."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Residual(c), Residual(c))
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def camp_policy(mode, pre_gate, quantizer):
    return {"settings": {"dual_precision": {"mode": mode, "pre_gate": pre_gate}},
            "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "dual_precision": {"high_bits": 4}},
                      {"match": {"op": ["add", "iadd"]},
                       "dual_precision": {"low_bits": 1, "high_bits": 4, "quantizer": quantizer,
                                          "gate_channels": 4, "gate_bits": 4}}]}


def split_gates(cm, x):
    """Gates that send about half the batch each way, block by block."""
    cm.eval()
    for b in (m for m in cm.graph_module.modules() if isinstance(m, DualBlock)):
        nn.init.normal_(b.gate.fc.weight, std=3.0)
        nn.init.zeros_(b.gate.fc.bias)
        seen = []
        h = b.gate.register_forward_hook(lambda m, i, o: seen.append(torch.log(o[:, 1] / o[:, 0])))
        with torch.no_grad():
            cm(x)
        h.remove()
        b.gate.fc.bias.data[1] = -seen[0].median() + 1e-4


@pytest.mark.parametrize("mode,pre_gate,quantizer", [("sp", False, "dorefa"), ("rl", True, "pact")])
def test_camp_model_exports_with_gates_norms_and_routing(tmp_path, mode, pre_gate, quantizer):
    torch.manual_seed(0)
    cm = fxcompress.compile(ResNet(), camp_policy(mode, pre_gate, quantizer), (torch.randn(2, 1, 8, 8),))
    x = torch.randn(16, 1, 8, 8)
    split_gates(cm, x)
    cm.train()
    cm(x).sum().backward()  # moves both paths' BatchNorm statistics and the usage counters
    blocks = {n: m for n, m in cm.graph_module.named_modules() if isinstance(m, DualBlock)}
    assert len(blocks) == 2
    export(cm, tmp_path)
    rebuilt = import_exported(str(tmp_path)).load()
    state, back = cm.graph_module.state_dict(), rebuilt.state_dict()
    assert set(state) <= set(back) and all(torch.equal(back[k], v) for k, v in state.items())
    for name, b in blocks.items():
        other = rebuilt.get_submodule(name)
        assert (other.block, other.mode, other.pre_gate, other._norm_sources) == \
            (b.block, b.mode, b.pre_gate, b._norm_sources)
        assert list(other.quant) == list(b.quant) and list(other.low_norms) == list(b.low_norms)
        assert other.train_count.item() == b.train_count.item() == 16
        assert not torch.equal(other.low_norms[next(iter(b.low_norms))].running_mean,
                               cm.graph_module.get_submodule(b._norm_sources[next(iter(b.low_norms))]).running_mean)
    cm.eval(), rebuilt.eval()
    for b in (b for b in rebuilt.modules() if isinstance(b, DualBlock)):
        b.eval_sum.zero_(), b.eval_count.zero_()
    with torch.no_grad():
        routed = cm(x)
        assert torch.equal(rebuilt(x), routed)  # routed eval: each sample runs the path its gate chose
        used = [(m.eval_sum / m.eval_count).item() for m in rebuilt.modules() if isinstance(m, DualBlock)]
        assert all(0 < u < 1 for u in used), used  # both paths really used
        for m in (cm.graph_module, rebuilt):
            for b in (b for b in m.modules() if isinstance(b, DualBlock)):
                b.set_routed(False)
        assert torch.equal(rebuilt(x), cm(x))
    cm.train(), rebuilt.train()
    torch.manual_seed(5)
    y = cm(x)  # rl samples its choices: the same seed gives the same ones
    torch.manual_seed(5)
    assert torch.equal(rebuilt(x), y)


def test_acdc_model_exports_with_its_masks(tmp_path):
    torch.manual_seed(0)
    policy = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "sparsity": {"sparsity": 0.9}}]}
    cm = fxcompress.compile(ResNet(), policy, (torch.randn(2, 1, 8, 8),))
    masked = {n: m for n, m in cm.graph_module.named_modules() if isinstance(m, MaskedWeight)}
    assert len(masked) == 6
    for m in masked.values():
        m.mask.copy_(torch.rand(m.mask.shape) > 0.5)
    export(cm, tmp_path)
    rebuilt = import_exported(str(tmp_path)).load()
    for name, m in masked.items():
        other = rebuilt.get_submodule(name)
        assert other.param_name == m.param_name and torch.equal(other.mask, m.mask)
    x = torch.randn(4, 1, 8, 8)
    for train in (True, False):
        cm.train(train), rebuilt.train(train)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), cm(x))
    rebuilt(x).square().sum().backward()  # the mask masks the gradient too
    w = rebuilt.get_parameter("blocks.0.body.0.weight")
    assert w.grad.abs().sum() > 0 and not w.grad[~masked["fxc_sparsity_blocks_0_body_0_weight"].mask].any()
