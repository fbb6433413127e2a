import json
import os
import re
import shutil
import stat
from dataclasses import dataclass

import pytest
import torch

import fxcompress
import fxcompress.inspect as fxi
from fxcompress.loading import load_model
from tests.helpers import DemoPass, run_cli
from tests.models.small_cnn import SmallCNN

HERE = os.path.dirname(__file__)
SMALL_CNN = os.path.join(HERE, "models", "small_cnn.py")
POLICY = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "mark": {"level": 2}}]}


@dataclass
class MarkConfig:
    level: int = 1

    def check(self):
        pass


class MarkPass(DemoPass):
    """Puts an identity call after each treated Conv2d/Linear: a real rewrite
    that inserts fxc_-named nodes and changes nothing numerically."""

    name = "mark"
    key = "mark"
    config = MarkConfig


@pytest.fixture
def cm():
    return fxcompress.compile(SmallCNN(), POLICY, torch.randn(1, 3, 16, 16), passes=[MarkPass])


def test_diff_shows_removed_and_inserted_lines(cm):
    d = fxi.diff(cm)
    assert d.startswith("--- traced (before passes)\n+++ rewritten (after passes)\n")
    added = [l for l in d.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in d.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert sum(l.startswith("+    fxc_mark_conv1 = ") for l in added) == 1
    assert "-    return fc" in removed and "+    return fxc_mark_fc" in added
    assert fxi.code_before(cm) == cm.original_code and fxi.code_after(cm) == cm.graph_module.code


def test_diff_is_empty_when_no_pass_changed_the_graph():
    cm = fxcompress.compile(SmallCNN(), None, torch.randn(1, 3, 16, 16), passes=[])
    assert fxi.diff(cm) == ""


def test_table_has_a_row_per_treated_and_per_inserted_node(cm):
    rows = fxi.node_rows(cm)
    treated = [r["node"] for r in rows if r["treatments"]]
    inserted = {r["node"]: r["inserted_by"] for r in rows if r["inserted_by"]}
    assert treated == ["conv1", "conv2", "fc"]
    assert inserted == {"fxc_mark_conv1": "mark", "fxc_mark_conv2": "mark", "fxc_mark_fc": "mark"}
    conv1 = rows[0]
    assert (conv1["qualname"], conv1["op"], conv1["target"], conv1["shape"], conv1["dtype"]) == \
        ("conv1", "call_module", "Conv2d", [1, 8, 16, 16], "float32")
    assert conv1["treatments"] == "mark(level=2)"
    text = fxi.node_table(cm).splitlines()
    assert text[0].split()[:3] == ["node", "qualname", "op"]
    body = [line.split()[0] for line in text[2:]]
    assert body == ["conv1", "fxc_mark_conv1", "conv2", "fxc_mark_conv2", "fc", "fxc_mark_fc"]


def _dot_nodes(dot: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r'^  "([^"]+)" \[(.*)\];$', dot, re.M)}


def test_dot_highlights_inserted_nodes_and_annotates_treated_ones(cm):
    dot = fxi.to_dot(cm)
    assert dot.startswith("digraph fxcompress {") and dot.rstrip().endswith("}")
    nodes = _dot_nodes(dot)
    assert set(nodes) == {n.name for n in cm.graph_module.graph.nodes}
    highlighted = {n for n, attrs in nodes.items() if fxi.INSERTED_FILL in attrs}
    assert highlighted == {"fxc_mark_conv1", "fxc_mark_conv2", "fxc_mark_fc"}
    assert fxi.TREATED_FILL in nodes["conv2"] and "mark(level=2)" in nodes["conv2"]
    assert fxi.TREATED_FILL not in nodes["bn1"] and fxi.INSERTED_FILL not in nodes["bn1"]
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";$', dot, re.M)
    assert ("conv1", "fxc_mark_conv1") in edges and ("fxc_mark_conv1", "bn1") in edges
    assert len(edges) == sum(len(n.all_input_nodes) for n in cm.graph_module.graph.nodes)


def test_dot_marks_automatic_leaves():
    loaded = load_model(os.path.join(HERE, "models", "gated.py"))
    cm = fxcompress.compile(loaded.model, None, torch.randn(3, 8), passes=[])
    nodes = _dot_nodes(fxi.to_dot(cm))
    assert "auto-leaf" in nodes["block_gate"] and fxi.AUTO_LEAF_FILL in nodes["block_gate"]
    assert "auto-leaf" not in nodes["head"]


def test_write_graph_without_graphviz_writes_dot_and_says_why(cm, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = fxi.write_graph(cm, tmp_path / "g.svg")
    assert out.paths == [tmp_path / "g.dot", tmp_path / "g.png"] and out.svg is None
    assert "Graphviz 'dot' is not installed" in out.note
    assert (tmp_path / "g.dot").read_text() == fxi.to_dot(cm)


def test_write_graph_renders_svg_with_dot_on_path(cm, tmp_path, monkeypatch):
    # A stand-in `dot` that records its arguments proves the call without Graphviz.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "dot"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "<svg/>" > "$4"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = fxi.write_graph(cm, tmp_path / "graph")
    assert out.svg == tmp_path / "graph.svg" and out.note is None
    assert (tmp_path / "graph.svg").read_text().strip() == "<svg/>"
    assert (bindir / "args").read_text().split()[0] == "-Tsvg"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_real_graphviz_renders_the_dot(cm, tmp_path):
    out = fxi.write_graph(cm, tmp_path / "graph.dot")
    assert out.note is None, out.note
    svg = out.svg.read_text()
    assert "<svg" in svg and "fxc_mark_conv1" in svg and fxi.INSERTED_FILL in svg


def test_write_graph_reports_a_failing_dot(cm, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "dot").write_text("#!/bin/sh\necho 'syntax error' >&2\nexit 1\n")
    (bindir / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    out = fxi.write_graph(cm, tmp_path / "g")
    assert out.svg is None and "syntax error" in out.note and (tmp_path / "g.dot").exists()


@pytest.fixture
def policy_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nrules:\n  - match: {type: [Conv2d, Linear]}\n    mark: {level: 3}\n")
    return str(p)


def test_cli_default_prints_table_and_diff(policy_file):
    code, out, err = run_cli(["inspect", SMALL_CNN, "--policy", policy_file], passes=[MarkPass])
    assert code == 0, err
    assert "fxc_mark_conv1" in out and "mark(level=3)" in out      # the table
    assert "+++ rewritten (after passes)" in out                   # the diff
    assert "def forward" not in out.split("---")[0]                # no full code unless asked


def test_cli_json_with_code_table_and_graph(policy_file, tmp_path):
    code, out, err = run_cli(["inspect", SMALL_CNN, "--policy", policy_file, "--json", "--code", "--table",
                              "--graph", str(tmp_path / "g")], passes=[MarkPass])
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"code_before", "code_after", "nodes", "graph"}
    assert "fxc_mark_fc" in data["code_after"] and "fxc_mark_fc" not in data["code_before"]
    assert [r["node"] for r in data["nodes"] if r["inserted_by"] == "mark"] == \
        ["fxc_mark_conv1", "fxc_mark_conv2", "fxc_mark_fc"]
    assert data["graph"]["written"][0] == str(tmp_path / "g.dot")


def test_cli_bad_input_exits_2(policy_file, tmp_path):
    code, _, err = run_cli(["inspect", str(tmp_path / "nope.py"), "--policy", policy_file], passes=[MarkPass])
    assert code == 2 and "model file not found" in err and "Traceback" not in err
    code, _, err = run_cli(["inspect", SMALL_CNN, "--policy", policy_file, "--graph", str(tmp_path / "no" / "g")],
                           passes=[MarkPass])
    assert code == 2 and "does not exist" in err


def test_graph_picture_is_a_png_without_graphviz(tmp_path, monkeypatch):
    # issue 11: without Graphviz only a .dot file came out, and transform -o
    # did not say so
    from fxcompress.export import export

    monkeypatch.setattr(fxi.shutil, "which", lambda name: None)
    cm = fxcompress.compile(SmallCNN(), "policies/psgd_w4.yaml", torch.randn(1, 3, 16, 16))
    files = fxi.write_graph(cm, tmp_path / "g")
    assert files.png == tmp_path / "g.png" and files.svg is None
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Graphviz 'dot' is not installed: no g.svg" in files.note
    notes = []
    written = export(cm, tmp_path / "out", {"kind": "file", "path": "tests/models/small_cnn.py",
                                             "model_fn": "SmallCNN"}, notes=notes)
    assert tmp_path / "out" / "graph.png" in written and any("no graph.svg" in n for n in notes)
    if shutil.which("dot"):
        monkeypatch.undo()
        assert fxi.write_graph(cm, tmp_path / "h").svg == tmp_path / "h.svg"


def test_report_prints_as_tables_and_converts_to_a_dict():
    # issue 11: print(cm.report()) printed a 3,000-character dict
    from tests.models.gated import GatedNet

    cm = fxcompress.compile(GatedNet(), {"rules": [{"match": {"type": "Linear"}, "scaled_grad": {"bits": 2}}]},
                            torch.randn(3, 8))
    rep = cm.report()
    text = str(rep)
    assert text.startswith("plan: ") and "\n\nleaves:\n  auto-leaf block.gate (Gate)" in text
    assert "layer" in text and "treatments" in text and "-> 8 (first layer)" in text
    assert "passes:\n  scaled_grad: " in text and "controllers:" in text and "scaled_grad  steps" in text
    assert all(len(line) < 400 for line in text.splitlines())
    d = rep.to_dict()
    assert type(d) is dict and d["plan"] == rep["plan"] and json.loads(json.dumps(d, default=str))
    assert rep["auto_leaves"][0]["path"] == "block.gate"
