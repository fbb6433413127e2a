import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid

import pytest
import torch
import torch.nn as nn
import torchvision

import fxcompress
import fxcompress.export
import fxcompress.inspect
from fxcompress.errors import BadInput
from fxcompress.export import export
from fxcompress.loading import load_model
from fxcompress.passes import Pass, PassResult, add_submodule, fxc_name
from tests.models.recurrent import Recurrent, UsesHidden
from tests.models.small_cnn import SmallCNN
from tests.models.tiny_resnet import TinyResNet
from tests.test_inspect import POLICY, MarkPass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_exported(directory):
    name = f"exported_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, "module.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_outputs(cm, directory, x):
    rebuilt = import_exported(directory).load().eval()
    cm.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), cm(x))
    return rebuilt


def test_small_cnn_with_inserted_nodes_loads_in_a_fresh_interpreter(tmp_path):
    cm = fxcompress.compile(SmallCNN(), POLICY, torch.randn(1, 3, 16, 16), passes=[MarkPass]).eval()
    written = export(cm, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert {"module.py", "weights.pt", "report.json", "graph.dot"} <= set(names)
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    script = (f"import sys, torch; sys.path.insert(0, {str(tmp_path / 'out')!r}); import module; "
              f"m = module.load().eval(); torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), "
              f"{str(tmp_path / 'y.pt')!r}); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "CompressedModule"
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), cm(x))
    code = (tmp_path / "out" / "module.py").read_text()
    assert "from tests.helpers import _fxc_identity as tests_helpers__fxc_identity" in code
    assert "fxc_mark_conv1 = tests_helpers__fxc_identity(conv1)" in code


def test_weights_load_with_weights_only_and_match_the_model(tmp_path):
    cm = fxcompress.compile(SmallCNN(), POLICY, torch.randn(1, 3, 16, 16), passes=[MarkPass])
    export(cm, tmp_path)
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    expected = cm.graph_module.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passes"]["mark"]["inserted"] == ["fxc_mark_conv1", "fxc_mark_conv2", "fxc_mark_fc"]
    assert [n["node"] for n in report["plan"]] == ["conv1", "conv2", "fc"]


def test_vit_with_multihead_attention_and_class_token(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    cm = fxcompress.compile(model, None, torch.randn(1, 3, 32, 32))
    export(cm, tmp_path)
    code = (tmp_path / "module.py").read_text()
    assert "torch.nn.MultiheadAttention(embed_dim=32, num_heads=2" in code
    assert "_parameter(self, 'class_token', (1, 1, 32), torch.float32)" in code
    rebuilt = assert_same_outputs(cm, tmp_path, torch.randn(2, 3, 32, 32))
    assert isinstance(rebuilt.class_token, nn.Parameter)


def test_torchvision_resnet_with_leaf_blocks_rebuilds_them_from_the_source(tmp_path):
    # BasicBlock keeps no 'inplanes' attribute: its constructor cannot be
    # inferred, so each block comes from a freshly built resnet18.
    loaded = load_model("torchvision:resnet18")
    policy = {"trace": {"leaf_modules": ["BasicBlock"]}}
    cm = fxcompress.compile(loaded.model, policy, torch.randn(1, 3, 32, 32))
    export(cm, tmp_path, loaded.source)
    code = (tmp_path / "module.py").read_text()
    assert "torchvision.models.get_model('resnet18', weights=None" in code
    assert "_attach(self, 'layer1.0', src.get_submodule('layer1.0'))" in code
    assert_same_outputs(cm, tmp_path, torch.randn(2, 3, 32, 32))
    with pytest.raises(BadInput, match=r"'layer1\.0' \(torchvision\.models\.resnet\.BasicBlock\).*no model source"):
        export(cm, tmp_path / "nosource")


def test_model_file_classes_come_from_a_copy_of_the_file(tmp_path):
    loaded = load_model(os.path.join(ROOT, "tests", "models", "gated.py"))
    cm = fxcompress.compile(loaded.model, None, torch.randn(3, 8))
    assert [a.path for a in cm.trace_info.auto_leaves] == ["block.gate"]
    written = export(cm, tmp_path, loaded.source)
    assert tmp_path / "source_model.py" in written
    assert "_attach(self, 'block.gate', _source.Gate())" in (tmp_path / "module.py").read_text()
    for x in (torch.ones(3, 8), -torch.ones(3, 8)):  # both sides of the data-dependent branch
        assert_same_outputs(cm, tmp_path, x)


MODEL_FILE = """
import torch
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self, width):  # 'width' is not kept: the constructor cannot be inferred
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Branchy(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def build_model():
    return Net()
"""


def test_uninferable_file_classes_come_from_the_copied_model_file(tmp_path):
    model_file = tmp_path / "net.py"
    model_file.write_text(MODEL_FILE)
    loaded = load_model(str(model_file))
    cm = fxcompress.compile(loaded.model, None, torch.randn(2, 4))
    export(cm, tmp_path / "out", loaded.source)
    model_file.unlink()  # the export must stand on its own
    code = (tmp_path / "out" / "module.py").read_text()
    assert "return _source.build_model()" in code
    assert "_attach(self, 'body', src.get_submodule('body'))" in code
    assert (tmp_path / "out" / "source_model.py").read_text() == MODEL_FILE
    assert_same_outputs(cm, str(tmp_path / "out"), torch.ones(2, 4))


def clipped(x):
    return x.clamp(-1, 1) if x.numel() > 3 else x  # Python control flow: fx must not enter it


torch.fx.wrap("clipped")


class UsesWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return clipped(self.lin(x) * 3)


def test_wrapped_functions_are_imported_and_rewrapped_at_module_level(tmp_path):
    cm = fxcompress.compile(UsesWrapped(), None, torch.randn(2, 4))
    export(cm, tmp_path)
    code = (tmp_path / "module.py").read_text()
    assert "from tests.test_export import clipped as tests_test_export_clipped" in code
    # fx.wrap raises unless called at module level: the load below proves where it went
    assert '\ntorch.fx._symbolic_trace.wrap("tests_test_export_clipped")\n' in code
    assert_same_outputs(cm, tmp_path, torch.randn(2, 4))


# --- what passes leave behind: runtime modules, constants, ties, frozen weights

class FxcScale(nn.Module):
    """A runtime-like module whose state is not in its constructor's arguments."""

    def __init__(self, channels: int, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))

    def fxc_constructor(self):
        return FxcScale, (self.scale.numel(),), {"init": 0.5}

    def forward(self, x):
        return x * self.scale


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(6, 6)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.emb(x))) + self.frozen(x)


class AddScaleAndOffset(Pass):
    """Inserts an fxc_ submodule and a plain tensor attribute read by get_attr."""

    name = "scaleoff"

    def run(self, gm, plan):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        last = out.args[0]
        mod = add_submodule(gm, fxc_name(gm, self.name, "scale"), FxcScale(6))
        const = fxc_name(gm, self.name, "offset")
        setattr(gm, const, torch.arange(6.0))  # a plain attribute, not a buffer
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_module(mod, (last,))
            offset = gm.graph.get_attr(const)
            new = gm.graph.call_function(torch.add, (scaled, offset))
        out.args = (new,)
        return PassResult(modified=True, inserted=[mod, const])


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node")  # the plain attribute is the point
def test_inserted_modules_constants_ties_and_frozen_weights_survive(tmp_path):
    torch.manual_seed(0)
    cm = fxcompress.compile(TiedNet(), None, torch.randn(2, 6), passes=[AddScaleAndOffset])
    with torch.no_grad():
        cm.graph_module.fxc_scaleoff_scale.scale.uniform_()
    export(cm, tmp_path)
    code = (tmp_path / "module.py").read_text()
    assert "FxcScale(6, init=0.5)" in code
    rebuilt = assert_same_outputs(cm, tmp_path, torch.randn(4, 6))
    assert rebuilt.head.weight is rebuilt.emb.weight
    assert not rebuilt.frozen.weight.requires_grad and rebuilt.frozen.bias.requires_grad
    assert torch.equal(rebuilt.fxc_scaleoff_offset, torch.arange(6.0))
    module = import_exported(str(tmp_path))
    via_safetensors = module.load(weights="weights.safetensors")
    assert via_safetensors.head.weight is via_safetensors.emb.weight
    assert torch.equal(via_safetensors.emb.weight, rebuilt.emb.weight)


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, 2)

    def forward(self, x):
        return self.lin(x).sum() if x.sum() > 0 else x  # untraceable: becomes a leaf


class Outer(nn.Module):
    def __init__(self, width):  # needs an argument: export cannot build a fresh one either
        super().__init__()
        self.inner = NeedsArgs(width)

    def forward(self, x):
        return self.inner(x)


def test_a_submodule_that_cannot_be_rebuilt_is_a_clear_error(tmp_path):
    cm = fxcompress.compile(Outer(4), None, torch.randn(1, 4))
    with pytest.raises(BadInput) as e:
        export(cm, tmp_path)
    msg = str(e.value)
    assert "'inner'" in msg and "required argument 'width' is not stored as an attribute" in msg
    assert not (tmp_path / "module.py").exists()


def test_rnn_modules_export_from_the_users_own_source_under_an_empty_policy(tmp_path):
    # RNN constructors cannot be read back from attributes (LSTM(*args)):
    # they come from a fresh model of the user's class, with no source given.
    model = Recurrent()
    x = torch.randn(2, 5, 8)
    cm = fxcompress.compile(model, {"rules": []}, (x,))
    # shape propagation on meta must leave the RNN's weight list on the real weights
    assert all(w.device.type == "cpu" for w in cm.graph_module.rnn._flat_weights)
    export(cm, tmp_path)
    assert "_attach(self, 'rnn', src.get_submodule('rnn'))" in (tmp_path / "module.py").read_text()
    assert_same_outputs(cm, tmp_path, x)


def test_an_arg_less_model_class_rebuilds_what_no_constructor_can(tmp_path):
    cm = fxcompress.compile(UsesHidden(), None, torch.randn(1, 4))
    export(cm, tmp_path)
    assert_same_outputs(cm, tmp_path, torch.randn(3, 4))


SHIPPED_POLICIES = sorted(os.listdir(os.path.join(ROOT, "policies")))


@pytest.mark.parametrize("policy", SHIPPED_POLICIES)
def test_every_shipped_policy_exports_a_torchvision_model(tmp_path, policy, monkeypatch):
    # PSGD's modules share a step clock and are grouped in one node: each
    # is rebuilt from its settings, the group from references to them.
    # The model is resnet18's structure of torchvision's own BasicBlocks at
    # 8/16 channels (every module and op kind a policy treats in resnet18,
    # in seconds, not 10-20 s a policy); the graph picture, which other
    # tests check, is not drawn.
    monkeypatch.setattr(fxcompress.export, "write_graph",
                        lambda cm, path: fxcompress.inspect.GraphFiles(tmp_path / "graph.dot"))
    torch.manual_seed(0)
    model = TinyResNet()
    cm = fxcompress.compile(model, os.path.join(ROOT, "policies", policy), torch.randn(2, 3, 32, 32))
    cm.train()
    loss = cm(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()  # a trained PSGD range must travel in the weights file
    written = export(cm, tmp_path)
    assert tmp_path / "module.py" in written
    rebuilt = assert_same_outputs(cm, tmp_path, torch.randn(2, 3, 32, 32))
    for name, m in cm.graph_module.named_modules():
        if type(m).__name__ == "ScaledGrad":
            other = rebuilt.get_submodule(name)
            assert (other.bits, other.config, other.role) == (m.bits, m.config, m.role)
            assert torch.equal(other.range, m.range)
        if type(m).__name__ == "ScaledGradGroup":
            other = rebuilt.get_submodule(name)
            assert [x.param_name for x in other.members] == [x.param_name for x in m.members]
            assert all(x is rebuilt.get_submodule(n) for x, n in
                       zip(other.members, [k for k, v in cm.graph_module.named_modules() if v in m.members]))


def test_bad_source_is_a_clear_error(tmp_path):
    cm = fxcompress.compile(SmallCNN(), None)
    with pytest.raises(BadInput, match="export source must be"):
        export(cm, tmp_path, {"kind": "hub", "name": "x"})
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="not a folder"):
        export(cm, tmp_path / "file")


class HoldsFn(nn.Module):
    def __init__(self, fn=None):
        super().__init__()
        self._fn = fn or torch.relu  # not a same-named attribute, and repr does not show it

    def forward(self, x):
        return self._fn(x)


class UsesHoldsFn(nn.Module):
    def __init__(self, fn):  # needs an argument: no fresh model of this class to fall back on
        super().__init__()
        self.act = HoldsFn(fn)

    def forward(self, x):
        return self.act(x)


def test_an_inferred_constructor_that_loses_hidden_state_is_rejected(tmp_path):
    cm = fxcompress.compile(UsesHoldsFn(torch.tanh), {"trace": {"leaf_modules": ["HoldsFn"]}}, torch.randn(2, 3))
    with pytest.raises(BadInput, match=r"'act'.*attribute _fn is <built-in method relu"):
        export(cm, tmp_path)


# --- models compiled with the activations (AC-GC) pass ---------------------------

class PoolNet(nn.Module):
    """SmallCNN plus ops whose saves need geometry (max-pool, ReLU6)."""

    def __init__(self):
        super().__init__()
        self.body = SmallCNN()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = torch.nn.functional.hardtanh(self.pool(x), 0.0, 6.0)
        return self.body(x)


def _specs(model):
    from fxcompress.runtime.activations import SaveSpec

    return [m for m in model.modules() if isinstance(m, SaveSpec)]


@pytest.mark.parametrize("policy", ["acgc_2bit.yaml", "acgc_auto.yaml"])
def test_activations_model_exports_and_trains_compressed(tmp_path, policy):
    from fxcompress.runtime.ledger import Ledger

    torch.manual_seed(0)
    cm = fxcompress.compile(PoolNet(), os.path.join(ROOT, "policies", policy), (torch.randn(2, 3, 32, 32),))
    export(cm, tmp_path)
    x = torch.randn(4, 3, 32, 32)
    rebuilt = assert_same_outputs(cm, tmp_path, x)
    # every spec is rebuilt faithfully: function, method, geometry, settings
    orig, new = _specs(cm.graph_module), _specs(rebuilt)
    assert [s.node for s in new] == [s.node for s in orig] and len(new) >= 7
    for a, b in zip(orig, new):
        assert (b._fn, b._method, b.weight_args, b.first, b.settings) == \
            (a._fn, a._method, a.weight_args, a.first, a.settings)
        assert {k: v for k, v in b.geom.items() if k != "in_w"} == {k: v for k, v in a.geom.items() if k != "in_w"}
    assert any(s.rule == "maxpool" for s in new) and any(s.rule == "hardtanh" for s in new)
    # one Ledger per exported instance, shared by all its specs
    ledgers = {id(s._ledger) for s in new}
    assert len(ledgers) == 1 and isinstance(new[0]._ledger, Ledger)
    other = import_exported(str(tmp_path)).load()
    assert {id(s._ledger) for s in _specs(other)} == {id(other.fxc_act_body_conv1._ledger)} != ledgers
    # training forward + backward stores packed tensors (auto: its fallback bits)
    figures = fxcompress.measure_saved(rebuilt, x)
    assert figures["ratio"] > 1 and figures["fp32_bytes"] > 0
    assert figures["avg_bits"] == (2.0 if policy == "acgc_2bit.yaml" else 8.0)
    assert all(p.grad is None for p in rebuilt.parameters())
    rebuilt.train()
    rebuilt(x).square().mean().backward()
    assert all(p.grad is not None for p in rebuilt.parameters())
    # the compiled model stores the same bytes
    assert fxcompress.measure_saved(cm, x)["stored_bytes"] == figures["stored_bytes"]


def test_exported_activations_module_reexports(tmp_path):
    cm = fxcompress.compile(SmallCNN(), os.path.join(ROOT, "policies", "acgc_2bit.yaml"),
                            (torch.randn(2, 3, 16, 16),))
    export(cm, tmp_path / "a")
    code = (tmp_path / "a" / "module.py").read_text()
    assert "rebuild_save_spec(" in code and "fn='torch.nn.functional.relu'" in code
    assert "fn='torch.relu'" in code
    key = re.search(r"ledger_key='(\w+)'", code).group(1)
    assert code.count(f"ledger_key={key!r}") == len(_specs(cm.graph_module))


def test_save_spec_functions_come_from_the_allow_list_only():
    from fxcompress.runtime.activations import rebuild_save_spec, resolve_function

    assert resolve_function("torch.nn.functional.conv2d") is torch.nn.functional.conv2d
    assert resolve_function("operator.add") is __import__("operator").add
    from fxcompress.kernels.binary_conv import binary_conv2d
    assert resolve_function("fxcompress.kernels.binary_conv.binary_conv2d") is binary_conv2d  # CAMP's 1-bit conv
    for bad in ["os.system", "builtins.eval", "torch.nn.Module", "torch._C._nn.gelu", "torch.load.__call__",
                "subprocess.run", "eval", "torch.Tensor", "fxcompress.kernels.binary_conv.load_library",
                "fxcompress.kernels.binary_conv.os"]:
        with pytest.raises(BadInput, match="is not allowed|is not a function"):
            resolve_function(bad)
    with pytest.raises(BadInput, match="'os.system' is not allowed"):
        rebuild_save_spec("n", "op", "quant", {}, fn="os.system")


@pytest.mark.parametrize("policy", ["acgc_auto.yaml", "psgd_w4_acgc_auto.yaml"])
def test_compiled_model_deepcopies_and_pickles_at_any_step(policy):
    # issue 11: after two steps under acgc_auto, deepcopy and torch.save raised
    # "ctypes objects containing pointers cannot be pickled" (AutoQuant's
    # BatchNorm terms cached a C pointer array): no EMA copy, no best-model copy
    import copy
    import io

    torch.manual_seed(0)
    cm = fxcompress.compile(SmallCNN(), os.path.join(ROOT, "policies", policy), torch.randn(2, 3, 16, 16)).train()
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm.attach_optimizer(opt)
    for _ in range(3):
        loss = nn.functional.cross_entropy(cm(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        cm.step()
        twin = copy.deepcopy(cm)
        buf = io.BytesIO()
        torch.save(cm, buf)
        twin(torch.randn(4, 3, 16, 16)).sum().backward()  # the copy trains on its own
    x = torch.randn(2, 3, 16, 16)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), cm.eval()(x))
