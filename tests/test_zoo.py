"""tools/zoo.py keeps every finished pair in its results file, skips them on a
restart, and turns a pair that runs too long into a `timeout` record instead
of a hang (one small model; the whole zoo is a benchmark, not a test)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo_tool", os.path.join(ROOT, "tools", "zoo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pol(name):
    return os.path.join(ROOT, "policies", name + ".yaml")


def test_worker_appends_one_line_per_pair_and_names_a_method_that_applies_nowhere(zoo, tmp_path):
    res = str(tmp_path / "z.jsonl")
    zoo.worker(["squeezenet1_1"], [pol("camp_sp")], res)
    (r,) = zoo.read_results(res)
    assert (r["model"], r["policy"], r["status"]) == ("squeezenet1_1", "camp_sp", "ok")
    assert 0.05 < r["worker_peak_rss_gb"] < 24  # the worker measured its own resident memory (GiB)
    assert r["transform_s"] >= 0 and r["input"] == 64
    # squeezenet has no residual add: CAMP's block rule (optional) reaches no node, and the record says so
    assert len(r["notes"]) == 1 and r["notes"][0].startswith("dual_precision applies to no node")


def test_restart_skips_done_pairs_and_ignores_a_cut_line(zoo, tmp_path, capsys):
    res = tmp_path / "z.jsonl"
    done = [{"model": "squeezenet1_1", "policy": p, "status": "ok", "transform_s": 0.1} for p in ("all", "psgd_w4")]
    res.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"model": "squeezenet1_1", "pol')
    # every pair is in the file: nothing is started (a worker would take far longer than this test)
    rc = zoo.main(["--policies", pol("all"), pol("psgd_w4"), "--only", "squeezenet1_1", "--results", str(res)])
    assert rc == 0
    assert len(zoo.read_results(str(res))) == 2
    out = capsys.readouterr().out
    assert "2 ok" in out and "0 not run" in out


def test_pair_over_its_cpu_budget_is_a_timeout_and_the_next_pair_still_runs(zoo, tmp_path):
    res = str(tmp_path / "z.jsonl")
    # 0.05 CPU seconds: the worker cannot even import torch, so each pair in turn is killed
    zoo.run_models(["squeezenet1_1", "squeezenet1_0"], [pol("all"), pol("psgd_w4")], res, pair_cpu_s=0.05,
                   max_rss_gb=64, log=lambda s: None)
    recs = zoo.read_results(res)
    assert [(r["model"], r["policy"], r["status"]) for r in recs] == [
        ("squeezenet1_1", "all", "timeout"), ("squeezenet1_1", "psgd_w4", "timeout"),
        ("squeezenet1_0", "all", "timeout"), ("squeezenet1_0", "psgd_w4", "timeout")]
    assert "CPU seconds" in recs[0]["reason"]


def test_table_from_marks_pairs_not_run(zoo, tmp_path, capsys):
    res = tmp_path / "z.jsonl"
    res.write_text(json.dumps({"model": "resnet18", "policy": "all", "status": "n/a",
                               "reason": "policy.yaml:3:match: matches nothing"}) + "\n")
    assert zoo.main(["--table-from", str(res), "--policies", pol("all"), pol("acdc_90"),
                     "--only", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "matches nothing" in out and "1 not applicable" in out and "1 not run" in out


def test_big_models_get_a_worker_of_their_own(zoo):
    names = zoo.models_smallest_first(["vit_h_14", "resnet18", "squeezenet1_1", "mobilenet_v3_small"])
    assert names[0] == "squeezenet1_1" and names[-1] == "vit_h_14"
    assert zoo.chunks(names, 2) == [["squeezenet1_1", "mobilenet_v3_small"], ["resnet18"], ["vit_h_14"]]


def test_missing_policy_file_is_exit_2_naming_it(zoo, tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert zoo.main(["--only", "resnet18", "--policies", missing, "--results", str(tmp_path / "z.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "not found" in err and "Traceback" not in err
