"""Built-in models: the CIFAR ResNet family that the seeds train."""
from __future__ import annotations

from .resnet_cifar import DEPTHS, BasicBlock, ResNetCifar, ShortcutA, resnet_cifar  # noqa: F401


def default_model(bundle, depth: int = 20) -> ResNetCifar:
    """The model `fxcompress train` uses when none is named: ResNet-`depth` sized for the data."""
    return resnet_cifar(depth, bundle.num_classes, bundle.in_channels)
