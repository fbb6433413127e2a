import pytest
import torch

import fxcompress
from fxcompress.errors import RunFailure
from fxcompress.passes import Pass, PassResult
from tests.helpers import DemoPass
from tests.models.small_cnn import SmallCNN

POLICY = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "demo": {"bits": 4}}]}


@pytest.fixture(autouse=True)
def demo(monkeypatch):
    import fxcompress.passes as P

    monkeypatch.setattr(P, "PASS_ORDER", list(P.PASS_ORDER) + [DemoPass])


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
    cm = fxcompress.compile(SmallCNN(), {"rules": [{"match": {"type": "Conv2d"}}]}, passes=[DemoPass])
    assert "demo" not in cm.pass_results
