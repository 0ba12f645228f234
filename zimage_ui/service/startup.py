"""The first second of ``zimage-ui serve``: bind the port, then answer health checks while the rest starts.

Importing torch, diffusers and Gradio and building the page take seconds (tens on a slow disk). The port is bound
before any of that, so a port in use is reported at once, in one line, with exit code ``EXIT_CANNOT_BIND``; and
``/healthz`` answers 200 and ``/readyz`` 503 ``loading`` from then on, as docs/deployment.md promises. The stand-in
is the standard library's threaded HTTP server on the same socket; ``stop()`` hands the still-open socket to
uvicorn, and connections that arrive in between wait in the listen backlog instead of being refused.

Only the standard library is imported here: this module runs before anything heavy.

    >>> sock = bind_socket("127.0.0.1", 0)
    >>> early = EarlyResponder(sock).start()
    >>> import urllib.request, urllib.error
    >>> url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    >>> urllib.request.urlopen(url + "/healthz").read()
    b'{"status": "ok"}'
    >>> try:
    ...     urllib.request.urlopen(url + "/readyz")
    ... except urllib.error.HTTPError as exc:
    ...     exc.code, json.loads(exc.read())["status"]
    (503, 'loading')
    >>> early.stop(); sock.close()
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import socket
import threading
from typing import Any

EXIT_CANNOT_BIND = 3  # the address can't be bound: port in use, no permission, no such address
RETRY_AFTER_S = 5
BACKLOG = 2048  # uvicorn's default: what queues while the stand-in hands over to uvicorn


class CannotBind(OSError):
    """The server's address can't be bound; the message is one line for the user."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon), TCP_NODELAY set (accepted sockets
    inherit it: asyncio leaves Nagle on for a socket it did not create)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        if exc.errno == errno.EADDRINUSE:
            why = "the port is in use by another program (another zimage-ui?); stop it or pick another --port"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need root); pick a --port above 1024"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "this machine has no such address; check --host"
        else:
            why = exc.strerror or str(exc)
        raise CannotBind(exc.errno, f"cannot listen on {shown}:{port}: {why}") from None
    return sock


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "zimage-ui"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, {"status": "ok"})
        elif path == "/readyz":
            self._send(503, {"status": "loading", "reason": "starting: loading the program and building the web UI",
                             "model": None})
        elif "text/html" in self.headers.get("Accept", ""):
            page = ("<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=3><title>zimage-ui</title>"
                    "<p>zimage-ui is starting; this page reloads by itself. / 正在启动，页面会自动刷新。").encode()
            self._send(503, page, content_type="text/html; charset=utf-8")
        else:
            self._send(503, {"error": "not_ready", "message": "the server is starting; try again in a few seconds",
                             "status": "loading"})

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self._send(503, {"error": "not_ready", "message": "the server is starting; try again in a few seconds",
                         "status": "loading"})

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if code == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # health checks every few seconds are not news


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    timeout = 5  # a client that sends nothing does not hold the hand-over

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up before its answer (a probe's timeout while imports hold the GIL): not news


class EarlyResponder:
    """Answers /healthz (200) and everything else (503 loading) on ``sock`` until ``stop()``; the socket stays
    open for the real server."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._server = _Server(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self._server.socket.close()  # the one it made; ours is bound and listening already
        self._server.socket = sock
        self._thread: threading.Thread | None = None

    def start(self) -> EarlyResponder:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="zimage-early-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (requests already being answered finish); leaves the socket open and listening."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None


def _exit_while_starting(signum: int, frame: Any) -> None:
    # Nothing to drain yet: no job was accepted, no answer is owed. An exception raised into the main thread here
    # would land in the middle of an import that the engine thread is doing too, and leave it half done.
    os.write(2, f"zimage-ui: {signal.Signals(signum).name} while starting: exiting\n".encode())
    os._exit(0)


def stop_on_signals() -> None:
    """Until uvicorn runs (and installs its graceful handlers), SIGTERM/SIGINT end the process at once with exit 0
    (so supervisor's stop during start-up is a clean exit, not death by signal)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_while_starting)
