"""Hostile input, generated from the config schema: every bad value, key, file or argument gives
exit code 2, one line on stderr naming what is wrong, no traceback, and a run directory that is
byte-identical afterwards (or still absent).

The bad inputs come from :func:`metaopt.run.schema.fields` (every leaf setting of the four
built-in recipes, with its type and constraints) and from the methods' own ``[method]`` fields;
Hypothesis draws the value (wrong type, NaN/inf, out of range, beyond 64 bits, a control
character, not a choice, a list of the wrong length or with a bad item), the key (unknown ones
too) and how it arrives (``--set``, a ``--config`` file, a file that is not UTF-8, a bad
command-line argument). ``derandomize`` keeps CI reproducible (``METAOPT_FUZZ_RANDOM=1`` draws afresh);
``METAOPT_FUZZ_EXAMPLES`` sets the number of inputs (200 by default); ``tools/fuzz_cli.py`` runs them
through the real command.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runs import snapshot

from metaopt.cli import main
from metaopt.hypergrad.methods import entry
from metaopt.run import schema
from metaopt.run.config import MethodTable
from metaopt.run.recipe import get

RECIPES = ("demo", "distill", "hpo", "structure")
COUNT = itertools.count()
EXAMPLES = int(os.environ.get("METAOPT_FUZZ_EXAMPLES", "200"))


@dataclass(frozen=True)
class Bad:
    """One hostile command: ``argv`` (with ``{out}`` and ``{config}`` placeholders), the config file's
    bytes (if any), and the text the error line must contain."""

    argv: tuple[str, ...]
    config: bytes | None
    names: str

    def prepare(self, where: str, finished: Path, work: Path) -> tuple[list[str], Path, str]:
        """``(argv, run directory, the text the error must contain)`` of this input in the empty folder
        ``work``; ``where``: ``"absent"`` (a new ``--out`` under ``work``), ``"finished"`` (the run
        ``finished``) or ``"finished+resume"`` (that run, with ``--resume``)."""
        out = finished if where.startswith("finished") else work / "new" / "run"
        config = work / "cfg.toml"
        if self.config is not None:
            config.write_bytes(self.config)
        argv = [a.replace("{out}", str(out)).replace("{config}", str(config)) for a in self.argv]
        if where.endswith("resume") and argv[0] == "run":
            argv.append("--resume")
        return argv, out, self.names.replace("{config}", str(config))


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string (every control character escaped)."""
    out = []
    for c in s:
        if c in '"\\' or ord(c) < 32 or ord(c) == 127:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_float(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else repr(x)


def toml(x: object) -> str:
    """A default value (scalar, list or ``[method]`` table) as a TOML literal."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return toml_str(x)
    if isinstance(x, float):
        return toml_float(x)
    if isinstance(x, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in x.items() if v is not None) + " }"
    if isinstance(x, list):
        return "[" + ", ".join(map(toml, x)) + "]"
    return str(x)


WRONG = {  # TOML literals of another type than the field's
    bool: ["1", '"yes"', "0.5", "[true]", "{ a = 1 }"],
    int: ['"abc"', "1.5", "true", "[1, 2]", "{ a = 1 }", "1e400"],
    float: ['"fast"', "true", "[0.1]", "{ a = 1 }"],
    str: ["1", "true", "[\"a\"]", "2.5"],
}


def out_of_range(base: type, r: schema.Range) -> st.SearchStrategy[str]:
    """Literals just outside ``r`` (and far outside it)."""
    options = []
    if base is int:
        if r.low is not None:
            options.append(st.integers(min_value=schema.INT64[0], max_value=int(r.low) - 1).map(str))
        if r.high is not None and r.high < schema.INT64[1]:
            options.append(st.integers(min_value=int(r.high) + 1, max_value=schema.INT64[1]).map(str))
    else:
        if r.low is not None:
            options.append(st.floats(max_value=r.low, exclude_max=not r.open_low, allow_nan=False,
                                     allow_infinity=False).map(toml_float))
        if r.high is not None:
            options.append(st.floats(min_value=r.high, exclude_min=not r.open_high, allow_nan=False,
                                     allow_infinity=False).map(toml_float))
    return st.one_of(options)


BAD_TABLES = ['5', '"nosuch"', '{ name = "nosuch" }', '{ name = 5 }', '{ bogus = 1 }', '{ name = "full", bogus = 1 }',
              '{ name = "truncated", k = -1 }', '{ name = "cg", tol = nan }']
"""Inline ``[method]`` tables (an item of ``l2.compare``) a config must refuse."""


def bad_scalar(base: type, markers: tuple) -> st.SearchStrategy[str]:
    """A TOML literal the scalar field (``base`` with ``markers``) must refuse."""
    if base is MethodTable:
        return st.sampled_from(BAD_TABLES)
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        return st.one_of(st.text(max_size=12).filter(lambda s: s not in choices).map(toml_str),
                         st.sampled_from(["3", "true", "[\"a\"]"]))
    options = [st.sampled_from(WRONG[base])]
    if base is float:
        options.append(st.sampled_from(["nan", "inf", "-inf", "+nan", "-nan"]))
    if base is int:
        options.append(st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)).map(str))
    if base is str:
        control = st.characters(min_codepoint=0, max_codepoint=31) | st.just("\x7f")
        options.append(st.tuples(st.text(max_size=5), control, st.text(max_size=5)).map(lambda t: toml_str("".join(t))))
    for m in markers:
        if isinstance(m, schema.Range):
            options.append(out_of_range(base, m))
    return st.one_of(options)


def bad_value(spec: schema.FieldSpec) -> st.SearchStrategy[str]:
    """A TOML literal the field ``spec`` must refuse."""
    if typing.get_origin(spec.type) is not list:
        return bad_scalar(spec.type, spec.markers)
    item = typing.get_args(spec.type)[0]
    good = [x for x in spec.default] or []
    fill = toml(good[0]) if good else None
    options = [st.sampled_from(WRONG[str][:2] + ['"x"'])]  # a scalar for a list
    item_options = [bad_scalar(item, spec.item_markers)]
    if fill is not None:  # one bad item among good ones
        options.append(st.tuples(st.one_of(item_options), st.integers(0, 3))
                       .map(lambda t: "[" + ", ".join([fill] * t[1] + [t[0]]) + "]"))
    else:
        options.append(st.one_of(item_options).map(lambda v: f"[{v}]"))
    for m in spec.markers:
        if isinstance(m, schema.Length) and fill is not None:
            sizes = ([m.low - 1] if m.low > 0 else []) + ([m.high + 1] if m.high is not None else [])
            if sizes:
                options.append(st.sampled_from(sizes).map(lambda n: "[" + ", ".join([fill] * n) + "]"))
    return st.one_of(options)


def leaves(recipe: str) -> list[schema.FieldSpec]:
    """The recipe's settings, its default ``[method]``'s fields among them (as ``method.<field>``)."""
    out = []
    for spec in schema.fields(get(recipe).config):
        if spec.type is MethodTable:
            for f in entry(spec.default["name"]).fields().values():
                if f.type in WRONG:
                    out.append(schema.FieldSpec(f"method.{f.name}", f.type, (), (), f.default))
            continue
        out.append(spec)
    return out


LEAVES = {r: leaves(r) for r in RECIPES}


def deliver(recipe: str, path: str, literal: str, how: str) -> Bad:
    """The command that gives ``path = literal`` to ``recipe`` by ``--set`` or a ``--config`` file."""
    base = ("run", recipe, "--out", "{out}")
    if how == "set":
        return Bad((*base, "--set", f"{path}={literal}"), None, path.rsplit(".", 1)[-1])
    table, _, key = path.rpartition(".")
    text = (f"[{table}]\n" if table else "") + f"{key} = {literal}\n"
    return Bad((*base, "--config", "{config}"), text.encode(), path.rsplit(".", 1)[-1])


@st.composite
def bad_setting(draw: st.DrawFn) -> Bad:
    recipe = draw(st.sampled_from(RECIPES))
    spec = draw(st.sampled_from(LEAVES[recipe]))
    return deliver(recipe, spec.path, draw(bad_value(spec)), draw(st.sampled_from(["set", "config"])))


@st.composite
def unknown_key(draw: st.DrawFn) -> Bad:
    recipe = draw(st.sampled_from(RECIPES))
    spec = draw(st.sampled_from(LEAVES[recipe]))
    table, _, key = spec.path.rpartition(".")
    known = {s.path.rpartition(".")[2] for s in LEAVES[recipe] if s.path.rpartition(".")[0] == table}
    typo = draw(st.one_of(st.just(key + "x"), st.just(key[:-1]), st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
                .filter(lambda k: k and k not in known and k not in ("name",)))
    path = f"{table}.{typo}" if table else typo
    bad = deliver(recipe, path, "1", draw(st.sampled_from(["set", "config"])))
    return Bad(bad.argv, bad.config, typo)


STRUCTURE = [  # (TOML text, the name the error must give): tables and values in the wrong places
    ("outer = 5\n", "outer"), ("[seed]\nx = 1\n", "seed"), ("[[outer]]\nsteps = 1\n", "outer"),
    ("[outer.steps]\na = 1\n", "outer.steps"), ("[method]\nname = 5\n", "method"), ("method = 3\n", "method"),
    ("[method]\nname = \"nosuch\"\n", "nosuch"), ("[method]\nname = \"full\"\nbogus = 1\n", "bogus"),
    ("[outer\nsteps = 1\n", "{config}"), ("seed = \n", "{config}"), ("[outer]\nsteps = 1\nsteps = 2\n", "{config}"),
]


@st.composite
def malformed(draw: st.DrawFn) -> Bad:
    """A config file whose shape is wrong (a value for a table, a table for a value, bad TOML)."""
    text, name = draw(st.sampled_from(STRUCTURE))
    recipe = draw(st.sampled_from(RECIPES))
    return Bad(("run", recipe, "--out", "{out}", "--config", "{config}"), text.encode(), name)


@st.composite
def not_utf8(draw: st.DrawFn) -> Bad:
    """A config file that is not UTF-8: a latin-1 comment, or binary bytes."""
    raw = draw(st.one_of(st.just("# caf\xe9\n[outer]\nsteps = 3\n".encode("latin-1")),
                         st.binary(min_size=1, max_size=64).filter(lambda b: not _decodes(b))))
    recipe = draw(st.sampled_from(RECIPES))
    return Bad(("run", recipe, "--out", "{out}", "--config", "{config}"), raw, "{config}")


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def bad_argument(draw: st.DrawFn) -> Bad:
    """A bad command-line argument: seed, timeout, preset, device, recipe or an unknown option."""
    recipe = draw(st.sampled_from(RECIPES))
    base = ("run", recipe, "--out", "{out}")
    kind = draw(st.sampled_from(["seed", "timeout", "preset", "device", "recipe", "option"]))
    if kind == "seed":
        seed = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.sampled_from(["abc", "1.5"])))
        return Bad((*base, "--seed", str(seed)), None, "seed")
    if kind == "timeout":
        value = draw(st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "abc"]),
                               st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr)))
        return Bad((*base, f"--timeout={value}"), None, "timeout")
    if kind == "preset":
        name = draw(st.from_regex(r"[a-z]{1,10}", fullmatch=True).filter(lambda p: p not in get(recipe).presets))
        return Bad((*base, "--preset", name), None, name)
    if kind == "device":
        return Bad((*base, "--device", draw(st.sampled_from(["tpu", "gpu", "CUDA", "mps0"]))), None, "--device")
    if kind == "recipe":
        name = draw(st.from_regex(r"[a-z]{1,10}", fullmatch=True).filter(lambda r: r not in RECIPES))
        return Bad(("run", name, "--out", "{out}"), None, name)
    option = draw(st.sampled_from(["--sed", "--presett", "--outt", "-x"]))
    return Bad((*base, option, "1"), None, option)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished demo run (2 outer steps) that no bad input may change."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    argv = ["run", "demo", "--preset", "smoke", "--set", "outer.steps=2", "--out", str(out)]
    res = subprocess.run([sys.executable, "-m", "metaopt", *argv], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("METAOPT_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bad=st.one_of(bad_setting(), bad_setting(), unknown_key(), malformed(), not_utf8(), bad_argument()),
       where=st.sampled_from(["absent", "finished", "finished+resume"]))
def test_bad_input_exits_2_in_one_line_and_touches_nothing(bad, where, finished_run, tmp_path, capsys):
    work = tmp_path / f"x{next(COUNT)}"
    work.mkdir()
    argv, out, name = bad.prepare(where, finished_run, work)
    before = snapshot(out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert name in err, (argv, err)
    assert snapshot(out) == before, f"{argv} changed {out}"
