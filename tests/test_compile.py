import torch

import fxcompress
from fxcompress.passes import Pass, PassResult
from fxcompress.runtime.controller import Controller
from tests.models.small_cnn import SmallCNN


class CountingController(Controller):
    kind = "counter"

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.register_buffer("ema", torch.zeros(3))

    def step(self):
        self.steps += 1
        self.ema += 1

    def figures(self):
        return {"steps": float(self.steps)}

    def state(self):
        return {"steps": self.steps}

    def load_state(self, state):
        self.steps = state["steps"]


class WithController(Pass):
    name = "counting"

    def run(self, gm, plan):
        return PassResult(controllers={"counter": CountingController()})


def test_compiled_model_api_and_controller_state_round_trip(tmp_path):
    cm = fxcompress.compile(SmallCNN(), None, torch.randn(1, 3, 16, 16), passes=[WithController])
    for _ in range(3):
        cm.step()
    assert cm.figures() == {"counter.steps": 3.0}
    sd = cm.state_dict()
    assert "controllers.counter._extra_state" in sd and "controllers.counter.ema" in sd
    path = tmp_path / "ck.pt"
    torch.save(sd, path)
    fresh = fxcompress.compile(SmallCNN(), None, torch.randn(1, 3, 16, 16), passes=[WithController])
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.controllers["counter"].steps == 3
    assert torch.equal(fresh.controllers["counter"].ema, torch.full((3,), 3.0))
    assert isinstance(cm.graph_module, torch.fx.GraphModule) and cm.report()["controllers"]


def test_compile_shares_parameters_with_the_model():
    model = SmallCNN()
    cm = fxcompress.compile(model, None)
    assert cm.graph_module.conv1.weight is model.conv1.weight
