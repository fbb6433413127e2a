"""CAMP's dual_precision pass: block detection, the rewrite, the gate, the
quantizers' gradients, the BOP cost model, routed inference and the RL loss."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxcompress
import fxcompress.errors
from fxcompress.errors import PolicyError
from fxcompress.models import resnet_cifar
from fxcompress.passes.dual_precision import find_residual_blocks
from fxcompress.quantizers.dorefa import quantize_activation, quantize_weight
from fxcompress.quantizers.pact import PactQuant
from fxcompress.runtime.dual_precision import rl_loss
from fxcompress.tracing import trace
from tests.models.residual import Residual


def policy(mode="sp", pre_gate=False, **block):
    return {"settings": {"dual_precision": {"mode": mode, "pre_gate": pre_gate}},
            "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "optional": True, "dual_precision": {}},
                      {"match": {"op": ["add", "iadd"]}, "optional": True, "dual_precision": dict(block)}]}


class UserNet(nn.Module):
    def __init__(self, c=4, blocks=1):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[Residual(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def blocks_of(model):
    gm, _ = trace(model)
    regions, _ = find_residual_blocks(gm)
    return {r.name: r for r in regions.values()}


# --- block detection ----------------------------------------------------------------

@pytest.mark.parametrize("name,count,downsampled", [("resnet18", 8, "layer2.0"), ("resnet50", 16, "layer1.0"),
                                                    ("mobilenet_v2", 10, None)])
def test_blocks_found_in_torchvision_models(name, count, downsampled):
    found = blocks_of(getattr(torchvision.models, name)(num_classes=10))
    assert len(found) == count
    if downsampled:  # the shortcut's downsample conv belongs to the block
        targets = {str(n.target) for n in found[downsampled].layers}
        assert f"{downsampled}.downsample.0" in targets
    if name == "mobilenet_v2":  # inverted residuals: expand, depthwise, project
        assert all(len(r.layers) in (2, 3) for r in found.values())
        assert "features.1" not in found  # no residual: in != out channels


def test_blocks_found_in_a_user_model_and_the_cifar_resnet():
    found = blocks_of(UserNet(blocks=2))
    assert list(found) == ["blocks.0", "blocks.1"]
    r = found["blocks.0"]
    assert [str(n.target) for n in r.layers] == ["blocks.0.body.0", "blocks.0.body.3"]
    assert r.end.target is torch.relu  # the ReLU after the add ends the block
    assert len(blocks_of(resnet_cifar(20, 10, 1))) == 9


def test_an_add_that_is_not_a_block_is_skipped_with_a_reason():
    class NotBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((y + y.mean()).mean((2, 3)))  # no conv between the add's inputs and a shared input

    cm = fxcompress.compile(NotBlock(), policy(), (torch.randn(2, 1, 6, 6),))
    skipped = [e.skipped for e in cm.plan.entries.values() if e.skipped]
    assert any("not a residual block" in s.get("dual_precision", "") for s in skipped)


# --- the rewrite ----------------------------------------------------------------------

def compiled(mode="sp", pre_gate=False, blocks=1, seed=0, **block):
    torch.manual_seed(seed)
    net = UserNet(blocks=blocks)
    return net, fxcompress.compile(net, policy(mode, pre_gate, **block), (torch.randn(2, 1, 8, 8),))


def test_code_shows_paths_and_gate_and_first_last_stay_full_precision():
    net, cm = compiled()
    code = cm.code
    for part in ("fxc_dual_blocks_0_low_", "fxc_dual_blocks_0_high_", "self.fxc_dual_blocks_0.gate(",
                 "self.fxc_dual_blocks_0.merge(", "self.fxc_dual_blocks_0.route_high(",
                 "self.fxc_dual_blocks_0.low_norms.blocks_0_body_1("):
        assert part in code
    assert "self.stem(x)" in code and "self.fc(" in code  # untouched
    # shared weights: both paths read the original parameter; the state_dict keeps its names
    assert code.count("blocks_0_body_0_weight") >= 2
    names = set(dict(cm.graph_module.named_parameters()))
    assert {"stem.weight", "blocks.0.body.0.weight", "fc.weight"} <= names


def test_gate_shapes_and_train_forward_backward():
    _, cm = compiled()
    block = cm.controllers["dual_precision"].blocks["blocks.0"]
    x = torch.randn(5, 1, 8, 8)
    probs = block.gate(torch.rand(5, 4, 8, 8))
    assert probs.shape == (5, 2) and torch.allclose(probs.sum(1), torch.ones(5))
    cm.train()
    out = cm(x)
    assert out.shape == (5, 3)
    out.sum().backward()
    # supervised: the hard gate's straight-through gradient reaches the gate's head (zero at
    # the start: every sample begins at p_high = sigmoid(1)), and through it the 3x3 conv
    assert block.gate.fc.weight.grad is not None and block.gate.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.gate.fc.weight.normal_()
    cm.zero_grad()
    cm(x).sum().backward()
    assert block.gate.conv.weight.grad is not None and block.gate.conv.weight.grad.abs().sum() > 0


def test_straight_through_gradients():
    w = torch.randn(20, requires_grad=True)
    g = torch.randn(20)
    (quantize_weight(w, 1) * g).sum().backward()
    assert torch.equal(w.grad, g)  # 1-bit: identity gradient
    q1 = quantize_weight(w.detach(), 1)
    assert torch.allclose(q1.abs(), w.detach().abs().mean().expand(20))
    q4 = quantize_weight(w.detach(), 4)
    assert len(torch.unique(q4)) <= 16 and q4.abs().max() <= 1
    x = torch.linspace(-0.45, 1.45, 20, requires_grad=True)  # no point on the clamp edges
    (quantize_activation(x, 2) * 3).sum().backward()
    inside = ((x.detach() >= 0) & (x.detach() <= 1)).float()
    assert torch.equal(x.grad, 3 * inside)  # rounding passes the gradient, the clamp does not outside [0, 1]
    levels = torch.unique(quantize_activation(x.detach(), 2) * 3)
    assert torch.allclose(levels, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    p = PactQuant(2, alpha=1.0)
    y = torch.tensor([-1.0, 0.4, 2.0], requires_grad=True)
    p(y).sum().backward()
    assert y.grad.tolist() == [0.0, 1.0, 0.0] and p.alpha.grad.item() == 1.0  # PACT: d/dalpha = 1 above the clip


def test_k_bit_weight_keeps_only_the_weight_for_backward():
    """The k-bit chain is recomputed in the backward (eager training): same
    values and gradients as the plain chain, and nothing weight-sized saved
    but what the consumer keeps."""
    from fxcompress.quantizers.dorefa import _k_bit_weight

    w = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 32)
    saved = []

    def pack(t):
        if t.numel() == w.numel() and t.data_ptr() != w.data_ptr():
            saved.append(t)  # weight-sized and not w itself: memory the backward holds on to
        return t

    def run(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            q = fn(w, 4)
        grad, = torch.autograd.grad((q * g).sum(), w)
        return q.detach(), grad, len(saved)

    q_plain, g_plain, saved_plain = run(_k_bit_weight)
    q_ckpt, g_ckpt, saved_ckpt = run(quantize_weight)
    assert torch.equal(q_plain, q_ckpt) and torch.allclose(g_plain, g_ckpt, rtol=0, atol=1e-6)
    assert g_plain.abs().sum() > 0  # the max's gradient and tanh's make it more than a copy of g
    assert saved_plain >= 2  # tanh(w), |tanh(w)| at least
    assert saved_ckpt == 0


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [1, 4])
def test_activation_quantizer_inference_path_gives_the_training_values(bits, signed):
    """Without autograd the activation quantizer skips the straight-through
    arithmetic (fewer passes in routed inference); same grid values."""
    x = torch.cat([torch.randn(1000) * 1.5, torch.tensor([0.5, -0.5, 0.0, 1.0, -1.0, 0.25, 0.75])])  # ties too
    trained = quantize_activation(x.clone().requires_grad_(), bits, signed).detach()
    with torch.no_grad():
        infer = quantize_activation(x.clone().requires_grad_(), bits, signed)
    plain = quantize_activation(x, bits, signed)  # no grad needed: the same path
    torch.testing.assert_close(infer, trained, rtol=0, atol=1e-6)
    assert torch.equal(infer, plain)
    n = 2 ** bits - 1
    grid = (infer + 1) * n / 2 if signed else infer * n
    assert torch.allclose(grid, grid.round(), atol=1e-5) and len(torch.unique(infer)) <= n + 1


def test_fixed_mode_quantizes_every_layer_but_first_and_last():
    net = UserNet()
    cm = fxcompress.compile(net, {"settings": {"dual_precision": {"mode": "fixed"}},
                                  "rules": [{"match": {"type": ["Conv2d", "Linear"]},
                                             "dual_precision": {"high_bits": 1}}]}, (torch.randn(2, 1, 8, 8),))
    assert "gate" not in cm.code and "self.stem(x)" in cm.code
    assert cm.code.count("torch.conv2d(") == 2
    cost = cm.controllers["dual_precision"].cost
    assert {c.w_bits for c in cost.layers} == {1, 32}


def test_bad_settings_point_at_the_policy_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nsettings:\n  dual_precision:\n    mode: reinforce\nrules: []\n")
    with pytest.raises(PolicyError) as e:
        fxcompress.compile(UserNet(), str(p), (torch.randn(2, 1, 8, 8),))
    assert ":4" in str(e.value) and "mode" in str(e.value)


# --- cost model -------------------------------------------------------------------------

def test_bops_against_hand_count():
    _, cm = compiled(gate_channels=8, gate_bits=4)
    cost = cm.controllers["dual_precision"].cost
    stem = 8 * 8 * 4 * 1 * 9          # first conv: out 4x8x8, 1 input channel, 3x3
    body = 8 * 8 * 4 * 4 * 9          # each block conv
    fc = 4 * 3
    # 3x3 stride 2 to 8 channels on 4x4 (4-bit), then the full-precision 1x1 head on 4-bit features
    gate = 8 * 4 * 9 * 4 * 4 * 16 + 8 * 2 * 32 * 4
    reference = (stem + fc) * 32 * 32 + 2 * body * 4 * 4
    assert cost.reference == reference
    for u in (0.0, 0.25, 1.0):
        expect = (stem + fc) * 1024 + 2 * body * 1 + gate + u * 2 * body * 16
        assert cost.relative({"blocks.0": u}) == pytest.approx(expect / reference)
    # the pre-gate runs the low path only for its own samples
    _, cm = compiled(pre_gate=True, gate_channels=8, gate_bits=4)
    cost = cm.controllers["dual_precision"].cost
    expect = (stem + fc) * 1024 + 0.75 * 2 * body + gate + 0.25 * 2 * body * 16
    assert cost.relative({"blocks.0": 0.25}) == pytest.approx(expect / reference)


# --- routed inference ----------------------------------------------------------------------

@pytest.mark.parametrize("pre_gate", [False, True])
def test_routed_eval_equals_masked_two_branch_output(pre_gate):
    _, cm = compiled(pre_gate=pre_gate, blocks=2, seed=1)
    ctl = cm.controllers["dual_precision"]
    torch.manual_seed(3)
    cm.eval()
    x = torch.randn(16, 1, 8, 8)
    for b in ctl.blocks.values():  # gates that split the batch in half, block by block
        nn.init.normal_(b.gate.fc.weight, std=3.0)
        nn.init.zeros_(b.gate.fc.bias)
        seen = []
        h = b.gate.register_forward_hook(lambda m, i, o: seen.append(torch.log(o[:, 1] / o[:, 0])))
        with torch.no_grad():
            cm(x)
        h.remove()
        b.gate.fc.bias.data[1] = -seen[0].median() + 1e-4
    with torch.no_grad():
        ctl.reset_eval()
        routed = cm(x)
        usage = ctl.eval_usage()
        for b in ctl.blocks.values():
            b.set_routed(False)
        masked = cm(x)
        for b in ctl.blocks.values():
            b.set_routed(True)
    routed_grad = cm(x)  # grad enabled: the merge copies the low output instead of writing into it
    assert all(0 < u < 1 for u in usage.values()), usage  # both paths really used
    torch.testing.assert_close(routed, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_grad.detach(), routed, rtol=1e-5, atol=1e-5)
    # compiled eval (fullgraph): merged by the mask, not routed by the
    # data-dependent sub-batches (which failed to compile), same outputs
    import torch._dynamo as dynamo

    try:
        cm.compile_with("aot_eager", fullgraph=True)
        with torch.no_grad():
            compiled_out = cm(x)
    finally:
        cm.compile_with(None)
        dynamo.reset()
    torch.testing.assert_close(compiled_out, routed, rtol=1e-5, atol=1e-5)


def test_routed_eval_runs_the_high_path_only_for_chosen_samples():
    _, cm = compiled(seed=2)
    block = cm.controllers["dual_precision"].blocks["blocks.0"]
    seen = []
    conv = cm.graph_module.get_submodule("fxc_dual_blocks_0.quant.high_a_blocks_0_body_0")
    conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    cm.eval()
    block.force = 0.0
    cm(torch.randn(6, 1, 8, 8))
    block.force = 1.0
    cm(torch.randn(6, 1, 8, 8))
    assert seen == [0, 6]


# --- RL ---------------------------------------------------------------------------------------

def test_rl_credits_each_sample_with_its_own_reward():
    torch.manual_seed(0)
    outputs = torch.randn(4, 3) * 3
    targets = torch.tensor([0, 1, 2, 0])
    ce = F.cross_entropy(outputs, targets, reduction="none")
    assert len(set(ce.tolist())) == 4
    logp = [torch.zeros(4, requires_grad=True) for _ in range(2)]
    actions = [torch.ones(4), torch.tensor([1.0, 0.0, 1.0, 0.0])]
    alpha, w_rl = 0.1, 0.01
    rl_loss(outputs, targets, logp, actions, alpha, 1.0, w_rl).backward()
    # gate 2 (last): R = alpha/2 * (1 - a) - CE_b; gate 1: its own reward 0 + R of gate 2
    r2 = alpha / 2 * (1 - actions[1]) - ce
    torch.testing.assert_close(logp[1].grad, -w_rl * r2 / 4)
    torch.testing.assert_close(logp[0].grad, -w_rl * r2 / 4)
    assert len(set(logp[0].grad.tolist())) == 4  # a batch-mean CE would give equal gradients
    # gamma < 1: R_i = sum_{j>=i} gamma^(j-i) r_j + gamma^(N-i+1) (-CE), i 1-based (SPEC)
    logp = [torch.zeros(4, requires_grad=True) for _ in range(2)]
    g = 0.5
    rl_loss(outputs, targets, logp, actions, alpha, g, w_rl).backward()
    r = [alpha / 2 * (1 - a) for a in actions]
    torch.testing.assert_close(logp[1].grad, -w_rl * (r[1] + g * -ce) / 4)
    torch.testing.assert_close(logp[0].grad, -w_rl * (r[0] + g * r[1] + g ** 2 * -ce) / 4)
    # rl_baseline (option, off by default): each gate's batch-mean return is subtracted
    logp = [torch.zeros(4, requires_grad=True) for _ in range(2)]
    rl_loss(outputs, targets, logp, actions, alpha, 1.0, w_rl, baseline=True).backward()
    torch.testing.assert_close(logp[1].grad, -w_rl * (r2 - r2.mean()) / 4)
    r1 = alpha / 2 * (1 - actions[0]) + r2
    torch.testing.assert_close(logp[0].grad, -w_rl * (r1 - r1.mean()) / 4)


def test_rl_gates_stay_undecided_after_a_step_and_actions_vary():
    """The gate starts at p_high = sigmoid(1) for every input, so sampled
    actions differ within a batch; one small RL step must move it a little,
    not saturate it (a DoReFa-quantized head did: tanh(w) / max|tanh(w)| turns
    the first tiny update into weights of +-1, p_high ~0.005 after one step)."""
    torch.manual_seed(0)
    _, cm = compiled(mode="rl", blocks=2)
    ctl = cm.controllers["dual_precision"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    cm.train()
    for step in range(3):
        seen = []
        hooks = [b.gate.register_forward_hook(lambda m, i, o: seen.append(o[:, 1].detach()))
                 for b in ctl.blocks.values()]
        out = cm(x)
        actions = [b.action for b in ctl.blocks.values()]
        loss = F.cross_entropy(out, y) + cm.extra_loss(out, y)
        for h in hooks:
            h.remove()
        for p, a in zip(seen, actions):
            assert 0.6 < float(p.mean()) < 0.85 and float(p.min()) > 0.5, (step, p)
            assert 0 < float(a.sum()) < len(a)  # both paths sampled in one batch
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_rl_training_step_reaches_the_gates():
    _, cm = compiled(mode="rl", blocks=2)
    cm.train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    out = cm(x)
    extra = cm.extra_loss(out, y)
    assert extra is not None and extra.dim() == 0
    (F.cross_entropy(out, y) + extra).backward()
    for b in cm.controllers["dual_precision"].blocks.values():
        assert b.gate.fc.bias.grad is not None and b.gate.fc.bias.grad.abs().sum() > 0
        assert b.log_prob is None  # consumed
    cm.eval()
    assert cm.extra_loss(cm(x), y) is None


@pytest.mark.parametrize("mode", ["rl", "sp"])
def test_warmup_trains_both_paths_under_a_random_gate_then_the_gate(mode):
    """settings warmup_epochs/warmup_high (a recipe option, off by default):
    during the warm-up epochs each sample takes the high path with
    probability warmup_high whatever the gate says, the gate gets no gradient
    and RL adds no term; from the next epoch the method runs as the SPEC says."""
    torch.manual_seed(0)
    pol = policy(mode)
    pol["settings"]["dual_precision"].update(warmup_epochs=1, warmup_high=0.25)
    cm = fxcompress.compile(UserNet(blocks=2), pol, (torch.randn(2, 1, 8, 8),))
    ctl = cm.controllers["dual_precision"]
    x, y = torch.randn(512, 1, 8, 8), torch.randint(0, 3, (512,))
    cm.train()
    ctl.on_epoch_start(0)
    out = cm(x)
    assert cm.extra_loss(out, y) is None
    F.cross_entropy(out, y).backward()
    for b in ctl.blocks.values():
        assert 0.15 < float(b.last_usage) < 0.35  # the gate alone would send every sample high (p = 0.73)
        assert b.gate.fc.bias.grad is None or not b.gate.fc.bias.grad.any()
        low = [p for n, p in b.low_norms.named_parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in low)  # the 1-bit path trains
    cm.zero_grad()
    ctl.on_epoch_end(0)
    ctl.on_epoch_start(1)
    out = cm(x)
    extra = cm.extra_loss(out, y)
    assert (extra is not None) == (mode == "rl")
    (F.cross_entropy(out, y) + (extra if extra is not None else 0)).backward()
    for b in ctl.blocks.values():
        assert b.warm is None and b.gate.fc.bias.grad.abs().sum() > 0
    cm.eval()
    with torch.no_grad():
        ctl.on_epoch_start(0)  # eval ignores the warm-up: the gate decides
        cm(x)
    assert all(u == 1.0 for u in ctl.eval_usage().values())


def test_distill_option_trains_the_low_path_toward_the_high_path():
    """settings distill (option, off by default): extra_loss adds
    distill * sum_blocks mean((low - high.detach())^2) in training."""
    torch.manual_seed(0)
    _, plain = compiled(mode="sp")
    plain.train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    assert plain.extra_loss(plain(x), y) is None  # off by default: sp adds nothing
    pol = policy("sp")
    pol["settings"]["dual_precision"]["distill"] = 2.0
    torch.manual_seed(0)
    net = UserNet()
    cm = fxcompress.compile(net, pol, (torch.randn(2, 1, 8, 8),))
    block = cm.controllers["dual_precision"].blocks["blocks.0"]
    pairs = []
    h = block.merge.register_forward_hook(lambda m, i, o: pairs.append((i[0].detach(), i[1].detach())))
    cm.train()
    extra = cm.extra_loss(cm(x), y)
    h.remove()
    low, high = pairs[0]
    torch.testing.assert_close(extra, 2.0 * F.mse_loss(low, high))
    extra.backward()
    assert block.low_norms["blocks_0_body_1"].weight.grad.abs().sum() > 0
    assert net.blocks[0].body[1].weight.grad is None  # the high path's norm: the target, not trained by it
    assert block.merge.pair is None  # consumed
    cm.eval()
    with torch.no_grad():
        assert cm.extra_loss(cm(x), y) is None


def test_energy_option_adds_the_relative_energy_straight_through_to_the_gates():
    """settings energy (option, off by default, mode sp): extra_loss is
    energy * relative energy at the batch's hard choices; its gradient pushes
    every gate's p_high down (choosing the low path saves energy)."""
    pol = policy("sp")
    pol["settings"]["dual_precision"]["energy"] = 3.0
    torch.manual_seed(0)
    cm = fxcompress.compile(UserNet(blocks=2), pol, (torch.randn(2, 1, 8, 8),))
    ctl = cm.controllers["dual_precision"]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    cm.train()
    extra = cm.extra_loss(cm(x), y)
    # the gates start high for every sample (p_high = sigmoid(1))
    assert extra is not None
    torch.testing.assert_close(extra.detach(), torch.tensor(3.0 * ctl.cost.summary()["relative_all_high"]))
    extra.backward()
    for b in ctl.blocks.values():
        g = b.gate.fc.bias.grad
        assert g[1] > 0 and g[0] < 0  # descent lowers the high logit, raises the low one
        assert b.choice is None  # consumed
    cm.eval()
    with torch.no_grad():
        assert cm.extra_loss(cm(x), y) is None
    bad = policy("rl")
    bad["settings"]["dual_precision"]["energy"] = 1.0
    with pytest.raises(PolicyError, match="energy"):
        fxcompress.compile(UserNet(), bad, (torch.randn(2, 1, 8, 8),))


def test_energy_target_penalises_only_the_energy_above_the_budget():
    """settings energy_target (option, 0 = off): the energy term is
    energy * max(0, E - energy_target): zero, with no gradient to the gates,
    for a batch at or under the budget; above it, the excess, pushing the
    gates low as the plain term does."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    high = None
    for margin in (0.05, -0.05):  # budget above, then below the batch's energy (every gate high)
        pol = policy("sp")
        torch.manual_seed(0)
        probe = fxcompress.compile(UserNet(blocks=2), pol, (torch.randn(2, 1, 8, 8),))
        high = probe.controllers["dual_precision"].cost.summary()["relative_all_high"]
        pol["settings"]["dual_precision"].update(energy=3.0, energy_target=high + margin)
        torch.manual_seed(0)
        cm = fxcompress.compile(UserNet(blocks=2), pol, (torch.randn(2, 1, 8, 8),))
        ctl = cm.controllers["dual_precision"]
        cm.train()
        extra = cm.extra_loss(cm(x), y)
        assert extra is not None
        extra.backward()
        grads = [b.gate.fc.bias.grad for b in ctl.blocks.values()]
        if margin > 0:
            assert float(extra.detach()) == 0.0
            assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
        else:
            torch.testing.assert_close(extra.detach(), torch.tensor(3.0 * 0.05), atol=1e-6, rtol=1e-5)
            assert all(g[1] > 0 and g[0] < 0 for g in grads)  # descent: toward the low path
    for bad, match in (({"energy_target": 0.5}, "energy_target"), ({"energy": 1.0, "energy_target": -0.1},
                                                                    "energy_target")):
        pol = policy("sp")
        pol["settings"]["dual_precision"].update(bad)
        with pytest.raises(PolicyError, match=match):
            fxcompress.compile(UserNet(), pol, (torch.randn(2, 1, 8, 8),))


def test_warmup_settings_are_checked():
    pol = policy("rl")
    pol["settings"]["dual_precision"].update(warmup_high=1.5)
    with pytest.raises(PolicyError, match="warmup_high"):
        fxcompress.compile(UserNet(), pol, (torch.randn(2, 1, 8, 8),))


def test_init_from_all_4bit_fills_low_norms():
    net = UserNet()
    x = torch.randn(2, 1, 8, 8)
    w4 = fxcompress.compile(net, {"settings": {"dual_precision": {"mode": "fixed"}},
                                  "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "dual_precision": {}}]}, (x,))
    with torch.no_grad():
        net.blocks[0].body[1].weight.fill_(0.5)
    state = copy.deepcopy(w4.state_dict())
    _, cm = compiled()
    missing = cm.load_state_dict(state, strict=False).missing_keys
    assert not any("low_norms" in k for k in missing) and any(".gate." in k for k in missing)
    low = cm.graph_module.get_submodule("fxc_dual_blocks_0.low_norms.blocks_0_body_1")
    assert torch.equal(low.weight, torch.full((4,), 0.5))


def test_report_and_figures():
    _, cm = compiled(blocks=2)
    ctl = cm.controllers["dual_precision"]
    ctl.on_epoch_start(0)
    cm.train()
    cm(torch.randn(4, 1, 8, 8))
    f = cm.figures()
    assert set(f) == {"dual_precision.usage", "dual_precision.energy"}
    ctl.on_epoch_end(0)
    cm.eval()
    with torch.no_grad():
        cm(torch.randn(4, 1, 8, 8))
    rep = ctl.report()
    usage = {n: v["test_usage"] for n, v in rep["blocks"].items()}
    assert rep["test_energy"] == pytest.approx(ctl.cost.relative(usage))
    assert rep["epochs"][0]["epoch"] == 1


def test_train_4bit_then_camp_rl_with_init(tmp_path):
    """The README sequence, tiny: the all-4-bit run, then CAMP RL from its
    weights (--init); the RL term runs through the loop's extra_loss."""
    import os

    from fxcompress.training import TrainConfig, train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = dict(depth=8, upscale=8, epochs=1, train_limit=64, test_limit=32, batch_size=32, plots=False,
                  progress=False)
    w4 = train(TrainConfig(policy=os.path.join(root, "policies", "camp_w4.yaml"), run_dir=str(tmp_path / "w4"),
                           **common))
    assert w4["status"] == "done"
    rl = train(TrainConfig(policy=os.path.join(root, "policies", "camp_rl.yaml"), run_dir=str(tmp_path / "rl"),
                           init=str(tmp_path / "w4" / "final_model.pt"), **common))
    init = rl["main"]["init"]
    assert init["loaded"] > 0 and any(".gate." in k for k in init["missing"])
    assert not any("low_norms" in k for k in init["missing"])  # filled from the loaded norms
    figures = rl["main"]["epochs"][0]["figures"]
    assert 0 <= figures["dual_precision.usage"] <= 1 and figures["dual_precision.energy"] > 0


class PlainNet(nn.Module):
    """No residual add: the block is named by its module path (settings.blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_a_block_named_by_module_path():
    pol = {"settings": {"dual_precision": {"blocks": ["body"]}},
           "rules": [{"match": {"name": "body.*"}, "dual_precision": {"gate_channels": 2}}]}
    cm = fxcompress.compile(PlainNet(), pol, (torch.randn(2, 1, 8, 8),))
    block = cm.controllers["dual_precision"].blocks["body"]
    assert block.gate.conv.out_channels == 2  # the rule's settings for the block's layer
    assert "self.fxc_dual_body.merge(" in cm.code and "self.fxc_dual_body.low_norms.body_1(" in cm.code
    cm.eval()
    with torch.no_grad():
        x = torch.randn(5, 1, 8, 8)
        block.force = 1.0
        high = cm(x)
        block.set_routed(False)
        torch.testing.assert_close(cm(x), high)
    bad = {"settings": {"dual_precision": {"blocks": ["stem"]}}, "rules": pol["rules"]}
    with pytest.raises(fxcompress.errors.BadInput, match="first or last"):
        fxcompress.compile(PlainNet(), bad, (torch.randn(2, 1, 8, 8),))


def test_training_forward_is_one_dynamo_graph():
    """Quantizers, gate and merge are plain tensor code: torch.compile sees the
    training forward whole (compiled eval: test_routed_eval_equals_masked_two_branch_output)."""
    import torch._dynamo as dynamo

    _, cm = compiled(mode="rl", blocks=2)
    cm.train()
    try:
        e = dynamo.explain(cm)(torch.randn(4, 1, 8, 8))
    finally:
        dynamo.reset()
    assert e.graph_break_count == 0 and e.graph_count == 1


def test_inductor_training_step_equals_eager_in_float64():
    """The compiled training step is eager's: in float64 (in float32 an ulp
    of inductor's reassociated sums moves a value across a rounding
    boundary and the quantized forward amplifies it), with inductor using
    eager's RNG ops (`fallback_random`), the RL step samples the same gates
    (gates drawn as u < p: torch.bernoulli decomposed into another use of
    the generator under compile) and gives the same loss and gradients."""
    import torch._dynamo as dynamo
    from torch._inductor import config as inductor_config

    _, eager = compiled(mode="rl", blocks=1, seed=4)
    comp = copy.deepcopy(eager)
    eager.double(), comp.double()
    comp.compile_with("inductor", fullgraph=True)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = {}
    try:
        for name, m in (("compiled", comp), ("eager", eager)):
            torch.manual_seed(11)
            with inductor_config.patch(fallback_random=True):
                logits = m(x)
                actions = [b.action.clone() if b.action is not None else None
                           for b in m.controllers["dual_precision"].blocks.values()]
                loss = F.cross_entropy(logits, y)
                extra = m.extra_loss(logits, y)
                (loss + extra if extra is not None else loss).backward()
            out[name] = (logits.detach(), [p.grad.clone() for p in m.parameters()], actions)
    finally:
        comp.compile_with(None)
        dynamo.reset()
    torch.testing.assert_close(out["compiled"][0], out["eager"][0], rtol=1e-12, atol=1e-12)
    for gc, ge in zip(out["compiled"][1], out["eager"][1]):
        torch.testing.assert_close(gc, ge, rtol=1e-9, atol=1e-12)
    a = out["eager"][2]
    assert all(t is not None for t in a) and any(0 < float(t.mean()) < 1 for t in a)  # really sampled
    for ac, ae in zip(out["compiled"][2], a):
        assert torch.equal(ac, ae)
