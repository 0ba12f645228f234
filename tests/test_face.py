"""The engine's one face: the doors use nothing of the engine that ``EngineAPI`` (the bench: ``BenchAPI``) does not
name, and the in-process ``Engine`` implements both with the same signatures."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from zimage_ui.engine.api import BenchAPI, EngineAPI
from zimage_ui.engine.engine import Engine
from zimage_ui.settings import Settings

PACKAGE = Path(__file__).resolve().parents[1] / "zimage_ui"
DOORS = sorted([*PACKAGE.joinpath("ui").rglob("*.py"), *PACKAGE.joinpath("service").rglob("*.py"),
                PACKAGE / "cli.py"])
BENCH = [PACKAGE / "bench.py", PACKAGE / "bench_memory.py"]


def face_names(protocol: type) -> set[str]:
    """What a protocol names: its methods and properties, its bases' too."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object,) or cls.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


def _is_engine(node: ast.expr) -> bool:
    """``engine``, ``self.engine``, ``ctx.engine``, ``app.state.engine``: an expression that holds the engine."""
    return (isinstance(node, ast.Name) and node.id == "engine") or (
        isinstance(node, ast.Attribute) and node.attr == "engine")


def engine_uses(source: str) -> list[tuple[int, str]]:
    """(line, attribute) for every attribute of the engine the code reads or calls, ``getattr`` included.

    >>> engine_uses("x = self.engine.worker.depth\\ny = getattr(engine, 'probe', None)\\nengine.submit(r)")
    [(1, 'worker'), (2, 'probe'), (3, 'submit')]
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_engine(node.value):
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and node.args and _is_engine(node.args[0]) and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant)):
            found.append((node.lineno, node.args[1].value))
    return sorted(found)


def outside_face(files: list[Path], allowed: set[str]) -> list[str]:
    return [f"{path.name}:{line}: engine.{attr}"
            for path in files for line, attr in engine_uses(path.read_text()) if attr not in allowed]


def test_doors_use_only_the_face():
    assert len(DOORS) > 10 and PACKAGE / "service" / "routes" / "api.py" in DOORS
    # limits.py: the doors' shared rules (a kiosk's caps), handed the engine by the page and the API
    assert outside_face([*DOORS, PACKAGE / "limits.py"], face_names(EngineAPI)) == []


def test_bench_uses_only_its_extension():
    assert outside_face(BENCH, face_names(BenchAPI)) == []


def test_the_check_sees_a_door_reaching_inside(tmp_path):
    door = tmp_path / "door.py"
    door.write_text("def f(self):\n    return self.engine.worker.running, getattr(self.engine, 'probe', None)\n")
    assert outside_face([door], face_names(EngineAPI)) == ["door.py:2: engine.probe", "door.py:2: engine.worker"]
    engine = Engine(Settings(model="demo", save_images=False))
    assert hasattr(engine, "worker") and "worker" not in face_names(EngineAPI)  # the engine has it, the face not


def test_no_door_types_its_engine_as_any():
    pattern = ("engine: Any", "engine: Any =", "engine: object")
    offenders = [f"{p.name}:{i}" for p in DOORS + BENCH for i, line in enumerate(p.read_text().splitlines(), 1)
                 if any(x in line for x in pattern)]
    assert offenders == []


def _members(protocol: type) -> dict[str, object]:
    members: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        members.update({n: v for n, v in vars(cls).items() if not n.startswith("_")})
    return members


@pytest.mark.parametrize("protocol", [EngineAPI, BenchAPI], ids=["EngineAPI", "BenchAPI"])
def test_engine_implements_the_face_with_its_signatures(protocol):
    engine = Engine(Settings(model="demo", save_images=False))
    assert isinstance(engine, protocol)
    mismatched = []
    for name, declared in _members(protocol).items():
        assert hasattr(engine, name), name
        if isinstance(declared, property):
            continue  # a property of the face may be a plain attribute of the engine
        want, have = inspect.signature(declared), inspect.signature(getattr(Engine, name))
        if want != have:
            mismatched.append(f"{name}: face {want} / engine {have}")
    assert mismatched == []


def test_the_signature_check_can_fail():
    class Wrong:
        def submit(self, raw, owner=None):  # owner not keyword-only, no annotations
            ...

    assert inspect.signature(Wrong.submit) != inspect.signature(EngineAPI.submit)


TESTS = Path(__file__).resolve().parent
ENGINE_NAMES = ("engine", "e", "demo_engine", "idle_engine")  # what the tests call an engine


def test_tests_use_the_face_the_bench_extension_or_the_seam():
    """No test reaches ``engine.runners``, ``engine.worker``, ``engine.probe`` or a private attribute: what a test
    needs from inside goes through ``engine.test_seam()`` (engine/seam.py), documented in one place."""
    allowed = (face_names(BenchAPI) - {"runners", "prompt_cache"}) | {"test_seam"}  # those: the seam's runner
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")) + sorted(TESTS.rglob("conftest.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            holder = node.value if isinstance(node, ast.Attribute) else None
            if holder is None:
                continue
            named = (isinstance(holder, ast.Name) and holder.id in ENGINE_NAMES) or (
                isinstance(holder, ast.Attribute) and holder.attr == "engine")
            if named and node.attr not in allowed and node.attr not in dir(str):  # ``e``: an error text, too
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}: .{node.attr}")
    assert offenders == []
