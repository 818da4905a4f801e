"""The ``>>>`` examples in the public docstrings run and print what they say (doctest), as a reader
would run them: torch's own default dtype (float32), one thread, the global RNG untouched."""

import doctest
import importlib

import pytest
import torch

from metaopt import hypergrad as hg

# module -> the objects whose docstrings must carry examples (so a deleted example fails here too)
DOCUMENTED = {
    "metaopt.hypergrad.api": ["hypergradient"],
    "metaopt.hypergrad.methods": ["Method"],
    "metaopt.optim._sgd": ["sgd"],
    "metaopt.optim._adam": ["adam"],
    "metaopt.optim._adaptive": ["rmsprop"],
    "metaopt.optim.compose": ["clip_by_global_norm", "chain", "masked", "partition"],
    "metaopt.optim.stateful": ["functional_of"],
    "metaopt.hypergrad.implicit": ["custom_root"],
    "metaopt.hypergrad.level": ["Level"],
}


@pytest.mark.parametrize("module_name", list(DOCUMENTED))
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    tests = {t.name.rsplit(".", 1)[-1]: t for t in doctest.DocTestFinder().find(module) if t.examples}
    missing = [name for name in DOCUMENTED[module_name] if name not in tests]
    assert not missing, f"{module_name}: no >>> examples in the docstrings of {missing}"
    registered = hg.names()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    torch.set_default_dtype(torch.float32)
    with torch.random.fork_rng(devices=[]):
        for test in tests.values():
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= len(DOCUMENTED[module_name])
    assert result.failed == 0, f"{module_name}: {result.failed} of {result.attempted} doctest examples failed"
    assert hg.names() == registered, "a docstring example left the method name table changed"
