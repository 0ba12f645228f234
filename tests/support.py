"""Helpers the test folders share, one definition each: waiting for a condition, a free loopback port, an app served
on loopback, a started demo-model engine, a pretend small machine behind the engine's memory probe, and a Hugging
Face cache layout. Folder-specific helpers stay beside their tests (``tests/service/helpers.py``: a whole server).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from zimage_ui.memory.probe import RawMemory
from zimage_ui.units import GiB

REV_A = "a" * 40  # a commit hash for an HF cache snapshot


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; AssertionError after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(app: Any, up_path: str = "") -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a thread, on a free loopback port; yields ``http://127.0.0.1:PORT/``
    once ``up_path`` answers 200 (as Gradio's own tests poll its info route), and stops the server after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            return httpx.get(url + up_path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, 0.1, f"{url}{up_path} answering")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def demo_engine(allocator: Any = None, **settings: Any) -> Iterator[Any]:
    """A started engine on the demo model (``save_images`` off unless given), shut down afterwards; ``allocator``:
    the engine's seam for CUDA's numbers (``FakeAllocator`` in tests/engine/test_memory_truth.py)."""
    from zimage_ui.engine.engine import Engine
    from zimage_ui.settings import Settings

    engine = Engine(Settings(**{"model": "demo", "save_images": False, **settings}), allocator=allocator)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown(0)


@dataclass
class SmallMachine:
    """A test-only memory source behind the probe's interface: a machine with ``total`` bytes, ``used`` of them
    taken by others. Admission is then decided by the engine's real estimator against these numbers, so a big
    request is honestly 'over' on this pretend machine (the real one is too big to fill honestly)."""

    total: int = 4 * GiB
    used: int = 0

    def read(self) -> RawMemory:
        return RawMemory(kind="cpu", name="small test machine", total=self.total, allocated=0, reserved=0,
                         device_used=self.used)

    def reset_peak(self) -> None:
        pass


@contextlib.contextmanager
def small_machine(engine: Any, total: int = 4 * GiB, used: int = 0) -> Iterator[SmallMachine]:
    """Put ``engine``'s memory probe on a :class:`SmallMachine` for the duration (the probe is the engine's test
    seam for memory, reached through ``engine.test_seam()``: everything that measures goes through it)."""
    source = SmallMachine(total, used)
    with engine.test_seam().fake_memory(source):
        yield source


def make_hf_snapshot(cache: Path, repo_id: str, src: Path, rev: str = REV_A, ref: bool = True) -> Path:
    """Write ``src`` into a Hugging Face hub cache layout as huggingface_hub does: blobs/ + snapshots/<rev>/ of
    relative symlinks (+ refs/main = rev when ``ref``). Returns the snapshot folder."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
    return snap
