"""The config schema: what every setting of a recipe may be, declared once on its dataclass field.

A recipe's config is a tree of dataclasses; each field's type annotation is its schema. The type
(``bool``, ``int``, ``float``, ``str``, a ``Literal`` of choices, ``list[...]``, a nested dataclass,
a ``[method]`` table) says what is parsed, and ``typing.Annotated`` markers add the constraints::

    steps: Count = 100                                   # an integer >= 1
    clip: Annotated[float, Range(0), Note("0: off")] = 0.0
    split: Annotated[list[Fraction], Length(3, 3)]       # three numbers in (0, 1)

Rules every field obeys without saying so: a float is finite (NaN and inf are refused), an integer
fits in 64 bits, a string holds no control characters. :func:`metaopt.run.config.from_dict` checks
all of it and raises one :class:`~metaopt.run.ConfigError` line naming the field, the value and
what it must be; a dataclass's ``validate()`` is left with the checks that relate two fields.
:func:`fields` walks the schema (for the docs and the fuzz test, which generate bad values from it).

No validation library is used: pydantic and msgspec would add a runtime dependency and their own
multi-line messages, while this vocabulary of three markers covers every field the recipes have.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

INT64 = (-(2**63), 2**63 - 1)
"""The integers a setting may hold (torch's and numpy's widest)."""


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``open_low``/``open_high``: strict), for numbers and list lengths."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def need(self) -> str:
        """``">= 1"``, ``"> 0"``, ``"in (0, 1]"``."""
        def num(v: float) -> str:
            return "2**63" if v == INT64[1] else f"{v:g}" if isinstance(v, float) else str(v)

        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.open_low else "[", ")" if self.open_high or self.high == INT64[1] else "]"
            return f"in {lo}{num(self.low)}, {num(self.high)}{hi}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {num(self.low)}"
        return f"{'<' if self.open_high else '<='} {num(self.high)}" if self.high is not None else "any value"


@dataclass(frozen=True)
class Length:
    """A list holds ``low`` to ``high`` items (``None``: no upper bound)."""

    low: int = 0
    high: int | None = None

    def holds(self, n: int) -> bool:
        return n >= self.low and (self.high is None or n <= self.high)

    def need(self) -> str:
        if self.high == self.low:
            return f"exactly {self.low} item{'s' if self.low != 1 else ''}"
        if self.high is None:
            return f"at least {self.low} item{'s' if self.low != 1 else ''}"
        return f"{self.low} to {self.high} items"


@dataclass(frozen=True)
class Note:
    """What a special value means (``"0: off"``), appended to the field's error message."""

    text: str


Count = Annotated[int, Range(1)]
"""An integer >= 1 (steps, members, ...)."""
Size = Annotated[int, Range(0)]
"""An integer >= 0 (0 usually means "all" or "off": say which with a :class:`Note`)."""
Positive = Annotated[float, Range(0, open_low=True)]
"""A finite number > 0 (learning rates, precisions, noise levels)."""
NonNegative = Annotated[float, Range(0)]
"""A finite number >= 0."""
Fraction = Annotated[float, Range(0, 1, open_low=True, open_high=True)]
"""A number in (0, 1)."""
CompileBlock = Annotated[int, Range(0, 10_000), Note("0: automatic, 5 for 100 inner steps or more of a small model, "
                                                    "else 1; 1 compiles fastest")]
"""Inner steps per compiled graph with ``compile = true`` (``metaopt.hypergradient``'s ``compile_block``)."""
Seed = Annotated[int, Range(0, 2**63 - 1)]
"""A random seed: any integer in [0, 2**63) (:func:`metaopt.data.numpy_seed` maps it for numpy)."""


def split(typ: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(base type, markers)`` of a field's annotation (``Annotated`` unwrapped, nested ones flattened)."""
    if typing.get_origin(typ) is Annotated:
        base, *markers = typing.get_args(typ)
        return base, tuple(markers)
    return typ, ()


def violation(value: Any, markers: tuple[Any, ...]) -> str | None:
    """What ``value`` (already of the field's base type) must be, if a marker refuses it; else ``None``."""
    note = next((m.text for m in markers if isinstance(m, Note)), "")
    for m in markers:
        if isinstance(m, Range) and not m.holds(value):
            return f"must be {m.need()}" + (f" ({note})" if note else "")
        if isinstance(m, Length) and not m.holds(len(value)):
            return f"must have {m.need()}" + (f" ({note})" if note else "")
    return None


def scalar_violation(value: Any, base: type) -> str | None:
    """The rules every field obeys: floats finite, integers in 64 bits, strings without control characters."""
    if base is float and not math.isfinite(value):
        return "must be a finite number"
    if base is int and not INT64[0] <= value <= INT64[1]:
        return "must fit in 64 bits (|value| < 2**63)"
    if base is str and any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not hold control characters"
    return None


@dataclass(frozen=True)
class FieldSpec:
    """One setting of a config class, as :func:`fields` finds it: its dotted ``path``, base type (for
    a list, ``list[item]`` with ``item`` the item's base type), constraints and default."""

    path: str
    type: Any
    markers: tuple[Any, ...]
    item_markers: tuple[Any, ...]
    default: Any


def fields(cls: type, prefix: str = "", defaults: Any = None) -> Iterator[FieldSpec]:
    """Every leaf setting of the config dataclass ``cls`` (nested tables walked; a ``[method]`` table
    is one leaf: its fields belong to the method named, :meth:`metaopt.hypergrad.Method.config_fields`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        base, markers = split(hints[f.name])
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(base):
            yield from fields(base, f"{prefix}{f.name}.", default)
            continue
        item_markers: tuple[Any, ...] = ()
        if typing.get_origin(base) is list:
            item, item_markers = split(typing.get_args(base)[0])
            base = list[item]
        yield FieldSpec(f"{prefix}{f.name}", base, markers, item_markers, default)
