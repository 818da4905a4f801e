"""Configs: TOML (stdlib ``tomllib``) and ``--set a.b=value`` overrides into typed dataclasses.

A recipe's config is a (nested) dataclass. Every error names the field, the bad value, what is
allowed and, for a typo, the closest key — a :class:`ConfigError`, which the CLI prints in one or
two lines with exit code 2.

Every recipe has one ``[method]`` table (a :class:`MethodTable` field): the hypergradient method's
``name`` and that method class's own fields, checked by the class
(:meth:`metaopt.hypergrad.Method.from_config`); :func:`check_method` builds it for the recipe's
inner steps and refuses a method the recipe's inner problem cannot use. A key that moved (``hpo.method``
is now ``method.name``) is named by the dataclass's ``MOVED`` table and refused with what to write.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

from . import schema

if TYPE_CHECKING:
    from ..hypergrad import Method
    from ..optim.base import Optimizer

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used, with a message that says how to fix it."""


class MethodTable(dict):
    """A ``[method]`` table: ``{"name": registered method, **that method's fields}`` (a dict, so it
    is written to and read from TOML as any table). In a config dataclass::

        method: MethodTable = method_table("checkpointed")

    A bare string is accepted for a table with a name alone (``method = "full"``). The field's
    default is the base layer, as a preset is: a table naming the same method changes only the fields
    it gives, one naming another method starts from that method's own defaults (:func:`merge`).
    Checked on parsing (the name, the fields and their types); the ranges that depend on the inner
    steps are checked by :func:`check_method` in the recipe's ``validate``."""


def method_table(name: str, **fields: Any) -> Any:
    """A dataclass field whose default is the ``[method]`` table ``name`` with ``fields``."""
    return dataclasses.field(default_factory=lambda: MethodTable(name=name, **fields))


def _method_table(path: str, value: Any) -> MethodTable:
    """``value`` (a table, or a name) as a checked :class:`MethodTable` (name first, fields as given,
    converted to their types)."""
    from ..hypergrad.methods import MethodConfigError, entry

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a table with a name (e.g. {{name = \"full\"}}), got {value!r}")
    try:
        if "name" not in value:
            raise MethodConfigError("method.name is missing: name the hypergradient method (e.g. method.name = "
                                    "\"full\"; metaopt.hypergrad.names() lists them)")
        e = entry(value["name"])
        method = e.from_config(value)  # names and types (the ranges need the steps: check_method)
    except MethodConfigError as err:
        raise ConfigError(_at(str(err), path)) from None
    # each field as the class converted it (e.g. Full's max_memory = "512MB" as bytes)
    return MethodTable(name=value["name"], **{k: getattr(method, k) for k in value if k != "name"})


def _at(message: str, path: str) -> str:
    """A method's message (``method.<field> ...``) for the table at ``path`` (e.g. ``l2.compare[1]``)."""
    return message if path == "method" else message.replace("method.", f"{path}.", 1)


def _moved(cls: type, key: str, prefix: str, value: Any) -> ConfigError | None:
    """The error for a key that moved, if it did: ``cls.MOVED[key]`` says what to write instead, with
    ``{value}`` replaced by the value given (so the line is what to type)."""
    hint = getattr(cls, "MOVED", {}).get(key)
    if not hint:
        return None
    return ConfigError(f"{prefix}{key} is gone: " + hint.format(value=str(value).strip().strip("'\"")))


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(options))}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _convert(path: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (bool/int/float/str, Literal, Optional, list[...], nested dataclasses and
    their :mod:`~metaopt.run.schema` constraints), or a :class:`ConfigError` naming ``path``."""
    typ, markers = schema.split(typ)
    value = _as_type(path, value, typ)
    need = schema.violation(value, markers) or (schema.scalar_violation(value, typ) if typ in (int, float, str)
                                                else None)
    if need:
        raise ConfigError(f"{path} = {value!r} {need}")
    return value


def _as_type(path: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is MethodTable:
        return _method_table(path, value)
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
            unknown = ConfigError(f"unknown setting {prefix + key!r}{_suggest(key, list(fields))}")
            raise _moved(cls, key, prefix, value) or unknown
        default = fields[key].default_factory
        if hints[key] is MethodTable and default is not dataclasses.MISSING:  # the recipe's table is the base
            value = merge({"method": default()}, {"method": {"name": value} if isinstance(value, str) else value})
            value = value["method"]
        kwargs[key] = _convert(f"{prefix}{key}", value, hints[key])
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (tables merge, values replace). A ``[method]`` table that names another
    method replaces the one before it (whose fields belong to the method it named)."""
    out = dict(base)
    for k, v in over.items():
        old = out.get(k)
        renamed = (k == "method" and isinstance(v, dict) and isinstance(old, dict) and "name" in v and "name" in old
                   and v["name"] != old["name"])
        out[k] = merge(old, v) if isinstance(v, dict) and isinstance(old, dict) and not renamed else v
    return out


def parse_override(text: str, cls: type) -> dict[str, Any]:
    """``"a.b=value"`` as a nested dict, the value converted to the field's type (TOML syntax
    accepted for lists and strings: ``a.sizes=[2, 10, 1]``, ``a.name="x"``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: use key=value, e.g. --set outer.steps=100")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: the key {key.strip()!r} has an empty part; write table.key=value, "
                          "e.g. --set outer.steps=100")
    typ: Any = cls
    for i, part in enumerate(parts):
        if typ is MethodTable and i == len(parts) - 1:  # method.<field>: the method class checks it
            typ = Any
            break
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a table")
        names = [f.name for f in dataclasses.fields(typ)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            moved = _moved(typ, part, ".".join(parts[:i]) + "." if i else "", raw)
            raise moved or ConfigError(f"--set {key}: {where} has no setting {part!r}{_suggest(part, names)}")
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
    if not str(path).strip():
        raise ConfigError("--config is empty: give the path of a .toml file")
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a file; give the path of a .toml file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
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
    if isinstance(v, dict):  # an inline table (a list of [method] tables)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def check_method(table: Mapping[str, Any], steps: int, *, where: str = "method", stationary: bool = True,
                 why: str = "", optimizer: Optimizer | None = None) -> Method:
    """The method of a recipe's ``[method]`` table (``where``: its path, for messages), built by its
    class for ``steps`` inner steps, or a one-line :class:`ConfigError` naming the field and the fix.

    Refuses before any run what the recipe's inner problem cannot use: an implicit method
    (``reference == "stationary"``) when ``stationary`` is false (``why`` says why the inner problem
    has no stationary point to differentiate), and a method that cannot run ``optimizer`` (its
    ``skip_reason``, e.g. reversible without heavy-ball momentum)."""
    from ..hypergrad.methods import MethodConfigError, entry, registered

    table = _method_table(where, table)
    try:
        method = entry(table["name"]).from_config(table, steps)
    except MethodConfigError as e:
        raise ConfigError(_at(str(e), where)) from None
    name = table["name"]
    if not stationary and method.reference == "stationary":
        usable = [n for n, e in registered().items() if e.cls.reference != "stationary"]
        raise ConfigError(f"{where}.name = {name!r} is implicit (it differentiates an inner stationary point), but "
                          f"{why}; use one of {', '.join(usable)}")
    reason = method.skip_reason(optimizer, 0) if optimizer is not None else None
    if reason:
        raise ConfigError(f"{where}.name = {name!r} cannot run this recipe's inner optimizer: {reason}")
    return method


def build_method(table: Mapping[str, Any], steps: int, seed: int = 0) -> Method:
    """The method object a task runs (one per run: a stateful method keeps its state in it) from its
    checked ``[method]`` table; a method with a ``seed`` field that the table leaves unset gets
    ``seed`` (the run's)."""
    from ..hypergrad.methods import entry

    e = entry(table["name"])
    if "seed" in e.fields() and "seed" not in table:
        table = {**table, "seed": seed}
    return e.from_config(table, steps)
