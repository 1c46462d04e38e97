"""YAML -> typed dataclass trees: the loader every layer's config (and the bundle contract) goes through.

Dataclasses are the schema. Unknown or missing keys and wrong types raise ConfigError naming the dotted key;
a dataclass may declare ``OTHER_LAYER_SECTIONS`` (names or fnmatch patterns) whose keys it carries raw in
its ``other`` field for the layer that owns them. ``--set dotted.key=value`` overrides are applied to the
raw mapping first.

Why not pydantic for the loading: besides coercion this loader carries other layers' sections through at
any depth (the bundle contract uses that too), accepts tuples whose trailing entries are optional and words
its errors as one line naming the dotted key; pydantic would need a pre-walk of the same type tree for
those. Pydantic does give the JSON Schema: ``scripts/config_schema.py`` writes ``docs/config.schema.json``
from these same dataclasses for editors, and a test keeps it current.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value a user got wrong; the message names it."""


_EXPONENT_ONLY = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, label: str = "config") -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # An argument the value already is goes first, so `str | int` keeps 1651334400000 an int.
        exact = [a for a in args if isinstance(a, type) and type(value) is a]
        for arg in exact + [a for a in args if a not in exact]:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, label)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]", label) for i, v in enumerate(value)]
    if origin is tuple:
        # A fixed-length list, one type per position; trailing optional entries may be left out.
        args = get_args(tp)
        required = len(args)
        while required and type(None) in get_args(args[required - 1]):
            required -= 1
        if not isinstance(value, list) or not required <= len(value) <= len(args):
            got = f"{len(value)} entries" if isinstance(value, list) else repr(value)
            raise ConfigError(f"{where}: expected a list of {required} to {len(args)} entries, got {got}")
        padded = value + [None] * (len(args) - len(value))
        return tuple(_coerce(v, a, f"{where}[{i}]", label) for i, (v, a) in enumerate(zip(padded, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp)
        return {_coerce(k, key_tp, where, label): _coerce(v, val_tp, f"{where}.{k}", label) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, label)
    if tp is float:
        if isinstance(value, str) and _EXPONENT_ONLY.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads `1e-5` as a string: a float needs a dot there (`1.0e-5`).
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type[T], data: Any, where: str = "", label: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown or missing keys and wrong types raise ConfigError naming
    them (``label`` says what the keys are of: "unknown config key 'data.dri'")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or label}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # Names (or fnmatch patterns) of keys another layer owns: kept raw in ``other``, not checked here.
    other_sections = getattr(cls, "OTHER_LAYER_SECTIONS", frozenset())
    kwargs: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key in fields and key != "other":
            kwargs[key] = _coerce(value, hints[key], dotted, label)
        elif "other" in fields and any(fnmatch.fnmatchcase(str(key), p) for p in other_sections):
            other[key] = value
        else:
            known = sorted(k for k in fields if k != "other")
            raise ConfigError(f"unknown {label} key '{dotted}'; known keys here: {known}")
    missing = [n for n, f in fields.items() if n not in kwargs and n != "other"
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing {label} key '{f'{where}.{missing[0]}' if where else missing[0]}'")
    if other:
        kwargs["other"] = other
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready form of a config (sections of other layers merged back in)."""
    if dataclasses.is_dataclass(cfg):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "other"}
        out.update(getattr(cfg, "other", {}) or {})
        return out
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, tuple):  # trailing None entries are optional ones left out (see _coerce)
        items = list(cfg)
        while items and items[-1] is None:
            items.pop()
        return [to_dict(v) for v in items]
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects dotted.key=value, got '{text}'")
    if not raw.strip():
        return key.split("."), ""
    if raw.strip()[0] in "|>":  # a YAML block scalar cannot sit on one line: `sep=|` means the text
        return key.split("."), raw.strip()
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. `sep=|`: not YAML, so the text itself
        return key.split("."), raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return apply_overrides(raw, overrides or [])
