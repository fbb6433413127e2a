"""tools/gpu_check.sh must not be broken on the day a GPU is lent: its Python
part runs here in dry mode (CPU, Triton interpreter, tiny sizes) through the
same code paths, and its GPU mode fails loudly on a machine without CUDA.
(One activation policy keeps the test short; the script runs every policy
the same way. `bash tools/gpu_check.sh --dry` runs them all.)"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("FXC_FORCE_TRITON", None)
    env.update(kw)
    return env


def test_dry_mode_measures_every_family_and_policy(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "gpu_bench.py"), "--dry", "--out", str(tmp_path),
           "--sections", "bandwidth,train", "--elements", "4096", "--policies", "acgc_auto",
           "--warmup-steps", "0", "--steps", "1", "--size", "16"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "gpu_bench.json"))
    assert res["dry"] is True
    rows = res["bandwidth"]["rows"]
    fams = {r["family"] for r in rows}
    assert {"fixed width", "mask", "zvc", "mixed widths", "mixed zvc", "PSGD scaled grad",
            "gradient quantization", "absmax int8"} <= fams
    for r in rows:
        assert "error" not in r, r
        assert r["kernel_s"] > 0 and r["copy_s"] > 0 and r["x_copy"] > 0
    train = {r["policy"]: r for r in res["train"]["rows"]}
    assert set(train) == {"uncompressed", "acgc_auto"}
    for r in train.values():
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["peak_bytes"] is None  # no CUDA peak on the CPU
    assert train["acgc_auto"]["time_ratio"] > 0
    assert "alq_3bit.yaml" in res["train"]["communication_only"]
    # the readable tables are printed too
    assert "x copy" in p.stdout and "step ms" in p.stdout


def test_gpu_mode_without_cuda_fails_loudly(tmp_path):
    if torch.cuda.is_available():
        return  # the GPU machine: gpu_check.sh itself runs GPU mode there
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_bench.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(TRITON_INTERPRET="0"))
    assert p.returncode == 2 and "no CUDA device" in p.stderr
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/kernels/test_triton_on_device.py", "-k", "test_masks"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=_env(FXC_GPU_CHECK="1", TRITON_INTERPRET="0"))
    assert p.returncode != 0, p.stdout[-2000:]
    assert "torch sees no CUDA device" in p.stdout and "skipped" not in p.stdout


def test_shell_script_parses_and_rejects_bad_arguments():
    sh = os.path.join(ROOT, "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", sh]).returncode == 0
    p = subprocess.run(["bash", sh, "--bogus"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr
