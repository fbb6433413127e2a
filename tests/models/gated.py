"""A model with a data-dependent branch inside a submodule: needs auto-leaf."""
import torch
import torch.nn as nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: symbolic tracing cannot follow it
            return self.lin(x)
        return -x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(torch.relu(self.pre(x)))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(x))


def example_inputs():
    return (torch.randn(3, 8),)


def build_model():
    return GatedNet()
