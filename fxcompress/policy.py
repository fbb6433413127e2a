"""The policy file: YAML schema version 1, parsed into dataclasses.

```yaml
version: 1
trace: {leaf_modules: [], concrete_args: {}, auto_leaf: true}
rules:
  - match: {name: "layer*.*", type: Conv2d, op: add}   # all keys must hold
    optional: false          # a rule whose treatments apply nowhere is an error
    <treatment>: {...}       # a pass's key (see fxcompress/passes), or null
schedule: {<treatment>: {...}}   # per pass: its schedule_config
settings: {<treatment>: {...}}   # per pass: its settings_config (pass-wide)
communication: {method: alq, bits: 3}
```

Which treatments exist is not known here: the caller hands in the pass
list (`passes`, resolved once by compile() or a command) and each pass's
dataclasses validate its own rule fields, schedule and settings.

Values are read with `yaml.safe_load`; a second walk over `yaml.compose`
records the line of every key so errors can point at it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .config import ConfigError, field_names, from_dict
from .errors import PolicyError, closest

SCHEMA_VERSION = 1

Path = Tuple[Union[str, int], ...]


@dataclass
class TraceConfig:
    leaf_modules: List[str] = field(default_factory=list)
    concrete_args: Dict[str, Any] = field(default_factory=dict)
    auto_leaf: bool = True


# Top-level sections besides `version`, `trace` and `rules`, loaded lazily so
# that reading a policy does not import every method's package.
SECTIONS = {
    "trace": "fxcompress.policy:TraceConfig",
    "communication": "fxcompress.distributed.config:CommunicationConfig",
}
TOP_KEYS = ["version", "trace", "rules", "schedule", "settings", "communication"]
MATCH_KEYS = ["name", "type", "op"]


@dataclass
class Match:
    name: List[str] = field(default_factory=list)
    type: List[str] = field(default_factory=list)
    op: List[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{k}={'|'.join(getattr(self, k))}" for k in MATCH_KEYS if getattr(self, k)]
        return ", ".join(parts) or "everything"


@dataclass
class Rule:
    index: int
    match: Match
    #: treatment key -> dict of fields (validated), or None to opt out
    treatments: Dict[str, Optional[Dict[str, Any]]]
    optional: bool = False
    line: Optional[int] = None


@dataclass
class Policy:
    version: int = SCHEMA_VERSION
    trace: TraceConfig = field(default_factory=TraceConfig)
    rules: List[Rule] = field(default_factory=list)
    #: treatment key -> its pass's schedule_config instance (only keys the policy schedules)
    schedule: Dict[str, Any] = field(default_factory=dict)
    #: treatment key -> its pass's settings_config instance (defaults when the section is absent)
    settings: Dict[str, Any] = field(default_factory=dict)
    #: the pass list the policy was validated against
    passes: Tuple[type, ...] = ()
    raw: Dict[str, Any] = field(default_factory=dict)
    file: Optional[str] = None
    lines: Dict[Path, int] = field(default_factory=dict, repr=False)
    _sections: Dict[str, Any] = field(default_factory=dict, repr=False)

    def section(self, name: str):
        """A parsed top-level section (dataclass), or None when absent."""
        return self._sections.get(name)

    def line_of(self, path: Path) -> Optional[int]:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, message: str, path: Path, suggestion: Optional[str] = None) -> PolicyError:
        return PolicyError(message, self.file or "<policy>", self.line_of(path), _key(path), suggestion)


def _key(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def treatment_keys(passes: Sequence[type]) -> Dict[str, type]:
    """Policy key -> config dataclass, from the given passes."""
    return {p.key: p.config for p in passes if p.key}


def _load_class(ref: str):
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


def _line_map(node, path: Path, out: Dict[Path, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out)


def _as_list(value, what: str, policy: Policy, path: Path) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise policy.error(f"{what} must be a string or a list of strings, got {value!r}", path)


def _check_pattern(pat: str, policy: Policy, path: Path) -> None:
    if pat.startswith("re:"):
        try:
            re.compile(pat[3:])
        except re.error as e:
            raise policy.error(f"bad regular expression {pat[3:]!r}: {e}", path) from None


def parse_policy(data: Any, file: Optional[str] = None, lines: Optional[Dict[Path, int]] = None, *,
                 passes: Sequence[type]) -> Policy:
    """Validate `data` (a policy as plain values) against the treatments,
    schedules and settings of `passes`."""
    passes = tuple(passes)
    policy = Policy(file=file, lines=lines or {}, raw=data if isinstance(data, dict) else {}, passes=passes)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise policy.error(f"a policy is a mapping of {', '.join(TOP_KEYS)}; got {type(data).__name__}", ())
    for key in data:
        if key not in TOP_KEYS:
            raise policy.error("unknown top-level key", (key,), closest(str(key), TOP_KEYS))
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise policy.error(f"unsupported policy version {version!r}; this fxcompress reads version {SCHEMA_VERSION}",
                           ("version",))
    policy.version = version
    for name, ref in SECTIONS.items():
        if data.get(name) is not None:
            policy._sections[name] = _parse_section(policy, name, _load_class(ref), data[name])
    policy.trace = policy._sections.get("trace") or TraceConfig()
    keys = treatment_keys(passes)
    policy.schedule = _parse_per_pass(policy, "schedule", data.get("schedule"), passes)
    policy.settings = _parse_per_pass(policy, "settings", data.get("settings"), passes)
    rules = data.get("rules", [])
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise policy.error("rules must be a list of rules", ("rules",))
    policy.rules = [_parse_rule(policy, i, r, keys) for i, r in enumerate(rules)]
    return policy


def _load_config(policy: Policy, cls, value, path: Path):
    """`from_dict`, with a bad field reported at its own key and line."""
    try:
        return from_dict(cls, value)
    except ConfigError as e:
        field_path = tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]", e.field) if p)
        raise policy.error(e.message, path + field_path, e.suggestion) from None


def _parse_section(policy: Policy, name: str, cls, value):
    return _load_config(policy, cls, value, (name,))


#: policy section -> the Pass attribute naming the dataclass that validates it
PER_PASS = {"schedule": "schedule_config", "settings": "settings_config"}


def _parse_per_pass(policy: Policy, section: str, value, passes: Tuple[type, ...]) -> Dict[str, Any]:
    """`schedule:` or `settings:`: treatment key -> that pass's dataclass.

    Settings get their defaults for every pass that declares a
    settings_config, so a pass always receives an instance; a schedule is
    present only where the policy writes one (its absence means "no
    schedule", not "the default schedule")."""
    attr = PER_PASS[section]
    owners = {p.key: getattr(p, attr) for p in passes if p.key}
    if value is not None and not isinstance(value, dict):
        raise policy.error(f"{section} must be a mapping of treatment -> {section}", (section,))
    out: Dict[str, Any] = {}
    for key, body in (value or {}).items():
        if key not in owners:
            raise policy.error("unknown treatment", (section, key),
                               closest(str(key), [k for k, c in owners.items() if c is not None])
                               or closest(str(key), list(owners)))
        cls = owners[key]
        if cls is None:
            takes = [k for k, c in owners.items() if c is not None]
            raise policy.error(f"treatment '{key}' takes no {section}"
                               + (f" (these do: {', '.join(takes)})" if takes else ""), (section, key))
        out[key] = _load_config(policy, cls, body, (section, key))
    if section == "settings":
        for key, cls in owners.items():
            if cls is not None and key not in out:
                out[key] = _load_config(policy, cls, {}, (section,))
    return out


def _moved_field(policy: Policy, key: str, fields: Dict[str, Any], path: Path) -> None:
    """A field written in a rule that belongs to the pass's schedule or
    settings section (a pass-wide value: one node's cannot decide it)."""
    owner = next((p for p in policy.passes if p.key == key), None)
    rule_fields = set(field_names(owner.config)) if owner is not None and owner.config else set()
    for section, attr in PER_PASS.items():
        cls = getattr(owner, attr, None)
        if cls is None:
            continue
        for name in field_names(cls):
            if name in fields and name not in rule_fields:
                raise policy.error(f"'{name}' holds for the whole pass, not per node: write it once under "
                                   f"'{section}: {{{key}: {{{name}: ...}}}}' instead of in a rule",
                                   path + (name,))


def _parse_rule(policy: Policy, i: int, rule, keys: Dict[str, type]) -> Rule:
    path: Path = ("rules", i)
    if not isinstance(rule, dict):
        raise policy.error("a rule is a mapping with 'match' and treatments", path)
    match_data = rule.get("match")
    if match_data is None:
        raise policy.error("a rule needs 'match' (name, type and/or op)", path)
    if not isinstance(match_data, dict):
        raise policy.error("match must be a mapping of name/type/op", path + ("match",))
    match = Match()
    for k, v in match_data.items():
        if k not in MATCH_KEYS:
            raise policy.error("unknown match key", path + ("match", k), closest(str(k), MATCH_KEYS))
        values = _as_list(v, f"match.{k}", policy, path + ("match", k))
        if k == "name":
            for pat in values:
                _check_pattern(pat, policy, path + ("match", k))
        setattr(match, k, values)
    optional = rule.get("optional", False)
    if not isinstance(optional, bool):
        raise policy.error(f"optional must be true or false, got {optional!r}", path + ("optional",))
    treatments: Dict[str, Optional[Dict[str, Any]]] = {}
    for k, v in rule.items():
        if k in ("match", "optional"):
            continue
        if k not in keys:
            raise policy.error("unknown rule key (not a treatment)", path + (k,),
                               closest(str(k), list(keys) + ["match", "optional"]))
        if v is None:
            treatments[k] = None
            continue
        if not isinstance(v, dict):
            raise policy.error(f"a treatment's settings are a mapping (or null to opt out), got {v!r}", path + (k,))
        _moved_field(policy, k, v, path + (k,))
        # Checked now (types, ranges, defaults for the rest) so the error
        # points at the rule that wrote the bad value.
        _load_config(policy, keys[k], v, path + (k,))
        treatments[k] = dict(v)
    if not treatments:
        # A rule without a treatment does nothing; it is almost always a
        # treatment key left out or mis-indented under `match`.
        known = ", ".join(keys) or "none in this pass list"
        raise policy.error(f"rule carries no treatment: give one ({known}), or opt out with '<treatment>: null'",
                           path)
    return Rule(index=i, match=match, treatments=treatments, optional=optional, line=policy.line_of(path))


def build_config(policy: Policy, key: str, cls, values: Dict[str, Any], rule: Rule):
    """The merged fields of several rules, as the treatment's dataclass."""
    try:
        return from_dict(cls, values)
    except ConfigError as e:
        raise policy.error(e.message + " (after merging the rules that match this node)",
                           ("rules", rule.index, key, e.field)) from None


def load_policy(source: Union[str, os.PathLike, Dict[str, Any], Policy, None], passes: Sequence[type]) -> Policy:
    """A Policy from a YAML path, a dict of the same shape, or None (empty),
    validated against `passes`. A Policy validated against another pass
    list is validated again (from its raw values) against this one."""
    passes = tuple(passes)
    if isinstance(source, Policy):
        if source.passes == passes:
            return source
        return parse_policy(source.raw, source.file, source.lines, passes=passes)
    if source is None:
        return parse_policy({}, passes=passes)
    if isinstance(source, dict):
        return parse_policy(source, passes=passes)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PolicyError("policy file not found", path) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read the policy file: {e}", path) from None
    return parse_policy_text(text, path, passes=passes)


def parse_policy_text(text: str, file: str = "<policy>", *, passes: Sequence[type]) -> Policy:
    try:
        data = yaml.safe_load(text)
        lines: Dict[Path, int] = {}
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _line_map(node, (), lines)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyError(f"not valid YAML: {problem}", file, mark.line + 1 if mark else None) from None
    if data is None or (isinstance(data, dict) and all(k == "version" for k in data)):
        # An empty file (or one with only comments or a version) is more
        # likely a wrong path or an unsaved editor buffer than a policy.
        raise PolicyError("the policy is empty: write 'rules:' with at least one rule "
                          "(a policy that treats nothing says 'rules: []')", file, 1)
    return parse_policy(data, file, lines, passes=passes)
