"""AutoQuant at a statistics step whose gradients are NaN (a diverging step,
or a gradient scaler's overflow step): nothing is measured from it (the
measured-width replay used to crash with "max() arg is an empty sequence"),
nothing NaN enters the window, and the next step measures as if the bad step
had not happened."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress


def _compiled():
    torch.manual_seed(0)
    # conv (analytic bound), BatchNorm (its own bound), GELU (measured by replay)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    policy = {"version": 1, "rules": [{"match": {"name": "*"}, "optional": True,
                                       "activations": {"mode": "auto", "min_numel": 16}}]}
    return fxcompress.compile(model, policy, example_inputs=torch.zeros(1, 3, 16, 16))


def _step(cm, x, y, scale=1.0):
    (F.cross_entropy(cm(x), y) * scale).backward()
    cm.step()


def _widths(ctrl):
    return ({n: ctrl._specs[n].measured_bits for n in ctrl.probe_nodes},
            {n: s.dx2 for n, s in ctrl._specs.items()})


def test_nan_gradients_are_skipped_then_measured_at_the_next_step():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    bad = _compiled()
    ctrl = bad.controllers["activations"]
    assert ctrl.probe_nodes  # GELU is measured by replay
    _step(bad, x, y, scale=float("nan"))
    probed, budgets = _widths(ctrl)
    assert all(b is None for b in probed.values()) and all(d is None for d in budgets.values())
    assert not any(ctrl.snapshots.values())
    assert all(ctrl._specs[n].collect for n in ctrl.probe_nodes)  # tried again at once
    _step(bad, x, y)  # no optimizer step: the same weights as a model that never saw the NaN step
    good = _compiled()
    _step(good, x, y)
    assert _widths(ctrl) == _widths(good.controllers["activations"])
    assert all(b is not None for b in _widths(ctrl)[0].values())
