"""A network whose edges mix candidate basis functions (Bakhteev & Strijov).

Nodes ``0 .. J``: node 0 is the input ``x``; every other node ``j`` is
``f_j = sum_{(j, k) in edges} sum_h gamma_jk[h] * g_jk^h(f_k)``, the structure weights ``gamma_jk``
on the simplex mixing the edge's ``K_jk`` basis functions ``g_jk^h``; the last node is the output.
A discrete structure picks one basis function per edge (a vertex of every simplex): there are
``prod K_jk`` of them.

Basis functions (each with its own weights):

* ``"zero"`` — 0; ``"const"`` — a learned constant ``b``; ``"identity"`` — ``f_k`` itself (equal widths);
* ``"linear"``, ``"tanh"``, ``"sigmoid"``, ``"relu"`` — ``act(f_k W + b)``;
* ``"<act>:<w>"`` — the same with only the first ``w`` output units (a narrower layer, zero-padded:
  Bakhteev's "layers of different widths");
* ``"mlp:<h>:<act>"`` — a two-layer ``act`` network with ``h`` hidden units (an over-complex candidate).

Weights are evaluated for ``S`` samples at once: every weight tensor carries a leading sample axis
``[S, ...]`` and every ``gamma`` is ``[S, K]``; the output is ``[S, B, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_ACTS = {"linear": lambda z: z, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


@dataclass(frozen=True)
class Edge:
    """Edge ``source -> target`` with its candidate basis functions."""

    target: int
    source: int
    basis: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"e{self.target}_{self.source}"


def _parse(spec: str) -> tuple[str, int | None, str | None]:
    """``(kind, width_or_hidden, activation)`` of a basis name (see the module docstring)."""
    if spec in ("zero", "const", "identity") or spec in _ACTS:
        return spec, None, None
    parts = spec.split(":")
    if len(parts) == 2 and parts[0] in _ACTS and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1]), None
    if len(parts) == 3 and parts[0] == "mlp" and parts[1].isdigit() and int(parts[1]) > 0 and parts[2] in _ACTS:
        return "mlp", int(parts[1]), parts[2]
    raise ValueError(f"unknown basis function {spec!r}: use zero, const, identity, linear, tanh, sigmoid, relu, "
                     "<act>:<width> or mlp:<hidden>:<act>")


class StructureGraph:
    """The graph: node widths ``widths[j]`` (``widths[0]`` the input's, ``widths[-1]`` the output's)
    and ``edges`` as ``(target, source, [basis, ...])`` with ``source < target``."""

    def __init__(self, widths: Sequence[int], edges: Sequence[tuple[int, int, Sequence[str]]]) -> None:
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"StructureGraph: widths {list(widths)} must list >= 2 positive node widths")
        self.widths = [int(w) for w in widths]
        self.edges = [Edge(int(t), int(s), tuple(b)) for t, s, b in edges]
        J = len(self.widths) - 1
        for e in self.edges:
            if not 0 <= e.source < e.target <= J:
                raise ValueError(f"edge {e.target} <- {e.source}: need 0 <= source < target <= {J}")
            if not e.basis:
                raise ValueError(f"edge {e.name} has no basis functions")
            for b in e.basis:
                kind, width, _ = _parse(b)
                if kind == "identity" and self.widths[e.source] != self.widths[e.target]:
                    raise ValueError(f"edge {e.name}: 'identity' needs equal widths, got "
                                     f"{self.widths[e.source]} -> {self.widths[e.target]}")
                if kind in _ACTS and width is not None and width > self.widths[e.target]:
                    raise ValueError(f"edge {e.name}: {b!r} is wider than node {e.target} ({self.widths[e.target]})")
        for j in range(1, J + 1):
            if not any(e.target == j for e in self.edges):
                raise ValueError(f"node {j} has no incoming edge")

    @property
    def structures(self) -> int:
        """Number of discrete structures ``prod K_jk``."""
        n = 1
        for e in self.edges:
            n *= len(e.basis)
        return n

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every weight (``"<edge>.<h>.W"``, ``".b"``, and ``".W2"``/``".b2"`` for MLPs)."""
        out: dict[str, tuple[int, ...]] = {}
        for e in self.edges:
            d_in, d_out = self.widths[e.source], self.widths[e.target]
            for h, b in enumerate(e.basis):
                kind, width, _ = _parse(b)
                p = f"{e.name}.{h}"
                if kind == "const":
                    out[f"{p}.b"] = (d_out,)
                elif kind in _ACTS:
                    out[f"{p}.W"], out[f"{p}.b"] = (d_in, d_out), (d_out,)
                elif kind == "mlp":
                    out[f"{p}.W"], out[f"{p}.b"] = (d_in, width), (width,)
                    out[f"{p}.W2"], out[f"{p}.b2"] = (width, d_out), (d_out,)
        return out

    def fan_in(self, name: str) -> int:
        """Inputs of the layer a weight belongs to (for initialisation scales)."""
        shape = self.weight_shapes()[name]
        return shape[0] if len(shape) == 2 else 1

    def basis_output(self, e: Edge, h: int, W: Mapping[str, Tensor], f: Tensor) -> Tensor:
        """``g_e^h(f)`` for ``f [S, B, d_in]``: ``[S, B, d_out]``."""
        kind, width, act = _parse(e.basis[h])
        p = f"{e.name}.{h}"
        d_out = self.widths[e.target]
        if kind == "zero":
            return f.new_zeros(*f.shape[:-1], d_out)
        if kind == "identity":
            return f
        if kind == "const":
            return W[f"{p}.b"].unsqueeze(1).expand(*f.shape[:-1], d_out)
        if kind == "mlp":
            z = _ACTS[act](torch.baddbmm(W[f"{p}.b"].unsqueeze(1), f, W[f"{p}.W"]))
            return torch.baddbmm(W[f"{p}.b2"].unsqueeze(1), z, W[f"{p}.W2"])
        z = _ACTS[kind](torch.baddbmm(W[f"{p}.b"].unsqueeze(1), f, W[f"{p}.W"]))
        if width is not None and width < d_out:
            mask = torch.zeros(d_out, dtype=z.dtype, device=z.device)
            mask[:width] = 1
            z = z * mask
        return z

    def forward(self, W: Mapping[str, Tensor], gamma: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``[S, B, widths[-1]]`` for weights ``W[name] [S, *shape]``, structure weights
        ``gamma[edge] [S, K]`` and inputs ``x [B, widths[0]]``."""
        S = gamma[self.edges[0].name].shape[0]
        nodes: list[Tensor | None] = [x.unsqueeze(0).expand(S, *x.shape)] + [None] * (len(self.widths) - 1)
        for j in range(1, len(self.widths)):
            total = None
            for e in self.edges:
                if e.target != j:
                    continue
                f, g = nodes[e.source], gamma[e.name]
                for h in range(len(e.basis)):
                    term = g[:, h].reshape(-1, 1, 1) * self.basis_output(e, h, W, f)
                    total = term if total is None else total + term
            nodes[j] = total
        return nodes[-1]

    def vertex(self, choice: Mapping[str, int], samples: int = 1,
               dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """One-hot ``gamma`` for a discrete structure ``{edge name: basis index}`` (``[samples, K]``)."""
        out = {}
        for e in self.edges:
            g = torch.zeros(samples, len(e.basis), dtype=dtype)
            g[:, choice[e.name]] = 1
            out[e.name] = g
        return out

    def all_structures(self) -> list[dict[str, int]]:
        """Every discrete structure, as ``{edge name: basis index}``."""
        out: list[dict[str, int]] = [{}]
        for e in self.edges:
            out = [{**c, e.name: h} for c in out for h in range(len(e.basis))]
        return out


def make_graph(name: str) -> StructureGraph:
    """``tanh3``: one edge, constant / tanh (the truth) / over-complex MLP; ``enum8``: 2 x 2 x 2
    structures (activation, head, skip); ``wine8``: 4 hidden-layer candidates x 2 skip options."""
    if name == "tanh3":
        return StructureGraph([2, 1], [(1, 0, ["const", "tanh", "mlp:10:tanh"])])
    if name == "enum8":
        return StructureGraph([2, 3, 1], [(1, 0, ["tanh", "relu"]), (2, 1, ["linear", "const"]),
                                          (2, 0, ["linear", "zero"])])
    return StructureGraph([13, 8, 3], [(1, 0, ["tanh", "relu", "sigmoid", "tanh:2"]), (2, 1, ["linear"]),
                                       (2, 0, ["zero", "linear"])])
