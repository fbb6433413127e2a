"""torch.compile of rewritten models (runtime/compile_support.py): a compiled
training step per shipped policy, compiled vs eager, no recompiles, and the
compiled activation hooks' pack/unpack against their definition.

Backends: "aot_eager" (AOT autograd, so the activation hooks are inlined into
the compiled forward and backward as under inductor, without inductor's C++
build) for every policy; one inductor test (PSGD, the tiny CNN)."""
import copy
import glob
import os

import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress.runtime import compile_support as cs
from tests.models.small_cnn import SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "policies", "*.yaml")))
FULLGRAPH = {"acgc_2bit", "psgd_w4", "psgd_w2", "alq_3bit", "amq_3bit"}  # the others keep per-node eager hooks


class Counting:
    def __init__(self, backend):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner, self.calls = lookup_backend(backend), 0

    def __call__(self, gm, inputs, **kw):
        self.calls += 1
        return self.inner(gm, inputs, **kw)


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _step(cm, opt, x, y):
    opt.zero_grad(set_to_none=True)
    out = cm(x)
    F.cross_entropy(out, y).backward()
    opt.step()
    cm.step()
    return out


def _policy(name):
    import yaml

    with open(os.path.join(ROOT, "policies", name + ".yaml")) as f:
        pol = yaml.safe_load(f)
    rules = pol.get("rules", []) or []
    if any(isinstance(r.get("activations"), dict) and r["activations"].get("mode") == "auto" for r in rules):
        # statistics steps among the counted ones
        pol.setdefault("settings", {}).setdefault("activations", {}).update(stats_every=2, window=2)
    return pol


@pytest.mark.parametrize("name", POLICIES)
def test_compiled_training_no_recompiles(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = _data()
    cm = fxcompress.compile(SmallCNN(), _policy(name), example_inputs=x[:1])
    ref = fxcompress.compile(SmallCNN(), _policy(name), example_inputs=x[:1])
    ref.load_state_dict(cm.state_dict())
    counter = Counting("aot_eager")
    cm.compile_with(counter, fullgraph=name in FULLGRAPH)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (cm, ref)]
    for m, o in zip((cm, ref), opts):
        m.attach_optimizer(o)
    for i in range(2):  # warm-up: compile
        _step(cm, opts[0], *_data(i))
    first = counter.calls
    for i in range(2, 7):
        out = _step(cm, opts[0], *_data(i))
        assert torch.isfinite(out).all()
    assert counter.calls == first, f"{counter.calls - first} recompiles after warm-up"
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["psgd_w4", "psgd_w2", "alq_3bit"])
def test_lossless_policies_match_eager(name):
    """Outputs and gradients equal eager's over steps (the PSGD ranges and
    scaled gradients included), within float32 rounding."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, _ = _data()
    cm = fxcompress.compile(SmallCNN(), _policy(name), example_inputs=x[:1])
    ref = fxcompress.compile(SmallCNN(), _policy(name), example_inputs=x[:1])
    ref.load_state_dict(cm.state_dict())
    cm.compile_with("aot_eager", fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (cm, ref)]
    for i in range(4):
        xb, yb = _data(i)
        oc, oe = _step(cm, opts[0], xb, yb), _step(ref, opts[1], xb, yb)
        torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(cm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    if name.startswith("psgd"):
        for m, r in zip(cm.controllers["scaled_grad"].layers.values(),
                        ref.controllers["scaled_grad"].layers.values()):
            torch.testing.assert_close(m.range, r.range)
            assert m.initialized and r.initialized
    torch._dynamo.reset()


def test_psgd_start_step_guard_free():
    """start_step flips a tensor flag, not a Python value dynamo guards on:
    the gradient is unscaled before it, scaled after, with no recompile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = _data()
    pol = {"version": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]},
                                    "scaled_grad": {"bits": 4, "start_step": 2}}]}
    cm = fxcompress.compile(SmallCNN(), pol, example_inputs=x[:1])
    ref = fxcompress.compile(SmallCNN(), pol, example_inputs=x[:1])
    ref.load_state_dict(cm.state_dict())
    counter = Counting("aot_eager")
    cm.compile_with(counter, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (cm, ref)]
    calls = []
    for i in range(4):
        xb, yb = _data(i)
        _step(cm, opts[0], xb, yb)
        _step(ref, opts[1], xb, yb)
        calls.append(counter.calls)
    assert calls[0] == calls[-1]
    for a, b in zip(cm.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_psgd_inductor_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = _data()
    cm = fxcompress.compile(SmallCNN(), "policies/psgd_w4.yaml", example_inputs=x[:1])
    ref = fxcompress.compile(SmallCNN(), "policies/psgd_w4.yaml", example_inputs=x[:1])
    ref.load_state_dict(cm.state_dict())
    cm.compile_with("inductor", fullgraph=True)
    for m in (cm, ref):
        F.cross_entropy(m(x), y).backward()
    biggest = max(float(p.grad.norm()) for p in ref.parameters())
    for (n, a), b in zip(cm.named_parameters(), ref.parameters()):
        # relative to the largest gradient: conv1's bias (before BatchNorm) has a gradient of ~0
        assert float((a.grad - b.grad).norm()) <= 1e-4 * max(float(b.grad.norm()), 1e-3 * biggest), n
    torch._dynamo.reset()


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (7, 33)])
def test_hook_pack_roundtrip(bits, shape):
    """unpack(pack(x)) is within half a grid step per channel (nearest), zero
    and the sign of a ReLU output exact, bool masks exact."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    for t in (x, x.relu()):
        y = cs.unpack_tensor(cs.pack_tensor(t, bits, False, 0))
        cdim = 1 if t.dim() >= 3 else t.dim() - 1
        dims = [d for d in range(t.dim()) if d != cdim]
        amax = t.abs().amax(dim=dims, keepdim=True)
        signed = bool(t.min() < 0)
        step = amax / (2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
        err = (y - t).abs()
        # eager's grid for round to nearest (kernels/rounding.py): 0 to
        # max|x|, or -max|x| to max|x| with 0 on it: half a step everywhere
        assert (err <= step * 0.5 * (1 + 1e-5) + 1e-6).all()
        if not signed:  # eager's runtime hook: no negative value = a ReLU output, its sign exact
            assert torch.equal(y > 0, t > 0)
    m = torch.rand(shape) > 0.5
    assert torch.equal(cs.unpack_tensor(cs.pack_tensor(m, bits, False, 0)), m)


def test_hook_stochastic_unbiased():
    """Stochastic codes are unbiased: the mean decoded value over many
    different tensors (new draws each) approaches the value."""
    x = torch.full((4, 2, 8, 8), 0.3)
    x[:, :, 0, 0] = 1.0  # max|x| = 1 per channel: 0.3 sits between grid points
    acc = torch.zeros_like(x)
    n = 200
    for i in range(n):
        xi = x.clone()
        xi[0, 0, 7, 7] = 0.3 + i * 1e-7  # a different tensor: a different key
        acc += cs.unpack_tensor(cs.pack_tensor(xi, 2, True, 0))
    mean = (acc / n)[:, :, 1:, 1:].mean()
    assert abs(float(mean) - 0.3) < 0.01


def test_compiled_2bit_packs_saved_tensors():
    """Under the compiled hooks (aot_eager) the forward hands the backward
    packed tensors: the pack hook runs for the compiled graph's saved
    activations, and the gradient differs from the uncompressed one by
    quantization error of eager's size."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = _data(0, 8)
    seen = []
    orig = cs.pack_tensor

    def spy(t, *a):
        seen.append((tuple(t.shape), t.dtype))
        return orig(t, *a)

    net = SmallCNN()
    base = fxcompress.compile(copy.deepcopy(net), {"version": 1}, example_inputs=x[:1])
    cm = fxcompress.compile(copy.deepcopy(net), "policies/acgc_2bit.yaml", example_inputs=x[:1])
    eager = fxcompress.compile(copy.deepcopy(net), "policies/acgc_2bit.yaml", example_inputs=x[:1])
    cs.pack_tensor = spy
    try:
        cm.compile_with("aot_eager", fullgraph=True)
        for m in (base, cm, eager):
            F.cross_entropy(m(x), y).backward()
    finally:
        cs.pack_tensor = orig
    assert any(len(s) == 4 and d == torch.float32 for s, d in seen)

    def err(m):
        num = sum(float((a.grad - b.grad).pow(2).sum()) for a, b in zip(m.parameters(), base.parameters()))
        return (num / sum(float(b.grad.pow(2).sum()) for b in base.parameters())) ** 0.5

    assert 0 < err(cm) < 0.5
    assert err(eager) > 0
    torch._dynamo.reset()


def test_uniform_settings_reasons():
    x, _ = _data()
    auto = fxcompress.compile(SmallCNN(), "policies/acgc_auto.yaml", example_inputs=x[:1])
    hooks, why = cs.activation_hooks_for(auto.graph_module)
    assert hooks is None and "AutoQuant" in why
    fixed = fxcompress.compile(SmallCNN(), "policies/acgc_2bit.yaml", example_inputs=x[:1])
    hooks, why = cs.activation_hooks_for(fixed.graph_module)
    assert hooks is not None and hooks.bits == 2 and hooks.stochastic
