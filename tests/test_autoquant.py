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
                                       "activations": {"mode": "auto", "eps_bits": eps_bits}}],
              "settings": {"activations": {"stats_every": 1}}}
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
                                       "activations": {"mode": "auto"}}],
              "settings": {"activations": {"stats_every": 3, "window": 2}}}
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


# --- ops without a bound (LayerNorm, GELU, attention): measured widths ---------------

def _tiny_vit(num_classes, zero_head=False):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=num_classes)
    if not zero_head:  # torchvision zero-initialises the head; give the encoder a gradient at step 0
        torch.nn.init.normal_(m.heads.head.weight, std=0.1)
    return m


def _gray_to_rgb(x):
    return x.expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("eps_bits", [0, 4])
def test_measured_widths_keep_every_gradient_within_e(batch, eps_bits):
    """Statistics on one batch; on another batch, the whole model's weight
    gradient stays within e of the uncompressed one (and every single
    parameter tensor within a few e), and the measured ops are stored below
    the 8-bit fallback."""
    from fxcompress.runtime.gradient_check import gradient_error

    x, y, bundle = batch
    x = _gray_to_rgb(x)
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "eps_bits": eps_bits, "min_numel": 256}}]}
    cm = fxcompress.compile(_tiny_vit(bundle.num_classes), policy, example_inputs=x[:2])
    ctrl = cm.controllers["activations"]
    kinds = {ctrl._specs[n].op for n in ctrl.probe_nodes}
    assert {"LayerNorm", "GELU", "MultiheadAttention"} <= kinds
    F.cross_entropy(cm(x[:32]), y[:32]).backward()
    cm.step()
    bits = {n: ctrl._specs[n].measured_bits for n in ctrl.probe_nodes}
    assert all(b is not None for b in bits.values()), bits
    if eps_bits == 0:
        assert min(bits.values()) < 8
    g = gradient_error(cm, x[32:], lambda out: F.cross_entropy(out, y[32:]))
    e = 2.0 ** -eps_bits
    assert 0 < g["total"] <= e, g["total"]
    if eps_bits == 0:
        # the widths sit at their 2-bit floor here, where the signed grid
        # (which holds max|x| since the rounding fix) has 3 levels: one
        # LayerNorm weight's gradient reaches 1.53 e, the whole model's
        # stays within e (0.71 here)
        assert g["worst"] <= 2 * e, (g["worst_param"], g["worst"])
    else:
        # each op's error is held to e on its own, and errors of ops in series
        # add up along the backward: one tensor may exceed e (0.116 here),
        # the whole model's gradient stays within it
        assert g["worst"] <= 4 * e, (g["worst_param"], g["worst"])


def test_tighter_e_measures_wider(batch):
    x, y, bundle = batch
    x = _gray_to_rgb(x)
    widths = []
    for eps_bits in (0, 8):
        policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                           "activations": {"mode": "auto", "eps_bits": eps_bits,
                                                           "min_numel": 256}}]}
        cm = fxcompress.compile(_tiny_vit(bundle.num_classes), policy, example_inputs=x[:2])
        F.cross_entropy(cm(x), y).backward()
        cm.step()
        ctrl = cm.controllers["activations"]
        widths.append(sum(ctrl._specs[n].measured_bits for n in ctrl.probe_nodes))
    assert widths[0] < widths[1]


def test_no_gradient_at_step_0_is_measured_again(batch):
    """torchvision's ViT starts with a zero head: at step 0 no gradient reaches
    the encoder, so there is nothing to take statistics from; AutoQuant tries
    again at the next step instead of waiting stats_every steps."""
    x, y, bundle = batch
    x = _gray_to_rgb(x)
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "min_numel": 256}}]}
    cm = fxcompress.compile(_tiny_vit(bundle.num_classes, zero_head=True), policy, example_inputs=x[:2])
    ctrl = cm.controllers["activations"]
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    ln = ctrl.probe_nodes[0]
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        cm.step()
        if step == 0:  # nothing measured; the next step collects again
            assert not ctrl.snapshots.get(ln) and ctrl._specs[ln].collect
    assert ctrl._specs[ln].measured_bits is not None
    assert not ctrl._specs[ln].collect  # measured: back to the every-100-steps schedule


@pytest.mark.parametrize("eps_bits", [0, 4])
def test_measured_in_the_backward_from_16_bit_copies(batch, monkeypatch, eps_bits):
    """The statistics step's memory: a measured op's input copies are packed
    at 16 bits, and the op is measured inside the backward as its output's
    gradient arrives, its copies and gradient freed there. The widths equal
    those measured from exact fp32 copies."""
    from fxcompress.kernels import actpack
    from fxcompress.runtime import probe

    x, y, bundle = batch
    x = _gray_to_rgb(x)[:32]
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "eps_bits": eps_bits, "min_numel": 256}}]}
    widths = []
    for copy_bits in (16, None):
        monkeypatch.setattr(probe, "COPY_BITS", copy_bits)
        cm = fxcompress.compile(_tiny_vit(bundle.num_classes), policy, example_inputs=x[:2])
        ctrl = cm.controllers["activations"]
        out = cm(x)
        args = [a for n in ctrl.probe_nodes for a in ctrl._specs[n].snapshot["args"]]
        packed = [a for a in args if isinstance(a, actpack.Packed)]
        assert bool(packed) == (copy_bits == 16)
        F.cross_entropy(out, y[:32]).backward()
        # measured in the backward: nothing but the result is held until step()
        assert all(set(ctrl._specs[n].snapshot) == {"measured"} for n in ctrl.probe_nodes)
        cm.step()
        widths.append({n: ctrl._specs[n].measured_bits for n in ctrl.probe_nodes})
    assert widths[0] == widths[1] and all(widths[0].values()), widths


def test_measured_op_keeps_its_input_from_before_an_in_place_op():
    """Hardswish(inplace=True) overwrites its input: the statistics must keep
    the input as it was (a BN output, below hardswish's minimum -0.375)."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(inplace=True), nn.Conv2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "min_numel": 16}}]}
    cm = fxcompress.compile(model, policy, example_inputs=x[:1])
    ctrl = cm.controllers["activations"]
    (node,) = [n for n in ctrl.probe_nodes if ctrl._specs[n].op == "Hardswish"]
    out = cm(x)
    from fxcompress.runtime.probe import _restore

    kept = _restore(ctrl._specs[node].snapshot["args"][1])
    assert float(kept.min()) < -1.0
    F.cross_entropy(out, y).backward()
    cm.step()
    assert ctrl._specs[node].measured_bits is not None


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "swin_t"])
def test_auto_trains_torchvision_families(name):
    """In-place activations, squeeze-excitation products, stochastic depth,
    channel shuffles, shifted-window attention: three training steps under
    `auto`, with statistics, measured widths and packed storage."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    cm = fxcompress.compile(model, "policies/acgc_auto.yaml", example_inputs=x[:1])
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(cm(x), y)
        loss.backward()
        opt.step()
        cm.step()
    assert torch.isfinite(loss)
    ctrl = cm.controllers["activations"]
    assert ctrl.probe_nodes and all(ctrl._specs[n].measured_bits for n in ctrl.probe_nodes)
    assert cm.figures()["activations.ratio"] > 4


def test_c_widths_equal_the_numpy_reference(monkeypatch):
    """kernels/autobits.py (one C call per tensor) gives runtime/widths.py's
    numpy widths exactly: conv/linear and BatchNorm budgets, signed and
    unsigned, with and without spend_slack, channel counts off the
    pairwise-sum block sizes."""
    from fxcompress.kernels import autobits
    from fxcompress.runtime.widths import auto_bits

    if autobits._lib() is None:
        pytest.skip("no C compiler: the numpy reference is the only path")
    gen = torch.Generator().manual_seed(3)
    for trial in range(120):
        C = int(torch.randint(1, 1100, (1,), generator=gen))
        amax = (torch.rand(C, generator=gen) ** 3 * 10).float()
        counts = torch.randint(0, 5000, (C,), generator=gen) if trial % 3 else None
        dx2 = float(10 ** (-torch.rand(1, generator=gen) * 8))
        bn = None
        if trial % 4 == 0:
            bn = {"numer": dx2 * 1e3, "K": float(C), "gamma2": torch.rand(C, generator=gen) if trial % 8 else 1.0,
                  "inv_std2": torch.rand(C, generator=gen) * 10, "nnz2": torch.rand(C, generator=gen) * 1e4,
                  "gz2_max": torch.rand(C, generator=gen) * 1e-6, "ggamma2": torch.rand(C, generator=gen) * 1e-4}
        signed = bool(trial % 2)
        monkeypatch.setenv("FXC_CPU_FAST", "1")
        fast = auto_bits(amax, signed, C, dx2, bn, 8, counts=counts)
        monkeypatch.setenv("FXC_CPU_FAST", "0")
        ref = auto_bits(amax, signed, C, dx2, bn, 8, counts=counts)
        assert torch.equal(fast, ref), (trial, C, signed)


def _small_auto_net():
    """Conv, BatchNorm (its budget caches the C path's ctypes arrays), ReLU,
    GELU (a measured width) and a linear head, under policies/acgc_auto.yaml."""
    import os

    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                      nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    policy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies", "acgc_auto.yaml")
    return fxcompress.compile(m, policy, example_inputs=(torch.randn(2, 3, 16, 16),))


def _train_step(cm, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(cm(x), y)
    loss.backward()
    opt.step()
    cm.step()
    return loss.detach()


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_compiled_model_copies_and_pickles_at_any_step(steps):
    """deepcopy and torch.save/load of a compiled `auto` model after `steps`
    steps (after two, BatchNorm budgets hold the C path's ctypes arrays):
    the copy trains, and its next steps match the original's bit for bit
    (so the loaded copy still compresses: its backward is the original's)."""
    import io

    cm = _small_auto_net()
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(steps + 2)]
    for x, y in batches[:steps]:
        _train_step(cm, opt, x, y)
    buf = io.BytesIO()
    torch.save(cm, buf)
    buf.seek(0)
    copies = [copy.deepcopy(cm), torch.load(buf, weights_only=False)]
    rest = batches[steps:]
    ref = [_train_step(cm, opt, x, y) for x, y in rest]
    for c in copies:
        # torch.load re-traces the graph module from its code: the
        # compressed saves must stay calls, not be traced through
        assert c.graph_module.code.count("fxc_save(") == cm.graph_module.code.count("fxc_save(") > 0
        c_opt = torch.optim.SGD(c.parameters(), lr=0.05)
        got = [_train_step(c, c_opt, x, y) for x, y in rest]
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (steps, [float(v) for v in got], [float(v) for v in ref])
        for (n, p), q in zip(cm.named_parameters(), c.parameters()):
            assert torch.equal(p, q), n
        assert c.controllers["activations"].steps == cm.controllers["activations"].steps


def test_a_pack_belongs_to_one_forward():
    """The same tensor object fed to a later forward is packed again: under
    `auto` the step after the statistics step stores the first convolution's
    input at its measured widths (not the 8 bits of step 0's pack), exactly
    as a copy of the tensor would be; at fixed stochastic bits the draws are
    new."""
    cm = _small_auto_net()
    opt = torch.optim.SGD(cm.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    ledger = cm.graph_module.fxc_act__0._ledger

    def stored(node="_0"):
        return ledger.nodes[node]["stored_bytes"]

    _train_step(cm, opt, x, y)  # statistics step: the input is stored at the fallback bits
    at_8 = stored()
    _train_step(cm, opt, x, y)  # the same object again
    again = stored()
    _train_step(cm, opt, x.clone(), y)
    assert again == stored() < at_8

    torch.manual_seed(0)
    import torch.nn as nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"bits": 2, "rounding": "stochastic"}}]}
    cm = fxcompress.compile(net, policy, example_inputs=(x[:1],))
    spec = cm.graph_module.fxc_act__0
    packs = []
    for _ in range(2):
        cm(x).sum().backward()
        ptr = x.untyped_storage().data_ptr()
        packs += [obj for key, obj in spec._ledger.registry.items() if key[0] == ptr]
    assert len(packs) == 2 and packs[0] is not packs[1]
    assert not torch.equal(spec.unpack(packs[0]), spec.unpack(packs[1]))  # new draws


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_c_auto_pack_stores_what_the_reference_stores(monkeypatch, rounding):
    """One training step after the statistics, on copies of one model: with
    the C path (kernels/auto_pack.py: widths, groups and codes in two calls
    per tensor) at 1, 2 and 3 threads, every tensor backward decodes, the
    byte accounting and (at 1 thread) the gradients equal the reference's
    (FXC_CPU_FAST=0: numpy widths, torch packers), on a conv input (signed),
    a BatchNorm input (per-channel budget) and a ReLU output (non-zeros
    only, the shared mask)."""
    import dataclasses

    from fxcompress.kernels.auto_pack import PackedAuto
    from fxcompress.runtime.activations import SaveSpec

    cm = _small_auto_net()
    for m in cm.modules():
        if isinstance(m, SaveSpec):
            m.settings = dataclasses.replace(m.settings, rounding=rounding)
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    for _ in range(2):
        _train_step(cm, opt, x, y)
    decoded, kinds = [], []
    unpack = SaveSpec.unpack

    def recording(self, obj):
        v = unpack(self, obj)
        kinds.append(type(obj).__name__)
        decoded.append(v.clone())
        return v

    monkeypatch.setattr(SaveSpec, "unpack", recording)

    def run(fast: str, threads: int):
        monkeypatch.setenv("FXC_CPU_FAST", fast)
        c = copy.deepcopy(cm)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            decoded.clear(), kinds.clear()
            torch.manual_seed(9)
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
        finally:
            torch.set_num_threads(before)
        return (list(decoded), list(kinds), [p.grad.clone() for p in c.parameters()],
                dict(c.graph_module.fxc_act__0._ledger.totals()))

    ref = run("0", 1)
    assert PackedAuto.__name__ not in ref[1]
    for threads in (1, 2, 3):
        got = run("1", threads)
        assert got[1].count(PackedAuto.__name__) >= 3  # the three auto forms took the C path
        assert len(got[0]) == len(ref[0]) and all(torch.equal(a, b) for a, b in zip(got[0], ref[0])), threads
        assert got[3] == ref[3]
        if threads == 1:
            assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
