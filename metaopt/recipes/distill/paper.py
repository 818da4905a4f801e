"""Medvedev & D'yakonov 2020's published numbers (Tables 1 and 2), for side-by-side summaries.

``TABLE[strategy][data row][test architecture] = (mean, std)`` of test accuracy; ``ORIGINAL`` is
training on the whole training set. Rows: data distilled for the 1-, 2- and 4-layer model, and
``all`` (Table 2: the three architectures as the three internal models).
"""

from __future__ import annotations

ARCHS = ("1-layer", "2-layer", "4-layer")

ORIGINAL = {"1-layer": (0.766, 0.089), "2-layer": (0.877, 0.005), "4-layer": (0.995, 0.015)}


def _row(*cells: tuple[float, float]) -> dict[str, tuple[float, float]]:
    return dict(zip(ARCHS, cells))


TABLE = {
    "raw": {
        "1-layer": _row((0.871, 0.003), (0.869, 0.004), (0.864, 0.006)),
        "2-layer": _row((0.808, 0.014), (0.941, 0.043), (0.691, 0.182)),
        "4-layer": _row((0.825, 0.014), (0.879, 0.013), (0.906, 0.054)),
        "all": _row((0.859, 0.005), (0.881, 0.004), (0.867, 0.122)),
    },
    "strategy1": {
        "1-layer": _row((0.863, 0.006), (0.860, 0.008), (0.860, 0.010)),
        "2-layer": _row((0.808, 0.010), (0.956, 0.047), (0.985, 0.015)),
        "4-layer": _row((0.818, 0.012), (0.911, 0.059), (0.916, 0.062)),
        "all": _row((0.851, 0.007), (0.970, 0.028), (0.986, 0.014)),
    },
    "strategy2": {
        "1-layer": _row((0.869, 0.004), (0.867, 0.006), (0.865, 0.005)),
        "2-layer": _row((0.804, 0.012), (0.954, 0.065), (0.672, 0.229)),
        "4-layer": _row((0.827, 0.017), (0.937, 0.035), (0.941, 0.055)),
        "all": _row((0.862, 0.007), (0.941, 0.027), (0.984, 0.017)),
    },
    "strategy3": {
        "1-layer": _row((0.870, 0.003), (0.866, 0.006), (0.863, 0.008)),
        "2-layer": _row((0.807, 0.011), (0.961, 0.041), (0.834, 0.210)),
        "4-layer": _row((0.835, 0.016), (0.910, 0.041), (0.955, 0.039)),
        "all": _row((0.858, 0.006), (0.897, 0.014), (0.965, 0.045)),
    },
}
