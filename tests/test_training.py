"""The training loop: exact resume, baseline with the same data order, hooks, reports, CLI errors."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxcompress.errors import BadInput
from fxcompress.passes import Pass, PassResult, add_submodule, fxc_name
from fxcompress.runtime.controller import Controller
from fxcompress.training import (TrainConfig, comparison_rows, comparison_table, load_checkpoint, lr_at,
                                 resume, train)

from .helpers import run_cli

# Tiny and fast: ResNet-8 on native 8x8 digits, 96 training images, 3 batches an epoch.
TINY = dict(data="digits", upscale=8, depth=8, batch_size=32, train_limit=96, test_limit=40, lr=0.05,
            progress=False, plots=False)


@dataclass
class CountingConfig:
    draw: bool = True


class CountingController(Controller):
    """Records hook calls; draws from the global RNG (as stochastic rounding would) and keeps state."""

    kind = "counting"

    def __init__(self, draw: bool, layers):
        super().__init__()
        self.draw, self.layers = draw, list(layers)
        self.steps, self.noise, self.calls = 0, 0.0, []
        self.last_forward_grad = -1.0  # set by the probe the pass puts in the graph

    def attach_optimizer(self, optimizer):
        super().attach_optimizer(optimizer)
        self.calls.append("attach")

    def on_epoch_start(self, epoch):
        self.calls.append(f"start{epoch}")

    def step(self):
        self.steps += 1
        if self.draw:
            self.noise += float(torch.rand(()))
        if self.calls[-1] != "step":
            self.calls.append("step")

    def on_epoch_end(self, epoch):
        self.calls.append(f"end{epoch}")

    def figures(self):
        return {"steps": self.steps, "noise": self.noise, "last_forward_grad": self.last_forward_grad}

    def report(self):
        return {**self.figures(), "bits_per_layer": {name: 4.0 + i for i, name in enumerate(self.layers)}}

    def state(self):
        return {"steps": self.steps, "noise": self.noise}

    def load_state(self, state):
        self.steps, self.noise = state["steps"], state["noise"]


class Probe(nn.Module):
    """Tells the controller whether the latest forward recorded autograd (training) or not (evaluation)."""

    def __init__(self, ctrl):
        super().__init__()
        self._ctrl = [ctrl]  # a list, so the controller is not registered twice in the module tree

    def forward(self, x):
        self._ctrl[0].last_forward_grad = float(torch.is_grad_enabled())
        return x


class CountingPass(Pass):
    name = "counting"
    key = "counting"
    config = CountingConfig

    def applies_to(self, node: fx.Node, gm: fx.GraphModule):
        ok = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)
        return None if ok else "convolutions only"

    def run(self, gm, plan):
        selected = plan.selected(self.key)
        ctrl = CountingController(selected[0][1].draw, [n.target for n, _ in selected])
        node = selected[0][0]
        name = add_submodule(gm, fxc_name(gm, "counting", "probe"), Probe(ctrl))
        with gm.graph.inserting_after(node):
            probe = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(probe, delete_user_cb=lambda u: u is not probe)
        return PassResult(modified=True, inserted=[name], controllers={"counting": ctrl})


# handed to train()/resume(): the compile runs exactly this pass list, no global changed
PASSES = [CountingPass]


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "count.yaml"
    path.write_text("version: 1\nrules:\n  - match: {type: Conv2d}\n    counting: {draw: true}\n")
    return str(path)


def _weights(run_dir, name="final_model.pt"):
    return torch.load(os.path.join(run_dir, name), weights_only=True)["state_dict"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _strip_times(history):
    return [{k: v for k, v in h.items() if k not in ("time_s", "img_per_s")} for h in history]


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, policy):
    full = train(TrainConfig(**TINY, epochs=2, policy=policy, run_dir=str(tmp_path / "full")), passes=PASSES)
    part = train(TrainConfig(**TINY, epochs=2, policy=policy, run_dir=str(tmp_path / "part"), stop_after=1),
                 passes=PASSES)
    assert part["status"] == "stopped" and len(part["main"]["epochs"]) == 1
    assert not os.path.exists(tmp_path / "part" / "final_model.pt")
    torch.manual_seed(12345)  # a resumed process starts with whatever RNG state; the checkpoint restores it
    again = resume(str(tmp_path / "part"), stop_after=1, passes=PASSES)  # nothing left before epoch 1: a no-op
    assert again["status"] == "stopped" and len(again["main"]["epochs"]) == 1
    done = resume(str(tmp_path / "part"), passes=PASSES)
    assert done["status"] == "done" and done["resumed"]
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "part"))
    assert _strip_times(full["main"]["epochs"]) == _strip_times(done["main"]["epochs"])
    # the controller's state and RNG draws went through the checkpoint too
    # (epoch figures are means over the epoch's steps: steps counts 4, 5, 6)
    assert done["main"]["epochs"][-1]["figures"]["counting.steps"] == 5.0


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    train(TrainConfig(**TINY, epochs=1, run_dir=str(tmp_path)))
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "rng", "history", "schedule"}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert any(v.get("momentum_buffer") is not None for v in state["optimizer"]["state"].values())


def test_baseline_sees_same_data_and_init(tmp_path, policy):
    # The counting pass changes no arithmetic but draws random numbers every
    # step: if data order or initial weights depended on the global RNG stream
    # the two runs would diverge.
    res = train(TrainConfig(**TINY, epochs=2, policy=policy, baseline=True, run_dir=str(tmp_path)), passes=PASSES)
    main, base = res["main"], res["baseline"]
    assert main["compressed"] and not base["compressed"]
    ws_main = {k.removeprefix("graph_module."): v for k, v in _weights(tmp_path).items()
               if k.startswith("graph_module.")}
    _assert_same(ws_main, _weights(tmp_path / "baseline"))
    assert [h["train_loss"] for h in main["epochs"]] == [h["train_loss"] for h in base["epochs"]]
    names = [r[0] for r in res["comparison"]]
    assert names[:2] == ["test accuracy (%)", "best test accuracy (%)"] and "counting.steps" in names
    table = comparison_table(res["comparison"])
    assert "compressed" in table and "baseline" in table and "counting.noise" in table


def test_hooks_run_in_order(tmp_path, policy):
    from fxcompress.training import execute, prepare_run

    run = prepare_run(TrainConfig(**TINY, epochs=2, policy=policy), str(tmp_path), "t", use_policy=True,
                      passes=PASSES)
    execute(run)
    ctrl = run.model.controllers["counting"]
    assert ctrl.optimizer is run.optimizer
    assert ctrl.calls == ["attach", "start0", "step", "end0", "start1", "step", "end1"]
    assert ctrl.steps == 6
    # figures describe training: read before the evaluation forwards (no autograd) run
    assert [h["figures"]["counting.last_forward_grad"] for h in run.history] == [1.0, 1.0]
    assert ctrl.last_forward_grad == 0.0  # evaluation did run afterwards


def test_epoch_figures_describe_the_whole_epoch(tmp_path, monkeypatch):
    """80 images in batches of 32: the last batch (16) is partial. The
    epoch's activation figures average all three steps, not the last one."""
    from fxcompress.runtime.autoquant import AutoQuantController
    from fxcompress.training import prepare_run, train_epoch

    policy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies",
                          "acgc_2bit.yaml")
    run = prepare_run(TrainConfig(**{**TINY, "train_limit": 80}, epochs=1, policy=policy), str(tmp_path), "t",
                      use_policy=True)
    seen = []
    figures = AutoQuantController.figures

    def recording(self):
        out = figures(self)
        seen.append(out)
        return out

    monkeypatch.setattr(AutoQuantController, "figures", recording)
    got = train_epoch(run, 0, progress=False)["figures"]
    assert len(seen) == 3  # one read per step
    fp32, saved = [f["fp32_mb"] for f in seen], [f["saved_mb"] for f in seen]
    assert fp32[2] < 0.6 * fp32[0]  # the partial batch saves about half
    assert got["activations.fp32_mb"] == pytest.approx(sum(fp32) / 3)
    assert got["activations.saved_mb"] == pytest.approx(sum(saved) / 3)
    assert got["activations.ratio"] == pytest.approx(sum(fp32) / sum(saved))
    bits = sum(f["avg_bits"] * f["fp32_mb"] for f in seen) / sum(fp32)
    assert got["activations.avg_bits"] == pytest.approx(bits)


def test_epoch_figures_weighting():
    from fxcompress.training import EpochFigures

    acc = EpochFigures()
    acc.add({"a.saved_mb": 1.0, "a.fp32_mb": 8.0, "a.ratio": 8.0, "a.avg_bits": 2.0, "b.x": 1.0, "ratio": 3.0})
    acc.add({"a.saved_mb": 1.0, "a.fp32_mb": 2.0, "a.ratio": 2.0, "a.avg_bits": 4.0, "b.x": 3.0, "ratio": 5.0})
    assert acc.result() == {"a.saved_mb": 1.0, "a.fp32_mb": 5.0, "a.ratio": 5.0, "a.avg_bits": 2.4, "b.x": 2.0,
                            "ratio": 4.0}
    nothing = EpochFigures()
    nothing.add({"a.saved_mb": 0.0, "a.fp32_mb": 0.0, "a.ratio": 0.0, "a.avg_bits": 0.0})
    assert nothing.result() == {"a.saved_mb": 0.0, "a.fp32_mb": 0.0, "a.ratio": 0.0, "a.avg_bits": 0.0}


def test_report_and_plots(tmp_path, policy):
    cfg = TrainConfig(**{**TINY, "plots": True}, epochs=2, policy=policy, run_dir=str(tmp_path))
    train(cfg, passes=PASSES)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "done" and report["config"]["epochs"] == 2
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["epochs"][1]["figures"]["counting.steps"] == 5.0  # mean of 4, 5, 6
    assert report["controllers"]["counting"]["bits_per_layer"]["conv1"] == 4.0
    for name in ("curves.png", "figures.png", "layers.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_plots_skip_what_does_not_apply(tmp_path):
    from fxcompress.plots import write_plots

    hist = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5, "test_acc": 0.4, "figures": {}}]
    written = write_plots(str(tmp_path), hist)
    assert [os.path.basename(p) for p in written] == ["curves.png"]
    hist[0]["figures"] = {"camp.relative_energy": 0.3}
    assert "tradeoff.png" in [os.path.basename(p) for p in write_plots(str(tmp_path), hist)]


def test_schedules():
    cos = TrainConfig(epochs=10, lr=0.1)
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 5) == pytest.approx(0.05)
    assert lr_at(cos, 9) < 0.003
    step = TrainConfig(epochs=8, lr=0.1, schedule="step")
    assert [round(lr_at(step, e), 6) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    custom = TrainConfig(epochs=8, lr=0.1, schedule="step", decay_epochs=[2], gamma=0.5)
    assert lr_at(custom, 1) == 0.1 and lr_at(custom, 7) == 0.05


def test_adam_and_nesterov_train(tmp_path):
    for i, extra in enumerate([dict(optimizer="adam", lr=0.01), dict(nesterov=True, schedule="step")]):
        res = train(TrainConfig(**{**TINY, **extra}, epochs=1, run_dir=str(tmp_path / str(i))))
        assert res["main"]["epochs"][0]["train_loss"] < 2.3


def test_comparison_rows_handle_missing_figures():
    fin = {"test_acc": 0.9, "best_test_acc": 0.95, "train_acc": 1.0, "train_loss": 0.1, "test_loss": 0.2,
           "time_per_epoch_s": 2.0, "img_per_s": 100.0}
    main = {"final": {**fin, "figures": {"acgc.avg_bits": 6.5}}, "model": {"parameters": 10}}
    base = {"final": {**fin, "test_acc": 0.92, "figures": {}}, "model": {"parameters": 10}}
    rows = {r[0]: r[1:] for r in comparison_rows(main, base)}
    assert rows["test accuracy (%)"] == [90.0, 92.0, pytest.approx(-2.0)]
    assert rows["acgc.avg_bits"] == [6.5, None, None]


# --- bad input: one line, exit code 2 ------------------------------------------------

def _cli(args):
    code, out, err = run_cli(["train", "--no-progress", "--no-plots"] + args)
    return code, out, err.strip()


@pytest.mark.parametrize("args,words", [
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--policy", "nope.yaml"], "policy file not found"),
    (["--depth", "21"], "6n+2"),
    (["--data", "mnist"], "mnist:PATH"),
    (["--device", "tpu"], "--device must be"),
    (["--upscale", "4"], "native size 8"),
    (["--decay-epochs", "50", "--schedule", "step"], "--decay-epochs must be"),
    (["torchvision:resnet1"], "did you mean 'resnet18'"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs"),
])
def test_bad_flags(tmp_path, args, words):
    code, out, err = _cli(args + ["--run-dir", str(tmp_path / "r"), "--epochs", "1"] if "--epochs" not in args
                          else args + ["--run-dir", str(tmp_path / "r")])
    assert code == 2, err
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_model_with_wrong_outputs_is_bad_input(tmp_path):
    model = tmp_path / "m.py"
    model.write_text("import torch.nn as nn\n\ndef build_model():\n"
                     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n")
    code, _, err = _cli([str(model), "--upscale", "8", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "(2, 10)" in err, err


def test_resume_refuses_changed_config_and_existing_dir(tmp_path):
    train(TrainConfig(**TINY, epochs=1, run_dir=str(tmp_path / "r")))
    code, _, err = _cli(["--resume", str(tmp_path / "r"), "--lr", "0.1"])
    assert code == 2 and "drop --lr" in err
    code, _, err = _cli(["--run-dir", str(tmp_path / "r")])
    assert code == 2 and "already holds a run" in err
    code, _, err = _cli(["--resume", str(tmp_path / "none")])
    assert code == 2 and "report.json" in err
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="checkpoint.pt is damaged"):
        resume(str(tmp_path / "r"))


def test_resume_refuses_changed_policy(tmp_path, policy):
    train(TrainConfig(**TINY, epochs=2, policy=policy, run_dir=str(tmp_path / "r"), stop_after=1), passes=PASSES)
    with open(policy, "a") as f:
        f.write("# edited\n")
    with pytest.raises(BadInput, match="changed since the run started"):
        resume(str(tmp_path / "r"))


def test_cli_json_and_resume_finish_run(tmp_path):
    run_dir = str(tmp_path / "r")
    args = ["--data", "digits", "--upscale", "8", "--depth", "8", "--train-limit", "64", "--test-limit", "20",
            "--batch-size", "32", "--epochs", "2", "--run-dir", run_dir]
    code, out, err = _cli(args + ["--stop-after", "1"])
    assert code == 0 and "--resume" in out
    code, out, err = _cli(["--resume", run_dir, "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["status"] == "done" and [e["epoch"] for e in data["main"]["epochs"]] == [1, 2]
    assert "epoch 2/2" in err  # per-epoch lines go to stderr with --json


def test_resume_exact_with_augmented_cifar(tmp_path):
    from .test_data import write_cifar10

    write_cifar10(str(tmp_path / "data"), n_per_batch=4)
    cfg = dict(TINY, data=f"cifar10:{tmp_path / 'data'}", upscale=None, train_limit=None, test_limit=None,
               batch_size=8, epochs=2)
    full = train(TrainConfig(**cfg, run_dir=str(tmp_path / "full")))
    assert full["main"]["data"]["in_channels"] == 3 and full["main"]["data"]["image_size"] == 32
    train(TrainConfig(**cfg, run_dir=str(tmp_path / "part"), stop_after=1))
    resume(str(tmp_path / "part"))
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "part"))
