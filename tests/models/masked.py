"""Shaped like timm's hiera: forward(x, mask=None) reads the mask only when
one is given (tests/test_tracing.py)."""
import torch
import torch.nn as nn


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x, mask=None, return_intermediates=False):
        x = self.conv(x)
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, x.shape[2], x.shape[3])
        if return_intermediates:
            return self.fc(x.flatten(1)), x
        return self.fc(x.flatten(1))


class Uses(nn.Module):
    """The same, with the masked part one level down (a submodule's default
    is not a forward argument of the model: it fails at its node)."""

    def __init__(self):
        super().__init__()
        self.inner = Masked()

    def forward(self, x, mask=None):
        return self.inner(x, mask)


def build_model():
    return Masked()


def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
