"""Config dataclasses: typed, allow-listed loading from plain dicts.

Each treatment (one per pass) and each top-level policy section is a
dataclass. `from_dict` accepts only the dataclass's own fields, checks each
value against the field's annotation and then calls the class's `check()`
for ranges, so a policy never reaches a pass half-validated.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Literal, Optional, Union, get_args, get_origin

from .errors import BadInput, closest


class ConfigError(BadInput, ValueError):
    """A bad value in a config: `field` is the key inside the section (or
    the flag or argument a bit width came from, see check_bits). Outside a
    policy, where nothing adds a file and line, it is bad input as it is."""

    def __init__(self, field: str, message: str, suggestion: Optional[str] = None):
        self.field, self.message, self.suggestion = field, message, suggestion
        super().__init__(f"{field}: {message}")


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, typing.List):
        return "a list"
    if origin in (dict, typing.Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(field: str, tp, value):
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(field, a, value)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = closest(str(value), [str(c) for c in choices])
            raise ConfigError(field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}", hint)
        return value
    if origin in (list, typing.List):
        (inner,) = get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and inner is not Any:
            value = [value]  # a single item where a list is expected is a list of one
        if not isinstance(value, list):
            raise ConfigError(field, f"expected a list, got {value!r}")
        return [_coerce(f"{field}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(field, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=field + ".")
    return value


def field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def from_dict(cls, data: Optional[Dict[str, Any]], prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(prefix + str(key), "unknown key; valid keys: " + ", ".join(names),
                              closest(str(key), names))
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(prefix + e.field, e.message, e.suggestion) from None
    return obj


def to_dict(obj) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(obj).items() if not k.startswith("_")}


def check_range(field: str, value, lo, hi, why: str = ""):
    if value is not None and not (lo <= value <= hi):
        raise ConfigError(field, f"must be in {lo}..{hi}, got {value}" + (f" ({why})" if why else ""))


def check_bits(field: str, bits, lo: int, hi: int, why: str = "") -> int:
    """The one bit-width check (policies, kernels, quantize, wire codes):
    `bits` must be an integer (not a bool) in lo..hi; returns it."""
    tail = f" ({why})" if why else ""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(field, f"must be an integer in {lo}..{hi}, got {bits!r}{tail}")
    if not lo <= bits <= hi:
        raise ConfigError(field, f"must be in {lo}..{hi}, got {bits}{tail}")
    return bits
