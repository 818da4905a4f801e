"""Tiny pytree helpers over (nested) dicts of tensors, the structure every metaopt API uses.

Kept in one place so the rest of the code never touches ``torch.utils._pytree`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

Tree = Any

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_leaves = pytree.tree_leaves


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure."""
    return pytree.tree_map(fn, tree, *rest)


def detach(tree: Tree, requires_grad: bool = False) -> Tree:
    """Detached copy of every tensor leaf (optionally a fresh leaf that requires grad)."""

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return t.requires_grad_() if requires_grad and t.is_floating_point() else t

    return pytree.tree_map(one, tree)


def nbytes(tree: Tree) -> int:
    """Total bytes held by the tensor leaves of ``tree``."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def zeros_like(tree: Tree) -> Tree:
    return pytree.tree_map(torch.zeros_like, tree)
