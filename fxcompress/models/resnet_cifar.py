"""The CIFAR ResNet family (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

Depth 6n+2: a 3x3 stem with 16 channels, three stages of n basic blocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global
average pooling and one linear layer. Shortcuts that change shape are
"option A" (subsample by 2, zero-pad the new channels), which has no weights;
the seeds' ResNet-20/32/44 use it, so parameter counts match theirs
(ResNet-20: 0.27 M, ResNet-32: 0.46 M).

Everything is plain modules and tensor ops so torch.fx traces it without leaves.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput

DEPTHS = (20, 32, 44, 56, 110)


class ShortcutA(nn.Module):
    """Identity shortcut for a stride-2, wider block: subsample and zero-pad channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        # F.pad pads dims from the last: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        n = (depth - 2) // 6
        self.depth = depth
        c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        planes = c1
        stages = []
        for out_planes, stride in ((c1, 1), (c2, 2), (c3, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, out_planes, stride if i == 0 else 1))
                planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal (fan_out) as in the reference CIFAR ResNets; BN starts at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_cifar(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNetCifar:
    """ResNet-`depth` for CIFAR-sized images; depth is 6n+2 (20, 32, 44, 56, 110, ...).
    width multiplies the stage widths 16/32/64 (rounded; 1.0: the paper's model)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise BadInput(f"--depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise BadInput(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise BadInput(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise BadInput(f"width must be a positive number, got {width!r}")
    return ResNetCifar(depth, num_classes, in_channels, width)
