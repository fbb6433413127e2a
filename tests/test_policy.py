"""Malformed policies and models: one clear message, exit code 2, no traceback."""
import os
import textwrap

import pytest

from fxcompress.policy import parse_policy_text

from .helpers import DemoPass, run_cli

HERE = os.path.dirname(__file__)
CNN = os.path.join(HERE, "models", "small_cnn.py")


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# (policy text, words the message must contain, line it must name or None)
BAD_POLICIES = [
    ("rules: [\n  - match: {type: Conv2d\n", "not valid YAML", None),
    ("version: 1\nrulez: []\n", "did you mean 'rules'", 2),
    ("version: 2\nrules: []\n", "unsupported policy version", 1),
    ("- 1\n- 2\n", "a policy is a mapping", None),
    ("rules: {match: 1}\n", "rules must be a list", 1),
    ("rules:\n  - 3\n", "a rule is a mapping", 2),
    ("rules:\n  - activations: {bits: 4}\n", "needs 'match'", 2),
    ("rules:\n  - match: Conv2d\n", "match must be a mapping", 2),
    ("rules:\n  - match: {typ: Conv2d}\n", "did you mean 'type'", 2),
    ("rules:\n  - match: {type: 3}\n", "string or a list of strings", 2),
    ("rules:\n  - match: {name: 're:layer[0-'}\n", "bad regular expression", 2),
    ("rules:\n  - match: {type: Conv2d}\n    activatons: {bits: 4}\n", "did you mean 'activations'", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {bitz: 4}\n", "did you mean 'bits'", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {bits: 0}\n", "must be in 1..16", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {bits: 17}\n", "must be in 1..16", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {bits: four}\n", "expected an integer", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {bits: 4.5}\n", "expected an integer", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {rounding: nearst}\n", "did you mean 'nearest'", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: {group_size: 0}\n", "must be a positive integer", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations: 4\n", "settings are a mapping", 3),
    ("rules:\n  - match: {type: Conv2d}\n    optional: maybe\n", "optional must be true or false", 3),
    ("trace: {leaf_modules: 5}\n", "expected a string", 1),
    ("trace: {auto_leaf: yes please}\n", "expected true/false", 1),
    ("trace: {leaf_modulez: []}\n", "did you mean 'leaf_modules'", 1),
    ("schedule: {activatons: {}}\n", "did you mean 'activations'", 1),
    ("schedule: {activations: {}}\n", "treatment 'activations' takes no schedule", 1),
    # the pass-wide settings section: validated by the pass that owns it
    ("settings: {activatons: {}}\n", "did you mean 'activations'", 1),
    ("settings: {scaled_grad: {}}\n", "treatment 'scaled_grad' takes no settings (these do: dual_precision, activations)", 1),
    ("settings: 3\n", "settings must be a mapping", 1),
    ("settings:\n  activations:\n    stats_evry: 5\n", "did you mean 'stats_every'", 3),
    ("settings:\n  activations:\n    window: 0\n", "must be a positive number of snapshots", 3),
    # a controller-wide field in a per-node rule says where it lives now
    ("rules:\n  - match: {type: Conv2d}\n    activations: {mode: auto, stats_every: 50}\n",
     "'stats_every' holds for the whole pass, not per node: write it once under "
     "'settings: {activations: {stats_every: ...}}'", 3),
    ("rules:\n  - match: {type: Conv2d}\n    activations:\n      window: 5\n", "'settings: {activations: {window", 4),
    # an empty policy and a rule that carries no treatment are mistakes, not no-ops
    ("", "the policy is empty", 1),
    ("# a comment only\n", "the policy is empty", 1),
    ("version: 1\n", "the policy is empty", 1),
    ("rules:\n  - match: {type: Conv2d}\n", "rule carries no treatment", 2),
    ("rules:\n  - match: {type: Conv2d}\n    optional: true\n", "rule carries no treatment", 2),
]


@pytest.mark.parametrize("text,words,line", BAD_POLICIES)
def test_bad_policy_gives_one_clear_line(tmp_path, text, words, line):
    path = write(tmp_path, text)
    code, out, err = run_cli(["validate", path])
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert words in err, err
    assert err.count("\n") == 1, err  # one line
    assert path in err
    if line is not None:
        assert f"{path}:{line}:" in err, err


RULE_MISMATCH = [
    ("rules:\n  - match: {name: 'conv9'}\n    activations: {}\n", "matches no node", "did you mean 'conv"),
    ("rules:\n  - match: {type: Conv3d}\n    activations: {}\n", "matches no node", "did you mean 'Conv2d'"),
    ("rules:\n  - match: {type: BatchNorm2d}\n    scaled_grad: {}\n", "applies to none of them", None),
    ("rules:\n  - match: {op: matmul}\n    activations: null\n", "matches no node", None),
]


@pytest.mark.parametrize("text,words,hint", RULE_MISMATCH)
def test_rule_matching_nothing_is_an_error(tmp_path, text, words, hint):
    path = write(tmp_path, text)
    code, out, err = run_cli(["validate", path, CNN])
    assert code == 2 and "Traceback" not in err
    assert words in err and f"{path}:2" in err
    if hint:
        assert hint in err


def test_optional_rule_may_match_nothing(tmp_path):
    path = write(tmp_path, "rules:\n  - match: {name: 'conv9'}\n    optional: true\n    activations: {}\n")
    code, out, err = run_cli(["validate", path, CNN])
    assert code == 0, err


BAD_MODELS = [
    (["transform", "tests/models/nope.py"], "model file not found"),
    (["transform", "tests/models/broken_import.py"], "broken_import.py:4: the model file failed to import"),
    (["transform", "tests/models/syntax_error.py"], "syntax_error.py:1"),
    (["transform", "tests/models/two_models.py"], "cannot tell which model"),
    (["transform", CNN, "--model-fn", "build_modle"], "did you mean 'build_model'"),
    (["transform", CNN, "--input-shape", "1,3,x"], "comma-separated integers"),
    (["transform", CNN, "--input-shape", "2,5,16,16"], "likely cause: the example input's shape"),
    (["transform", "torchvision:resnet5O"], "did you mean 'resnet50'"),
    (["transform", "tests/models/root_branch.py", "--input-shape", "2,4"], "root_branch.py:11"),
    (["transform", CNN, "--input-dtype", "float33"], "unknown input dtype"),
]


@pytest.mark.parametrize("argv,words", BAD_MODELS)
def test_bad_model_gives_one_clear_line(tmp_path, argv, words):
    policy = write(tmp_path, "rules: []\n")
    code, out, err = run_cli(argv + ["--policy", policy])
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert words in err, err


def test_missing_policy_file():
    code, out, err = run_cli(["validate", "does/not/exist.yaml"])
    assert code == 2 and "policy file not found" in err


def test_later_rules_override_key_by_key(tmp_path):
    import fxcompress
    from tests.models.small_cnn import SmallCNN

    policy = {"rules": [
        {"match": {"type": ["Conv2d", "Linear"]}, "demo": {"bits": 4, "rounding": "stochastic"}},
        {"match": {"name": "conv2"}, "demo": {"bits": 2}},
        {"match": {"name": "re:^fc$"}, "demo": None},
    ]}
    cm = fxcompress.compile(SmallCNN(), policy, passes=[DemoPass], dry_run=True)
    t = {e.qualname: e.treatments.get("demo") for e in cm.plan.selected_entries}
    assert t["conv1"].bits == 4 and t["conv1"].rounding == "stochastic"
    assert t["conv2"].bits == 2 and t["conv2"].rounding == "stochastic"
    assert t["fc"] is None


def test_error_lines_point_at_the_key():
    text = "version: 1\nrules:\n  - match: {type: Conv2d}\n\n    demo:\n      bits: 99\n"
    with pytest.raises(Exception) as e:
        parse_policy_text(text, "x.yaml", passes=[DemoPass])
    assert str(e.value).startswith("x.yaml:6: rules[0].demo.bits: must be in 1..16")
