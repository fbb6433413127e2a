"""The controller hooks the training loop calls (extra_loss, snapshot_due,
plots), `evaluate --weights LABEL`, and `train --init`."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from fxcompress.passes import PassResult, add_submodule, fxc_name
from fxcompress.runtime.controller import Controller
from fxcompress.training import TrainConfig, execute, prepare_run, train

from .helpers import run_cli
from .test_training import TINY, CountingPass


@dataclass
class HooksConfig:
    weight: float = 0.0  # of the extra loss term
    snapshots: str = ""  # "2:early,5:late": after optimizer step 2 save "early", after step 5 "late"


class HooksController(Controller):
    """Uses the three new hooks: a real loss term (the mean squared logit),
    snapshots at given steps, and a picture of its figures."""

    kind = "hooks"

    def __init__(self, cfg: HooksConfig):
        super().__init__()
        self.weight = cfg.weight
        self.due = {int(s): label for s, label in (p.split(":") for p in cfg.snapshots.split(",") if p)}
        self.steps = 0
        self.extras, self.copies, self.plotted = [], {}, None

    def extra_loss(self, outputs, targets):
        if not self.weight:
            return None
        term = self.weight * outputs.pow(2).mean()
        self.extras.append(float(term.detach()))
        return term

    def step(self):
        self.steps += 1
        if hasattr(self, "holder"):
            self.holder[0].count += 1

    def snapshot_due(self):
        label = self.due.get(self.steps)
        if label is not None:  # what the snapshot must hold: the first parameter right now
            self.copies[label] = self.optimizer.param_groups[0]["params"][0].detach().clone()
        return label

    def figures(self):
        return {"steps": self.steps}

    def state(self):
        return {"steps": self.steps}

    def load_state(self, state):
        self.steps = state["steps"]

    def plots(self, history, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plotted = [h["figures"] for h in history]
        fig, ax = plt.subplots()
        ax.plot([h["epoch"] for h in history], [h["figures"]["hooks.steps"] for h in history])
        path = os.path.join(out_dir, "hooks.png")
        fig.savefig(path)
        plt.close(fig)
        return [path]


class HooksPass(CountingPass):  # on convolutions, as the counting pass
    name = "hooks"
    key = "hooks"
    config = HooksConfig

    def run(self, gm, plan):
        ctrl = HooksController(plan.selected(self.key)[0][1])
        # state a pass keeps in the graph module (as a quantizer's range): counts steps
        holder = nn.Module()
        holder.register_buffer("count", torch.zeros((), dtype=torch.int64))
        add_submodule(gm, fxc_name(gm, "hooks", "state"), holder)
        ctrl.holder = [holder]  # a list: not registered twice
        return PassResult(modified=True, controllers={"hooks": ctrl})


# handed to prepare_run()/train(): the compile runs exactly this pass list, no global changed
PASSES = [HooksPass]


@pytest.fixture
def hooks_policy(tmp_path):

    def write(**settings):
        body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
        path = tmp_path / f"hooks{len(os.listdir(tmp_path))}.yaml"
        path.write_text(f"version: 1\nrules:\n  - match: {{type: Conv2d}}\n    hooks: {{{body}}}\n")
        return str(path)

    return write


def _first_param_name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_extra_loss_is_trained_and_reported(tmp_path, hooks_policy):
    runs = {}
    for w in (0.0, 0.5):
        run = prepare_run(TrainConfig(**TINY, epochs=1, policy=hooks_policy(weight=w)), str(tmp_path / str(w)),
                          "t", use_policy=True, passes=PASSES)
        execute(run)
        runs[w] = run
    ctrl = runs[0.5].model.controllers["hooks"]
    assert len(ctrl.extras) == 3  # one term per step
    fig = runs[0.5].history[0]["figures"]
    assert fig["train_extra_loss"] == pytest.approx(sum(ctrl.extras) / 3)  # 3 equal batches of 32
    assert "train_extra_loss" not in runs[0.0].history[0]["figures"]
    # the term reached the gradients: same seed, same data, other weights
    a, b = runs[0.0].model.state_dict(), runs[0.5].model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))


def test_snapshots_are_saved_and_evaluated(tmp_path, hooks_policy, capsys):
    run_dir = str(tmp_path / "r")
    run = prepare_run(TrainConfig(**TINY, epochs=2, policy=hooks_policy(snapshots="2:early,5:late")), run_dir, "t",
                      use_policy=True, passes=PASSES)
    execute(run)
    ctrl = run.model.controllers["hooks"]
    name = _first_param_name(run.model, ctrl.optimizer.param_groups[0]["params"][0])
    for label in ("early", "late"):
        saved = torch.load(os.path.join(run_dir, "models", f"{label}.pt"), weights_only=True)
        assert saved["label"] == label and set(saved) >= {"format", "model", "data", "epochs", "state_dict"}
        assert torch.equal(saved["state_dict"][name], ctrl.copies[label])  # the weights at that step
    assert not torch.equal(ctrl.copies["early"], ctrl.copies["late"])
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert sorted(report["snapshots"]) == ["early", "late"]
    from fxcompress.cli import main

    capsys.readouterr()
    assert main(["evaluate", run_dir, "--weights", "early", "--w-bits", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["weights"].endswith(os.path.join("models", "early.pt")) and 0 <= res["fp_acc"] <= 1
    code, _, err = run_cli(["evaluate", run_dir, "--weights", "middle"])
    assert code == 2 and "no snapshot models/middle.pt (it has early, late)" in err


def test_controller_plots_are_written_and_reported(tmp_path, hooks_policy):
    res = train(TrainConfig(**{**TINY, "plots": True}, epochs=2, policy=hooks_policy(),
                            run_dir=str(tmp_path)), passes=PASSES)
    path = str(tmp_path / "plots" / "hooks.png")
    assert path in res["plots"]
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path in json.loads((tmp_path / "report.json").read_text())["plots"]


def test_init_starts_from_another_runs_weights(tmp_path, hooks_policy):
    train(TrainConfig(**TINY, epochs=1, run_dir=str(tmp_path / "a")))
    trained = torch.load(tmp_path / "a" / "final_model.pt", weights_only=True)["state_dict"]
    # plain and compiled: the compiled model's graph module holds the same tensors
    for policy in (None, hooks_policy()):
        run = prepare_run(TrainConfig(**TINY, epochs=1, policy=policy, init=str(tmp_path / "a")),
                          str(tmp_path / f"b{policy is None}"), "t", use_policy=True, passes=PASSES)
        state = {k.removeprefix("graph_module."): v for k, v in run.model.state_dict().items()}
        for k, v in trained.items():
            assert torch.equal(state[k], v), k
        assert run.init["loaded"] == len(trained) and not run.init["unexpected"]
        assert run.init["missing"] == ([] if policy is None else ["graph_module.fxc_hooks_state.count"])


def test_init_of_a_compiled_run_brings_the_pass_state_not_the_controller_state(tmp_path, hooks_policy):
    policy = hooks_policy()
    train(TrainConfig(**TINY, epochs=1, policy=policy, run_dir=str(tmp_path / "a")), passes=PASSES)
    run = prepare_run(TrainConfig(**TINY, epochs=1, policy=policy, init=str(tmp_path / "a")), str(tmp_path / "b"),
                      "t", use_policy=True, passes=PASSES)
    assert int(run.model.graph_module.fxc_hooks_state.count) == 3  # the 3 steps of run a
    assert run.model.controllers["hooks"].steps == 0  # a new run: the controller starts afresh
    assert not run.init["missing"] and not run.init["unexpected"]


def _train_cli(tmp_path, *args):
    return run_cli(["train", "--no-progress", "--no-plots", "--data", "digits", "--upscale", "8", "--depth", "8",
                    "--batch-size", "32", "--train-limit", "64", "--test-limit", "20", "--epochs", "1", *args])


def test_init_lists_missing_and_unexpected_keys_and_refuses_other_shapes(tmp_path):
    train(TrainConfig(**TINY, epochs=1, run_dir=str(tmp_path / "a")))
    state = torch.load(tmp_path / "a" / "final_model.pt", weights_only=True)["state_dict"]
    last = [k for k in state if k.endswith(".weight")][-1]
    partial = {k: v for k, v in state.items() if k != last}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pt")
    code, out, err = _train_cli(tmp_path, "--init", str(tmp_path / "partial.pt"), "--run-dir", str(tmp_path / "b"))
    assert code == 0, err
    line = [x for x in out.splitlines() if x.startswith("--init")]
    assert len(line) == 1 and f"missing (left as initialised): {last}" in line[0]
    assert "unexpected (ignored): extra.weight" in line[0]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["init"]["missing"] == [last] and report["config"]["init"] == str(tmp_path / "partial.pt")

    wrong = dict(state)
    wrong[last] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    code, _, err = _train_cli(tmp_path, "--init", str(tmp_path / "wrong.pt"), "--run-dir", str(tmp_path / "c"))
    assert code == 2 and f"{last} has shape (3, 3) there" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _train_cli(tmp_path, "--init", str(tmp_path / "none"), "--run-dir", str(tmp_path / "d"))
    assert code == 2 and "no such run directory or weights file" in err
