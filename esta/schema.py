"""Declared configuration schemas: dataclasses whose fields carry their own rules.

A schema is a dataclass; each field's type annotation says what it accepts and `rule(...)` in its
metadata adds ranges:

    @dataclass
    class Evaluate:
        all: bool = True
        batch_size: int = field(default=256, metadata=rule(minimum=1))

        def __post_init__(self):
            check_fields(self, "Evaluate")

Types understood: int (not bool), float (an int is accepted and kept; never a bool or a string; finite),
bool, str, Literal[...] (the choices), Optional[X] (None allowed), List[X], Dict[str, Any], and nested
schema dataclasses (built from a dict by `from_dict`). A value of the wrong type is never converted:
"0.01" for a float field is an error naming the field, as is True for an int.

`from_dict(cls, values, where)` rejects unknown keys (listing the allowed ones), builds nested schemas,
and reports every error as a `ConfigError` whose message starts with the full key path
("config.train.base_lr: must be a finite number > 0, got '0.01' (str)").
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, Optional

__all__ = ["ConfigError", "rule", "check_fields", "from_dict", "to_dict"]


class ConfigError(ValueError):
    """A configuration value that breaks its schema. `key` is the path of the offending key (relative to
    the schema that raised it; `from_dict` prefixes its own location), `reason` the rest of the message."""

    def __init__(self, key: str, reason: str, where: str = "") -> None:
        self.key, self.reason, self.where = key, reason, where
        super().__init__(self._text())

    def _text(self) -> str:
        path = ".".join(p for p in (self.where, self.key) if p)
        return f"{path}: {self.reason}" if path else self.reason

    def located(self, where: str) -> "ConfigError":
        """The same error, its key path under `where`."""
        return ConfigError(self.key, self.reason, where)


def rule(*, minimum=None, maximum=None, exclusive_minimum: bool = False, exclusive_maximum: bool = False,
         items_minimum=None) -> Dict[str, Any]:
    """Field metadata: a numeric range (bounds inclusive unless exclusive_*), and for lists of numbers
    a minimum for every item."""
    return {"esta_rule": dict(minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                              exclusive_maximum=exclusive_maximum, items_minimum=items_minimum)}


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, typing.List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, typing.Dict):
        return "a table/object"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _range_text(r: Dict[str, Any]) -> str:
    parts = []
    if r["minimum"] is not None:
        parts.append(f"{'>' if r['exclusive_minimum'] else '>='} {r['minimum']:g}")
    if r["maximum"] is not None:
        parts.append(f"{'<' if r['exclusive_maximum'] else '<='} {r['maximum']:g}")
    return " and ".join(parts)


def _check_value(name: str, value, tp, r: Optional[Dict[str, Any]]) -> None:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_value(name, value, inner[0], r)
        raise TypeError(f"unsupported schema type {tp} for {name}")
    expected = _type_name(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(name, f"must be {expected}, got {_describe(value)}")
        return
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(name, f"must be {expected}, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)
        item_rule = None
        if r and r.get("items_minimum") is not None:
            item_rule = dict(minimum=r["items_minimum"], maximum=None, exclusive_minimum=False,
                             exclusive_maximum=False)
        for i, item in enumerate(value):
            _check_value(f"{name}[{i}]", item, item_tp, item_rule)
        return
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be {expected}, got {_describe(value)}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {_describe(value)}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer{_suffix(r)}, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a finite number{_suffix(r)}, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number{_suffix(r)}, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {_describe(value)}")
        return
    else:
        raise TypeError(f"unsupported schema type {tp} for {name}")
    if r:
        lo, hi = r["minimum"], r["maximum"]
        bad = (lo is not None and (value <= lo if r["exclusive_minimum"] else value < lo)) or \
              (hi is not None and (value >= hi if r["exclusive_maximum"] else value > hi))
        if bad:
            raise ConfigError(name, f"must be {_range_text(r)}, got {value!r}")


def _suffix(r) -> str:
    text = _range_text(r) if r else ""
    return f" {text}" if text else ""


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def check_fields(obj, where: str) -> None:
    """Checks every field of the dataclass instance `obj` against its annotation and rule; raises
    ConfigError naming `where.field`."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ConfigError(f.name, f"must be a {tp.__name__}, got {_describe(value)}", where)
            continue
        if typing.get_origin(tp) in (list, typing.List) and typing.get_args(tp) and \
                dataclasses.is_dataclass(typing.get_args(tp)[0]):
            continue  # lists of schemas are built and checked by from_dict
        try:
            _check_value(f.name, value, tp, f.metadata.get("esta_rule"))
        except ConfigError as e:
            raise e.located(where) from None


def from_dict(cls, values, where: str):
    """An instance of the schema dataclass `cls` from a dict, nested schemas included; every error a
    ConfigError whose message starts with `where.<key>`."""
    if not isinstance(values, dict):
        raise ConfigError("", f"must be a table/object, got {_describe(values)}", where)
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError("", f"unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(known))}",
                          where)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("", f"missing key(s) {', '.join(missing)}", where)
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, f"{where}.{name}")
        elif typing.get_origin(tp) in (list, typing.List) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise ConfigError(name, f"must be a list, got {_describe(value)}", where)
            item = typing.get_args(tp)[0]
            value = [from_dict(item, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.where and e.where.startswith(where):
            raise
        raise e.located(where) from None


def to_dict(obj) -> Dict[str, Any]:
    """The plain dict of a schema instance (nested schemas included): what `from_dict` reads back."""
    return dataclasses.asdict(obj)
