"""YAML configs for both tools: YAML-1.2 scalars, ``--set key=value`` overrides, typed dataclass coercion.

Both ``olacache build --config`` and ``olatrain run`` read their files here, so a value means the same thing
in either: ``1e-3`` is a float, only true/false are booleans (``on`` stays the string "on"), and every value is
checked against its dataclass field's type, with errors that name the key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file or key and what is expected."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars where PyYAML's YAML 1.1 rules bite configs:

    - ``1e-3`` is a float (1.1 needs a dot, ``1.0e-3``; ``1e-3`` was the STRING '1e-3' and reached the optimizer
      as lr='1e-3');
    - only true/false are booleans (1.1 also turns on/off/yes/no into booleans, so ``grad_checkpointing: on``
      became True, which is neither "on" nor "auto": gradient checkpointing was silently off)."""


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with YAML 1.2 scalars. A syntax error is a ConfigError naming ``source``, the line and
    the column (no PyYAML traceback)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def load_yaml_file(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read {what} file: {e}") from None
    data = load_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of options, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: 1e-3, true, [8, 20], {depth: 0.5}, none."""
    if text.lower() in ("none", "null"):
        return None
    return load_yaml(text, f"value {text!r}")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment; use dotted names like train.lr=1e-3")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p!r} was already set to a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, mappings merged key by key (recursively); inputs are not modified."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with every value checked against its field's type (nested dataclass fields from
    mappings); unknown and missing keys are ConfigErrors naming ``where``."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {sorted(unknown)}; valid: {sorted(names)}")
    missing = [
        n for n, f in names.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        hint = hints[k]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.{k} must be a mapping")
            kwargs[k] = build_dataclass(hint, v, f"{where}.{k}")
        else:
            kwargs[k] = coerce(v, hint, f"{where}.{k}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a value against its field's annotation; convert the lossless cases (int -> float, an integral
    float -> int, list -> tuple, a numeric string for a float such as '1e-3' from YAML 1.1). A wrong type is a
    ConfigError naming the key here, not a TypeError from deep inside the optimizer or the data pipeline."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return coerce(value, rest[0], where) if len(rest) == 1 else value

    def bad() -> ConfigError:
        return ConfigError(f"{where} must be {getattr(hint, '__name__', None) or hint}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if hint is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # a YAML 1.1 on/off that became a bool (e.g. configs saved in checkpoints)
            return "on" if value else "off"
        if isinstance(value, (int, float)):
            return str(value)  # e.g. a numeric-looking path or name
        raise bad()
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise bad()
        if args and args[-1] is not Ellipsis:
            return tuple(coerce(x, a, f"{where}[{i}]") for i, (x, a) in enumerate(zip(value, args, strict=True)))
        return tuple(value)
    return value
