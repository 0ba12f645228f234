"""Every doctest in the package runs (what ``pytest --doctest-modules zimage_ui`` runs), as part of the suite, so CI
(``scripts/test``, the whole suite) runs them all: each module's examples are counted against the ``>>>`` lines it
shows."""

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


SOURCES = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py") if ">>>" in path.read_text("utf-8")}
MODULES = sorted(SOURCES)


def prompts(path: Path) -> int:
    """How many ``>>>`` example lines the source shows."""
    return sum(line.lstrip().startswith(">>>") for line in path.read_text("utf-8").splitlines())


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
    # every example the source shows ran: none sits where the finder does not look (a nested function, a comment)
    assert tried == prompts(SOURCES[name]), f"{name}: {tried} examples ran of {prompts(SOURCES[name])} shown"


def test_an_example_the_finder_cannot_see_is_counted(tmp_path):
    # the check above can fail: an example in a nested function's docstring is shown but never run
    source = tmp_path / "made_up.py"
    source.write_text('def outer():\n    def inner():\n        """\n        >>> 1 + 1\n        2\n        """\n')
    module = types.ModuleType("made_up")
    exec(compile(source.read_text(), str(source), "exec"), module.__dict__)
    assert run_doctests(module)[0] == 0 and prompts(source) == 1


def test_a_wrong_doctest_fails():
    module = types.ModuleType("made_up", "A made-up module.\n\n    >>> 1 + 1\n    3\n")
    tried, failed, report = run_doctests(module)
    assert (tried, failed) == (1, 1) and "Expected:\n    3\nGot:\n    2" in report
