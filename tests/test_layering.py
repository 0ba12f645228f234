"""The package's layers, read from its source: a lower layer never imports a higher one.

Every ``import`` / ``from … import`` counts, at module level and inside functions (a lazy import is still a
dependency), as does ``importlib.import_module("zimage_ui.…")`` with a literal name. The layers:

- ``memory`` (measuring and planning GPU memory) imports no engine, ui or service;
- ``models`` (where weights come from) imports no engine, ui or service;
- ``engine`` (the queue and the pipeline) imports no ui or service;
- ``scale`` (engines as Ray Serve replicas, behind the same face) sits beside the engine: no ui or service, and
  nothing below the doors imports it (the service starts it for ``serve --replicas``);
- ``ui`` and ``service`` (two doors) import each other only where the service puts the doors together;
- only the engine and memory talk to NVML (``memory.nvml``); the doors ask the engine (``Engine.gpu_stats``);
- the shared top-level modules (settings, validation, presets, sizes, limits, users, …) import none of
  engine, ui or service; only the entry points (cli, bench, bench_memory, doctor) sit above everything.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import zimage_ui

PACKAGE_DIR = Path(zimage_ui.__file__).resolve().parent
LAYERS = ("engine", "memory", "models", "scale", "service", "ui")
ENTRY_POINTS = {"zimage_ui.cli", "zimage_ui.bench", "zimage_ui.bench_memory", "zimage_ui.doctor"}
FORBIDDEN = {
    "memory": {"engine", "scale", "ui", "service"},
    "models": {"engine", "scale", "ui", "service"},
    "engine": {"scale", "ui", "service"},
    "scale": {"ui", "service"},
    "ui": {"service", "scale"},
    "service": {"ui"},
    "shared": {"engine", "scale", "ui", "service"},
}
NVML = "zimage_ui.memory.nvml"
NVML_USERS = {"memory", "engine", None}  # None: the entry points (doctor, bench_memory)
# (importer, imported) -> why it is allowed. Each must still exist (see test_allowed_exceptions_are_still_needed).
ALLOWED = {
    ("zimage_ui.service.app", "zimage_ui.ui"): "create_app mounts the page beside the API: the service is where "
                                               "the two doors are put together (ui=False or no ui package: none)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (PACKAGE_DIR.parent / name.replace(".", "/") / "__init__.py").is_file()


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every zimage_ui module ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from ..memory import nvml`` imports the module zimage_ui.memory.nvml
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if is_package(target) and (PACKAGE_DIR.parent / target.replace(".", "/")
                                                 / f"{alias.name}.py").is_file()]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return [(line, target) for line, target in found if target == "zimage_ui" or target.startswith("zimage_ui.")]


def layer(name: str) -> str | None:
    """The layer of a module name: one of LAYERS, "shared", or None (the package itself, the entry points)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    if name == "zimage_ui" or name in ENTRY_POINTS:
        return None
    return "shared"


def all_imports() -> dict[str, list[tuple[int, str]]]:
    return {module_name(path): imported_names(path) for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def wrong_way(graph: dict[str, list[tuple[int, str]]]) -> tuple[list[str], set[tuple[str, str]]]:
    """Each import from a lower layer into a higher one (file:line, what), and the allowed ones that were used."""
    errors, used = [], set()
    for importer, targets in graph.items():
        mine = layer(importer)
        for line, target in targets:
            if target == NVML and mine not in NVML_USERS:
                errors.append(f"{importer.replace('.', '/')}.py:{line}: {mine} talks to NVML directly; "
                              "ask the engine (Engine.gpu_stats)")
                continue
            theirs = layer(target)
            if mine is None or theirs is None or theirs not in FORBIDDEN.get(mine, ()):
                continue
            allowed = next((key for key in ALLOWED if importer == key[0]
                            and (target == key[1] or target.startswith(key[1] + "."))), None)
            if allowed:
                used.add(allowed)
                continue
            errors.append(f"{importer.replace('.', '/')}.py:{line}: {mine} imports {target} ({theirs})")
    return errors, used


def test_no_layer_imports_a_higher_one():
    errors, _ = wrong_way(all_imports())
    assert not errors, "imports against the layering:\n" + "\n".join(errors)


def test_allowed_exceptions_are_still_needed():
    _, used = wrong_way(all_imports())
    assert used == set(ALLOWED), f"no longer imported, drop from ALLOWED: {set(ALLOWED) - used}"


def closure(start: str, graph: dict[str, list[tuple[int, str]]]) -> set[str]:
    """Every zimage_ui module reachable from the modules under ``start`` (lazy imports included)."""
    edges = defaultdict(set)
    for importer, targets in graph.items():
        edges[importer] |= {target for _, target in targets}
    todo = [name for name in graph if name == start or name.startswith(start + ".")]
    seen = set(todo)
    while todo:
        for target in edges[todo.pop()]:
            # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                name = ".".join(parts[:end])
                if name in graph and name not in seen:
                    seen.add(name)
                    todo.append(name)
    return seen


@pytest.mark.parametrize("start", ["zimage_ui.engine", "zimage_ui.memory", "zimage_ui.models"])
def test_what_a_layer_reaches_stays_below_the_doors(start):
    # through a shared module too: engine -> limits -> ui.sizes once pulled in the UI's folder
    reached = closure(start, all_imports())
    doors = sorted(name for name in reached if layer(name) in ("ui", "service"))
    assert not doors, f"{start} reaches {doors}"


def test_the_walker_sees_relative_lazy_and_submodule_imports():
    # the walker itself, on a file it must read right: a relative import inside a function, from-import of a module
    graph = all_imports()
    app = {target for _, target in graph["zimage_ui.service.app"]}
    assert "zimage_ui.ui" in app  # lazy, inside create_app
    probe = {target for _, target in graph["zimage_ui.memory.probe"]}
    assert "zimage_ui.memory.nvml" in probe  # from zimage_ui.memory import nvml


def test_bad_imports_are_caught(tmp_path):
    # the rules on made-up graphs: each forbidden direction is reported, an allowed one is not
    bad = {"zimage_ui.engine.engine": [(3, "zimage_ui.ui.sizes")],
           "zimage_ui.ui.page": [(5, "zimage_ui.service.security")],
           "zimage_ui.memory.probe": [(7, "zimage_ui.engine.jobs")],
           "zimage_ui.models.demo": [(9, "zimage_ui.service")],
           "zimage_ui.limits": [(11, "zimage_ui.ui.sizes")],
           "zimage_ui.service.app": [(13, "zimage_ui.ui")],
           "zimage_ui.cli": [(15, "zimage_ui.ui")],
           "zimage_ui.ui.gpu": [(17, "zimage_ui.memory.nvml")],
           "zimage_ui.doctor": [(19, "zimage_ui.memory.nvml")]}
    errors, used = wrong_way(bad)
    assert [e.split(":")[0] + ":" + e.split(":")[1] for e in errors] == [
        "zimage_ui/engine/engine.py:3", "zimage_ui/ui/page.py:5", "zimage_ui/memory/probe.py:7",
        "zimage_ui/models/demo.py:9", "zimage_ui/limits.py:11", "zimage_ui/ui/gpu.py:17"]
    assert used == set(ALLOWED)


@pytest.mark.slow  # a fresh interpreter each: 24-27 s on a loaded 2-core machine
@pytest.mark.parametrize("layer_name", ["engine", "memory"])
def test_importing_a_lower_layer_loads_no_web_framework(layer_name):
    # every module of the layer, in a fresh interpreter: gradio and fastapi must stay unloaded
    code = f"""
import importlib, pkgutil, sys
import zimage_ui.{layer_name} as pkg
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gradio", "fastapi", "starlette", "uvicorn"))
print(len([m for m in sys.modules if m.startswith("zimage_ui.{layer_name}.")]), loaded)
"""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    count, loaded = done.stdout.strip().split(" ", 1)
    assert int(count) >= 3, done.stdout  # the walk imported the layer's modules
    assert loaded == "[]", f"importing zimage_ui.{layer_name} loaded {loaded}"
