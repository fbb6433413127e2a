"""Select-only policies leave outputs and gradients bitwise unchanged."""
import pytest
import torch
import torchvision.models as tvm

from fxcompress.verify import check_identity

# (name, constructor kwargs, input size): small inputs keep the suite fast.
MODELS = [
    ("vit_b_16", {"image_size": 32}, 32),
    ("swin_t", {}, 64),
    ("convnext_tiny", {}, 32),
    ("mobilenet_v3_small", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("densenet121", {}, 32),
    ("googlenet", {"aux_logits": False, "init_weights": False}, 32),
    ("inception_v3", {"aux_logits": False, "init_weights": False}, 75),
    ("regnet_x_400mf", {}, 32),
    ("shufflenet_v2_x0_5", {}, 32),
    ("resnet18", {}, 32),
    ("squeezenet1_1", {}, 64),
]


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_identity(name, kwargs, size):
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=10, **kwargs)
    x = torch.randn(2, 3, size, size)
    r = check_identity(model, (x,))
    assert r.selected > 0
    assert r.outputs_equal
    assert r.grads_equal, r.mismatched[:5]


def test_identity_detects_a_difference():
    """The check itself must be able to fail: a pass that perturbs a value."""
    from tests.helpers import DemoPass
    import fxcompress.verify as verify

    class Perturb(DemoPass):
        def run(self, gm, plan):
            res = super().run(gm, plan)
            for n in gm.graph.nodes:
                if n.name.startswith("fxc_demo"):
                    n.target = _times_one_plus
            return res

    def _times_one_plus(x):
        return x * 1.0001

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    r = verify.check_identity(model, (torch.randn(3, 4),), {"rules": [{"match": {"type": "Linear"}, "demo": {}}]},
                              passes=[Perturb])
    assert not r.outputs_equal and not r.grads_equal
