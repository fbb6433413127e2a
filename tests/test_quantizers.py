"""Gradient quantizers: config validation, wire format, unbiasedness and the
variance each quantizer promises (issue 6)."""
import numpy as np
import pytest
import torch

from fxcompress.config import ConfigError, from_dict
from fxcompress.distributed.config import CommunicationConfig
from fxcompress.distributed.quantizers import Quantizer
from fxcompress.distributed.wire import pack_codes, unpack_codes
from fxcompress.errors import BadInput

QUANTIZERS = ["qsgd", "qsgdinf", "nuqsgd", "terngrad", "alq", "alqn", "amq", "amqn"]


# ------------------------------------------------------------------- config

def test_config_defaults_resolve_per_method():
    assert from_dict(CommunicationConfig, {"method": "qsgdinf"}).resolved_norm == "linf"
    assert from_dict(CommunicationConfig, {"method": "alq"}).resolved_norm == "l2"
    tern = from_dict(CommunicationConfig, {"method": "terngrad"})
    assert tern.resolved_bits == 2 and tern.resolved_norm == "linf"
    cfg = from_dict(CommunicationConfig, {"refit": {"iterations": [0, 5], "every": 50}})
    assert [i for i in range(200) if cfg.refit.due(i)] == [0, 5, 55, 105, 155]


@pytest.mark.parametrize("data, field, words", [
    ({"method": "alg"}, "method", "must be one of"),
    ({"bits": 9}, "bits", "1..8"),
    ({"bits": 0}, "bits", "1..8"),
    ({"bucket_size": 100}, "bucket_size", "multiple of 8"),
    ({"bucket_size": 0}, "bucket_size", "8.."),
    ({"method": "terngrad", "bits": 3}, "bits", "always sends 2 bits"),
    ({"refit": {"every": -1}}, "refit.every", "0.."),
    ({"refit": {"iterations": [0, -3]}}, "refit.iterations[1]", ">= 0"),
    ({"num_top": 5}, "num_top", "unknown key"),
])
def test_config_rejects_bad_values(data, field, words):
    with pytest.raises(ConfigError) as e:
        from_dict(CommunicationConfig, data)
    assert e.value.field == field and words in e.value.message


def test_config_suggests_the_closest_method():
    with pytest.raises(ConfigError) as e:
        from_dict(CommunicationConfig, {"method": "alqn_"})
    assert e.value.suggestion == "alqn"


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "qsgdd"}, "did you mean 'qsgd'"),
    ({"method": "fp32"}, "full precision"),
    ({"bits": 9}, "1..8"),
    ({"bits": 2.5}, "1..8"),
    ({"bucket_size": 12}, "multiple of 8"),
    ({"method": "terngrad", "bits": 4}, "always sends 2 bits"),
    ({"norm": "l1"}, "l2 or linf"),
])
def test_quantizer_rejects_bad_arguments_with_bad_input(kwargs, words):
    with pytest.raises(BadInput, match=words):
        Quantizer(**kwargs)


# --------------------------------------------------------------------- wire

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13, 1000])
def test_pack_unpack_roundtrip(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits * n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8) * bits
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_places_code_k_at_bit_offset_bits_times_k():
    # the documented layout, so other implementations can read the stream
    packed = pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 5]), 3)
    word = int.from_bytes(bytes(packed.tolist()), "little")
    assert word == 1 | (5 << 21)


def test_wire_bytes_at_3_bits_are_over_9x_smaller_than_fp32():
    q = Quantizer("alq", 3)
    x = torch.randn(100_000)
    msg = q.encode(x)
    layout = q.layout(x.numel())
    assert msg.numel() == layout.nbytes == 13 * 4 + 12_500 * 3
    assert 4 * x.numel() / msg.numel() >= 9.0


# ------------------------------------------------------------- quantization

def _grad(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and a varying scale, like real gradients
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 2


@pytest.mark.parametrize("method", QUANTIZERS)
def test_decoded_values_are_bucket_norm_times_a_neighbouring_level(method):
    q = Quantizer(method, bucket_size=64)
    x = _grad(64 * 4 + 24)
    out = q.quantize(x, seed=3).double()
    xb = torch.nn.functional.pad(x, (0, 40)).view(-1, 64).double()
    norms = xb.abs().amax(1) if q.norm == "linf" else xb.norm(dim=1)
    lv = torch.as_tensor(q.levels)
    r = (x.double() / norms.repeat_interleave(64)[: x.numel()]).clamp(-1, 1)
    level = out / norms.repeat_interleave(64)[: x.numel()]
    k = torch.searchsorted(lv[1:-1].contiguous(), r, right=True)
    lo, hi = lv[k], lv[k + 1]
    # each coordinate lands on one of the two levels that bracket it
    assert torch.all((level - lo).abs().lt(1e-5) | (level - hi).abs().lt(1e-5))


@pytest.mark.parametrize("method", QUANTIZERS)
def test_quantizer_is_unbiased_and_keeps_its_variance_promise(method):
    q = Quantizer(method, bucket_size=256)
    x = _grad(1000)
    if q.adaptive:
        q.fit(q.stats(x))
    draws = torch.stack([q.quantize(x, seed=s) for s in range(300)])
    promised = q.expected_error(x)
    # per-draw error matches the promised variance on average ...
    observed = ((draws - x) ** 2).sum(dim=1).mean().item()
    assert 0.8 * promised < observed < 1.2 * promised
    # ... and the mean of 300 draws converges to x at the rate an unbiased
    # estimator must: E||mean - x||^2 = promised / 300
    bias_sq = ((draws.mean(0) - x) ** 2).sum().item()
    assert bias_sq < 2.0 * promised / 300


def test_seeds_select_independent_streams():
    q = Quantizer("qsgd", 3, bucket_size=64)
    x = _grad(512)
    assert torch.equal(q.encode(x, seed=5), q.encode(x, seed=5))
    assert not torch.equal(q.encode(x, seed=5), q.encode(x, seed=6))


def test_zero_gradient_decodes_to_zero():
    q = Quantizer("alq", 3, bucket_size=64)
    out = q.quantize(torch.zeros(100))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_stats_cover_the_partial_last_bucket():
    q = Quantizer("alq", 3, bucket_size=64)
    x = _grad(64 * 3 + 10)
    s = q.stats(x)
    assert len(s) == 4
    tail = x[-10:].double()
    r = tail / (tail.norm() + 1e-7)
    assert np.isclose(s.norms[-1], tail.norm().item(), rtol=1e-5)
    assert np.isclose(s.means[-1], r.mean().item(), atol=1e-6)
    assert np.isclose(s.stds[-1], r.std(unbiased=False).item(), rtol=1e-4)


def test_fitted_alq_beats_the_other_level_sets_when_the_model_holds():
    # buckets of normals with different scales: exactly the truncated-normal
    # mixture ALQ / AMQ assume, so the fit must pay off in real error
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g)).reshape(-1)
    errors = {}
    for method in ("qsgd", "nuqsgd", "alq", "amq"):
        q = Quantizer(method, 3, bucket_size=512)
        if q.adaptive:
            q.fit(q.stats(x))
        errors[method] = q.expected_error(x)
    assert errors["alq"] < errors["amq"] <= errors["nuqsgd"]
    assert errors["alq"] < errors["qsgd"]


def test_state_dict_roundtrip_keeps_learned_levels():
    q = Quantizer("amq", 3, bucket_size=256)
    q.fit(q.stats(_grad(2048)))
    r = Quantizer("amq", 3, bucket_size=256)
    r.load_state_dict(q.state_dict())
    assert np.array_equal(r.levels, q.levels) and r.p == q.p


def test_policy_communication_errors_name_the_key():
    from fxcompress.errors import PolicyError
    from fxcompress.policy import parse_policy

    policy = parse_policy({"version": 1, "communication": {"method": "alq", "bits": 3}}, passes=())
    assert policy.section("communication").resolved_bits == 3
    with pytest.raises(PolicyError, match=r"communication\.bucket_size: must be a multiple of 8"):
        parse_policy({"version": 1, "communication": {"bucket_size": 1004}}, passes=())
    with pytest.raises(PolicyError, match=r"communication\.refit\.every"):
        parse_policy({"version": 1, "communication": {"refit": {"every": -5}}}, passes=())


def test_shipped_policies_load():
    import pathlib

    from fxcompress import load_policy

    root = pathlib.Path(__file__).resolve().parents[1] / "policies"
    for name, method in (("alq_3bit.yaml", "alq"), ("amq_3bit.yaml", "amq")):
        cfg = load_policy(str(root / name)).section("communication")
        assert cfg.method == method and cfg.resolved_bits == 3 and cfg.bucket_size == 8192


def test_empirical_alq_beats_the_truncated_normal_fit_on_heavy_tails():
    # the paper's f is a mixture of normals; on heavy-tailed buckets the
    # `distribution: empirical` option fits the coordinates themselves
    x = _grad(64 * 512, seed=4)
    errors = {}
    for dist in ("truncnorm", "empirical"):
        q = Quantizer("alq", 3, bucket_size=512, distribution=dist)
        q.fit(q.stats(x))
        errors[dist] = q.expected_error(x)
    assert errors["empirical"] < 0.9 * errors["truncnorm"]
    cfg = from_dict(CommunicationConfig, {"distribution": "empirical"})
    assert Quantizer.from_config(cfg).distribution == "empirical"
