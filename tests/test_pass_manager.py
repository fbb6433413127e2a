from dataclasses import dataclass
from typing import List

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.config import ConfigError
from fxcompress.errors import BadInput, PolicyError, RunFailure
from fxcompress.passes import DEFAULT_PASSES, Pass, PassResult, add_submodule, fxc_name
from fxcompress.passes.activations import ActivationsPass
from fxcompress.passes.scaled_grad import ScaledGradPass
from tests.helpers import DemoPass
from tests.models.small_cnn import SmallCNN

POLICY = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "demo": {"bits": 4}}]}


def test_inserted_nodes_get_deterministic_fxc_names():
    a = fxcompress.compile(SmallCNN(), POLICY, passes=[DemoPass])
    b = fxcompress.compile(SmallCNN(), POLICY, passes=[DemoPass])
    inserted = a.pass_results["demo"].inserted
    assert inserted == ["fxc_demo_conv1", "fxc_demo_conv2", "fxc_demo_fc"]
    assert inserted == b.pass_results["demo"].inserted
    assert "fxc_demo_conv1 = " in a.code


def test_rewritten_model_still_computes_the_same():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    cm = fxcompress.compile(model, POLICY, passes=[DemoPass]).eval()
    assert torch.equal(cm(x), model(x))


def test_a_failing_pass_is_named():
    class Boom(Pass):
        name = "boom"

        def run(self, gm, plan):
            raise ValueError("kaput")

    with pytest.raises(RunFailure, match="pass 'boom' failed: ValueError: kaput"):
        fxcompress.compile(SmallCNN(), None, passes=[Boom])


def test_a_pass_that_breaks_the_graph_is_caught_by_lint():
    class Breaker(Pass):
        name = "breaker"

        def run(self, gm, plan):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            first = next(n for n in gm.graph.nodes if n.op != "placeholder")
            with gm.graph.inserting_before(first):  # uses a value before it is defined
                gm.graph.call_function(torch.relu, (out.args[0],))
            return PassResult(modified=True)

    with pytest.raises(RunFailure, match="pass 'breaker' left a broken graph"):
        fxcompress.compile(SmallCNN(), None, passes=[Breaker])


def test_unprefixed_names_are_refused():
    class Sloppy(Pass):
        name = "sloppy"

        def run(self, gm, plan):
            return PassResult(inserted=["my_node"])

    with pytest.raises(RunFailure, match="without the fxc_ prefix"):
        fxcompress.compile(SmallCNN(), None, passes=[Sloppy])


def test_pass_with_nothing_selected_is_skipped():
    cm = fxcompress.compile(SmallCNN(), {"rules": [{"match": {"type": "Conv2d"}, "demo": None}]}, passes=[DemoPass])
    assert "demo" not in cm.pass_results


# --- a pass of the test's own, with a schedule and pass-wide settings -------------------------

@dataclass
class GateConfig:
    """Per node: how much the gate scales the layer's output."""
    scale: float = 1.0


@dataclass
class GateSchedule:
    """When the gate opens (optimizer steps)."""
    start_step: int = 0
    every: int = 1

    def check(self):
        if self.every < 1:
            raise ConfigError("every", f"must be a positive number of steps, got {self.every}")


@dataclass
class GateSettings:
    """For the whole pass: one label, one list of extra tags."""
    label: str = "gate"
    tags: List[str] = None


class Gate(nn.Module):
    def __init__(self, scale, start_step):
        super().__init__()
        self.scale, self.start_step = scale, start_step

    def forward(self, x):
        return x * self.scale


class GatePass(Pass):
    """Wraps each treated layer's output in a Gate that keeps what the manager
    handed the pass (schedule and settings), so the test can see it."""
    name = "gate"
    key = "gate"
    config = GateConfig
    schedule_config = GateSchedule
    settings_config = GateSettings
    before = ("activations",)
    seen: list = []

    def run(self, gm, plan):
        GatePass.seen.append((self.schedule, self.settings))
        res = PassResult()
        start = self.schedule.start_step if self.schedule is not None else None
        for node, cfg in plan.selected(self.key):
            name = add_submodule(gm, fxc_name(gm, self.settings.label, node.name), Gate(cfg.scale, start))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            res.inserted.append(name)
            res.modified = True
        return res


GATE_POLICY = {
    "rules": [{"match": {"type": "Conv2d"}, "gate": {"scale": 2.0}},
              {"match": {"name": "conv2"}, "gate": {"scale": 0.5}}],
    "schedule": {"gate": {"start_step": 5, "every": 2}},
    "settings": {"gate": {"label": "door", "tags": ["a", "b"]}},
}


def test_a_test_pass_with_schedule_and_settings_runs_through_compile():
    before = tuple(DEFAULT_PASSES)
    GatePass.seen.clear()
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    cm = fxcompress.compile(model, GATE_POLICY, x, passes=[GatePass]).eval()
    (schedule, settings), = GatePass.seen
    assert schedule == GateSchedule(start_step=5, every=2)
    assert settings == GateSettings(label="door", tags=["a", "b"])
    gm = cm.graph_module
    assert gm.fxc_door_conv1.scale == 2.0 and gm.fxc_door_conv2.scale == 0.5 and gm.fxc_door_conv1.start_step == 5
    assert "fxc_door_conv1" in cm.code
    # the rewrite is real: conv1's output is doubled, conv2's halved
    assert not torch.allclose(cm(x), model(x))
    # absent sections: no schedule, default settings
    GatePass.seen.clear()
    fxcompress.compile(SmallCNN(), {"rules": GATE_POLICY["rules"]}, x, passes=[GatePass])
    assert GatePass.seen == [(None, GateSettings())]
    # no global changed, and the default pass list does not know the key
    assert tuple(DEFAULT_PASSES) == before
    with pytest.raises(PolicyError, match="schedule.gate: unknown treatment"):
        fxcompress.compile(SmallCNN(), GATE_POLICY, x)
    with pytest.raises(PolicyError, match="rules.0..gate: unknown rule key"):
        fxcompress.compile(SmallCNN(), {"rules": GATE_POLICY["rules"]}, x)


def test_the_same_pass_list_runs_beside_the_shipped_passes():
    x = torch.randn(2, 3, 16, 16)
    policy = {**GATE_POLICY, "rules": GATE_POLICY["rules"] + [{"match": {"type": "Conv2d"}, "activations": {"bits": 4}}]}
    cm = fxcompress.compile(SmallCNN(), policy, x, passes=[*DEFAULT_PASSES[:-1], GatePass, DEFAULT_PASSES[-1]])
    assert set(cm.pass_results) == {"gate", "activations"}


@pytest.mark.parametrize("policy,words,key", [
    ({"schedule": {"gate": {"every": 0}}}, "must be a positive number of steps", "schedule.gate.every"),
    ({"schedule": {"gate": {"evry": 2}}}, "did you mean 'every'", "schedule.gate.evry"),
    ({"settings": {"gate": {"lable": "x"}}}, "did you mean 'label'", "settings.gate.lable"),
    ({"settings": {"gate": {"label": 3}}}, "expected a string", "settings.gate.label"),
    ({"settings": {"gaet": {}}}, "did you mean 'gate'", "settings.gaet"),
    ({"rules": [{"match": {"type": "Conv2d"}, "gate": {"every": 2}}]},
     "'every' holds for the whole pass, not per node: write it once under 'schedule: {gate: {every: ...}}'",
     "rules[0].gate.every"),
])
def test_schedule_and_settings_are_checked_by_the_owning_pass(policy, words, key):
    with pytest.raises(PolicyError) as e:
        fxcompress.compile(SmallCNN(), {"rules": GATE_POLICY["rules"], **policy}, passes=[GatePass])
    assert words in str(e.value) and e.value.key == key


def test_pass_order_constraints_are_checked():
    # ScaledGradPass declares before=("activations",); GatePass likewise
    with pytest.raises(BadInput, match=r"'scaled_grad' must run before 'activations' \(ScaledGradPass.before\), "
                                       r"but the list has activations -> scaled_grad"):
        fxcompress.compile(SmallCNN(), None, passes=[ActivationsPass, ScaledGradPass])
    with pytest.raises(BadInput, match="'gate' must run before 'activations'"):
        fxcompress.compile(SmallCNN(), None, passes=[ActivationsPass, GatePass])

    class Late(DemoPass):
        name, key, after = "late", "late", ("demo",)

    with pytest.raises(BadInput, match=r"'late' must run after 'demo' \(Late.after\)"):
        fxcompress.compile(SmallCNN(), None, passes=[Late, DemoPass])
    fxcompress.compile(SmallCNN(), None, passes=[DemoPass, Late])
    fxcompress.compile(SmallCNN(), None, passes=[Late])  # the other pass absent: nothing to honour
    with pytest.raises(BadInput, match="two passes are named 'demo'"):
        fxcompress.compile(SmallCNN(), None, passes=[DemoPass, DemoPass])
    with pytest.raises(BadInput, match="not a Pass subclass"):
        fxcompress.compile(SmallCNN(), None, passes=[DemoPass()])


def test_policy_and_plan_do_not_import_the_pass_list():
    """The pass list is handed down: policy.py and plan.py name no pass."""
    import inspect

    import fxcompress.plan
    import fxcompress.policy

    for mod in (fxcompress.policy, fxcompress.plan):
        src = inspect.getsource(mod)
        assert "DEFAULT_PASSES" not in src and "PASS_ORDER" not in src and "from .passes" not in src
