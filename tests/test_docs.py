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
