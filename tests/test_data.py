import numpy as np
import pytest

from metaopt.data import make_moons, moons_split


def test_moons_split_is_identical_to_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.make_moons(1500, noise=0.05, random_state=8)
    ref = model_selection.train_test_split(X, y, test_size=0.33, random_state=8)
    ours = moons_split(1500, noise=0.05, random_state=8, test_size=0.33)
    assert [a.shape for a in ours] == [(1005, 2), (495, 2), (1005,), (495,)]
    for a, b in zip(ours, ref):
        assert np.array_equal(a, b)
    Xo, yo = make_moons(101, noise=None, random_state=3)
    Xr, yr = datasets.make_moons(101, noise=None, random_state=3)
    assert np.array_equal(Xo, Xr) and np.array_equal(yo, yr)
