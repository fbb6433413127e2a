"""tools/replicate_camp.py --kd: distillation from the frozen all-4-bit model in
the CAMP stages (a recipe option of the replication tool, issue 15 round 6)."""
import argparse
import importlib.util
import os

import torch
import torch.nn as nn

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "replicate_camp.py")
_spec = importlib.util.spec_from_file_location("replicate_camp_kd_test", _TOOL)
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


def test_kd_loss_zero_at_teacher_and_positive_elsewhere():
    ref = torch.randn(8, 10)
    assert float(rc.kd_loss(ref.clone(), ref, 2.0)) < 1e-6
    assert float(rc.kd_loss(torch.randn(8, 10), ref, 2.0)) > 1e-3
    # T^2 scaling: at equal logits/T the term grows with T^2
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(rc.kd_loss(2 * a, 2 * b, 2.0), 4 * rc.kd_loss(a, b, 1.0), rtol=1e-5)


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _setup(kd):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    data = {"xtr": x, "ytr": torch.randint(0, 3, (64,))}  # labels unrelated to the teacher
    teacher = Counting(nn.Linear(6, 3))
    with torch.no_grad():
        teacher.net.weight.mul_(5)
    args = argparse.Namespace(batch_size=16, weight_decay=0.0, kd=kd, kd_t=1.0)
    return x, data, teacher, args


def test_train_with_kd_follows_the_teacher():
    x, data, teacher, args = _setup(kd=1.0)
    model = nn.Linear(6, 3)
    before = float(rc.kd_loss(model(x), teacher(x), 1.0))
    rc.train(model, data, args, seed=0, epochs=20, lr=0.1, teacher=teacher)
    after = float(rc.kd_loss(model(x), teacher(x), 1.0))
    assert after < 0.25 * before
    agree = float((model(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert agree > 0.9
    assert not teacher.training  # the teacher runs in eval mode (its BatchNorm statistics stay)


def test_train_without_kd_never_runs_the_teacher():
    x, data, teacher, args = _setup(kd=0.0)
    rc.train(nn.Linear(6, 3), data, args, seed=0, epochs=2, lr=0.1, teacher=teacher)
    assert teacher.calls == 0


def test_from_json_pools_runs_that_differ_only_in_seeds(tmp_path, capsys):
    """--from-json A B: one table over both files' seeds; files from other settings are refused (exit 2)."""
    import json

    def run(path, seeds, **args):
        base = {"alphas": "", "energies": "2:0.7", "val": 0.0, "depth": 8, "epochs": 1}
        row = {"w4": [95.0, 1.0, None, None], "spe": {"2.0:0.7": [94.0, 0.68, 0.5, {}]}}
        with open(path, "w") as f:
            json.dump({"args": {**base, **args}, "seeds": [{"seed": s, **row} for s in seeds]}, f)
        return str(path)

    a, b = run(tmp_path / "a.json", [0, 1]), run(tmp_path / "b.json", [2])
    assert rc.main(["--from-json", a, b]) == 0
    out = capsys.readouterr().out
    assert "seeds [0, 1, 2]" in out and "(3 seeds, mean" in out
    c = run(tmp_path / "c.json", [3], depth=14)
    assert rc.main(["--from-json", a, c]) == 2
    assert "other depth" in capsys.readouterr().err
    assert rc.main(["--from-json", a, a]) == 2  # the same seeds twice
