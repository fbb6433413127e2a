"""The sparsity pass (AC/DC): masked weights, the phase schedule, masks,
momentum reset, resume, and the sparse export."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from fxcompress.errors import PolicyError
from fxcompress.kernels.masks import kept_count, nm_mask_reference, topk_masks
from fxcompress.passes.sparsity import SparsitySchedule
from fxcompress.runtime.sparsity import phase_starts
from fxcompress.sparse_export import compact, expand, load_compact, save_compact


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 8)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class FunctionalNet(nn.Module):
    """A user model whose weights reach F.linear and matmul as parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(16, 8) * 0.3)   # used as x @ w2
        self.w3 = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.scale = nn.Parameter(torch.ones(8))           # 1-d: never a weight

    def forward(self, x):
        h = F.relu(F.linear(x, self.w1, self.b1))
        h = torch.matmul(h, self.w2) * self.scale
        return F.linear(h, self.w3)


def policy(schedule=None, **fields):
    p = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "sparsity": fields or {"sparsity": 0.9}}]}
    if schedule is not None:
        p["schedule"] = {"sparsity": schedule}
    return p


def data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 8, (n,), generator=g)


def compiled(schedule, seed=0, **fields):
    torch.manual_seed(seed)
    return fxcompress.compile(Net(), policy(schedule, **fields), example_inputs=(torch.randn(2, 4, 8, 8),))


def train_steps(cm, opt, n, seed=0, epoch_steps=None):
    x, y = data(seed)
    for i in range(n):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        cm.step()


def masked_params(cm):
    c = cm.controllers["sparsity"]
    return {mb.name: (c.params[mb.name], c.masked[mb.name].mask) for mb in c.members}


# ------------------------------------------------------------------ schedule
def test_presets_are_the_authors_schedules():
    imagenet = phase_starts(SparsitySchedule(preset="imagenet"))
    assert imagenet[0] == (0, "dense")
    assert [s for s, k in imagenet if k == "sparse"] == [10, 20, 30, 40, 50, 60, 70, 85]
    assert [s for s, k in imagenet if k == "dense"] == [0, 15, 25, 35, 45, 55, 65, 75]
    cifar = phase_starts(SparsitySchedule(preset="cifar"))
    assert [s for s, k in cifar if k == "sparse"] == [10, 50, 90, 130, 170]
    assert [s for s, k in cifar if k == "dense"] == [0, 30, 70, 110, 150]
    explicit = phase_starts(SparsitySchedule(compress_at=[0, 6], decompress_at=[3]))
    assert explicit == [(0, "sparse"), (3, "dense"), (6, "sparse")]


@pytest.mark.parametrize("bad, match", [
    ({"compress_at": [2, 4], "decompress_at": [3, 5, 7]}, "alternate"),
    ({"compress_at": [2], "preset": "cifar"}, "either"),
    ({"warmup": 10, "final": 5}, "before the warm-up"),
    ({"preset": "imagnet"}, "imagenet"),
])
def test_bad_schedule_is_a_policy_error(bad, match):
    with pytest.raises(PolicyError, match=match):
        compiled(bad)


def test_phase_boundaries_in_epochs():
    cm = compiled({"warmup": 1, "compressed": 2, "decompressed": 1, "final": 5})
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    phases = []
    for epoch in range(7):
        cm.on_epoch_start(epoch)
        phases.append(c.phase())
        train_steps(cm, opt, 2)
        cm.on_epoch_end(epoch)
    assert phases == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse"]
    assert [p["epoch"] for p in c.log] == [0, 1, 3, 5]


def test_phase_boundaries_in_steps_and_exact_sparsity():
    cm = compiled({"unit": "step", "warmup": 3, "compressed": 2, "decompressed": 2, "final": 9})
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    seen = []
    for _ in range(11):
        train_steps(cm, opt, 1)
        before = c.phase()  # the change waits for the next forward
        c.flush()
        seen.append((c.steps, before, c.phase()))
    # after step s the model is in the phase that starts at s
    assert [s for s, _, p in seen if p == "sparse"] == [3, 4, 9, 10, 11]
    assert [s for s, b, p in seen if b != p] == [3, 5, 9]
    n = sum(p.numel() for p, _ in masked_params(cm).values())
    k = math.ceil(n * 0.1 - 1e-9)
    for entry in c.log:
        if entry["phase"] == "sparse":
            assert entry["kept"] == k
            assert entry["sparsity"] == pytest.approx(1 - k / n, abs=0)
    # weights are masked after every optimizer step: the zeros stay exactly k
    zeros = sum(int((p == 0).sum()) for p, _ in masked_params(cm).values())
    assert zeros == n - k


def test_gradient_is_masked_and_bias_is_not():
    cm = compiled({"unit": "step", "warmup": 0, "final": 0}, sparsity=0.5)
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    cm.attach_optimizer(opt)  # the final compressed phase starts at step 0
    x, y = data()
    F.cross_entropy(cm(x), y).backward()
    for p, mask in masked_params(cm).values():
        assert (p.grad[~mask] == 0).all()
        assert (p.grad[mask] != 0).any()
    gm = cm.graph_module
    assert not any("bias" in mb.name for mb in cm.controllers["sparsity"].members)
    assert gm.conv1.bias.grad is not None and (gm.conv1.bias.grad != 0).any()


def test_fresh_mask_each_compressed_phase_and_pruned_weights_restart_from_zero():
    cm = compiled({"unit": "step", "warmup": 2, "compressed": 2, "decompressed": 3, "final": 7})
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    train_steps(cm, opt, 2)  # -> first compressed phase
    c.flush()  # (what the next forward would do first)
    first = {n: m.clone() for n, (_, m) in masked_params(cm).items()}
    train_steps(cm, opt, 2)  # -> dense
    c.flush()
    assert c.phase() == "dense" and all(m.all() for _, m in masked_params(cm).values())
    w = c.params["conv2.weight"]
    pruned = (~first["conv2.weight"]).nonzero()[0].tolist()
    assert w[tuple(pruned)] == 0  # a pruned weight restarts from 0 ...
    train_steps(cm, opt, 2)
    with torch.no_grad():
        w[tuple(pruned)] = 50.0   # ... and may grow back into the next mask
    ws = [c.params[mb.name].detach().clone() for mb in c.members]
    train_steps(cm, opt, 1)  # step 7 -> the final compressed phase, mask computed after this step
    c.flush()
    assert c.phase() == "sparse"
    mask = c.masked["conv2.weight"].mask
    assert mask[tuple(pruned)]
    # the mask is the top-k of the weights at the phase start (an independent check)
    now = torch.cat([c.params[mb.name].detach().abs().flatten() for mb in c.members])
    got = torch.cat([c.masked[mb.name].mask.flatten() for mb in c.members])
    k = kept_count(now.numel(), 0.9)
    assert int(got.sum()) == k
    del ws


def test_momentum_zeroed_at_decompression():
    cm = compiled({"unit": "step", "warmup": 0, "compressed": 2, "decompressed": 2, "final": 8}, sparsity=0.5)
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    train_steps(cm, opt, 1)
    bufs = {n: opt.state[p]["momentum_buffer"] for n, (p, _) in masked_params(cm).items()}
    assert all(b.abs().sum() > 0 for b in bufs.values())
    train_steps(cm, opt, 1)  # step 2: decompression, made before the next forward
    assert c.phase() == "sparse" and c.momentum_resets == 0
    c.flush()
    assert c.phase() == "dense" and c.momentum_resets == 1
    # every buffer the optimizer holds, as the authors' SGD.reset_momentum_buffer:
    # the masked weights', the biases' (never masked) too
    everything = [opt.state[p]["momentum_buffer"] for p in cm.parameters()]
    assert len(everything) > len(bufs) and all(b.abs().sum() == 0 for b in everything)
    # so the first dense step's update is the plain gradient (+ weight decay 0)
    x, y = data()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(cm(x), y).backward()
    grads = {p: p.grad.clone() for p in cm.parameters()}
    opt.step()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], g) for p, g in grads.items())


# ------------------------------------------------------------------ masks
def test_exact_sparsity_with_ties_is_deterministic():
    w = torch.zeros(10, 10)
    w[:3] = 1.0           # 30 equal magnitudes, 25 of them kept
    w[3:, :5] = 0.5
    (mask,) = topk_masks([w.abs()], 25)
    assert int(mask.sum()) == 25
    assert mask[:2].all() and mask[2, :5].all() and not mask[2, 5:].any()  # first in flat order wins
    masks = topk_masks([w[:5].abs(), w[5:].abs()], kept_count(100, 0.9))
    assert sum(int(m.sum()) for m in masks) == 10 and masks[0][0].all() and not masks[1].any()
    assert kept_count(10, 0.9) == 1 and kept_count(1000, 0.95) == 50 and kept_count(7, 0.5) == 4


def test_nm_masks_every_group_has_n_zeros():
    cm = compiled({"unit": "step", "warmup": 0, "final": 0}, kind="nm", n=2, m=4)
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    for name, (p, mask) in masked_params(cm).items():
        groups = mask.movedim(1, -1).reshape(-1, 4)  # O, kh, kw, I
        assert (groups.sum(1) == 2).all(), name
        kept_min = p.abs().movedim(1, -1).reshape(-1, 4)
        g = groups
        assert (kept_min.masked_fill(~g, float("inf")).min(1).values
                >= kept_min.masked_fill(g, -1).max(1).values).all()
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, -3.0, 2.0, 0.0]])
    assert nm_mask_reference(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]


def test_uniform_keeps_first_and_last_dense():
    cm = compiled({"unit": "step", "warmup": 0, "final": 0}, kind="uniform", sparsity=0.75)
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    ms = masked_params(cm)
    assert ms["conv1.weight"][1].all() and ms["fc.weight"][1].all()
    mask = ms["conv2.weight"][1]
    assert int(mask.sum()) == kept_count(mask.numel(), 0.75)


def test_global_mask_that_empties_a_layer_warns_and_first_last_dense_prevents_it():
    """One global threshold can remove a whole small layer (here conv1, its
    weights scaled down): the controller warns and reports it; with the first
    and last layers dense (the shipped global policy) it cannot."""
    import warnings

    for fl in (False, True):
        cm = compiled({"unit": "step", "warmup": 0, "final": 0}, sparsity=0.9, first_last_dense=fl)
        with torch.no_grad():
            cm.graph_module.conv1.weight.mul_(1e-3)
        c = cm.controllers["sparsity"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert (len(said) == 1 and "conv1.weight" in said[0]) != fl
        assert c.report()["emptied_layers"] == ([] if fl else ["conv1.weight"])
        assert bool(c.masked["conv1.weight"].mask.all()) == fl


def test_shipped_global_policy_keeps_first_and_last_dense():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "policies" / "acdc_90.yaml"
    cm = fxcompress.compile(Net(), str(path), example_inputs=(torch.randn(2, 4, 8, 8),))
    members = cm.controllers["sparsity"].members
    assert {mb.kind for mb in members} == {"global"} and {mb.sparsity for mb in members} == {0.9}
    assert [mb.name for mb in members if mb.dense] == ["conv1.weight", "fc.weight"]


# ------------------------------------------------------------------ models
def test_functional_user_model_every_weight_masked():
    pol = {"rules": [{"match": {"name": ["w1", "w2", "w3"]}, "sparsity": {"sparsity": 0.5}}],
           "schedule": {"sparsity": {"unit": "step", "warmup": 0, "final": 0}}}
    model = FunctionalNet()
    cm = fxcompress.compile(model, pol, example_inputs=(torch.randn(3, 12),))
    c = cm.controllers["sparsity"]
    assert sorted(mb.name for mb in c.members) == ["w1", "w2", "w3"]
    assert {mb.name: mb.in_dim for mb in c.members} == {"w1": 1, "w2": 0, "w3": 1}
    assert cm.code.count("fxc_sparsity_w") >= 3
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    x = torch.randn(3, 12)
    expected = {n: p.detach() * c.masked[n].mask for n, p in c.params.items()}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, w in expected.items():
            getattr(ref, n).copy_(w)
    torch.testing.assert_close(cm(x), ref(x))


def test_vit_b_16_every_weight_masked():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16's configuration (patch 16, width 768, 12 heads, MLP 3072) with two
    # of its twelve blocks and a 32x32 image: the same ops, built in a second
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768,
                              mlp_dim=3072, num_classes=10)
    pol = {"rules": [{"match": {"type": ["Conv2d", "Linear", "MultiheadAttention"]}, "sparsity": {"sparsity": 0.9}}],
           "schedule": {"sparsity": {"unit": "step", "warmup": 0, "final": 0}}}
    cm = fxcompress.compile(model, pol, example_inputs=(torch.randn(1, 3, 32, 32),))
    c = cm.controllers["sparsity"]
    weights = {n for n, p in model.named_parameters() if p.dim() >= 2} - {"class_token", "encoder.pos_embedding"}
    # conv_proj, heads, and per block: attention in_proj and out_proj, two MLP linears
    assert len(weights) == 2 + 2 * 4
    assert {mb.name for mb in c.members} == weights
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.01))
    x = torch.randn(2, 3, 32, 32)
    out = cm(x)
    out.sum().backward()
    for mb in c.members:
        p, mask = c.params[mb.name], c.masked[mb.name].mask
        assert (p[~mask] == 0).all() and (p.grad[~mask] == 0).all(), mb.name
    zeros = sum(int((~c.masked[mb.name].mask).sum()) for mb in c.members)
    total = sum(c.params[mb.name].numel() for mb in c.members)
    assert total - zeros == kept_count(total, 0.9)


# ------------------------------------------------------------------ resume, export
@pytest.mark.parametrize("at", [2, 4])  # 4: saved after the step that ends the phase, before the change
def test_resume_mid_phase_is_bitwise_equal(at):
    sched = {"unit": "step", "warmup": 1, "compressed": 3, "decompressed": 2, "final": 8}

    def fresh():
        cm = compiled(sched)
        opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        cm.attach_optimizer(opt)
        return cm, opt

    cm, opt = fresh()
    train_steps(cm, opt, at)  # in the middle of the first compressed phase, or at its end
    saved = copy.deepcopy({"model": cm.state_dict(), "opt": opt.state_dict()})
    assert cm.controllers["sparsity"].pending() == (at == 4)
    train_steps(cm, opt, 8, seed=1)
    cm2, opt2 = fresh()
    cm2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    c2 = cm2.controllers["sparsity"]
    assert c2.steps == at and c2.phase() == "sparse" and c2.pending() == (at == 4)
    train_steps(cm2, opt2, 8, seed=1)
    for (k, a), (_, b) in zip(cm.state_dict().items(), cm2.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    assert cm.controllers["sparsity"].state() == cm2.controllers["sparsity"].state()


def test_sparse_export_reloads_with_the_same_outputs(tmp_path):
    cm = compiled({"unit": "step", "warmup": 0, "final": 0})
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    cm.attach_optimizer(opt)
    train_steps(cm, opt, 2)
    from fxcompress.training.checkpoint import original_names

    state = original_names(cm.state_dict())
    path = tmp_path / "m.pt"
    size = save_compact(state, str(path))
    back = load_compact(str(path))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    plain = Net()
    plain.load_state_dict(back)
    x, _ = data(3)
    cm.eval(), plain.eval()
    assert torch.equal(plain(x), cm(x))
    dense = expand(compact({k: torch.randn_like(v) for k, v in state.items()}))
    assert len(dense) == len(state)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    assert size < 0.5 * buf.tell()  # 90 % of the conv/linear weights are zeros


def test_snapshot_labels_in_epochs():
    cm = compiled({"warmup": 1, "compressed": 1, "decompressed": 1, "final": 3})
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    cm.attach_optimizer(opt)
    c = cm.controllers["sparsity"]
    labels = []
    for epoch in range(5):
        cm.on_epoch_start(epoch)
        for _ in range(2):
            train_steps(cm, opt, 1)
            labels.append((epoch, c.snapshot_due()))
        cm.on_epoch_end(epoch)
    got = [(e, lab) for e, lab in labels if lab]
    assert got == [(2, "dense"), (3, "sparse"), (4, "sparse")]


def test_dense_snapshot_is_the_last_dense_step_in_steps():
    """unit: step. The snapshot asked after the step that ends the last dense
    phase holds that step's weights (not the step before), with all-ones
    masks; the next forward already runs compressed."""
    cm = compiled({"unit": "step", "warmup": 2, "compressed": 2, "decompressed": 2, "final": 6})
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    x, y = data()
    labels, after_opt, snap = [], {}, None
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        after_opt = {n: p.detach().clone() for n, (p, _) in masked_params(cm).items()}
        cm.step()
        label = c.snapshot_due()
        labels.append((c.steps, label))
        if label == "dense":
            snap = copy.deepcopy(cm.state_dict())
            exact = after_opt
    assert [(s, lab) for s, lab in labels if lab == "dense"] == [(6, "dense")]
    masks = [v for k, v in snap.items() if k.endswith(".mask")]
    assert masks and all(bool(m.all()) for m in masks)
    for name, w in exact.items():
        key = next(k for k in snap if k.replace("graph_module.", "", 1) == name)
        assert torch.equal(snap[key], w), name  # the weights after step 6, dense
    assert c.phase() == "sparse" and [e["step"] for e in c.log if e["phase"] == "sparse"][-1] == 6


def test_dense_snapshot_is_the_last_dense_epoch_in_epochs():
    cm = compiled({"warmup": 1, "compressed": 1, "decompressed": 1, "final": 3})
    c = cm.controllers["sparsity"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    cm.attach_optimizer(opt)
    x, y = data()
    snap, exact = None, None
    for epoch in range(4):
        cm.on_epoch_start(epoch)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(cm(x), y).backward()
            opt.step()
            cm.step()
            if c.snapshot_due() == "dense":
                snap = copy.deepcopy(cm.state_dict())
                exact = {n: p.detach().clone() for n, (p, _) in masked_params(cm).items()}
                at = (epoch, c.steps_in_epoch)
        cm.on_epoch_end(epoch)
    assert at == (2, 3)  # the last step of epoch 2, the last dense epoch
    for name, w in exact.items():
        key = next(k for k in snap if k.replace("graph_module.", "", 1) == name)
        assert torch.equal(snap[key], w), name
    assert all(bool(v.all()) for k, v in snap.items() if k.endswith(".mask"))
    assert c.phase() == "sparse" and all(not bool(v.all()) for k, v in cm.state_dict().items() if k.endswith(".mask"))


def test_plot_written(tmp_path):
    cm = compiled({"warmup": 1, "compressed": 1, "decompressed": 1, "final": 3})
    c = cm.controllers["sparsity"]
    history = [{"epoch": e, "figures": {"sparsity.sparsity": s}} for e, s in enumerate([0, .9, 0, .9, .9])]
    (path,) = c.plots(history, str(tmp_path))
    assert path.endswith(".png") and (tmp_path / "sparsity.png").stat().st_size > 1000


def test_with_activations_in_one_policy():
    """The pass runs before activations: a policy using both builds, and the
    masked weight still reaches the conv."""
    pol = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "sparsity": {"sparsity": 0.5}},
                     {"match": {"type": "Conv2d"}, "activations": {"bits": 8}}],
           "schedule": {"sparsity": {"unit": "step", "warmup": 0, "final": 0}}}
    torch.manual_seed(0)
    cm = fxcompress.compile(Net(), pol, example_inputs=(torch.randn(2, 4, 8, 8),))
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    x, y = data()
    F.cross_entropy(cm(x), y).backward()
    for p, mask in masked_params(cm).values():
        assert (p.grad[~mask] == 0).all()
    assert "fxc_sparsity_conv1_weight" in cm.code


def test_training_run_end_to_end_resume_snapshots_export(tmp_path):
    """fxcompress train with an AC/DC policy in epochs: resuming in the middle
    of the alternation gives the same weights; the run keeps a dense and a
    sparse model; sparse-export writes a compact file that reloads bitwise."""
    from fxcompress.training import TrainConfig, resume, train
    from tests.helpers import run_cli

    pol = tmp_path / "acdc.yaml"
    pol.write_text("rules:\n  - match: {type: [Conv2d, Linear]}\n    sparsity: {sparsity: 0.8}\n"
                   "schedule:\n  sparsity: {warmup: 1, compressed: 1, decompressed: 1, final: 3}\n")
    tiny = dict(data="digits", upscale=8, depth=8, batch_size=32, train_limit=96, test_limit=40, lr=0.05,
                progress=False, plots=False, epochs=4, policy=str(pol))
    full = train(TrainConfig(**tiny, run_dir=str(tmp_path / "full")))
    train(TrainConfig(**tiny, run_dir=str(tmp_path / "part"), stop_after=2))  # stops after epoch 1 (sparse)
    done = resume(str(tmp_path / "part"))
    assert done["status"] == "done"
    a = torch.load(tmp_path / "full" / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "final_model.pt", weights_only=True)["state_dict"]
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    figs = [e["figures"] for e in full["main"]["epochs"]]
    assert [f["sparsity.sparse"] for f in figs] == [0.0, 1.0, 0.0, 1.0]
    assert (tmp_path / "full" / "models" / "dense.pt").exists() and (tmp_path / "full" / "models" / "sparse.pt").exists()
    code, out, err = run_cli(["sparse-export", str(tmp_path / "full"), "--json"])
    assert code == 0, err
    import json

    res = json.loads(out)
    assert res["compact_bytes"] < res["dense_bytes"] and res["weight_sparsity"] > 0.7
    back = load_compact(res["compact"])
    plain = torch.load(res["with_zeros"], weights_only=True)
    assert set(back) == set(plain) and all(torch.equal(back[k], plain[k]) for k in plain)


def test_masked_graph_compiles_without_graph_breaks():
    """The mask multiply is plain tensor code: dynamo captures the whole
    forward in one graph, in a dense and in a compressed phase alike."""
    cm = compiled({"unit": "step", "warmup": 0, "final": 0}, sparsity=0.5)
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    x, _ = data()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(cm.graph_module)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    fn = torch.compile(cm.graph_module, backend="eager")
    torch.testing.assert_close(fn(x), cm.graph_module(x))


def test_step_phase_changes_under_torch_compile_match_eager():
    """unit: step with the forward compiled (hooks added after tracing are not
    seen): the loop's snapshot_due()/figures() make each change before the next
    forward, so compiled training equals eager training bitwise."""
    import warnings

    def run(use_compile):
        cm = compiled({"unit": "step", "warmup": 2, "compressed": 2, "decompressed": 2, "final": 6})
        opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny fc may be emptied at 90 %
            cm.attach_optimizer(opt)
            fwd = torch.compile(cm.graph_module, backend="eager") if use_compile else cm.graph_module
            x, y = data()
            labels = []
            for _ in range(8):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(fwd(x), y).backward()
                opt.step()
                cm.step()
                labels.append(cm.snapshot_due())
                cm.figures()
        return [p.detach().clone() for p, _ in masked_params(cm).values()], labels

    torch._dynamo.reset()
    (a, la), (b, lb) = run(False), run(True)
    assert la == lb and la[5] == ["dense"]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_nm_keeps_a_layer_whose_inputs_are_not_groups_of_m_dense_and_says_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    cm = fxcompress.compile(net, policy({"unit": "step", "warmup": 0, "final": 0}, kind="nm"),
                            example_inputs=(torch.randn(1, 3, 8, 8),))
    assert any("not a multiple of m): 0.weight" in n for n in cm.pass_results["sparsity"].notes)
    cm.attach_optimizer(torch.optim.SGD(cm.parameters(), lr=0.1))
    ms = masked_params(cm)
    assert ms["0.weight"][1].all()
    assert (ms["2.weight"][1].reshape(-1, 4).sum(1) == 2).all()
