"""Small helpers every recipe's report uses: summary statistics, markdown tables, saved figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def stats(values: Tensor) -> dict[str, float | int]:
    """``{mean, std, n}`` of all elements (``std`` 0 for a single value)."""
    v = values.double().flatten()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "n": v.numel()}


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines; floats printed with 4 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(fmt(v) for v in r) + " |" for r in rows
    ]


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
