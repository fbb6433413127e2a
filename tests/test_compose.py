"""How the methods compose on one model (README "Composing the methods"): one
test per rule of that table, on a tiny residual network."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from fxcompress import load_policy
from fxcompress.passes import DEFAULT_PASSES
from fxcompress.quantizers.dorefa import WeightQuant
from fxcompress.runtime.activations import fxc_save
from fxcompress.runtime.scaled_grad import ScaledGrad
from fxcompress.runtime.sparsity import MaskedWeight
from tests.models.residual import Residual


class Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.block = Residual(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


LAYERS = {"match": {"type": ["Conv2d", "Linear"]}}
DP_LAYER = {"dual_precision": {"high_bits": 4}}
DP_BLOCK = {"match": {"op": ["add"]}, "dual_precision": {"low_bits": 1, "high_bits": 4}}
SG = {"scaled_grad": {"bits": 4, "lambda_s": 150.0}}
SP = {"sparsity": {"sparsity": 0.5, "kind": "global"}}
ACT = {"match": {"name": "*"}, "optional": True, "activations": {"mode": "fixed", "bits": 8}}
SCHEDULE = {"sparsity": {"unit": "step", "compress_at": [0]}}  # sparse from the first step


def policy(*, dp=False, sg=False, sp=False, act=False):
    layer = dict(LAYERS)
    for on, t in ((dp, DP_LAYER), (sg, SG), (sp, SP)):
        if on:
            layer.update(t)
    rules = [layer] + ([DP_BLOCK] if dp else []) + ([ACT] if act else [])
    out = {"rules": rules}
    if sp:
        out["schedule"] = SCHEDULE
    if dp:
        out["settings"] = {"dual_precision": {"mode": "sp"}}
    return out


X = torch.randn(4, 1, 8, 8)
Y = torch.tensor([0, 1, 2, 0])


def compiled(pol, seed=0):
    torch.manual_seed(seed)
    return fxcompress.compile(Net(), pol, (X,))


def train_step(cm, lr=0.1, noise=0.0):
    opt = torch.optim.SGD(cm.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    cm.attach_optimizer(opt)  # the sparsity controller compresses here (compress_at: [0])
    cm.train()
    loss = F.cross_entropy(cm(X), Y)
    opt.zero_grad()
    loss.backward()
    if noise:  # any error on the gradient (a quantized all-reduce, say)
        for p in cm.parameters():
            if p.grad is not None:
                p.grad.add_(noise * torch.randn_like(p.grad))
    grads = {n: p.grad.clone() for n, p in cm.graph_module.named_parameters() if p.grad is not None}
    opt.step()
    cm.step()
    return grads


def users_of(gm, cls):
    """{module target: [nodes calling it]} for inserted modules of class `cls`."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls):
            out.setdefault(n.target, []).append(n)
    return out


def test_passes_run_dual_precision_first():
    assert [p.name for p in DEFAULT_PASSES] == ["dual_precision", "scaled_grad", "sparsity", "activations"]


def test_sparsity_x_dual_precision_one_mask_after_each_quantizer():
    cm = compiled(policy(dp=True, sp=True))
    gm = cm.graph_module
    masks = users_of(gm, MaskedWeight)
    conv1 = next(t for t, ns in masks.items() if gm.get_submodule(t).param_name == "block.body.0.weight")
    nodes = masks[conv1]
    assert len(nodes) == 2  # one mask module, both paths
    for n in nodes:  # mask after the path's quantizer, right before the conv
        assert isinstance(gm.get_submodule(n.args[0].target), WeightQuant)
        assert all(u.op == "call_function" for u in n.users)
    train_step(cm)
    mask = gm.get_submodule(conv1).mask
    assert 0 < int((~mask).sum()) < mask.numel()
    w = gm.get_parameter("block.body.0.weight")
    for n in nodes:  # the quantized weight each path uses is exactly 0 where pruned
        q = gm.get_submodule(n.args[0].target)(w) * mask
        assert torch.all(q[~mask] == 0) and torch.all(gm.get_submodule(n.args[0].target)(w)[~mask] != 0)


def test_scaled_grad_x_sparsity_scales_masked_gradients_never_revives():
    cm = compiled(policy(sg=True, sp=True))
    gm = cm.graph_module
    for t, nodes in users_of(gm, MaskedWeight).items():  # mask after the scale, before the op
        for n in nodes:
            assert isinstance(gm.get_submodule(n.args[0].target), ScaledGrad)
    grads = train_step(cm)
    ctl = cm.controllers["sparsity"]
    for name, mod in ctl.masked.items():
        assert torch.all(grads[name][~mod.mask] == 0)  # no gradient reaches a pruned weight
    # the surviving gradients are PSGD-scaled: they differ from sparsity alone
    plain = train_step(compiled(policy(sp=True)))
    name = next(iter(ctl.masked))
    assert not torch.allclose(grads[name], plain[name])
    for _ in range(3):  # momentum, weight decay: still 0 after more steps
        train_step(cm)
    for name, mod in ctl.masked.items():
        assert torch.all(gm.get_parameter(name)[~mod.mask] == 0)


def test_scaled_grad_x_dual_precision_one_scale_on_the_float_weight():
    cm = compiled(policy(dp=True, sg=True))
    gm = cm.graph_module
    scaled = users_of(gm, ScaledGrad)
    t = next(t for t in scaled if gm.get_submodule(t).param_name == "block.body.3.weight")
    assert len(scaled[t]) == 2  # both paths read the weight through the same ScaledGrad
    for n in scaled[t]:
        (q,) = n.users
        assert isinstance(gm.get_submodule(q.target), WeightQuant)  # scale first, then the quantizer
    g = train_step(cm)["block.body.3.weight"]
    g_dp = train_step(compiled(policy(dp=True)))["block.body.3.weight"]
    assert not torch.allclose(g, g_dp)  # the sum of both paths' gradients, scaled


def test_activations_x_dual_precision_cover_both_paths_gate_and_merge():
    cm = compiled(policy(dp=True, act=True))
    saved = [n.name for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target is fxc_save]
    for part in ("_low_block_body_0", "_high_block_body_0", "_low_block_body_1", "_high_block_body_1",
                 "_gate", "_merge", "_low_block_body_0_in"):
        assert any(part in s for s in saved), part


def test_activations_x_weight_passes_store_inputs_not_weights():
    cm = compiled(policy(sg=True, sp=True, act=True))
    gm = cm.graph_module
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fxc_save
             and "conv2d" in n.args[1]]
    assert convs
    for n in convs:  # the weight arrives through the mask, is not counted as an activation
        spec = gm.get_submodule(n.args[0].target)
        w = n.args[3]  # fxc_save(spec, description, x, weight, ...)
        assert isinstance(gm.get_submodule(w.target), MaskedWeight)
        assert 1 in spec.weight_args and 0 not in spec.weight_args  # the op's (x, weight, ...)


def test_all_five_pruned_weights_stay_zero_under_gradient_noise():
    """communication x sparsity: whatever error the wire adds to a gradient,
    the controller re-applies the masks after every optimizer step."""
    pol = policy(dp=True, sg=True, sp=True, act=True)
    pol["communication"] = {"method": "alq", "bits": 3}
    cm = compiled(pol)
    for _ in range(3):
        train_step(cm, noise=0.1)
    ctl = cm.controllers["sparsity"]
    for name, mod in ctl.masked.items():
        assert torch.all(cm.graph_module.get_parameter(name)[~mod.mask] == 0)
    assert set(cm.controllers) == {"dual_precision", "scaled_grad", "sparsity", "activations"}


def test_all_yaml_loads_and_trains_a_step():
    pol = load_policy("policies/all.yaml", DEFAULT_PASSES)
    assert pol.section("communication") is not None
    torch.manual_seed(0)
    cm = fxcompress.compile(Net(), "policies/all.yaml", (X,))
    assert set(cm.controllers) == {"dual_precision", "scaled_grad", "sparsity", "activations"}
    before = copy.deepcopy(cm.state_dict())
    train_step(cm, lr=0.01)
    after = cm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_all_yaml_under_alq_gradients_stays_bounded():
    """communication x dual_precision: ALQ scales every coordinate of a bucket
    by the bucket's norm, so one huge gradient anywhere in the bucket becomes
    noise of that size on all its neighbours. all.yaml diverged under ALQ
    (loss 1e14..1e25 in the first epoch, fp32 all-reduce fine) because the
    gate's zero-initialised head was DoReFa-quantized: tanh(w) / max|tanh(w)|
    at w = 0 has a gradient of order 1 / 1e-12 (~1e11 here). Since the head is
    full precision every gradient of the composed model is of ordinary size,
    and steps with ALQ-quantized gradients (the hook's encode/decode, one
    rank) keep the loss bounded."""
    from fxcompress.distributed.quantizers import Quantizer

    torch.manual_seed(0)
    cm = fxcompress.compile(Net(), "policies/all.yaml", (X,))
    params = [p for p in cm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    q = Quantizer("alq", 3, bucket_size=64)  # several buckets even on this small model
    losses = []
    for step in range(6):
        loss = F.cross_entropy(cm(X), Y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        largest = max(float(g.abs().max()) for g in grads)
        assert largest < 1e3, f"step {step}: a gradient of {largest:.3g}"
        flat = torch.cat([g.reshape(-1) for g in grads])
        if step == 0:
            q.fit(q.stats(flat))
        flat = q.quantize(flat, seed=step)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()
        opt.step()
        cm.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and max(losses) < 10, losses
