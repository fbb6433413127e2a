import torch
import torchvision.models as tvm

import fxcompress
from tests.models.small_cnn import SmallCNN


# "activations: null": the rules select nodes and treat none (a rule must carry a treatment)
def names(cm):
    return [e.qualname for e in cm.plan.selected_entries]


def test_match_by_glob_regex_type_and_op():
    m = tvm.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    cm = fxcompress.compile(m, {"rules": [{"activations": None, "match": {"name": "layer1.*.conv*"}}]}, x)
    assert names(cm) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    cm = fxcompress.compile(m, {"rules": [{"activations": None, "match": {"name": "re:^layer4\\.1\\.bn2$"}}]}, x)
    assert names(cm) == ["layer4.1.bn2"]
    cm = fxcompress.compile(m, {"rules": [{"activations": None, "match": {"op": "add", "name": "layer2.*"}}]}, x)
    assert names(cm) == ["layer2.0.add_2", "layer2.1.add_3"]
    cm = fxcompress.compile(m, {"rules": [{"activations": None, "match": {"type": "BatchNorm2d", "name": "layer3.0.*"}}]}, x)
    assert len(names(cm)) == 3  # bn1, bn2 and downsample.1


def test_type_matches_base_classes():
    cm = fxcompress.compile(SmallCNN(), {"rules": [{"activations": None, "match": {"type": "_ConvNd"}}]})
    assert names(cm) == ["conv1", "conv2"]


def test_plan_json_has_shapes_and_rules():
    cm = fxcompress.compile(SmallCNN(), {"rules": [{"activations": None, "match": {"type": "Linear"}}]}, torch.randn(4, 3, 16, 16))
    (node,) = cm.plan.to_json()["nodes"]
    assert node["qualname"] == "fc" and node["shape"] == [4, 10] and node["rules"] == [0]
    assert node["dtype"] == "float32" and node["target"] == "Linear"
