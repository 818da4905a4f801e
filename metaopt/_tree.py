"""Tiny pytree helpers over (nested) dicts of tensors, the structure every metaopt API uses.

Kept in one place so the rest of the code never touches ``torch.utils._pytree`` directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

Tree = Any

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten


def nbytes(tree: Tree) -> int:
    """Total bytes held by the tensor leaves of ``tree``."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))
