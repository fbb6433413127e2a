import pytest
import torch

import fxcompress
from fxcompress.errors import TraceError
from fxcompress.tracing import trace
from tests.models.gated import GatedNet
from tests.models.root_branch import RootBranch
from tests.models.small_cnn import SmallCNN


def test_auto_leaf_makes_the_deepest_failing_module_a_leaf():
    gm, info = trace(GatedNet())
    assert [a.path for a in info.auto_leaves] == ["block.gate"]  # not "block"
    assert info.auto_leaves[0].where.endswith("gated.py:12")
    assert "self.block.gate(" in gm.code and "self.block.pre(" in gm.code


def test_auto_leaf_model_runs_and_report_names_the_leaf():
    model = GatedNet()
    x = torch.randn(3, 8)
    cm = fxcompress.compile(model, {"rules": [{"match": {"type": "Linear"}, "activations": None}]}, x)
    assert torch.equal(cm(x), model(x))
    assert cm.report()["auto_leaves"][0]["path"] == "block.gate"


def test_without_auto_leaf_the_error_names_module_line_and_fix():
    with pytest.raises(TraceError) as e:
        trace(GatedNet(), auto_leaf=False)
    msg = str(e.value)
    assert "'block.gate' (Gate)" in msg and "gated.py:12" in msg and "trace.leaf_modules" in msg


def test_root_failure_cannot_be_leafed():
    with pytest.raises(TraceError, match="model.s own forward .*root_branch.py:11"):
        trace(RootBranch())


def test_leaf_modules_by_name_and_type():
    gm, _ = trace(GatedNet(), leaf_modules=["block"])
    assert "self.block(" in gm.code
    gm, _ = trace(GatedNet(), leaf_modules=["Gate"])
    assert "self.block.gate(" in gm.code


def test_concrete_args_remove_a_branch():
    class Flag(torch.nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    gm, _ = trace(Flag(), concrete_args={"double": True})
    assert "mul" in gm.code


def test_shapes_filled_without_touching_bn_stats_or_rng():
    model = SmallCNN().train()
    before = model.bn1.running_mean.clone()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    expect = torch.rand(1)
    torch.manual_seed(5)
    cm = fxcompress.compile(model, {"rules": [{"match": {"type": "Conv2d"}, "activations": None}]}, x)
    assert torch.equal(torch.rand(1), expect)
    assert torch.equal(model.bn1.running_mean, before)
    assert model.training and model.bn1.training
    shapes = {e.qualname: e.shape for e in cm.plan.selected_entries}
    assert shapes == {"conv1": (2, 8, 16, 16), "conv2": (2, 16, 8, 8)}
