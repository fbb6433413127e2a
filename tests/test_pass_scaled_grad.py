"""The scaled_grad pass (PSGD): the gradient it produces, checked against an
independent computation, and what the rewrite keeps (names, forward)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress
from fxcompress.errors import PolicyError

LAMBDA = 150.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 12) * 0.3)
        self.bias = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def policy(**fields):
    return {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "scaled_grad": fields}]}


def data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    # a CompressedModel names its parameters graph_module.<original name>
    return {n.removeprefix("graph_module."): p.grad.clone() for n, p in model.named_parameters()}


def nearest_grid_point(w, bits):
    """Q(w) by brute force: the closest of the 2^b - 1 levels k*delta
    (no rounding function involved), delta from w's own absmax."""
    L = 2 ** (bits - 1) - 1
    delta = w.abs().max() / L
    levels = torch.arange(-L, L + 1, dtype=torch.float32) * delta
    idx = (w.reshape(-1, 1) - levels.reshape(1, -1)).abs().argmin(dim=1)
    return levels[idx].reshape(w.shape)


def expected_grad(w, g, bits):
    """PSGD's gradient by the paper's formula: lambda * |w - Q(w)| * g."""
    return LAMBDA * (w - nearest_grid_point(w, bits)).abs() * g


def compiled(model, pol):
    return fxcompress.compile(model, pol, example_inputs=torch.randn(2, 1, 8, 8))


def test_gradient_is_lambda_times_distance_times_g_exactly():
    torch.manual_seed(0)
    plain = Net()
    cm = compiled(copy.deepcopy(plain), policy(bits=4, first_last_bits=None))
    x, y = data()
    g_plain, g_psgd = grads(plain, x, y), grads(cm, x, y)
    for name, w in plain.named_parameters():
        if not name.endswith("weight"):
            assert torch.equal(g_psgd[name], g_plain[name])  # biases untouched by default
            continue
        w = w.detach()
        expected = expected_grad(w, g_plain[name], 4)
        assert torch.equal(g_psgd[name], expected), name
    # forward is unchanged
    with torch.no_grad():
        assert torch.equal(cm(x), plain(x))


def test_gradient_is_zero_on_grid_points():
    torch.manual_seed(1)
    model = Net()
    with torch.no_grad():
        for m in (model.conv1, model.conv2, model.fc):
            L = 7
            delta = m.weight.abs().max() / L
            m.weight.copy_(torch.round(m.weight / delta) * delta)
    cm = compiled(model, policy(bits=4, first_last_bits=None))
    g = grads(cm, *data())
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert torch.count_nonzero(g[name]) == 0, name
    assert torch.count_nonzero(g["fc.bias"]) > 0


def test_state_dict_names_unchanged_and_code_shows_the_nodes():
    model = Net()
    keys = list(model.state_dict())
    cm = compiled(model, policy())
    assert list(cm.graph_module.state_dict()) == keys
    cm.graph_module.load_state_dict(Net().state_dict())  # strict: an original checkpoint loads
    for name in ("conv1", "conv2", "fc"):
        assert f"fxc_scaled_grad_{name}_weight" in cm.code
    assert "self.conv1(" not in cm.code
    assert set(k for k in cm.state_dict() if not k.startswith("graph_module.")) == {
        "controllers.scaled_grad._extra_state"}


def test_start_step_passes_gradient_unchanged_until_then():
    torch.manual_seed(2)
    plain = Net()
    cm = compiled(copy.deepcopy(plain), policy(bits=4, start_step=2, first_last_bits=None))
    x, y = data()
    g_plain = grads(plain, x, y)
    for _ in range(2):
        g = grads(cm, x, y)
        assert all(torch.equal(g[n], g_plain[n]) for n in g)
        assert cm.figures()["scaled_grad.active"] == 0.0
        cm.step()  # no optimizer step: weights stay, only the count moves
    g = grads(cm, x, y)
    assert not torch.equal(g["conv2.weight"], g_plain["conv2.weight"])
    assert cm.figures()["scaled_grad.active"] == 1.0


def test_zero_grid_scales_by_lambda_abs_w():
    torch.manual_seed(3)
    plain = Net()
    cm = compiled(copy.deepcopy(plain), policy(grid="zero", lambda_s=2.0))
    x, y = data()
    g_plain, g = grads(plain, x, y), grads(cm, x, y)
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        w = dict(plain.named_parameters())[name].detach()
        assert torch.equal(g[name], 2.0 * w.abs() * g_plain[name])


def test_first_last_rule():
    def bits_of(cm):
        return {n: m.bits for n, m in cm.controllers["scaled_grad"].layers.items()}

    assert bits_of(compiled(Net(), policy(bits=2))) == {"conv1.weight": 8, "conv2.weight": 2, "fc.weight": 8}
    assert bits_of(compiled(Net(), policy(bits=3, first_last_bits=6))) == {
        "conv1.weight": 6, "conv2.weight": 3, "fc.weight": 6}
    assert set(bits_of(compiled(Net(), policy(bits=4))).values()) == {4}  # b >= 4: no special case
    assert set(bits_of(compiled(Net(), policy(bits=2, first_last_bits=None))).values()) == {2}
    # the authors' first_last_quant=0: first and last opted out, they stay plain
    pol = policy(bits=2)
    pol["rules"].append({"match": {"name": ["conv1", "fc"]}, "scaled_grad": None})
    assert bits_of(compiled(Net(), pol)) == {"conv2.weight": 2}


def test_bias_option_and_functional_weights():
    torch.manual_seed(4)
    plain = FunctionalNet()
    pol = {"rules": [{"match": {"op": "linear"}, "scaled_grad": {"bits": 3, "bias": True,
                                                                   "first_last_bits": None}}]}
    cm = fxcompress.compile(copy.deepcopy(plain), pol, example_inputs=torch.randn(2, 12))
    assert "fxc_scaled_grad_weight" in cm.code and "fxc_scaled_grad_bias" in cm.code
    x, y = torch.randn(4, 12), torch.tensor([0, 1, 2, 3])
    g_plain, g = grads(plain, x, y), grads(cm, x, y)
    for name, w in plain.named_parameters():
        w = w.detach()
        assert torch.equal(g[name], expected_grad(w, g_plain[name], 3)), name
    # a get_attr weight selected by name works the same way
    pol = {"rules": [{"match": {"name": "weight"}, "scaled_grad": {}}]}
    cm = fxcompress.compile(FunctionalNet(), pol, example_inputs=torch.randn(2, 12))
    assert "fxc_scaled_grad_weight" in cm.code and "fxc_scaled_grad_bias" not in cm.code


def test_ema_range_and_eval_mode():
    torch.manual_seed(5)
    cm = compiled(Net(), policy())
    sg = cm.controllers["scaled_grad"].layers["conv2.weight"]
    w = cm.graph_module.conv2.weight
    x, y = data()
    cm.eval()
    grads(cm, x, y)
    assert not sg.initialized  # evaluation never moves the range
    cm.train()
    grads(cm, x, y)
    first = (float(w.detach().min().clamp(max=0)), float(w.detach().max().clamp(min=0)))
    assert sg.ema_range() == first
    with torch.no_grad():
        w.mul_(2.0)
    grads(cm, x, y)
    assert sg.ema_range() == pytest.approx((1.1 * first[0], 1.1 * first[1]), rel=1e-6)  # 0.9 r + 0.1 (2 r)


def test_controller_state_round_trip():
    torch.manual_seed(6)
    model = Net()
    cm = compiled(model, policy(start_step=5))
    x, y = data()
    for _ in range(3):
        grads(cm, x, y)
        cm.step()
    state = cm.state_dict()
    fresh = compiled(copy.deepcopy(model), policy(start_step=5))
    fresh.load_state_dict(state)
    a, b = cm.controllers["scaled_grad"], fresh.controllers["scaled_grad"]
    assert b.steps == 3
    for n in a.layers:
        assert torch.equal(a.layers[n].range, b.layers[n].range) and b.layers[n].initialized
        assert b.layers[n].step_count == 3
    torch.save(state, "/dev/null")  # plain tensors and values only


@pytest.mark.parametrize("fields,key,hint", [
    ({"bits": 1}, "bits", None), ({"bits": 9}, "bits", None), ({"lambda": 10}, "lambda", "lambda_s"),
    ({"lambda_s": -1.0}, "lambda_s", None), ({"grid": "zeros"}, "grid", "zero"),
    ({"first_last_bits": 16}, "first_last_bits", None), ({"start_step": -1}, "start_step", None),
])
def test_bad_config_is_a_policy_error(fields, key, hint):
    with pytest.raises(PolicyError) as e:
        compiled(Net(), policy(**fields))
    assert key in str(e.value)
    if hint:
        assert f"did you mean '{hint}'" in str(e.value)


def test_figures_fall_as_weights_reach_the_grid():
    torch.manual_seed(7)
    cm = compiled(Net(), policy(bits=4, first_last_bits=None))
    before = cm.figures()
    assert 0.15 < before["scaled_grad.dist_over_delta"] < 0.35
    with torch.no_grad():
        for m in (cm.graph_module.conv1, cm.graph_module.conv2, cm.graph_module.fc):
            d = m.weight.abs().max() / 7
            m.weight.copy_(torch.round(m.weight / d) * d)
    after = cm.figures()
    assert after["scaled_grad.dist_over_delta"] < 1e-6 and after["scaled_grad.near_grid"] == 1.0
    assert after["scaled_grad.quant_mse"] < 1e-12


def test_triton_path_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(8)
    plain = Net()
    pol = policy(bits=3, epsilon=1e-3)
    x, y = data()
    ref = grads(compiled(copy.deepcopy(plain), pol), x, y)
    monkeypatch.setenv("FXC_FORCE_TRITON", "1")  # the interpreter runs the kernel on CPU
    tri = grads(compiled(copy.deepcopy(plain), pol), x, y)
    assert all(torch.equal(ref[n], tri[n]) for n in ref)


def test_batched_scaling_equals_the_per_tensor_kernel_exactly():
    """The group node's foreach path (runtime.scale_gradients) gives the fused
    kernel's reference bit for bit, mixed widths, epsilon and grids included."""
    from fxcompress.kernels.scaled_grad import scaled_grad_reference
    from fxcompress.runtime.scaled_grad import ScaledGrad, scale_gradients
    from fxcompress.runtime.scaled_grad_config import ScaledGradConfig as C

    gen = torch.Generator().manual_seed(9)
    members = [ScaledGrad("a", C(bits=2)), ScaledGrad("b", C(bits=8, lambda_s=0.37, epsilon=1e-3)),
               ScaledGrad("c", C(bits=4, grid="zero")), ScaledGrad("d", C(bits=3, lambda_s=1500.0)),
               ScaledGrad("e", C(bits=4))]
    ws = [torch.randn(s, generator=gen) * 0.1 for s in ((4, 3, 3, 3), (17,), (5, 6), (8, 8), (3, 3))]
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    gs[4] = None  # a weight that got no gradient
    deltas = [(w.abs().max() * 0.8 / m.levels).reshape(1) for m, w in zip(members, ws)]
    ws[0].view(-1)[:3] = torch.tensor([0.5, 1.5, -0.5]) * deltas[0]  # ties round half to even
    out = scale_gradients(members, ws, gs, deltas)
    assert out[4] is None
    for m, w, g, d, o in zip(members[:4], ws, gs, deltas, out):
        assert torch.equal(o, scaled_grad_reference(g, w, d, m.levels, m.lambda_s, m.epsilon, m.grid == "zero"))


def test_partly_active_group_and_one_range_update_per_forward():
    torch.manual_seed(10)
    plain = Net()
    pol = policy(bits=4, first_last_bits=None)
    pol["rules"].append({"match": {"name": "conv2"}, "scaled_grad": {"start_step": 1}})
    cm = compiled(copy.deepcopy(plain), pol)
    x, y = data()
    g_plain, g = grads(plain, x, y), grads(cm, x, y)
    assert torch.equal(g["conv2.weight"], g_plain["conv2.weight"])  # not started yet
    w = plain.fc.weight.detach()
    assert torch.equal(g["fc.weight"], expected_grad(w, g_plain["fc.weight"], 4))
    sg = cm.controllers["scaled_grad"].layers["fc.weight"]
    assert sg.ema_range() == (float(w.min().clamp(max=0)), float(w.max().clamp(min=0)))


def test_group_node_equals_per_tensor_nodes_over_several_steps():
    """The one group node (batched EMA ranges, batched scaling) gives the same
    gradients and ranges, bit for bit, as every ScaledGrad doing its own work,
    over steps where the EMA moves (mixed widths, epsilon, a scaled bias)."""
    from fxcompress.runtime.scaled_grad import ScaledGradGroup

    torch.manual_seed(11)
    pol = policy(bits=3, epsilon=1e-4)  # first/last at 8 bits, the rest at 3
    pol["rules"].append({"match": {"name": "fc"}, "scaled_grad": {"bias": True, "lambda_s": 37.5}})
    base = Net()
    grouped, single = compiled(copy.deepcopy(base), pol), compiled(copy.deepcopy(base), pol)
    groups = [m for m in single.graph_module.modules() if isinstance(m, ScaledGradGroup)]
    assert groups
    for grp in groups:  # the per-weight nodes do the work themselves, the group passes weights through
        grp.forward = lambda *ws: ws
        for m in grp.members:
            m.grouped = False
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (grouped, single)]
    for step in range(4):
        x, y = data(seed=step)
        ga, gb = grads(grouped, x, y), grads(single, x, y)
        assert ga.keys() == gb.keys()
        for n in ga:
            assert torch.equal(ga[n], gb[n]), (step, n)
        for o, m in zip(opts, (grouped, single)):
            o.step()
            m.step()
    la, lb = grouped.controllers["scaled_grad"].layers, single.controllers["scaled_grad"].layers
    for n in la:
        assert torch.equal(la[n].range, lb[n].range), n


# ------------------------------------------------------------ the CPU C path

def _c_path_or_skip():
    from fxcompress.kernels.scaled_grad import cpu_lib
    if cpu_lib() is None:
        pytest.skip("no C compiler: the torch path is the only path")


def test_c_scale_equals_the_reference_bit_for_bit():
    """The C loop (kernels/scaled_grad_cpu.c) against scaled_grad_reference for
    the same grid step: mixed widths, epsilon, the zero grid, ties that round
    half to even, values clipped at +-L, and sizes off the vector width."""
    _c_path_or_skip()
    from fxcompress.kernels.scaled_grad import scale_many_cpu, scaled_grad_reference

    gen = torch.Generator().manual_seed(12)
    cfg = [(1, 150.0, 0.0, False), (127, 0.37, 1e-3, False), (7, 150.0, 0.0, True), (3, 1500.0, 2e-4, True),
           (7, 150.0, 0.0, False)]
    ws = [torch.randn(s, generator=gen) * 0.1 for s in ((4, 3, 3, 3), (17,), (5, 6), (8, 8), (3, 3))]
    gs = [torch.randn(w.shape, generator=gen) for w in ws]
    deltas = [float(w.abs().max()) * 0.8 / L for w, (L, _, _, _) in zip(ws, cfg)]
    ws[4].view(-1)[:4] = torch.tensor([0.5, 1.5, -2.5, 100.0]) * deltas[4]  # ties, and one past +L
    out = scale_many_cpu(gs, ws, deltas, [c[0] for c in cfg], [c[1] for c in cfg], [c[2] for c in cfg],
                         [c[3] for c in cfg])
    for (L, lam, eps, zero), w, g, d, o in zip(cfg, ws, gs, deltas, out):
        ref = scaled_grad_reference(g, w, torch.tensor([d]), L, lam, eps, zero)
        assert torch.equal(o, ref), (L, lam, eps, zero)


def test_c_path_equals_the_torch_path_over_steps(monkeypatch):
    """Training with the C path (one call per step, gradients scaled in
    place) and with FXC_CPU_FAST=0 (the foreach path) gives the same
    gradients and EMA ranges, over steps where the ranges move. Ranges are
    compared to 1 ulp-ish: torch's CPU lerp fuses its multiply-add on this
    build, which the C code copies, but another build may not."""
    _c_path_or_skip()
    torch.manual_seed(13)
    pol = policy(bits=3, epsilon=1e-4)
    pol["rules"].append({"match": {"name": "fc"}, "scaled_grad": {"bias": True, "lambda_s": 37.5}})
    base = Net()
    fast, slow = compiled(copy.deepcopy(base), pol), compiled(copy.deepcopy(base), pol)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fast, slow)]
    for step in range(5):
        x, y = data(seed=step)
        monkeypatch.setenv("FXC_CPU_FAST", "1")
        ga = grads(fast, x, y)
        monkeypatch.setenv("FXC_CPU_FAST", "0")
        gb = grads(slow, x, y)
        for n in ga:
            assert torch.allclose(ga[n], gb[n], rtol=1e-5, atol=0), (step, n)
        for o, m in zip(opts, (fast, slow)):
            o.step()
            m.step()
    grp = next(m for m in fast.graph_module.modules() if type(m).__name__ == "ScaledGradGroup")
    assert any(b is not None for b in grp._batches.values())  # the C path did run
    la, lb = fast.controllers["scaled_grad"].layers, slow.controllers["scaled_grad"].layers
    for n in la:
        assert torch.allclose(la[n].range, lb[n].range, rtol=1e-6, atol=0), n


class SharedWeightNet(nn.Module):
    """One conv applied twice: autograd sums both uses' gradients before the
    group node, which then scales that sum (in place on the C path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(F.relu(self.conv(x))), 1))


def test_a_weight_used_twice_gets_its_summed_gradient_scaled():
    torch.manual_seed(14)
    plain = SharedWeightNet()
    cm = compiled(copy.deepcopy(plain), policy(bits=4, first_last_bits=None))
    x, y = data()
    g_plain, g = grads(plain, x, y), grads(cm, x, y)
    for name in ("conv.weight", "fc.weight"):
        w = dict(plain.named_parameters())[name].detach()
        assert torch.equal(g[name], expected_grad(w, g_plain[name], 4)), name


def test_create_graph_takes_the_out_of_place_path():
    """Under create_graph the gradients are part of a graph: the node must not
    scale them in place (the C path is skipped), and the values agree."""
    torch.manual_seed(15)
    base = Net()
    a, b = compiled(copy.deepcopy(base), policy()), compiled(copy.deepcopy(base), policy())
    x, y = data()
    ga = grads(a, x, y)
    names, params = zip(*b.named_parameters())
    gb = torch.autograd.grad(F.cross_entropy(b(x), y), params, create_graph=True)
    for n, g in zip(names, gb):
        assert torch.allclose(g.detach(), ga[n.removeprefix("graph_module.")], rtol=1e-6, atol=1e-12), n


def test_a_copied_model_keeps_its_own_ranges():
    """The C batch holds raw pointers: a deep copy must build its own and
    never write into the original's ranges."""
    torch.manual_seed(16)
    cm = compiled(Net(), policy())
    x, y = data()
    grads(cm, x, y)
    before = {n: m.range.clone() for n, m in cm.controllers["scaled_grad"].layers.items()}
    twin = copy.deepcopy(cm)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(3.0)
    grads(twin, x, y)
    for n, m in cm.controllers["scaled_grad"].layers.items():
        assert torch.equal(m.range, before[n]), n
        assert not torch.equal(twin.controllers["scaled_grad"].layers[n].range, before[n]), n
