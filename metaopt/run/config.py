"""Configs: TOML (stdlib ``tomllib``) and ``--set a.b=value`` overrides into typed dataclasses.

A recipe's config is a (nested) dataclass. Every error names the field, the bad value, what is
allowed and, for a typo, the closest key — a :class:`ConfigError`, which the CLI prints in one or
two lines with exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used, with a message that says how to fix it."""


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(options))}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(path: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (bool/int/float/str, Literal, Optional, list[...] and nested dataclasses)."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of settings, got {value!r}")
        return from_dict(typ, value, prefix=f"{path}.")
    if origin is typing.Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{path} = {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{path} = {value!r} must be a list")
        return [_convert(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path} = {value!r} must be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} = {value!r} must be a string")
    raise ConfigError(f"{path}: unsupported setting type {typ!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; keys not given keep their defaults."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {prefix}{key!r}{_suggest(key, list(fields))}")
        kwargs[key] = _convert(f"{prefix}{key}", value, hints[key])
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (tables merge, values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str, cls: type) -> dict[str, Any]:
    """``"a.b=value"`` as a nested dict, the value converted to the field's type (TOML syntax
    accepted for lists and strings: ``a.sizes=[2, 10, 1]``, ``a.name="x"``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: use key=value, e.g. --set outer.steps=100")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    typ: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a table")
        names = [f.name for f in dataclasses.fields(typ)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"--set {key}: {where} has no setting {part!r}{_suggest(part, names)}")
        typ = _hints(typ)[part]
    value = _literal(raw.strip(), typ)
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _literal(raw: str, typ: Any) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: a string (the type check then says whether one is allowed)


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def dumps_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for resolved configs (tables, scalars, lists of scalars)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for k, v in table.items():
            if isinstance(v, dict):
                raise ConfigError(f"config nesting deeper than one table is not supported ({name}.{k})")
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def check_method(field: str, name: str, steps: int | None = None, settings: Any = None) -> None:
    """A config's hypergradient method: a name in the one name table (:func:`metaopt.hypergrad.names`),
    or a ConfigError naming ``field`` and the choices; with ``steps``, the method must also be
    buildable from ``settings`` (a :class:`metaopt.hypergrad.Settings`) for that many inner steps."""
    from ..hypergrad import as_method, names

    if name not in names():
        hint = "; 'greedy' is now 'truncated' with truncate = 1" if name == "greedy" else ""
        raise ConfigError(f"{field} = {name!r} is not a hypergradient method; use one of {', '.join(names())}{hint}")
    if steps is not None:
        try:
            as_method(name, steps, settings).validate(steps)
        except ValueError as e:
            raise ConfigError(f"{field} = {name!r}: {e}") from None
