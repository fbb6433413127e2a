"""Models whose submodules export cannot rebuild from constructor arguments
(tests/test_export.py): RNNs (LSTM(*args) hides its signature) and a
submodule whose constructor argument is not stored."""
import torch.nn as nn


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.cell = nn.RNN(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        h, _ = self.gru(h)
        h, _ = self.cell(h)
        return self.head(h[:, -1])


class Hidden(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, 2)  # `width` is not kept as an attribute

    def forward(self, x):
        return self.lin(x).sum() if x.sum() > 0 else x  # untraceable: becomes a leaf


class UsesHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Hidden(4)

    def forward(self, x):
        return self.inner(x)
