"""A model that calls one module twice (tests/test_cli.py: plan table rows)."""
import torch
import torch.nn as nn


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))  # the same module, a second call
        return self.fc(x.mean((2, 3)))


def build_model():
    return Twice()


def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
