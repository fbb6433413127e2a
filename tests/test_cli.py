import json
import os
import re
import subprocess
import sys

import pytest

from fxcompress.cli import COMMANDS, build_parser
from tests.helpers import run_cli

CNN = os.path.join(os.path.dirname(__file__), "models", "small_cnn.py")
GATED = os.path.join(os.path.dirname(__file__), "models", "gated.py")


@pytest.fixture
def policy(tmp_path):
    p = tmp_path / "p.yaml"
    # selects the layers and treats none (activations: null), so the plan lists them
    p.write_text("version: 1\nrules:\n  - match: {type: [Conv2d, Linear]}\n    activations: null\n")
    return str(p)


def available_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_every_command_has_help():
    cmds = available_commands()
    assert {"transform", "validate"} <= set(cmds)
    for cmd in cmds:
        code, out, err = run_cli([cmd, "--help"])
        assert code == 0 and "usage: fxcompress " + cmd in out


def test_no_command_prints_help_and_exits_2():
    code, out, err = run_cli([])
    assert code == 2 and "COMMAND" in out


def test_dry_run_prints_the_plan_table(policy):
    code, out, err = run_cli(["transform", CNN, "--policy", policy, "--dry-run"])
    assert code == 0, err
    assert "conv1" in out and "2x8x16x16" in out and "(dry run) 3 nodes selected" in out


def test_dry_run_json(policy):
    code, out, err = run_cli(["transform", CNN, "--policy", policy, "--dry-run", "--json"])
    data = json.loads(out)
    assert [n["qualname"] for n in data["plan"]] == ["conv1", "conv2", "fc"]
    assert data["plan"][2]["shape"] == [2, 10]


def test_transform_reports_auto_leaf(policy, tmp_path):
    p = tmp_path / "lin.yaml"
    p.write_text("rules:\n  - match: {type: Linear}\n    activations: null\n")
    code, out, err = run_cli(["transform", GATED, "--policy", str(p)])
    assert code == 0, err
    assert "auto-leaf: block.gate (Gate)" in out and "gated.py:12" in out


def test_transform_torchvision_with_input_shape(policy):
    code, out, err = run_cli(["transform", "torchvision:mobilenet_v3_small", "--policy", policy,
                              "--input-shape", "1,3,32,32", "--json"])
    assert code == 0, err
    assert json.loads(out)["summary"]["selected_nodes"] > 10


def test_validate_ok(policy):
    code, out, err = run_cli(["validate", policy, CNN])
    assert code == 0 and "ok (1 rules, 3 nodes selected" in out


def test_console_script_entry_point(policy):
    """The installed script and `python -m fxcompress` both exit with 2 on bad input."""
    r = subprocess.run([sys.executable, "-m", "fxcompress", "validate", policy + ".missing"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "policy file not found" in r.stderr and "Traceback" not in r.stderr


TWICE = os.path.join(os.path.dirname(__file__), "models", "twice.py")


def _table_rows(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_plan_table_shows_every_treatment_the_real_width_one_row_per_call_in_graph_order(tmp_path):
    # issue 11: treatments were cut at ~80 characters, conv1 showed bits=2
    # where the first/last rule gives 8, rows came in another order after
    # the passes, and the ReLU called twice was two rows named alike
    p = tmp_path / "two.yaml"
    p.write_text("rules:\n  - match: {type: [Conv2d, Linear]}\n    scaled_grad: {bits: 2}\n"
                 "  - match: {type: [Conv2d, ReLU]}\n    activations: {bits: 4}\n")
    code, dry, err = run_cli(["transform", TWICE, "--policy", str(p), "--dry-run"])
    assert code == 0, err
    code, real, err = run_cli(["transform", TWICE, "--policy", str(p)])
    assert code == 0, err
    assert _table_rows(dry) == _table_rows(real)
    rows = _table_rows(real)
    labels = [re.split(r"\s{2,}", r)[0] for r in rows if not r.startswith(" ")]
    assert labels == ["conv1", "act #1", "conv2", "act #2", "fc"]
    conv1 = rows[:2]  # two treatments: two lines, neither cut
    assert "scaled_grad(bits=2 -> 8 (first layer) lambda_s=150.0" in conv1[0] and conv1[0].endswith("bias=False)")
    assert conv1[1].strip().startswith("activations(") and conv1[1].rstrip().endswith(")")
    assert "scaled_grad(bits=2 lambda_s" in next(r for r in rows if r.startswith("conv2"))
    assert "bits=2 -> 8 (last layer)" in next(r for r in rows if r.startswith("fc"))


def test_plan_json_in_graph_order_in_both_modes(tmp_path):
    # the JSON plan after the passes listed rewritten nodes last (their
    # entries are re-filed under the new node's name)
    p = tmp_path / "two.yaml"
    p.write_text("rules:\n  - match: {type: [Conv2d, Linear]}\n    scaled_grad: {bits: 2}\n"
                 "  - match: {type: [Conv2d, ReLU]}\n    activations: {bits: 4}\n")
    code, dry, err = run_cli(["transform", TWICE, "--policy", str(p), "--dry-run", "--json"])
    assert code == 0, err
    code, real, err = run_cli(["transform", TWICE, "--policy", str(p), "--json"])
    assert code == 0, err
    dry_q = [n["qualname"] for n in json.loads(dry)["plan"]]
    real_q = [n["qualname"] for n in json.loads(real)["report"]["plan"]]
    assert dry_q == real_q
    assert [q for q in dry_q if q in ("conv1", "conv2", "fc")] == ["conv1", "conv2", "fc"]
