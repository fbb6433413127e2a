"""The user's paths through damaged files and an interrupted first epoch:
one-line errors with exit code 2, and a run directory that resumes."""
import json
import os
import shutil

import pytest
import torch

from fxcompress.training import TrainConfig, train

from .helpers import run_cli
from .test_training import TINY


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after epoch 1 of 2: a checkpoint, no final model."""
    path = str(tmp_path_factory.mktemp("stopped") / "run")
    train(TrainConfig(**TINY, epochs=2, stop_after=1, run_dir=path))
    return path


def _damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else b"this is not a checkpoint\n" * 10)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("command", ["resume", "evaluate", "init"])
def test_damaged_checkpoint_is_one_line_exit_2(tmp_path, stopped_run, how, command):
    run_dir = str(tmp_path / "run")
    shutil.copytree(stopped_run, run_dir)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    _damage(ckpt, how)
    args = {"resume": ["train", "--resume", run_dir, "--no-progress", "--no-plots"],
            "evaluate": ["evaluate", run_dir, "--w-bits", "4"],
            "init": ["train", "--init", run_dir, "--run-dir", str(tmp_path / "new"), "--no-progress", "--no-plots",
                     "--epochs", "1", "--train-limit", "32", "--upscale", "8", "--depth", "8"]}[command]
    code, _, err = run_cli(args)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f"{ckpt} is damaged" in err, err
    assert "Errno" not in err and "weights_only" not in err and "Traceback" not in err


def test_pickled_model_is_named_as_such(tmp_path, stopped_run):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    torch.save(torch.nn.Linear(2, 2), run_dir / "model.pt")
    code, _, err = run_cli(["evaluate", str(run_dir / "model.pt")])
    assert code == 2 and "holds a pickled Python object (torch.nn.modules.linear.Linear)" in err, err


def test_ctrl_c_in_the_first_epoch_resumes(tmp_path, monkeypatch):
    """Ctrl-C during the first epoch: the directory is a run that --resume
    starts again, and it ends where an uninterrupted run ends."""
    args = ["train", "--no-progress", "--no-plots", "--data", "digits", "--upscale", "8", "--depth", "8",
            "--batch-size", "32", "--train-limit", "96", "--test-limit", "40", "--epochs", "2", "--lr", "0.05"]
    run_dir = str(tmp_path / "r")
    real_step = torch.optim.SGD.step
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second step of the first epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", interrupted)
    code, _, err = run_cli(args + ["--run-dir", run_dir])
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    assert code == 1 and "interrupted in the first epoch" in err and f"--resume {run_dir}" in err, err
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    assert json.loads(open(os.path.join(run_dir, "report.json")).read())["status"] == "interrupted"

    code, out, err = run_cli(["train", "--resume", run_dir, "--json", "--no-progress", "--no-plots"])
    assert code == 0, err
    assert json.loads(out)["status"] == "done"
    code, _, err = run_cli(args + ["--run-dir", str(tmp_path / "full")])
    assert code == 0, err
    a = torch.load(os.path.join(run_dir, "final_model.pt"), weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "full" / "final_model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
