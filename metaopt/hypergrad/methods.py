"""The hypergradient method protocol and the one name table of the package.

A method is an object with a ``name``, a ``supports_compile`` flag, ``validate(steps)`` and
``run(problem, params0, outer) -> Sweep``; :func:`metaopt.hypergradient` validates, builds the
:class:`~metaopt.hypergrad.problem.Problem` (the objective, optimizer, hyperparameters and the
pre-drawn data) and calls ``run``. Methods differ only in how they get the inner trajectory back for
the reverse sweep (or avoid it).

This module is the protocol and the name table only: it imports no method. The built-ins are
registered by :mod:`metaopt.hypergrad.builtins` (imported by the package); the CLI, the recipes'
``[method]`` tables and :func:`metaopt.hypergrad.check` read the table and no other. A method is
configured by its own dataclass fields (:meth:`Method.from_config`: a config's ``[method]`` table is
``name`` plus those fields) and carries its state between calls explicitly
(:meth:`Method.state_dict` / :meth:`Method.load_state_dict`, checkpointed by the runner). A new
method is one class::

    @register
    @dataclass(frozen=True)
    class Mine(Method):
        name: ClassVar[str] = "mine"
        reference: ClassVar[str] = "unrolled"

        def run(self, problem, params0, outer):
            ...  # problem.advance / record / sweep, outer_partials
            return Sweep(loss, params, grads, adjoint, problem.meter.peak)

        def peak_bound(self, steps, state_bytes, step_bytes, n_hyper):
            return steps * step_bytes + state_bytes

and ``tests/test_method_contract.py`` checks it against finite differences and its memory claim.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from torch import Tensor

from ..optim.base import Optimizer, Params, State

if TYPE_CHECKING:
    from .problem import Problem

Reference = Literal["unrolled", "truncated", "random_truncated", "straight_line", "stationary", "smoothed"]


@dataclass
class Sweep:
    """What a method's ``run`` returns.

    Attributes:
        loss: the outer loss ``F`` (0-d, detached).
        params: the final inner params ``{name: tensor}`` (detached).
        grads: ``dF/dh`` accumulated by the sweep, shaped like ``hyper``.
        adjoint: the adjoint of the initial inner state (flattened ``(params0, state0)``), which
            :func:`metaopt.hypergradient` pulls back through ``init_params`` when it depends on ``h``
            (a meta-learned initialisation); ``None`` when the method does not reach step 0 or
            differentiated the initialisation itself.
        peak_bytes: peak bytes of the stored trajectory (the method's memory, as metered).
        extras: method-specific diagnostics (a solver's report, reversal exactness, ...).
        state: the final inner state beside ``params`` (optimizer slots and the buffers slot, as the
            steps return it); ``None``: the method does not return it (then the result has no ``final``).
        end: the local step index of the final state when it is not ``problem.steps`` (random
            truncation stops at its drawn ``t``).
    """

    loss: Tensor
    params: Params
    grads: dict[str, Tensor]
    adjoint: list[Tensor] | None
    peak_bytes: int
    extras: dict[str, Any] = field(default_factory=dict)
    state: State | None = None
    end: int | None = None


class Method(ABC):
    """The base of every hypergradient method (frozen dataclasses, except stateful ones like HOAG).

    Class attributes:
        name: the registered name (configs, the CLI, result rows).
        supports_compile: whether ``compile=True`` applies (the inner steps run ``torch.compile``d).
        supports_create_graph: whether ``create_graph=True`` applies (the hypergradient comes back
            differentiable, for a level above) and the method can run a :class:`metaopt.Level`.
        supports_autocast: whether ``autocast=`` applies (its inner steps all go through
            :class:`~metaopt.hypergrad.problem.Problem`'s ``one``/``advance``/``record``).
        supports_start: whether ``start=`` applies (the run continues a given
            :class:`~metaopt.hypergrad.result.InnerState`: its inner steps all go through
            :class:`~metaopt.hypergrad.problem.Problem`, which offsets the step index, and it starts
            from ``problem.init_state``).
        reference: which function's gradient the method returns, for the contract tests:
            ``"unrolled"`` — ``F(h)`` after the ``n`` inner steps, exactly;
            ``"truncated"`` — the same with ``h`` held fixed in the first ``n - k`` steps (biased);
            ``"random_truncated"`` — ``F`` after a drawn ``t <= n`` steps (``extras["t"]``) with ``h``
            held fixed in the steps before ``t - W`` (biased);
            ``"straight_line"`` — exact when the inner trajectory is a straight line traversed at
            constant speed, approximate otherwise (DrMAD);
            ``"stationary"`` — ``F`` at the inner stationary point (implicit differentiation);
            ``"smoothed"`` — an unbiased Monte Carlo estimate of the gradient of a Gaussian-smoothed
            ``F`` (zero-order ES/PES), ``O(sigma^2)`` from ``dF/dh``, with its standard error per
            element in ``extras["stderr"]``: the contract compares it with the full unroll within a
            few standard errors (a fixed seed and enough particles), not to round-off.

    Examples:
        A method is a (frozen dataclass) subclass with a ``name`` and a ``run``; :func:`register`
        adds it to the name table, and then every entry point takes it by name. This one runs the full
        unroll and reports how many inner steps it recorded:

        >>> import torch, metaopt
        >>> from dataclasses import dataclass
        >>> from typing import ClassVar
        >>> from metaopt import hypergrad as hg, optim
        >>> @dataclass(frozen=True)
        ... class Counted(hg.Method):
        ...     name: ClassVar[str] = "counted"
        ...     def run(self, problem, params0, outer):
        ...         sweep = hg.Full().run(problem, params0, outer)
        ...         sweep.extras["recorded_steps"] = problem.steps
        ...         return sweep
        >>> _ = hg.register(Counted)
        >>> "counted" in hg.names(), hg.as_method("counted", 5)
        (True, Counted())
        >>> class Quadratic(metaopt.MetaObjective):  # inner: (w - h)^2; outer: w^2
        ...     def init_params(self, hyper, generator):
        ...         return {"w": torch.zeros((), dtype=torch.float64)}
        ...     def inner_loss(self, params, hyper, k, batch):
        ...         return (params["w"] - hyper["h"]) ** 2
        ...     def outer_loss(self, params, hyper, batch):
        ...         return params["w"] ** 2
        >>> hyper = {"h": torch.tensor(1.0, dtype=torch.float64)}
        >>> res = metaopt.hypergradient(Quadratic(), optim.sgd(lr=0.25), hyper, 5, method="counted")
        >>> res.method, res.extras["recorded_steps"]
        ('counted', 5)
        >>> round(res.grads["h"].item(), 9), 2 * (1 - 0.5**5) ** 2  # w_n = (1 - 2^-n) h: dF/dh in closed form
        (1.876953125, 1.876953125)
        >>> hg.unregister("counted")
        >>> "counted" in hg.names()
        False
    """

    name: ClassVar[str]
    supports_compile: ClassVar[bool] = False
    supports_create_graph: ClassVar[bool] = False
    supports_autocast: ClassVar[bool] = False
    supports_start: ClassVar[bool] = False
    reference: ClassVar[Reference] = "unrolled"

    def validate(self, steps: int) -> None:  # noqa: B027 (a documented no-op default)
        """Raise ``ValueError`` naming the setting and the fix if the method cannot run ``steps``
        inner steps as configured. Default: any ``steps >= 1`` will do."""

    @abstractmethod
    def run(self, problem: Problem, params0: Params, outer: Any) -> Sweep:
        """Run the inner problem from ``params0`` and its reverse sweep (or what replaces it);
        ``outer`` is the outer batch. Must not modify ``problem``."""

    def peak_bound(self, steps: int, state_bytes: int, step_bytes: int, n_hyper: int) -> float:
        """The memory claim: an upper bound on ``peak_bytes`` given the bytes of one inner state
        (params and optimizer state), the bytes one recorded inner step saves, and the number of
        hyperparameter elements. Default: the full unroll's, ``steps * step_bytes + state_bytes``."""
        return steps * step_bytes + state_bytes

    def skip_reason(self, optimizer: Optimizer, n_hyper: int) -> str | None:
        """Why :func:`~metaopt.hypergrad.check` leaves the method out for this optimizer and number of
        hyperparameter elements (it would fail or be far too slow); ``None``: it applies."""
        return None

    def start_params(self) -> Params | None:
        """Inner params to start from instead of ``init_params`` (a stateful method's previous
        solution, e.g. HOAG's); ``None``: start as usual."""
        return None

    @property
    def differentiable(self) -> bool:
        """Whether ``create_graph=True`` applies to this configuration (``supports_create_graph``,
        unless a setting rules it out, e.g. the implicit fixed-point solve)."""
        return self.supports_create_graph

    @property
    def label(self) -> str:
        """The method with its main setting, for tables (``"truncated (K=10)"``)."""
        return self.name

    # -- configuration: a config's [method] table is ``name`` plus these fields ------------------

    @classmethod
    def config_fields(cls, fixed: Mapping[str, Any] | None = None) -> dict[str, ConfigField]:
        """The settings a ``[method]`` table may give this class: its dataclass ``__init__`` fields
        whose type is a scalar (``bool``, ``int``, ``float``, ``str``, optionally ``None``), less the
        ones ``fixed`` by a registered variant (``"cg"`` fixes ``solver``) and the state fields
        (``metadata={"state": True}``). A class that is not a dataclass has none."""
        if not dataclasses.is_dataclass(cls):
            return {}
        hints = typing.get_type_hints(cls)
        out: dict[str, ConfigField] = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.metadata.get("state") or f.name in (fixed or {}):
                continue
            kind, optional = _scalar(hints.get(f.name))
            if kind is None:
                continue
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
            out[f.name] = ConfigField(f.name, kind, optional, default)
        return out

    @classmethod
    def from_config(cls, table: Mapping[str, Any], steps: int | None = None, *, name: str | None = None,
                    fixed: Mapping[str, Any] | None = None) -> Method:
        """The method a ``[method]`` table describes (``name`` and :meth:`config_fields`; a ``name``
        key is skipped), checked for ``steps`` inner steps (:meth:`validate`) when given. Every
        problem is a :class:`MethodConfigError` of one line naming ``method.<field>`` and the fix."""
        name = name or getattr(cls, "name", cls.__name__)
        fields = cls.config_fields(fixed)
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key == "name":
                continue
            if key not in fields:
                hint = _suggest(key, list(fields))
                raise MethodConfigError(f"method.{key} is not a setting of method {name!r}{hint}")
            kwargs[key] = fields[key].convert(value)
        for key, f in fields.items():
            if f.default is REQUIRED and key not in kwargs:
                raise MethodConfigError(f"method.{key} is required by method {name!r}: set it in [method] "
                                        f"(e.g. --set method.{key}=...)")
        method = cls(**dict(fixed or {}), **kwargs)
        if steps is not None:
            try:
                method.validate(steps)
            except FieldError as e:
                raise MethodConfigError(f"method.{e.field} = {e.value!r} {e.need} (method {name!r})") from None
            except ValueError as e:
                raise MethodConfigError(f"method.name = {name!r}: {e}") from None
        return method

    def config(self, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """This object's settings as a ``[method]`` table's fields (the inverse of :meth:`from_config`,
        without ``name``)."""
        return {k: getattr(self, k) for k in self.config_fields(fixed)}

    # -- state: what a stateful method carries from one call to the next -----------------------

    def state_dict(self) -> dict[str, Any]:
        """The state this object carries between calls (tensors, numbers; what a checkpoint keeps),
        ``{}`` for a stateless method. A run that saves it after a call and gives it to
        :meth:`load_state_dict` of a freshly built method continues exactly as if uninterrupted."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (of an object configured the same way)."""
        if state:
            raise ValueError(f"method {self.name!r} is stateless; it cannot take the state {sorted(state)}")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a :class:`ConfigField` that a ``[method]`` table must give."""

_SCALARS: tuple[type, ...] = (bool, int, float, str)
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(hint: Any) -> tuple[type | None, bool]:
    """The scalar type a field's type hint allows (``float | None`` -> ``(float, True)``; ``str |
    Callable`` -> ``(str, False)``; a tensor -> ``(None, ...)``)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    kinds = [a for a in args if a in _SCALARS]
    return (kinds[0] if kinds else None), type(None) in args


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; its settings: {', '.join(options)}" if options else "; it has no settings (give only method.name)"


class ConfigField(NamedTuple):
    """One setting of a method's ``[method]`` table: its field, scalar type, whether ``None`` is
    allowed (the default only: TOML has no null), and its default (:data:`REQUIRED`: none)."""

    name: str
    type: type
    optional: bool
    default: Any

    def convert(self, value: Any) -> Any:
        """``value`` as this field's type, or a :class:`MethodConfigError` naming ``method.<name>``."""
        t = self.type
        ok = (isinstance(value, bool) if t is bool else
              isinstance(value, int) and not isinstance(value, bool) if t is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
              isinstance(value, str))
        if not ok:
            raise MethodConfigError(f"method.{self.name} = {value!r} must be {_TYPE_WORDS[t]}")
        if t is float and not math.isfinite(value):
            raise MethodConfigError(f"method.{self.name} = {value!r} must be a finite number")
        if t is int and not -(2**63) <= value < 2**63:
            raise MethodConfigError(f"method.{self.name} = {value!r} must fit in 64 bits (|value| < 2**63)")
        return float(value) if t is float else value

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (" | None" if self.optional else "")


class FieldError(ValueError):
    """A method setting out of range, raised by :meth:`Method.validate`: ``field`` names it (a config
    reports it as ``method.<field>``), ``need`` says what it must be."""

    def __init__(self, method: str, field: str, value: Any, need: str) -> None:
        super().__init__(f"{method}({field}={value!r}) {need}")
        self.field, self.value, self.need = field, value, need


class MethodConfigError(ValueError):
    """A ``[method]`` table that cannot be used: one line naming ``method.<field>`` and the fix (the
    run layer reports it as a ``ConfigError``, exit code 2)."""


@dataclass(frozen=True)
class Settings:
    """The old union of every method's knobs (internal: :func:`~metaopt.hypergrad.check` and the
    contract tests make every method from one set of them; configs use each method's own fields,
    :meth:`Method.from_config`). Each class's ``configure(steps, settings)`` takes the ones it has.

    ``truncate``: K of ``"truncated"`` (at most ``steps``); ``window``: W of ``"random_truncated"``;
    ``tol``: the implicit methods' linear-solve and inner tolerance; ``max_rounds``: their inner
    rounds; ``solve_iters``: their linear solve's cap; ``every``: the checkpoint interval (and the
    recursive base span); ``chunk_size``: forward mode's tangents at a time; ``hoag_tol0``,
    ``hoag_decrease``: HOAG's schedule. ``None`` keeps the method's own default.
    """

    truncate: int | None = None
    window: int | None = None
    tol: float | None = None
    max_rounds: int | None = None
    solve_iters: int | None = None
    every: int | None = None
    chunk_size: int | None = None
    hoag_tol0: float | None = None
    hoag_decrease: float | None = None


Factory = Callable[[int, Settings], "Method"]


@dataclass(frozen=True)
class Entry:
    """One row of the name table: the method's class, the fields a variant fixes (``"cg"`` is
    ``Implicit`` with ``solver="cg"``), ``make(steps, settings) -> Method`` (from the internal
    :class:`Settings`), a one-line summary, whether :func:`~metaopt.hypergrad.check` runs it by
    default, and whether ``create_graph=True`` applies."""

    name: str
    cls: type[Method]
    make: Factory
    summary: str
    in_check: bool = True
    differentiable: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, ConfigField]:
        """The settings its ``[method]`` table may give (:meth:`Method.config_fields`)."""
        return self.cls.config_fields(self.fixed)

    def from_config(self, table: Mapping[str, Any], steps: int | None = None) -> Method:
        """The method of a ``[method]`` table naming this entry (:meth:`Method.from_config`)."""
        return self.cls.from_config(table, steps, name=self.name, fixed=self.fixed)


_TABLE: dict[str, Entry] = {}


def register(cls: type[Method], *, name: str | None = None, make: Factory | None = None, summary: str | None = None,
             in_check: bool = True, differentiable: bool | None = None,
             fixed: Mapping[str, Any] | None = None) -> type[Method]:
    """Add a method class to the name table (usable as a class decorator, ``@register``) under
    ``cls.name``; configs build it from its own fields (:meth:`Method.from_config`). With ``name=``
    and ``fixed=`` it adds a variant (``"cg"`` is ``Implicit`` with ``fixed={"solver": "cg"}``);
    ``make(steps, settings)`` builds it from the internal :class:`Settings` (default: the class's
    ``configure(steps, settings, **fixed)`` classmethod, or its constructor). A name registered
    twice is an error."""
    name = name or cls.name
    if name in _TABLE:
        raise ValueError(f"hypergradient method {name!r} is registered already")
    fixed = dict(fixed or {})
    if make is None:
        configure = getattr(cls, "configure", None)
        make = ((lambda steps, settings: configure(steps, settings, **fixed)) if configure is not None
                else (lambda steps, settings: cls(**fixed)))
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    differentiable = cls.supports_create_graph if differentiable is None else differentiable
    _TABLE[name] = Entry(name, cls, make, summary or doc, in_check, differentiable, fixed)
    return cls


def unregister(name: str) -> None:
    """Remove a method from the name table (a plug-in's tests clean up with it)."""
    if name not in _TABLE:
        raise ValueError(f"no hypergradient method {name!r} is registered")
    del _TABLE[name]


def registered() -> dict[str, Entry]:
    """The name table: every registered method by name, in registration order."""
    return dict(_TABLE)


def names(*, compilable: bool = False, differentiable: bool = False, autocast: bool = False,
          start: bool = False) -> list[str]:
    """The registered method names (what a config's ``method.name`` may say); with ``compilable``, those
    whose class ``supports_compile``; with ``differentiable``, those that ``supports_create_graph``;
    with ``autocast``, those that ``supports_autocast``; with ``start``, those that ``supports_start``."""
    return [n for n, e in registered().items()
            if (e.cls.supports_compile or not compilable) and (e.differentiable or not differentiable)
            and (e.cls.supports_autocast or not autocast) and (getattr(e.cls, "supports_start", False) or not start)]


def entry(name: Any) -> Entry:
    """The table's row for ``name``, or a :class:`MethodConfigError` listing the names."""
    table = registered()
    if not isinstance(name, str) or name not in table:
        hint = "; 'greedy' is now 'truncated' with k = 1" if name == "greedy" else ""
        raise MethodConfigError(f"method.name = {name!r} is not a hypergradient method; use one of "
                                f"{', '.join(table)}{hint}")
    return table[name]


def from_config(table: Mapping[str, Any], steps: int | None = None) -> Method:
    """The method of a ``[method]`` table (``name`` plus that method's fields), checked for ``steps``
    inner steps when given; a bad table is a one-line :class:`MethodConfigError`."""
    return _entry_of(table).from_config(table, steps)


def _entry_of(table: Mapping[str, Any]) -> Entry:
    if "name" not in table:
        raise MethodConfigError(f"[method] needs a name: one of {', '.join(registered())} "
                                "(e.g. --set method.name=full)")
    return entry(table["name"])


def resolve_config(table: Mapping[str, Any]) -> dict[str, Any]:
    """A ``[method]`` table checked (names, types; not yet the ranges that depend on the steps) and
    completed: ``name`` and every field of that method, defaults filled in (``None`` kept)."""
    e = _entry_of(table)
    method = e.from_config(table)
    return {"name": e.name, **method.config(e.fixed)}


def as_method(method: Method | str, steps: int | None = None,
              settings: Mapping[str, Any] | Settings | None = None) -> Method:
    """A method object: ``method`` itself, or the registered ``name`` for ``steps`` inner steps, made
    from ``settings``: that method's own fields (a mapping, as a ``[method]`` table's; checked for
    ``steps``), or the internal :class:`Settings` union (``None``: every default)."""
    if isinstance(method, Method):
        return method
    table = registered()
    if not isinstance(method, str) or method not in table:
        raise ValueError(f"unknown hypergradient method {method!r}; use one of {', '.join(table)} "
                         "or a Method object (see docs/choosing-a-method.md)")
    if isinstance(settings, Mapping):
        return table[method].from_config(settings, steps)
    return table[method].make(steps or 0, settings or Settings())


def reference_table() -> str:
    """Markdown: every registered method's ``[method]`` settings (field, type, default), for
    docs/cli.md (a test keeps the page in step with the registry)."""
    lines = ["| method.name | settings (type = default) |", "|---|---|"]
    for name, e in registered().items():
        cells = [f"`{f.name}` ({f.type_name} = {'required' if f.default is REQUIRED else repr(f.default)})"
                 for f in e.fields().values()]
        lines.append(f"| `{name}` | {', '.join(cells) or 'none'} |")
    return "\n".join(lines)


