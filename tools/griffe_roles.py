"""A griffe extension for the docs site: render the reST bits of metaopt's docstrings as Markdown.

The docstrings are Google style with two reST habits that Markdown would show verbatim: Sphinx roles
(``:class:`metaopt.Ensemble` `` becomes `` `metaopt.Ensemble` ``; a leading ``~`` keeps the last
name) and literal blocks introduced by ``::`` (the indented block after them is already Markdown
code, so only the second colon goes). Used from ``mkdocs.yml`` (mkdocstrings' ``extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc|const):`(~?)([^`]+)`")
LITERAL = re.compile(r"::[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as inline code and ``::`` line ends as ``:``."""
    return LITERAL.sub(":", ROLE.sub(_role, text))


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
