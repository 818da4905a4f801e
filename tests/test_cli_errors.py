"""Every failure of the `metaopt` command is one line on stderr and an exit code (2 bad input, 3 a
failed run, 130 an interrupt), never a traceback unless --debug: bad `check --objective` problems,
argparse errors, a damaged run directory under `show`, broken plug-ins, Ctrl-C while importing, a
terminal that cannot print the run directory's name; plus `--version`, lazy recipe loading and the
progress line."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import metaopt
from metaopt import cli

SMOKE = ["run", "demo", "--preset", "smoke", "--set", "outer.steps=2", "--set", "outer.eval_every=1",
         "--set", "inner.eval_inits=1"]


def run_cli(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- metaopt check --objective: the user's bad problems ------------------------------------------------

RIDGE = """\
import torch
import metaopt
from metaopt import optim


class Ridge(metaopt.MetaObjective):
    def __init__(self, dtype=torch.float64, xshape=(20, 3)):
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(*xshape, generator=g).to(dtype)
        self.y = torch.randn(20, generator=g).to(dtype)

    def init_params(self, hyper, generator):
        return {"w": torch.zeros(3)}

    def inner_loss(self, params, hyper, k, batch):
        return ((self.X @ params["w"] - self.y) ** 2).mean() + hyper["lam"].exp() * (params["w"] ** 2).sum()

    def outer_loss(self, params, hyper, batch):
        return ((self.X @ params["w"] - self.y) ** 2).mean()


def good(objective=None, steps=5):
    return objective or Ridge(), optim.sgd(lr=0.1), {"lam": torch.tensor(-1.0)}, steps
"""

# (name, module source (after RIDGE unless it starts with "!"), function, expected stderr, line of the file)
OBJECTIVES = [
    ("syntax", "!def make(:\n    pass\n", "make", "your objective raised SyntaxError: ", 1),
    ("missing_dependency", "!import not_a_package_xyz\n", "make",
     "your objective raised ModuleNotFoundError: No module named 'not_a_package_xyz' at {file}:1", None),
    ("raises_at_import", "!x = 1\nraise RuntimeError('no data here')\n", "make",
     "your objective raised RuntimeError: no data here at {file}:2", None),
    ("no_function", "", "make", "module '{mod}' has no 'make'", None),
    ("not_callable", "make = 3\n", "make", "make is a int, not a function", None),
    ("factory_raises", "def make():\n    raise ValueError('n must be even')\n", "make",
     "your objective raised ValueError: n must be even at {file}:{last}", None),
    ("factory_needs_args", "def make(n):\n    return good()\n", "make",
     "your objective: make() missing 1 required positional argument: 'n'", None),
    ("returns_none", "def make():\n    pass\n", "make",
     "make() must return (objective, optimizer, hyper, steps), got None", None),
    ("returns_three", "def make():\n    return good()[:3]\n", "make", "got a 3-tuple", None),
    ("returns_dict", "def make():\n    return {'objective': Ridge()}\n", "make", "got a dict", None),
    ("objective_is_a_string", "def make():\n    return good('ridge')\n", "make",
     "its objective: an object with inner_loss, outer_loss and init_params", None),
    ("hyper_is_a_tensor", "def make():\n    o, opt, h, n = good()\n    return o, opt, h['lam'], n\n", "make",
     "its hyper: a non-empty dict {name: floating-point tensor}", None),
    ("optimizer_is_none", "def make():\n    o, opt, h, n = good()\n    return o, None, h, n\n", "make",
     "its optimizer: a metaopt.optim optimizer", None),
    ("zero_steps", "def make():\n    return good(steps=0)\n", "make",
     "your objective: steps must be a positive int (the number of inner steps), got 0", None),
    ("shape_error", "def make():\n    return good(Ridge(xshape=(20, 4)))\n", "make",
     "your objective raised RuntimeError: size mismatch, got input (20), mat (20x4), vec (3)", 16),
    ("float32_data", "def make():\n    return good(Ridge(dtype=torch.float32))\n", "make",
     "your objective raised RuntimeError: addmv input tensors must have the same dtype, but got Double, Float, and "
     "Double at {file}:16; metaopt check computes in float64: make your data float64", 16),
    ("nan_loss", "class Nan(Ridge):\n    def outer_loss(self, params, hyper, batch):\n"
     "        return super().outer_loss(params, hyper, batch) * float('nan')\n\n\n"
     "def make():\n    return good(Nan())\n", "make", "your objective: ", None),
    ("vector_loss", "class Vec(Ridge):\n    def inner_loss(self, params, hyper, k, batch):\n"
     "        return (self.X @ params['w'] - self.y) ** 2\n\n\ndef make():\n    return good(Vec())\n", "make",
     "your objective: inner_loss must return a scalar tensor (sum the members' losses for an ensemble); got (20,)",
     None),
    ("outer_loss_raises", "class Bad(Ridge):\n    def outer_loss(self, params, hyper, batch):\n"
     "        return params['v'].sum()\n\n\ndef make():\n    return good(Bad())\n", "make",
     "your objective raised KeyError: 'v' at {file}:{line_of:params['v']}", None),
]


@pytest.mark.parametrize("name, source, function, expected, line", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_a_bad_objective_is_one_line_and_exit_2(name, source, function, expected, line, tmp_path, monkeypatch,
                                                capsys):
    mod = f"user_{name}"
    text = source[1:] if source.startswith("!") else RIDGE + "\n\n" + source
    path = tmp_path / f"{mod}.py"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    dtype = torch.get_default_dtype()
    try:
        code = cli.main(["check", "--objective", f"{mod}:{function}"])
    finally:
        sys.modules.pop(mod, None)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = text.splitlines()
    want = expected.replace("{file}", path.name).replace("{mod}", mod).replace("{last}", str(len(lines)))
    marker = want.partition("{line_of:")[2].partition("}")[0]
    if marker:
        at = next(i for i, x in enumerate(lines, 1) if marker in x)
        want = want.replace(f"{{line_of:{marker}}}", str(at))
    said = one_line(err)
    assert said.startswith("error: ") and want in said, said
    if line is not None:
        assert f" at {path.name}:{line}" in said, said  # the innermost frame in the user's file
    assert torch.get_default_dtype() == dtype  # the check's float64 does not leak into the caller


@pytest.mark.parametrize("args", [["--debug", "check", "--objective", "user_debug:make"],
                                  ["check", "--objective", "user_debug:make", "--debug"]], ids=["before", "after"])
def test_debug_adds_the_traceback(args, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_debug.py").write_text("def make():\n    raise ValueError('n must be even')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.main(args) == 2
    finally:
        sys.modules.pop("user_debug", None)
    err = capsys.readouterr().err
    assert "Traceback" in err and 'user_debug.py", line 2' in err
    assert err.strip().splitlines()[-1] == "error: your objective raised ValueError: n must be even at user_debug.py:2"


@pytest.mark.parametrize("where, why", [("dir", "it is a directory"), ("nowhere/rows.json", "no such file")])
def test_check_json_target_is_checked_before_the_check(where, why, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert cli.main(["check", "demo", "--json", str(tmp_path / where)]) == 2
    captured = capsys.readouterr()
    said = one_line(captured.err)
    assert f"--json '{tmp_path / where}': cannot write there ({why}" in said
    assert captured.out == ""  # refused before any method ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


# -- argparse, --version, Ctrl-C, encodings --------------------------------------------------------------


@pytest.mark.parametrize("args, said", [
    ([], "metaopt: the following arguments are required: command (see metaopt --help)"),
    (["run"], "metaopt run: the following arguments are required: recipe"),
    (["run", "demo", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["run", "demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    (["show"], "metaopt show: the following arguments are required: dir"),
    (["demo", "--outer-steps", "-3"], "--outer-steps must be >= 0, got -3"),
])
def test_argument_errors_are_one_line_exit_2(args, said, capsys):
    assert cli.main(args) == 2
    assert said in one_line(capsys.readouterr().err)


def test_version_is_fast_and_imports_no_torch():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "metaopt", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == f"metaopt {metaopt.__version__}\n" == "metaopt 0.1.0\n"
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "metaopt.cli" in imported and not {"torch", "rich", "numpy"} & imported


def test_ctrl_c_while_importing_is_one_line_and_130():
    """SIGINT lands while torch is being imported (seen in -X importtime's stream: a torch submodule is
    done, torch itself is not yet): one line, exit 130. The child starts with Ctrl-C's default action,
    as from a terminal: a shell without job control starts background commands (a CI script run with
    ``&``) with SIGINT ignored, which Python, and so metaopt, then keeps."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "metaopt", "check", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        if line.split("|")[-1].strip().startswith("torch."):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    said = [x for x in err.splitlines() if not x.startswith("import time:")]
    assert proc.returncode == 130 and said == ["interrupted: stopped by Ctrl-C"], err[-3000:]
    assert "hypergradient check" not in out


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}],
                         ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_a_non_utf8_terminal_with_a_non_ascii_out(env, tmp_path):
    out = tmp_path / "runs" / "é"
    res = run_cli(*SMOKE, "--out", str(out), env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    assert "done: 2 outer steps" in res.stdout and "results in" in res.stdout
    assert (out / "metrics.json").is_file()
    shown = run_cli("show", str(out), env={**os.environ, **env})
    assert shown.returncode == 0 and "finished" in shown.stdout, shown.stderr


# -- metaopt show on a damaged run -----------------------------------------------------------------------

HISTORY = [{"step": i, "loss": 1.0 / i, "seconds": 0.1} for i in (1, 2, 3)]
SUMMARY = {"recipe": "demo", "steps": 3, "updates": 3, "seconds": 0.3, "final_loss": 1 / 3,
           "final": {"step": 3, "test_accuracy": 0.875}, "history": HISTORY, "evals": [], "figures": [],
           "results": {"table": [1, 2]}, "report": "## Results\n\n| method | accuracy |\n|---|---|\n| ours | 0.875 |\n"}


def make_run(root: Path, config: str | bytes | None = "[outer]\nsteps = 3\n", summary=None, jsonl=None) -> Path:
    root.mkdir()
    for name, data in (("config.toml", config), ("metrics.json", summary), ("metrics.jsonl", jsonl)):
        if data is not None:
            (root / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def jsonl_of(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_show_renders_the_stored_report_not_summary_md(tmp_path, capsys):
    run = make_run(tmp_path / "r", summary=json.dumps(SUMMARY), jsonl=jsonl_of(HISTORY))
    (run / "summary.md").write_text("## Stale tables\n\nnot from metrics.json\n")
    assert cli.main(["show", str(run)]) == 0
    captured = capsys.readouterr()
    assert "finished" in captured.out and "test_accuracy" in captured.out and "0.875" in captured.out
    assert "Results" in captured.out and "ours" in captured.out and "Stale" not in captured.out
    assert captured.err == ""


def test_the_runner_stores_the_report_markdown_for_show(tmp_path, capsys):
    import dataclasses

    from metaopt.recipes.demo import RECIPE
    from metaopt.recipes.demo.task import DemoTask
    from metaopt.run import launch, read_run

    class Reporting(DemoTask):
        def report(self, hyper, generator):
            return {"accuracy": 0.5}

        def summary(self, results):
            return f"## Final tables\n\n| model | accuracy |\n|---|---|\n| fresh | {results['accuracy']} |\n"

    launch(dataclasses.replace(RECIPE, build=Reporting), preset="smoke", overrides=SMOKE[5::2],
           out=tmp_path / "r", log=lambda m: None)
    info = read_run(tmp_path / "r")
    assert info.results["accuracy"] == 0.5 and info.report.startswith("## Final tables") and not info.problems
    (tmp_path / "r" / "summary.md").unlink()  # show never reads it
    assert cli.main(["show", str(tmp_path / "r")]) == 0
    shown = capsys.readouterr().out
    assert "Final tables" in shown and "fresh" in shown and "0.5" in shown


DAMAGED = [  # (config.toml, metrics.json, metrics.jsonl, shown on stdout, the one line on stderr)
    ("[outer]\nsteps = 3\n", json.dumps(SUMMARY)[:200], jsonl_of(HISTORY),
     ["interrupted", "3 of 3", "0.333333"], "metrics.json is unreadable (Unterminated string"),
    ("[outer]\nsteps = 3\n", "{}", jsonl_of(HISTORY),
     ["finished", "0.333333"], "metrics.json lacks recipe, steps, seconds, final_loss, final, history, figures"),
    ("[outer]\nsteps = 3\n", "[1, 2]", jsonl_of(HISTORY), ["interrupted", "3 of 3"],
     "metrics.json holds a list, not a run's summary"),
    ("[outer]\nsteps = 9\n", None, jsonl_of(HISTORY) + '{"step": 4, "lo', ["interrupted", "3 of 9"],
     "metrics.jsonl: 1 unreadable line skipped (line 4)"),
    ("[outer]\nsteps = 9\n", None, "garbage\n" + jsonl_of(HISTORY) + "\x00\xff\n[]\n", ["interrupted", "3 of 9"],
     "metrics.jsonl: 3 unreadable lines skipped (line 1, 5, 6)"),
    ("[inner]\nlr = 0.1\n", None, jsonl_of(HISTORY), ["interrupted", "3 of ?"], "config.toml lacks outer.steps"),
    (b"[outer\n\xff", json.dumps(SUMMARY), None, ["finished", "demo"], "config.toml is unreadable"),
    (None, json.dumps({**SUMMARY, "steps": "three", "final": None}), None, ["finished", "0.333333"],
     "config.toml is missing; metrics.json lacks steps, final"),
]


@pytest.mark.parametrize("config, summary, jsonl, shown, problem", DAMAGED, ids=[
    "truncated-json", "empty-json", "json-list", "half-last-line", "garbage-lines", "config-without-steps",
    "config-not-toml", "no-config-mistyped-json"])
def test_show_reads_what_it_can_of_a_damaged_run(config, summary, jsonl, shown, problem, tmp_path, capsys):
    run = make_run(tmp_path / "r", config, summary, jsonl)
    assert cli.main(["show", str(run)]) == 0
    captured = capsys.readouterr()
    for text in shown:
        assert text in captured.out, captured.out
    said = one_line(captured.err)
    assert said.startswith(f"warning: could not read all of '{run}': ") and problem in said, said


def test_show_exits_2_when_nothing_is_readable(tmp_path, capsys):
    assert cli.main(["show", str(make_run(tmp_path / "bad", b"\xff\xfe", None, "half"))]) == 2
    said = one_line(capsys.readouterr().err)
    assert "nothing readable in run directory" in said and "config.toml is unreadable" in said
    (tmp_path / "empty").mkdir()
    assert cli.main(["show", str(tmp_path / "empty")]) == 2
    assert "is not a metaopt run directory" in one_line(capsys.readouterr().err)


# -- plug-ins: broken ones are warnings, recipes load only when named --------------------------------------

PLUGINS = {  # entry point name -> (module source, value)
    "crashes": ("import not_installed_xyz\n", "broken_import:RECIPE"),
    "notarecipe": ("RECIPE = 42\n", "not_a_recipe:RECIPE"),
    "clash": ("import dataclasses\nfrom metaopt.recipes.demo import RECIPE as DEMO\n"
              "RECIPE = dataclasses.replace(DEMO, description='a second demo')\n", "clashing:RECIPE"),
    "faulty": ("import dataclasses\nfrom metaopt.recipes.demo import RECIPE as DEMO\n\n\ndef build(cfg, device):\n"
               "    raise ValueError('no data for this seed')\n\n\n"
               "RECIPE = dataclasses.replace(DEMO, name='faulty', build=build)\n", "faulty:RECIPE"),
}


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory):
    """An environment with three broken plug-ins registered (a dist-info folder on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    info = site / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    lines = ["[metaopt.recipes]"]
    for name, (source, value) in PLUGINS.items():
        (site / f"{value.split(':')[0]}.py").write_text(source)
        lines.append(f"{name} = {value}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_a_broken_plugin_is_a_warning_and_the_others_work(broken_plugins, tmp_path):
    listed = run_cli("list", env=broken_plugins)
    assert listed.returncode == 0, listed.stderr
    for name in ("demo", "distill", "hpo", "structure"):
        assert name in listed.stdout
    warned = listed.stderr.strip().splitlines()
    assert len(warned) == 3 and all(w.startswith("warning: ") for w in warned), listed.stderr
    text = " ".join(warned)
    assert ("recipe plug-in 'crashes' (broken_import:RECIPE) failed to load: ModuleNotFoundError: No module named "
            "'not_installed_xyz' at ") in text and "broken_import.py:1" in text
    assert "recipe plug-in 'notarecipe' (not_a_recipe:RECIPE) is not a metaopt.run.Recipe (it is a int)" in text
    assert ("two recipes are named 'demo': metaopt.recipes.demo:RECIPE and clashing:RECIPE; using "
            "metaopt.recipes.demo:RECIPE") in text
    ran = run_cli(*SMOKE, "--out", str(tmp_path / "r"), env=broken_plugins)
    assert ran.returncode == 0 and ran.stderr.count("warning") == 0, ran.stderr  # the others are not even loaded
    asked = run_cli("run", "crashes", env=broken_plugins)
    assert asked.returncode == 2
    assert "recipe plug-in 'crashes' (broken_import:RECIPE) failed to load" in one_line(asked.stderr)
    faulty = run_cli("run", "faulty", "--preset", "smoke", "--out", str(tmp_path / "f"), env=broken_plugins)
    assert faulty.returncode == 2  # the plug-in's own code raised: bad input, naming its line
    said = one_line(faulty.stderr)
    assert said.startswith("error: recipe plug-in 'faulty' raised ValueError: no data for this seed at ")
    assert said.endswith("faulty.py:6")


def test_a_run_loads_only_the_named_recipe():
    script = textwrap.dedent("""
        import sys
        from metaopt.run.recipe import get
        demo = get("demo")
        assert not demo.presets.loaded  # no --preset: not even its own preset files are read
        assert demo.presets["smoke"]["outer"]["steps"] > 0 and demo.presets.loaded
        recipes = {"demo", "distill", "hpo", "structure"}
        loaded = sorted(recipes & {m.split(".")[2] for m in sys.modules if m.startswith("metaopt.recipes.")})
        print(" ".join(loaded))
        from metaopt.run.recipe import recipes
        assert all(not r.presets.loaded for name, r in recipes().items() if name != "demo")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["demo", "distill"]  # demo is built on distill's modules; hpo, structure not imported


def test_presets_given_as_a_folder_are_read_on_first_use(tmp_path):
    from metaopt.recipes.demo import RECIPE
    from metaopt.run.recipe import Presets, Recipe

    (tmp_path / "smoke.toml").write_text("[outer]\nsteps = 2\n")
    recipe = Recipe(name="mine", description="", config=RECIPE.config, build=RECIPE.build, presets=tmp_path)
    assert isinstance(recipe.presets, Presets) and not recipe.presets.loaded
    (tmp_path / "fast.toml").write_text('extends = "smoke"\n[outer]\neval_every = 1\n')  # written after: still seen
    assert dict(recipe.presets) == {"smoke": {"outer": {"steps": 2}}, "fast": {"outer": {"steps": 2, "eval_every": 1}}}
    assert recipe.presets.loaded and list(recipe.presets) == ["smoke", "fast"]


# -- a failed run, the progress line ---------------------------------------------------------------------


def test_an_unexpected_error_in_a_run_is_exit_3_with_where(tmp_path, monkeypatch, capsys):
    from metaopt.recipes.demo.task import DemoTask

    def broken(self, hyper, generator):
        raise RuntimeError("the evaluation\nbroke")

    monkeypatch.setattr(DemoTask, "evaluate", broken)
    assert cli.main([*SMOKE, "--out", str(tmp_path / "r")]) == 3
    said = one_line(capsys.readouterr().err)
    assert said.startswith("error: the run failed: RuntimeError: the evaluation broke (at metaopt/run/runner.py:")
    assert said.endswith("; --debug shows the traceback")


def test_progress_line_has_elapsed_eta_and_the_last_metric():
    line = cli.progress_line(12, 60, 0.123456, "test_accuracy 0.912", 5.2, 80.4)
    assert line == "outer step 12/60  loss 0.1235  test_accuracy 0.912  elapsed 0:00:05  eta 0:01:20"
    assert cli.progress_line(1, 3, 1.0, "", 0.0, None).endswith("loss 1.0000  elapsed 0:00:00  eta -:--:--")
    assert cli._metrics({"step": 4, "test_accuracy": 0.91234, "note": "x", "train_loss": 0.5}) == "test_accuracy 0.9123"


def test_progress_bar_on_a_terminal_shows_the_same():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system=None)
    st = SimpleNamespace()
    with cli._Progress(console) as update:
        for step in (1, 2):
            st.step, st.evals = step, [{"step": step, "test_accuracy": 0.5 + step / 10}]
            update(st, {"step": step, "loss": 0.25, "seconds": 0.01}, 4)
    shown = buf.getvalue()
    assert "2/4" in shown and "loss 0.2500" in shown and "test_accuracy 0.7" in shown
    assert "elapsed" in shown and "eta" in shown
