"""The config schema (metaopt/run/schema.py): its markers, the rules every setting obeys, and seeds
over the whole range [0, 2**63)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated

import numpy as np
import pytest
import torch

from metaopt.data import numpy_seed
from metaopt.run import launch, schema
from metaopt.run.config import ConfigError, MethodTable, from_dict
from metaopt.run.recipe import get
from metaopt.run.schema import Count, Fraction, Length, Note, Positive, Range

RECIPES = ("demo", "distill", "hpo", "structure")


@dataclasses.dataclass
class Toy:
    n: Count = 1
    rate: Positive = 0.5
    p: Fraction = 0.5
    clip: Annotated[float, Range(0), Note("0: off")] = 0.0
    sizes: Annotated[list[Count], Length(1, 3)] = dataclasses.field(default_factory=lambda: [1])
    name: str = "x"


@pytest.mark.parametrize("data, message", [
    ({"n": 0}, "n = 0 must be >= 1"),
    ({"n": 2**63}, "n = 9223372036854775808 must fit in 64 bits (|value| < 2**63)"),
    ({"n": 1.0}, "n = 1.0 must be an integer"),
    ({"rate": 0}, "rate = 0.0 must be > 0"),
    ({"rate": math.inf}, "rate = inf must be a finite number"),
    ({"rate": -math.inf}, "rate = -inf must be > 0"),
    ({"rate": math.nan}, "rate = nan must be a finite number"),
    ({"p": 1}, "p = 1.0 must be in (0, 1)"),
    ({"clip": -1}, "clip = -1.0 must be >= 0 (0: off)"),
    ({"sizes": []}, "sizes = [] must have 1 to 3 items"),
    ({"sizes": [1, 2, 3, 4]}, "sizes = [1, 2, 3, 4] must have 1 to 3 items"),
    ({"sizes": [1, 0]}, "sizes[1] = 0 must be >= 1"),
    ({"name": "a\x00b"}, "name = 'a\\x00b' must not hold control characters"),
])
def test_markers_and_rules_name_the_field_and_the_need(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Toy, data)
    assert str(e.value) == message


def test_every_numeric_setting_of_every_recipe_is_checked():
    """The schema covers every leaf: each float refuses NaN and each int a 65-bit value, by path."""
    for recipe in RECIPES:
        config = get(recipe).config
        for spec in schema.fields(config):
            base = typing.get_args(spec.type)[0] if typing.get_origin(spec.type) is list else spec.type
            if spec.type is MethodTable or base not in (int, float):
                continue
            bad = math.nan if base is float else 2**64
            node: dict = {}
            *tables, key = spec.path.split(".")
            leaf = node
            for t in tables:
                leaf = leaf.setdefault(t, {})
            leaf[key] = [bad] if typing.get_origin(spec.type) is list else bad
            with pytest.raises(ConfigError, match=spec.path.replace(".", r"\.")):
                from_dict(config, node)


def test_numpy_seed_keeps_small_seeds_and_separates_large_ones():
    assert [numpy_seed(s) for s in (None, 0, 7, 2**32 - 1)] == [None, 0, 7, 2**32 - 1]
    big = [2**32, 2**32 + 1, 2**63 - 1, 5 * 2**40 + 3]
    words = [tuple(numpy_seed(s)) for s in big]
    assert len(set(words)) == len(big)
    draws = {tuple(np.random.RandomState(numpy_seed(s)).randint(0, 2**31, 4)) for s in big}
    assert len(draws) == len(big)  # distinct streams
    assert (np.random.RandomState(numpy_seed(2**63 - 1)).rand(3) == np.random.RandomState(numpy_seed(2**63 - 1))
            .rand(3)).all()
    with pytest.raises(ValueError, match="seed"):
        numpy_seed(-1)


def test_the_largest_seed_runs(tmp_path):
    """seed = 2**63 - 1 reaches python, numpy, torch and the recipe's own generators without overflow."""
    st = launch("demo", preset="smoke", seed=2**63 - 1, out=tmp_path / "run", log=lambda m: None,
                overrides=["outer.steps=1", "outer.eval_every=1", "inner.eval_inits=1"])
    assert st.step == 1 and math.isfinite(st.history[-1]["loss"])
    assert "seed = 9223372036854775807" in (tmp_path / "run" / "config.toml").read_text()
    from metaopt.recipes.distill.data import digits

    a, b = digits(seed=2**63 - 1), digits(seed=2**63 - 1)
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, digits(seed=2**62).y)
