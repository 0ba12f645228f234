"""A real zimage-ui server for tests: uvicorn on a loopback socket, the demo model, in this process or another.
(``free_port`` and ``wait_until`` come from tests/support.py and are named here for the service tests.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from zimage_ui.service.server import Service, loopback_socket
from zimage_ui.settings import Settings

from ..support import free_port, wait_until

START_TIMEOUT_S = 120  # a loaded CI machine imports torch and builds the demo model slowly


def free_socket() -> socket.socket:
    """A listening-ready socket on a free loopback port (bound now, so no other test can take the port)."""
    return loopback_socket()


def metric(http: httpx.Client, name: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    for line in http.get("/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return 0.0


def wait_ready(url: str, timeout: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, 0.1, f"{url}/readyz 200")


def statuses_until_ready(url: str, alive=lambda: True, timeout: float = START_TIMEOUT_S) -> list[tuple[int, str]]:
    """Every (HTTP code, status) /readyz gave until it said 200; checks /healthz answers meanwhile."""
    seen: list[tuple[int, str]] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert alive(), "server exited while starting"
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        seen.append((r.status_code, r.json()["status"]))
        if r.status_code == 200:
            return seen
        assert httpx.get(f"{url}/healthz", timeout=2).json() == {"status": "ok"}  # alive while not ready
        time.sleep(0.05)
    raise AssertionError(f"never ready: {seen[-3:]}")


class LiveServer:
    """``Service.run`` on a thread: the same code ``zimage-ui serve`` runs, minus signal handlers."""

    def __init__(self, settings: Settings, *, wait: bool = True, **service_kwargs: Any):
        self.sock = free_socket()
        port = self.sock.getsockname()[1]
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        self.url = f"http://127.0.0.1:{port}"
        self.service = Service(self.settings, install_signal_handlers=False, hard_exit=False, **service_kwargs)
        self.engine = self.service.engine
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"live-server-{port}", daemon=True)
        self.thread.start()
        wait_until(lambda: self.service.started or self.exit_code is not None, START_TIMEOUT_S, what="listening")
        if wait:
            wait_ready(self.url)

    def _run(self) -> None:
        self.exit_code = self.service.run(sockets=[self.sock])

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self, timeout: float = 90) -> int | None:
        if self.thread.is_alive():
            self.service.request_stop("test teardown")
            self.thread.join(timeout)
        return self.exit_code


def held_demo_engine(settings: Settings) -> tuple[Any, threading.Event]:
    """An engine whose demo-model load waits for the returned event: a test sees the server while it loads
    (the demo model alone loads faster than a test's first poll)."""
    from zimage_ui.engine.engine import Engine
    from zimage_ui.models.loading import load_model
    from zimage_ui.models.sources import resolve_model

    release = threading.Event()

    def load(settings: Settings, device: Any) -> Any:
        assert release.wait(START_TIMEOUT_S), "the test never released the model load"
        return load_model(resolve_model("demo").source, device=device)

    return Engine(settings, loader=load), release


class Gate:
    """A runner fault hook that holds the running job at its first step until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: Any, attempt: int) -> None:
        self.entered.set()
        self.release.wait(60)


def demo_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(model="demo", output_dir=tmp / "out", log_level="warning")
    values.update(overrides)
    return Settings(**values)


def serve_subprocess(tmp: Path, *args: str, port: int | None = None, log_name: str = "server.log",
                     launcher: tuple[str, ...] = ("-m", "zimage_ui.cli")) -> tuple[subprocess.Popen, str, Path]:
    """``zimage-ui serve --model demo`` as a user starts it; returns (process, base URL, log file).
    ``launcher``: the interpreter's arguments before ``serve`` (another way to start the same CLI)."""
    port = port or free_port()
    log = tmp / log_name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, *launcher, "serve", "--model", "demo", "--port", str(port),
           "--output-dir", str(tmp / "out"), *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return proc, f"http://127.0.0.1:{port}", log


def stop_subprocess(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise
