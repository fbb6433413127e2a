"""`fxcompress train --nproc N` (issue 6 item 5): real gloo workers through the CLI.

One spawned run stops after its first epoch and a second resumes it (starting
workers costs seconds each, so the two spawns cover everything): exit codes,
bytes on the wire in report.json, rank 0 alone writing the run directory and
logging, and the hook's state carried through the checkpoint."""
import json
import os
from pathlib import Path

import pytest
import torch

from .helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
ALQ = str(ROOT / "policies" / "alq_3bit.yaml")
# ResNet-8 on native 8x8 digits, 96 images: 3 global steps of 2 x 16 an epoch
TINY = ["--upscale", "8", "--depth", "8", "--batch-size", "32", "--train-limit", "96", "--test-limit", "40",
        "--no-progress", "--no-plots"]


def test_two_gloo_workers_alq_stop_and_resume(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["train", "--nproc", "2", "--policy", ALQ, "--epochs", "2", "--stop-after", "1",
                            "--run-dir", str(run_dir)] + TINY)
    out = capfd.readouterr().out  # the workers print to the real stdout
    assert code == 0, err + out
    # rank 0 alone logs and writes: one epoch line, and exactly its files, no torn .tmp left by a second writer
    assert out.count("compressed epoch 1/2") == 1, out
    assert "2 gloo workers x 16 images a step, gradients as alq 3-bit" in out
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "report.json"]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "stopped" and report["config"]["nproc"] == 2
    d = report["distributed"]
    assert d["nproc"] == 2 and d["backend"] == "gloo" and d["batch_per_worker"] == 16
    assert d["written_by_rank"] == 0 and d["communication"]["method"] == "alq"
    fig = report["epochs"][0]["figures"]
    wire, fp32 = fig["comm.wire_bytes_per_step"], fig["comm.fp32_bytes_per_step"]
    params = report["model"]["parameters"]
    assert fp32 == 4 * params  # every gradient coordinate, once a step
    assert 0 < wire < fp32 / 9, fig  # 3-bit codes plus a norm per bucket: over 9x fewer bytes
    assert fig["comm.compression_vs_fp32"] == pytest.approx(fp32 / wire)
    assert len(d["refits"]) == 1 and d["refits"][0]["iteration"] == 0  # levels fit at step 0
    assert 0 <= report["epochs"][0]["test_acc"] <= 1  # rank 0 evaluated

    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["world"] == 2 and len(ck["rng_ranks"]) == 2
    assert ck["comm"]["iteration"] == 3 and ck["comm"]["method"] == "alq"

    code, _, err = run_cli(["train", "--resume", str(run_dir), "--no-progress", "--no-plots"])
    out = capfd.readouterr().out
    assert code == 0, err + out
    assert out.count("compressed epoch 2/2") == 1 and "resuming after epoch 1" in out
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "final_model.pt", "report.json"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "done" and len(report["epochs"]) == 2
    assert report["epochs"][1]["figures"]["comm.wire_bytes_per_step"] == wire
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["comm"]["iteration"] == 6  # the hook's step count went on from the checkpoint
    assert report["distributed"]["refits"] == d["refits"]  # learned levels restored, not refit at "step 0"


def test_communication_only_policy_single_process_notes_it(tmp_path, capfd):
    """A policy with only `communication:` compiles with no treatments; with one
    process it trains plainly and says the section needs --nproc > 1."""
    code, out, err = run_cli(["train", "--policy", ALQ, "--epochs", "1", "--run-dir", str(tmp_path / "r")] + TINY)
    assert code == 0, err
    assert "communication: section applies only to data-parallel training (--nproc > 1)" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["distributed"] is None and report["status"] == "done"
    assert not any(k.startswith("comm.") for k in report["epochs"][0]["figures"])


@pytest.mark.parametrize("args, words", [
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--nproc", "2", "--batch-size", "33"], "must split evenly"),
    (["--nproc", "3", "--batch-size", "3"], "at least 2 images per worker"),
])
def test_bad_nproc_is_bad_input(tmp_path, args, words):
    code, _, err = run_cli(["train", "--run-dir", str(tmp_path / "r"), "--no-progress"] + args)
    assert code == 2 and words in err, err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_nproc(tmp_path):
    code, _, err = run_cli(["train", "--resume", str(tmp_path), "--nproc", "2"])
    assert code == 2 and "--nproc" in err
