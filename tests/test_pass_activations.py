"""The activations pass on small models: what gm.code shows, that forward is
untouched, that gradients stay close, and that the memory saving is real
(measured from the packed tensors)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from fxcompress.errors import BadInput
from fxcompress.runtime.measure import measure_saved


class Block(nn.Module):
    """conv-bn-relu twice plus a downsample conv reading the same input."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, c, 1, bias=False)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = self.bn2(self.conv2(x)) + self.down(x)
        y = F.gelu(y)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(self.drop(y))


def _policy(settings=None, **act):
    out = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True, "activations": act}]}
    if settings:
        out["settings"] = {"activations": settings}
    return out


def _pair(act, settings=None, seed=0):
    torch.manual_seed(seed)
    m = Block()
    ref = copy.deepcopy(m)
    x = torch.randn(4, 3, 16, 16)
    cm = fxcompress.compile(m, _policy(settings, **act), example_inputs=x)
    return cm, ref, x


def _grads(model, x, seed=1):
    model.zero_grad()
    torch.manual_seed(seed)
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), {n.replace("graph_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


def test_code_shows_every_compressed_save():
    cm, _, _ = _pair({"bits": 2})
    code = cm.code
    assert code.count("fxc_save(") == 11  # every op that saves something, none that saves nothing
    assert "'Conv2d: 2-bit per-channel nearest'" in code
    assert "'ReLU: 1-bit mask'" in code
    assert "'MaxPool2d: window index, input shape only'" in code
    assert "'adaptive_avg_pool2d: input shape only'" in code
    assert "'gelu: 2-bit per-channel nearest'" in code
    assert "'Dropout: 1-bit mask'" in code
    assert "fxc_act_conv1" in str(cm.graph_module)  # the spec submodules print their settings
    assert "add" not in [n.split("_")[-1] for n in cm.pass_results["activations"].inserted]


@pytest.mark.parametrize("bits,tol", [(16, 2e-3), (8, 6e-2)])
def test_forward_exact_and_gradients_close(bits, tol):
    cm, ref, x = _pair({"bits": bits})
    y, g = _grads(cm, x)
    y0, g0 = _grads(ref, x)
    assert torch.equal(y, y0)  # compression acts on saved tensors only, never on forward values
    for n in g0:
        rel = (g[n] - g0[n]).norm() / (g0[n].norm() + 1e-12)
        assert rel < tol, (n, float(rel))


def test_masks_and_indices_are_exact():
    # nothing quantized (16-bit quantization never reached: min_numel huge),
    # only ReLU masks, max-pool window indices and shape-only pools: exact
    cm, ref, x = _pair({"bits": 2, "min_numel": 10**9})
    y, g = _grads(cm, x)
    y0, g0 = _grads(ref, x)
    for n in g0:
        assert torch.allclose(g[n], g0[n], rtol=1e-5, atol=1e-6), n


def test_memory_really_reduced_and_shared_storage_stored_once():
    cm, ref, x = _pair({"bits": 2, "min_numel": 16})
    f = measure_saved(cm, x)
    nodes = f["nodes"]
    # conv2 and down read the same tensor: counted once in fp32, stored once
    assert nodes["conv2"]["fp32_bytes"] > 0 and nodes["down"]["fp32_bytes"] == 0
    assert nodes["down"]["stored_bytes"] == 0
    # the relu result is stored as a 1-bit mask: 32x smaller (+ byte rounding)
    assert nodes["relu"]["stored_bytes"] == 4 * 8 * 16 * 16 // 8
    assert f["ratio"] > 10, f["ratio"]
    assert f["stored_bytes"] < f["fp32_bytes"] / 10
    assert f["avg_bits"] == 2.0
    # peak: the packed objects really are what autograd holds
    torch.manual_seed(0)
    out = cm(x)
    held = cm.figures()["activations.saved_mb"] * 2**20
    assert held == pytest.approx(f["stored_bytes"])
    out.sum().backward()


def test_parameters_and_weight_like_inputs_never_compressed():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3, 3, 3))

        def forward(self, x):
            w = self.w * 2.0  # a weight derived from a parameter: not an activation
            return F.conv2d(x, w, padding=1)

    m = Fn()
    x = torch.randn(2, 3, 8, 8)
    cm = fxcompress.compile(copy.deepcopy(m), _policy(bits=2, min_numel=1), example_inputs=x)
    f = measure_saved(cm, x)
    node = [k for k in f["nodes"] if "conv2d" in k][0]
    assert f["nodes"][node]["fp32_bytes"] == x.numel() * 4  # only the input counted
    _, g = _grads(cm, x)
    assert g["w"].shape == m.w.shape


def test_no_grad_and_eval_untouched():
    cm, ref, x = _pair({"bits": 2})
    cm.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(cm(x), ref(x))


def test_auto_mode_notes_fallback_and_controller_state():
    cm, _, x = _pair({"mode": "auto"}, {"stats_every": 2, "window": 3})
    notes = cm.report()["passes"]["activations"]["notes"]
    assert any("no AutoQuant bound for gelu" in n and "fixed 8 bits" in n for n in notes)
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    cm.attach_optimizer(opt)
    for _ in range(3):
        opt.zero_grad()
        cm(x).pow(2).mean().backward()
        opt.step()
        cm.step()
    figs = cm.figures()
    assert 1 <= figs["activations.avg_bits"] <= 16 and figs["activations.ratio"] > 1
    sd = cm.state_dict()
    cm2, _, _ = _pair({"mode": "auto"}, {"stats_every": 2, "window": 3})
    cm2.load_state_dict(sd)
    ctrl, ctrl2 = cm.controllers["activations"], cm2.controllers["activations"]
    assert ctrl2.steps == 3 and ctrl2.state()["snapshots"].keys() == ctrl.state()["snapshots"].keys()
    assert ctrl2._specs["conv2"].dx2 == pytest.approx(ctrl._specs["conv2"].dx2)
    assert ctrl._specs["conv2"].dx2 == ctrl._specs["down"].dx2  # one budget for the shared input


@pytest.mark.parametrize("act,msg", [
    ({"bits": 17}, "bits: must be in 1..16"),
    ({"bits": 0}, "bits: must be in 1..16"),
    ({"mode": "fast"}, "mode"),
    ({"mode": "auto", "granularity": "group"}, "per channel"),
    ({"rounding": "up"}, "rounding"),
    ({"bitz": 2}, "did you mean 'bits'"),
])
def test_bad_config_is_a_clear_error(act, msg):
    with pytest.raises(BadInput, match=msg):
        fxcompress.compile(Block(), _policy(**act), example_inputs=torch.randn(1, 3, 16, 16))


def test_auto_group_with_two_error_bounds_is_refused():
    """Two convolutions reading one input share one stored copy and one budget:
    different eps_bits for them is refused rather than the first one winning."""
    import torch.nn as nn

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    policy = {"rules": [{"match": {"type": "Conv2d"}, "activations": {"mode": "auto"}},
                        {"match": {"name": "b"}, "activations": {"eps_bits": 2}}]}
    with pytest.raises(fxcompress.BadInput, match=r"a \(eps_bits 0\), b \(eps_bits 2\) read one input"):
        fxcompress.compile(TwoHeads(), policy, torch.randn(2, 3, 8, 8))
    policy["rules"][1]["activations"]["eps_bits"] = 0.0
    fxcompress.compile(TwoHeads(), policy, torch.randn(2, 3, 8, 8))


class ReluConv(nn.Module):
    """conv-bn-relu feeding two convolutions directly (a ReLU output saved
    as a mask by the ReLU and quantized by both convs)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.down = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.conv2(x) + self.down(x)


@pytest.mark.parametrize("act", [{"bits": 2, "rounding": "stochastic", "min_numel": 16},
                                 {"mode": "auto", "min_numel": 16}])
def test_relu_mask_carries_the_next_saves_statistics(monkeypatch, act):
    """The ReLU's mask pass also takes the statistics the convolutions'
    saves of its output need (one read instead of two): the next save uses
    them instead of reading the tensor again, and the gradients are the
    same bits as with separate reads."""
    from fxcompress.kernels import actpack

    def run():
        torch.manual_seed(0)
        m = ReluConv()
        x = torch.randn(4, 3, 12, 12)
        cm = fxcompress.compile(m, _policy({"stats_every": 2, "window": 3}, **act), example_inputs=x)
        for _ in range(3):  # auto: statistics at step 0, its widths after
            cm.zero_grad()
            torch.manual_seed(1)
            cm(x).pow(2).sum().backward()
            cm.step()
        return [p.grad.clone() for p in cm.parameters()]

    reads = []
    stats, stats_nnz = actpack.stats, actpack.stats_nnz
    monkeypatch.setattr(actpack, "stats", lambda x3: reads.append(x3.shape) or stats(x3))
    monkeypatch.setattr(actpack, "stats_nnz", lambda x3: reads.append(x3.shape) or stats_nnz(x3))
    fused = run()
    fused_reads = len(reads)
    reads.clear()
    monkeypatch.setattr(actpack, "pack_mask_gt_stats", lambda x3, shape=None: None)
    separate = run()
    from fxcompress.kernels import actpack_cpu

    if actpack_cpu.lib() is not None:
        assert fused_reads < len(reads)  # the conv saves of the ReLU output read no statistics
    assert all(torch.equal(a, b) for a, b in zip(fused, separate))
