"""Every doctest in the package runs (what ``pytest --doctest-modules zimage_ui`` runs), as part of the suite."""

import doctest
import importlib
import io
import types
from pathlib import Path

import pytest

import zimage_ui

PACKAGE_DIR = Path(zimage_ui.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(path) for path in PACKAGE_DIR.rglob("*.py") if ">>>" in path.read_text("utf-8"))


def test_the_package_has_doctests():
    assert len(MODULES) >= 20, MODULES


def run_doctests(module: types.ModuleType) -> tuple[int, int, str]:
    """(examples tried, failed, the failures' report) for every doctest in ``module``."""
    runner = doctest.DocTestRunner()
    out = io.StringIO()
    for test in doctest.DocTestFinder().find(module):
        if test.examples:
            runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    return result.attempted, result.failed, out.getvalue()


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    tried, failed, report = run_doctests(importlib.import_module(name))
    assert tried, f"{name} shows '>>>' but no doctest was found in it"
    assert failed == 0, report[-6000:]


def test_a_wrong_doctest_fails():
    module = types.ModuleType("made_up", "A made-up module.\n\n    >>> 1 + 1\n    3\n")
    tried, failed, report = run_doctests(module)
    assert (tried, failed) == (1, 1) and "Expected:\n    3\nGot:\n    2" in report
