"""Every docstring example in armguard runs and prints what it says (as river does)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import armguard.daemon
import armguard.detectors


def _modules() -> list[str]:
    names = []
    for pkg in (armguard.detectors, armguard.daemon):
        names.append(pkg.__name__)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=pkg.__name__ + "."):
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_modules_found():
    assert "armguard.detectors.summary" in MODULES and "armguard.daemon.engine" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"


def test_every_public_detector_has_an_example_that_runs():
    for name in armguard.detectors.__all__:
        obj = getattr(armguard.detectors, name)
        if not isinstance(obj, type) or not hasattr(obj, "update"):
            continue  # result dataclasses and helpers are documented, detectors carry examples
        tests = doctest.DocTestFinder(recurse=False).find(obj)
        assert tests and tests[0].examples, f"{name} has no Examples doctest"
