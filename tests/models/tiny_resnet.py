"""A ResNet of torchvision's own parts at 8/16 channels: every kind of module
and op resnet18 has (stem conv/BN/ReLU/max-pool, BasicBlocks with residual
adds, a strided block with a 1x1 downsample, adaptive average pool, flatten,
`fc`), at a size that compiles, trains a step and exports in a fraction of
a second. For tests that need resnet18's structure, not its width."""
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        down = nn.Sequential(nn.Conv2d(8, 16, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2, downsample=down))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model():
    return TinyResNet()


def example_inputs():
    return (torch.randn(2, 3, 32, 32),)
