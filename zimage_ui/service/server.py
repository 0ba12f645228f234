"""Running the service: engine in the background, uvicorn in front, SIGTERM handling and the watchdog.

``serve(settings)`` is ``zimage-ui serve``. It answers /healthz at once and /readyz 503 (loading, warming) until
the model is ready. Exit codes, for supervisor:

* 0 — stopped by SIGTERM/SIGINT (the running job finished or was cancelled within ``grace_seconds``);
* 1 — the model failed to load or warm up;
* 2 — a setting, the model name or the auth file is wrong (one line says which);
* 3 — the address can't be bound: the port is in use, or no permission (before "serving on …");
* 70 — unhealthy: a sticky CUDA error, a step hung longer than ``watchdog_seconds``, or the worker died.

The port is bound first (``startup.py``): /healthz answers within a second of the start, while torch and the web UI
are still being imported and built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine.jobs import Job, JobState
from ..settings import Settings
from .app import ServiceState, create_app

if TYPE_CHECKING:
    from ..engine.api import EngineAPI

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_UNHEALTHY = 70  # EX_SOFTWARE
FATAL_LINGER_S = 2.0  # /readyz shows the reason this long before the process exits
# After the drain every job is answered; this is for those answers to go out. Streams that never end (an open
# browser tab's event stream) are cut after it instead of holding the exit for the whole grace period.
SEND_ANSWERS_S = 5
WATCH_INTERVAL_S = 0.5
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this long
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; a longer head is answered 400
LOG_REPEATS = 5  # the same log line at most this often per LOG_WINDOW_S; the rest are counted
LOG_WINDOW_S = 10.0

# Errors after which the CUDA context is unusable until the process ends (every later call fails too).
STICKY_CUDA_ERROR = re.compile(
    r"illegal memory access|device-side assert|unspecified launch failure|illegal instruction|misaligned address|"
    r"CUDA error: (?:an )?illegal|CUBLAS_STATUS_EXECUTION_FAILED|CUDNN_STATUS_EXECUTION_FAILED|uncorrectable ECC|"
    r"CUDA error: launch timed out|device not ready|GPU is lost|fell off the bus", re.IGNORECASE)


def is_sticky_cuda_error(message: str) -> bool:
    """Whether an error message says the GPU context is broken for good (restart needed).

    >>> is_sticky_cuda_error("RuntimeError: CUDA error: an illegal memory access was encountered")
    True
    >>> is_sticky_cuda_error("CUDA out of memory. Tried to allocate 2.00 GiB")
    False
    """
    return bool(STICKY_CUDA_ERROR.search(message))


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port, for serving with ``sockets=[...]`` (the benchmark, tests).

    TCP_NODELAY is set here because accepted sockets inherit it: asyncio leaves Nagle on for a socket it did not
    create, and every small answer would wait ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class RepeatLimiter(logging.Filter):
    """Lets the same log line (logger and message template) through at most ``repeats`` times per ``window_s``,
    and says how many it held back: a flood of bad requests must not become a flood of log.

    >>> f = RepeatLimiter(repeats=2, window_s=10)
    >>> rec = lambda: logging.LogRecord("x", logging.WARNING, "", 0, "Invalid HTTP request received.", None, None)
    >>> [f.filter(rec()) for _ in range(4)]
    [True, True, False, False]
    """

    def __init__(self, repeats: int = LOG_REPEATS, window_s: float = LOG_WINDOW_S):
        super().__init__()
        self.repeats, self.window_s = repeats, window_s
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window_s:
                held = int(entry[2]) if entry else 0
                if len(self._seen) > 1000:  # many distinct lines: forget the old windows
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
                self._seen[key] = [now, 1, 0]
                if held:
                    record.msg = f"{record.msg} ({held} more like this were not logged)"
                return True
            entry[1] += 1
            if entry[1] <= self.repeats:
                return True
            entry[2] += 1
            return False


def _header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within ``seconds`` of
    connecting or of its previous answer. uvicorn has no such timeout: without it, clients that trickle header
    bytes (slowloris) hold their connections, and file descriptors, forever."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(seconds, self._head_late)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_late(self) -> None:
            self._head_deadline = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._disarm()  # the connection now belongs to the websocket protocol
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


class _QuietCancelledStreams(logging.Filter):
    """At shutdown uvicorn cancels streams that never end (a browser tab's event stream) and logs each as an
    'Exception in ASGI application' traceback; while stopping, that is expected, not an error."""

    def __init__(self, state: ServiceState):
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        stopping = self.state.draining or self.state.fatal is not None
        return not (stopping and isinstance(exc, asyncio.CancelledError))


class _Uvicorn(uvicorn.Server):
    """uvicorn, with our signal handling: uvicorn re-raises SIGTERM after its shutdown, which would end the
    process with -15 instead of exit 0 after a clean drain."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if not self.service.install_signal_handlers or threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.service.request_stop(signal.Signals(signum).name)


class Service:
    """One server: engine, app, uvicorn, watchdog. ``run()`` blocks until it stops and returns the exit code.

    Tests run it on a thread (``install_signal_handlers=False``, ``hard_exit=False``) and stop it with
    ``request_stop()``; ``serve()`` runs it on the main thread with signal handlers.
    """

    def __init__(self, settings: Settings, *, engine: EngineAPI | None = None,
                 engine_thread: threading.Thread | None = None, install_signal_handlers: bool = True,
                 hard_exit: bool = True, app_kwargs: dict[str, Any] | None = None):
        from ..engine.engine import Engine

        self.settings = settings
        self.engine: EngineAPI = engine if engine is not None else Engine(settings)
        self.install_signal_handlers = install_signal_handlers
        self.hard_exit = hard_exit
        self.state = ServiceState()
        self.app = create_app(settings, self.engine, state=self.state, **(app_kwargs or {}))
        self.engine.add_end_hook(self._check_job_error)
        self.exit_code = EXIT_OK
        self._stop_requested = threading.Event()
        self._drain_thread: threading.Thread | None = None
        self._engine_thread = engine_thread  # set when the caller started the engine already
        self._fatal_lock = threading.Lock()
        grace = settings.grace_seconds
        config = uvicorn.Config(self.app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                access_log=settings.log_level == "debug", server_header=False,
                                timeout_graceful_shutdown=int(grace) + SEND_ANSWERS_S, lifespan="auto",
                                http=_header_timeout_protocol(settings.header_timeout_seconds),
                                limit_concurrency=settings.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self.server = _Uvicorn(config, self)
        # after Config: it (re)configures uvicorn's loggers
        logging.getLogger("uvicorn.error").addFilter(_QuietCancelledStreams(self.state))
        for name in ("uvicorn.error", "asyncio"):  # per request or per accept(): these can repeat thousands of times
            if not any(isinstance(f, RepeatLimiter) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(RepeatLimiter())

    # --- running --------------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """uvicorn is listening."""
        return bool(self.server.started)

    def run(self, sockets: list[socket.socket] | None = None) -> int:
        """Start the engine in the background, serve until stopped, return the exit code."""
        if self.engine.state.value == "new":
            self._engine_thread = self.engine.start_in_background()
        watchdog = threading.Thread(target=self._watch, name="zimage-watchdog", daemon=True)
        watchdog.start()
        threading.Thread(target=sweep_output_dir, args=(self.settings,), name="zimage-sweep", daemon=True).start()
        try:
            self.server.run(sockets=sockets)
        finally:
            self._stop_requested.set()
            if self._drain_thread is not None:
                self._drain_thread.join(self.settings.grace_seconds + 35)
            history = self.app.state.history
            if history is not None:
                history.close()
        if self.state.fatal is None and not self.state.draining and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_START_FAILED if not self.server.started else EXIT_OK  # e.g. port in use
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    @property
    def engine_still_starting(self) -> bool:
        return self._engine_thread is not None and self._engine_thread.is_alive()

    # --- stopping -------------------------------------------------------------------------------------------
    def request_stop(self, why: str = "stop requested") -> None:
        """Graceful stop (SIGTERM): refuse new work (503, /readyz 'stopping'), cancel what waits, let the running
        job finish within ``grace_seconds`` or cancel it, answer every request, stop listening, exit 0.
        A second request exits at once."""
        if self.state.draining:
            log.warning("%s again: stopping now", why)
            self.server.force_exit = True
            self.server.should_exit = True
            return
        log.info("%s: draining (grace %.0f s)", why, self.settings.grace_seconds)
        self.state.draining = True
        self._drain_thread = threading.Thread(target=self._drain, name="zimage-drain", daemon=True)
        self._drain_thread.start()

    def _drain(self) -> None:
        try:
            self.engine.shutdown(grace_s=self.settings.grace_seconds)
        except Exception:
            log.exception("engine shutdown failed")
        # every job has ended and its waiter is answering; now close the door
        self.server.config.timeout_graceful_shutdown = SEND_ANSWERS_S
        self.server.should_exit = True

    def fail(self, reason: str, code: int = EXIT_UNHEALTHY) -> None:
        """Unrecoverable: /readyz turns 503 with ``reason``, waiting clients get an error, the process exits
        with ``code`` so supervisor starts a fresh one."""
        with self._fatal_lock:
            if self.state.fatal is not None or self.state.draining:
                return
            self.state.fatal = reason
            self.exit_code = code
        log.critical("unhealthy, exiting with %d so the supervisor restarts the server: %s", code, reason)
        threading.Thread(target=self._fatal_exit, name="zimage-fatal-exit", daemon=True).start()

    def _fatal_exit(self) -> None:
        time.sleep(FATAL_LINGER_S)
        # give queued jobs an explicit end; don't wait on a GPU that may never answer again
        threading.Thread(target=self.engine.shutdown, args=(0.0,), daemon=True).start()
        self.server.config.timeout_graceful_shutdown = 3
        self.server.should_exit = True
        if self.hard_exit:
            # a thread stuck in a CUDA call can keep the interpreter from exiting; supervisor needs us gone
            timer = threading.Timer(15.0, self._exit_now)
            timer.daemon = True
            timer.start()

    def _exit_now(self) -> None:
        log.critical("still alive 15 s after a fatal error; exiting hard")
        exit_now(self.exit_code)

    # --- watching -------------------------------------------------------------------------------------------
    def _check_job_error(self, job: Job) -> None:
        if job.state == JobState.FAILED and job.error is not None and is_sticky_cuda_error(str(job.error)):
            self.fail(f"sticky CUDA error in {job.id}: {str(job.error)[:300]}")

    def _watch(self) -> None:
        limit = self.settings.watchdog_seconds
        while not self._stop_requested.wait(WATCH_INTERVAL_S):
            if self.state.draining or self.state.fatal is not None:
                continue
            engine = self.engine
            state = engine.state.value
            if state == "failed":
                self.fail(f"the model failed to start: {engine.reason}", EXIT_START_FAILED)
            elif state == "ready" and not engine.ready:
                self.fail("the GPU worker thread died")
            elif state == "ready" and limit > 0:
                queue = engine.queue_info()
                running = queue.running_job
                if running is not None and not running.done:
                    idle = time.monotonic() - queue.last_heartbeat
                    if idle > limit:
                        self.fail(f"{running.id} made no progress for {idle:.0f} s (step {running.step}/"
                                  f"{running.total_steps}; watchdog {limit:g} s)")


def sweep_output_dir(settings: Settings) -> int:
    """Delete the half-written ``.part`` files a crash mid-save left in the output folder (one log line)."""
    from ..metadata import sweep_partial_files

    try:
        removed = sweep_partial_files(Path(settings.output_dir))
    except OSError as exc:
        log.warning("could not look for half-written files in the output folder: %s", exc.strerror or exc)
        return 0
    if removed:
        log.info("removed %d half-written image file(s) left by an earlier crash", removed)
    return removed


def _base_url(settings: Settings) -> str:
    return f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{settings.port}"


def _warn_about_exposure(settings: Settings, users: dict[str, str]) -> None:
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not users:
        log.warning("serving %s without --auth: anyone who can reach this address can use the GPU", settings.host)


def serve(settings: Settings, *, sock: socket.socket | None = None, early: Any = None) -> NoReturn:
    """``zimage-ui serve``: run until SIGTERM/SIGINT (exit 0) or an unrecoverable error (non-zero); it ends the
    process with that code (:func:`exit_now`) instead of returning.

    ``sock``: the listening socket (bound by the CLI before the heavy imports); ``early``: the stand-in answering
    health checks on it meanwhile (``startup.EarlyResponder``), stopped just before uvicorn takes the socket."""
    from ..models.sources import resolve_model
    from .security import load_users
    from .startup import EarlyResponder, bind_socket, stop_on_signals

    stop_on_signals()  # SIGTERM while starting: exit 0
    if sock is None:
        sock = bind_socket(settings.host, settings.port)
        early = EarlyResponder(sock).start()
    try:
        # a wrong --model or auth file fails here, in one line, before anything starts
        resolve_model(settings.model, model_dir=settings.model_dir)
        _warn_about_exposure(settings, load_users(settings))
        log.info("listening on %s; starting up (/healthz answers, /readyz says loading until ready)",
                 _base_url(settings))
        if settings.replicas or settings.ray_address:  # scale-out: the engines are Ray Serve replicas
            from ..scale.local import remote_engine

            engine: EngineAPI = remote_engine(settings)  # the replicas load while the web UI is being built
            engine_thread = None
        else:
            from ..engine.engine import Engine

            engine = Engine(settings)
            engine_thread = engine.start_in_background()  # weights load while the web UI is being built
        service = Service(settings, engine=engine, engine_thread=engine_thread)
    finally:
        # uvicorn installs its own handlers while it runs and puts these back after: Python's defaults, not the
        # start-up ones (a late SIGTERM must not turn an exit 70 into 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if early is not None:
            early.stop()  # uvicorn takes the socket; connections meanwhile wait in its backlog
    log.info("serving on %s (readiness at /readyz, API docs at /docs)", _base_url(settings))
    code = service.run(sockets=[sock])  # drained (or failed), history closed, "stopped (exit N)" logged
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the service has stopped: flush the logs and the standard streams, then
    ``os._exit``. After a clean drain nothing is left to do, yet Python's own teardown (threads, gradio, torch,
    garbage collection of every module) took 1.4–1.9 s more on a busy 2-core machine — time a supervisor waits
    for before it can restart us; and a thread still loading weights or stuck on the GPU must not hold the exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
