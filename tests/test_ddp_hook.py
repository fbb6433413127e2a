"""The quantized DDP comm hook on two real gloo processes (issue 6).

One spawn runs every check (starting workers costs seconds): the hook's
averaged gradient against a plain all-reduce of the same local gradients,
within the variance the quantizer promises; identical levels on both ranks
after refits; full precision is exact; a levels mismatch is caught."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fxcompress.config import from_dict
from fxcompress.distributed.config import CommunicationConfig
from fxcompress.distributed.hook import QuantizedCommState, quantized_hook
from fxcompress.distributed.launch import run_data_parallel
from fxcompress.errors import BadInput, RunFailure

STEPS = 10
REFITS = [0, 2]


def _model():
    torch.manual_seed(0)  # same initial weights on every rank, as DDP expects
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 4))


def _checking_hook(record):
    """Wrap quantized_hook: compare its output with an exact all-reduce mean of
    the same bucket, and add up the variance the quantizer promised for it."""

    def hook(state, bucket):
        local = bucket.buffer().clone()
        refit_now = state.refit_due()
        fut = quantized_hook(state, bucket)
        exact = local.clone()
        dist.all_reduce(exact)
        exact /= state.world_size
        promised = torch.tensor([state.quantizer.expected_error(local)], dtype=torch.float64)
        dist.all_reduce(promised)  # sum over ranks of each rank's E||Q(g_i) - g_i||^2

        def check(f):
            out = f.value()
            if not refit_now:  # levels may change mid-iteration on a refit
                record["sq_err"] += float(((out.double() - exact.double()) ** 2).sum())
                # independent ranks: E||mean_i Q(g_i) - mean_i g_i||^2 = sum_i E_i / W^2
                record["promised"] += float(promised) / state.world_size ** 2
            return out

        return fut.then(check)

    return hook


def _train(ddp, rank, steps):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()


def _worker(rank, world):
    out = {}
    # -- ALQ 3 bits: variance promise and identical levels
    cfg = from_dict(CommunicationConfig, {"method": "alq", "bits": 3, "bucket_size": 64,
                                          "refit": {"iterations": REFITS, "every": 0}})
    ddp = DDP(_model(), bucket_cap_mb=0.002)  # several DDP buckets per step
    state = QuantizedCommState(cfg)
    record = {"sq_err": 0.0, "promised": 0.0}
    ddp.register_comm_hook(state, _checking_hook(record))
    _train(ddp, rank, STEPS)
    out["record"] = record
    out["state"] = state.state_dict()
    out["ratio"] = state.compression_ratio()
    restored = QuantizedCommState(cfg)
    restored.load_state_dict(state.state_dict())
    out["restored"] = restored.state_dict() == state.state_dict()

    # -- full precision through the same hook equals a plain all-reduce
    fp = DDP(_model(), bucket_cap_mb=0.002)
    fp_state = QuantizedCommState(from_dict(CommunicationConfig, {"method": "fp32"}))
    fp.register_comm_hook(fp_state, quantized_hook)
    plain = DDP(_model(), bucket_cap_mb=0.002)
    _train(fp, rank, 1)
    _train(plain, rank, 1)
    out["fp32_diff"] = max(float((a.grad - b.grad).abs().max()) for a, b in zip(fp.parameters(), plain.parameters()))

    # -- a rank holding different levels is caught on every rank
    payload = torch.tensor([3.0, float("nan")] + list(state.quantizer.levels), dtype=torch.float64)
    if rank == 1:
        payload[4] += 1e-12
    try:
        state._verify(payload)
        out["mismatch_caught"] = False
    except RunFailure:
        out["mismatch_caught"] = True
    return out


@pytest.fixture(scope="module")
def results():
    return run_data_parallel(_worker, 2)


def test_hook_matches_allreduce_within_the_promised_variance(results):
    for r in results:
        rec = r["record"]
        assert rec["promised"] > 0
        # observed squared error of the average ~ its expectation (many coordinates, 8 steps)
        assert 0.5 < rec["sq_err"] / rec["promised"] < 1.6, rec


def test_all_ranks_hold_identical_refit_levels(results):
    a, b = (r["state"] for r in results)
    assert a["quantizer"] == b["quantizer"] and a["refits"] == b["refits"]
    assert [f["iteration"] for f in a["refits"]] == REFITS
    assert a["iteration"] == b["iteration"] == STEPS
    # the fit moved the levels away from the exponential start
    assert not np.allclose(a["quantizer"]["levels"], [-1, -.5, -.25, -.125, .125, .25, .5, 1])


def test_state_dict_roundtrip_and_bytes(results):
    for r in results:
        assert r["restored"]
        assert r["ratio"] > 8  # 3-bit codes + one norm per 64 coordinates


def test_full_precision_equals_plain_allreduce(results):
    for r in results:
        assert r["fp32_diff"] < 1e-6


def test_level_mismatch_between_ranks_is_caught(results):
    assert all(r["mismatch_caught"] for r in results)


def test_bad_nproc_is_bad_input():
    with pytest.raises(BadInput, match="nproc"):
        run_data_parallel(_worker, 0)
