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


# --- the user's paths of issue 11 -------------------------------------------------

def test_arguments_the_example_inputs_do_not_give_are_fixed_at_their_defaults():
    # timm's hiera: forward(x, mask=None); left symbolic, `if mask is not None`
    # was traced as taken and shapes failed on None.view
    from tests.models.masked import Masked

    model = Masked()
    x = torch.randn(2, 3, 8, 8)
    cm = fxcompress.compile(model, None, x)
    assert cm.trace_info.fixed_args == {"mask": None, "return_intermediates": False}
    assert cm.report()["trace"]["fixed_args"] == {"mask": None, "return_intermediates": False}
    assert "mask.view" not in cm.code
    assert torch.equal(cm(x), model(x))
    # an input the example gives stays an input; the policy's own concrete_args win
    _, info = trace(model, n_inputs=2)
    assert info.fixed_args == {"return_intermediates": False}
    _, info = trace(model, concrete_args={"return_intermediates": False}, n_inputs=1)
    assert info.fixed_args == {"mask": None}


def test_a_failure_at_a_node_names_the_likely_cause_not_the_shape():
    from fxcompress.errors import ShapeError
    from fxcompress.tracing import propagate_shapes
    from tests.models.masked import Masked

    gm, _ = trace(Masked(), n_inputs=2)  # traced as if a mask were given, then run without one
    with pytest.raises(ShapeError) as e:
        propagate_shapes(gm, (torch.randn(2, 3, 8, 8),))
    msg = str(e.value)
    assert "'NoneType' object has no attribute 'view'" in msg and "at node 'view'" in msg
    assert "mask defaults to None" in msg and "trace.concrete_args" in msg
    assert "--input-shape" not in msg


def test_transformer_encoder_is_traced_into_and_attention_leaves_are_reported():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 5, 16)
    for training in (True, False):  # eval mode reached the fast path's checks on the input's rank
        model.train(training)
        cm = fxcompress.compile(model, "policies/psgd_w4.yaml", x)
        treated = sorted(e.qualname for e in cm.plan.selected_entries)
        assert treated == [f"0.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
        assert torch.backends.mha.get_fastpath_enabled()  # restored after tracing
        leaves = {c.path: c for c in cm.trace_info.leaf_containers}
        assert set(leaves) == {"0.layers.0.self_attn", "0.layers.1.self_attn"}
        assert "out_proj (NonDynamicallyQuantizableLinear)" in leaves["0.layers.0.self_attn"].inner
        assert "MultiheadAttention" in leaves["0.layers.0.self_attn"].why
        model.eval()
        cm.eval()
        with torch.no_grad():
            assert torch.allclose(cm(x), model(x), atol=1e-6)
