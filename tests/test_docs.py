"""The documentation's examples run: every ```python block of docs/*.md and README.md, in order, one
namespace per file."""

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


PAGES = sorted(p for p in [*DOCS.rglob("*.md"), DOCS.parent / "README.md"] if python_blocks(p))


def test_the_documented_pages_have_examples():
    names = {p.name for p in PAGES}
    assert {"optim.md", "ensemble.md", "hypergrad.md"} <= names, f"examples found only in {sorted(names)}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page):
    # Run as a reader would: a fresh namespace and torch's own default dtype (float32); an example
    # that wants float64 sets it itself. The conftest fixture restores the dtype afterwards.
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python blocks"
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    namespace = {"__name__": f"docs_{page.stem}"}
    with torch.random.fork_rng(devices=[]):
        for i, source in enumerate(blocks):
            code = compile(source, f"{page.name}[block {i}]", "exec")
            try:
                exec(code, namespace)
            except Exception as exc:
                pytest.fail(f"{page.name}: python block {i} raised {type(exc).__name__}: {exc}")


# The docs' lists of which methods take compile=True, create_graph=True and autocast=: every list
# written "names(FLAG=True)`: `a`, `b`, ..." (markdown) or "names(FLAG=True)``: ``a``, ``b``" (a
# docstring) must name exactly the registry's methods, and "outside ... names(FLAG=True)`: ..." the
# others, so a new method or a changed flag fails here until the docs say so.
LIST = re.compile(r"(outside\s+`+)?(?:metaopt\.hypergrad\.)?names\((\w+)=True\)`*:([^.;|)]*)")
ROOT = DOCS.parent


def documented_lists(text: str) -> list[tuple[str, bool, set[str]]]:
    """``(flag, complement, names)`` for every list in ``text``."""
    return [(flag, bool(outside), set(re.findall(r"`+([a-z_0-9]+)`+", body)))
            for outside, flag, body in LIST.findall(text)]


def test_the_method_lists_in_the_docs_match_the_registry():
    from metaopt import hypergrad as hg

    sources = [*DOCS.rglob("*.md"), ROOT / "README.md", *(ROOT / "metaopt").rglob("*.py")]
    seen: dict[str, set[str]] = {}
    for path in sources:
        for flag, complement, listed in documented_lists(path.read_text(encoding="utf-8")):
            registry = set(hg.names(**{flag: True}))
            expected = set(hg.names()) - registry if complement else registry
            where = f"{path.relative_to(ROOT)}: {'outside ' if complement else ''}names({flag}=True)"
            assert listed == expected, (f"{where} lists {sorted(listed)}; the registry says {sorted(expected)} "
                                        f"(missing {sorted(expected - listed)}, extra {sorted(listed - expected)})")
            seen.setdefault(flag, set()).add(path.name)
    # the lists a reader looks for are there (the check above cannot pass by finding none)
    for flag in ("compilable", "differentiable", "autocast"):
        assert {"hypergrad.md", "api.py"} <= seen.get(flag, set()), f"names({flag}=True) lists found in {seen}"


def test_documented_lists_are_parsed():
    text = ("a (`metaopt.hypergrad.names(compilable=True)`: `full`, `drmad` and `recursive`). "
            "b outside ``names(differentiable=True)``: ``forward``, ``drmad``; c names(autocast=True) alone.")
    assert documented_lists(text) == [("compilable", False, {"full", "drmad", "recursive"}),
                                      ("differentiable", True, {"forward", "drmad"})]
