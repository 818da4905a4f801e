"""The hypergradient method protocol and the one name table of the package.

A method is an object with a ``name``, a ``supports_compile`` flag, ``validate(steps)`` and
``run(problem, params0, outer) -> Sweep``; :func:`metaopt.hypergradient` validates, builds the
:class:`~metaopt.hypergrad.problem.Problem` (the objective, optimizer, hyperparameters and the
pre-drawn data) and calls ``run``. Methods differ only in how they get the inner trajectory back for
the reverse sweep (or avoid it).

Every built-in method is registered here under its name; the CLI, the recipes' configs and
:func:`metaopt.hypergrad.check` read this table and no other. A new method is one class::

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

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from ..optim.base import Optimizer, Params

if TYPE_CHECKING:
    from .problem import Problem

Reference = Literal["unrolled", "truncated", "random_truncated", "straight_line", "stationary"]


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
    """

    loss: Tensor
    params: Params
    grads: dict[str, Tensor]
    adjoint: list[Tensor] | None
    peak_bytes: int
    extras: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """The base of every hypergradient method (frozen dataclasses, except stateful ones like HOAG).

    Class attributes:
        name: the registered name (configs, the CLI, result rows).
        supports_compile: whether ``compile=True`` applies (the inner steps run ``torch.compile``d).
        supports_create_graph: whether ``create_graph=True`` applies (the hypergradient comes back
            differentiable, for a level above) and the method can run a :class:`metaopt.Level`.
        supports_autocast: whether ``autocast=`` applies (its inner steps all go through
            :class:`~metaopt.hypergrad.problem.Problem`'s ``one``/``advance``/``record``).
        reference: which function's gradient the method returns, for the contract tests:
            ``"unrolled"`` — ``F(h)`` after the ``n`` inner steps, exactly;
            ``"truncated"`` — the same with ``h`` held fixed in the first ``n - k`` steps (biased);
            ``"random_truncated"`` — ``F`` after a drawn ``t <= n`` steps (``extras["t"]``) with ``h``
            held fixed in the steps before ``t - W`` (biased);
            ``"straight_line"`` — exact when the inner trajectory is a straight line traversed at
            constant speed, approximate otherwise (DrMAD);
            ``"stationary"`` — ``F`` at the inner stationary point (implicit differentiation).

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


@dataclass(frozen=True)
class Settings:
    """The settings a config can give any method by name (each method takes the ones it has).

    ``truncate``: K of ``"truncated"`` (at most ``steps``); ``window``: W of ``"random_truncated"``
    (``1 <= W <= steps``); ``tol``: the implicit methods' linear-solve
    and inner tolerance; ``max_rounds``: at most this many rounds of ``steps`` in their inner run;
    ``solve_iters``: at most this many iterations of their linear solve; ``every``: the checkpoint
    interval (``None``: ``ceil(sqrt(steps))``); ``chunk_size``: forward mode's tangents at a time;
    ``hoag_tol0``, ``hoag_decrease``: HOAG's tolerance ``max(tol0 * decrease**t, tol)``.
    ``None`` keeps the method's own default.
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
    """One row of the name table: the method's class, ``make(steps, settings) -> Method``, a
    one-line summary, whether :func:`~metaopt.hypergrad.check` runs it by default, and whether
    ``create_graph=True`` applies (the class's ``supports_create_graph`` unless the variant says not)."""

    name: str
    cls: type[Method]
    make: Factory
    summary: str
    in_check: bool = True
    differentiable: bool = False


_TABLE: dict[str, Entry] = {}


def register(cls: type[Method], *, name: str | None = None, make: Factory | None = None, summary: str | None = None,
             in_check: bool = True, differentiable: bool | None = None) -> type[Method]:
    """Add a method class to the name table (usable as a class decorator, ``@register``): under
    ``cls.name``, made by its ``configure(steps, settings)`` classmethod (or a no-argument
    constructor). With ``name=`` and ``make=`` it adds a variant (``"cg"`` is ``Implicit("cg")``). A
    name registered twice is an error."""
    _load_builtins()  # the built-ins come first, and a clash with one is caught
    name = name or cls.name
    if name in _TABLE:
        raise ValueError(f"hypergradient method {name!r} is registered already")
    if make is None:
        configure = getattr(cls, "configure", None)
        make = configure if configure is not None else (lambda steps, settings: cls())
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    differentiable = cls.supports_create_graph if differentiable is None else differentiable
    _TABLE[name] = Entry(name, cls, make, summary or doc, in_check, differentiable)
    return cls


def unregister(name: str) -> None:
    """Remove a method from the name table (a plug-in's tests clean up with it)."""
    _load_builtins()
    if name not in _TABLE:
        raise ValueError(f"no hypergradient method {name!r} is registered")
    del _TABLE[name]


def registered() -> dict[str, Entry]:
    """The name table: every registered method by name, in registration order."""
    _load_builtins()
    return dict(_TABLE)


def names(*, compilable: bool = False, differentiable: bool = False, autocast: bool = False) -> list[str]:
    """The registered method names (what a config's ``method`` may say); with ``compilable``, those
    whose class ``supports_compile``; with ``differentiable``, those that ``supports_create_graph``;
    with ``autocast``, those that ``supports_autocast``."""
    return [n for n, e in registered().items()
            if (e.cls.supports_compile or not compilable) and (e.differentiable or not differentiable)
            and (e.cls.supports_autocast or not autocast)]


def as_method(method: Method | str, steps: int | None = None, settings: Settings | None = None) -> Method:
    """A method object: ``method`` itself, or the registered ``name`` configured for ``steps`` inner
    steps with ``settings`` (:class:`Settings`; ``None`` keeps every method's defaults)."""
    if isinstance(method, Method):
        return method
    table = registered()
    if not isinstance(method, str) or method not in table:
        raise ValueError(f"unknown hypergradient method {method!r}; use one of {', '.join(table)} "
                         "or a Method object (see docs/choosing-a-method.md)")
    return table[method].make(steps or 0, settings or Settings())


_builtins_loaded = False


def _load_builtins() -> None:
    """Register the built-in methods (once, on first use of the table), in the order
    :func:`~metaopt.hypergrad.check` lists them."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from .drmad import DrMAD
    from .forward import Forward
    from .implicit import HOAG, Implicit
    from .random_truncation import RandomTruncated
    from .reversible import Reversible
    from .unroll import Checkpointed, Full, Recursive, Truncated

    for cls in (Full, Checkpointed, Truncated, DrMAD, Forward, Reversible):
        register(cls)
    register(Recursive, in_check=False)  # the memory end of checkpointing; `check` keeps its table
    register(Implicit, in_check=False)  # the CG solve by default, as "cg"
    for solver in ("cg", "neumann", "fixed_point", "dense"):
        register(Implicit, name=solver, make=functools.partial(Implicit.configure, solver=solver),
                 summary=f"implicit differentiation, {solver.replace('_', ' ')} linear solve",
                 in_check=solver in ("cg", "neumann"), differentiable=solver != "fixed_point")
    register(HOAG, in_check=False)
    # a random draw per call: check's finite differences of F(params[n]) do not apply
    register(RandomTruncated, in_check=False)
