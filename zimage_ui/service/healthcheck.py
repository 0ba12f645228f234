"""Readiness checks for supervisor: an event listener that restarts the server when /readyz keeps failing,
``wait`` (block until the server is ready) and ``browser`` (run the kiosk browser once the server is ready, and
give it a fresh page after the server comes back from an outage).

Listener (in supervisord's config; see supervisor/zimage-ui.conf)::

    [eventlistener:zimage-ui-health]
    command=python -m zimage_ui.service.healthcheck listen --program zimage-ui --url http://127.0.0.1:7860/readyz
    events=TICK_5

On every tick it asks /readyz. Failures count only while supervisor says the program is RUNNING, and not while
the server is still loading or warming up within ``--startup-seconds``; after ``--failures`` in a row it restarts
the program through supervisor's XML-RPC interface. A server that answers "not ready" is stopped gracefully
(SIGTERM, then SIGKILL after ``stopwaitsecs``) and started; one that answers nothing at all (a wedged process or
event loop, which SIGTERM cannot reach) gets SIGKILL at once and supervisor's autorestart starts it. This catches
what the server's own watchdog cannot.

A program that keeps dying right after its start ends FATAL in supervisor, which then never starts it again on its
own. The listener starts a FATAL program again after ``--revive-after`` seconds, doubling the wait after each
revival that does not end ready (up to ``--revive-max``), so a kiosk always comes back once the cause is gone.

Only the standard library and supervisor's ``childutils`` are used; stdout belongs to the listener protocol, so
all logging goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger("zimage_ui.healthcheck")

STARTING = ("new", "loading", "warming")


@dataclass
class Probe:
    """One /readyz answer: ``ok`` (HTTP 200), the reported ``status`` ('' when no answer), a description, and
    whether the connection was refused (nothing listening yet) rather than left unanswered (wedged)."""

    ok: bool
    status: str
    detail: str
    refused: bool = False


def check(url: str, *, timeout: float = 5.0, auth: str | None = None) -> Probe:
    """GET ``url`` (a /readyz) once."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (our own URL)
            return Probe(True, _status(response.read()), f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return Probe(False, _status(body), f"HTTP {exc.code}: {body[:200].decode('utf-8', 'replace')}")
    except (OSError, ValueError) as exc:  # refused, timed out, reset
        reason = getattr(exc, "reason", exc)
        return Probe(False, "", f"no answer: {reason}", refused=isinstance(reason, ConnectionRefusedError))


def _status(body: bytes) -> str:
    try:
        return str(json.loads(body).get("status", ""))
    except (ValueError, AttributeError):
        return ""


class Watcher:
    """Counts consecutive /readyz failures of one program and decides when to restart it."""

    def __init__(self, *, failures: int, startup_seconds: float):
        self.failures = failures
        self.startup_seconds = startup_seconds
        self.count = 0

    def observe(self, probe: Probe, *, running: bool, uptime_s: float) -> bool:
        """Record one check; True when the program should be restarted now."""
        if probe.ok or not running or probe.status == "stopping":
            self.count = 0
            return False
        if uptime_s < self.startup_seconds and (probe.status in STARTING or probe.refused):
            return False  # still loading, or not listening yet: that is what startup looks like (a timeout isn't)
        self.count += 1
        if self.count >= self.failures:
            self.count = 0
            return True
        return False


def _rpc() -> Any:
    import os

    from supervisor import childutils

    return childutils.getRPCInterface(os.environ)


def _restart(rpc: Any, program: str, *, answering: bool = True) -> None:
    """Restart ``program``: gracefully when it still answers; SIGKILL when it answers nothing (a stopped or wedged
    process ignores SIGTERM, and waiting ``stopwaitsecs`` for it only prolongs the outage)."""
    if not answering:
        try:
            rpc.supervisor.signalProcess(program, "KILL")
            return  # autorestart starts it again
        except Exception as exc:  # exited meanwhile: start it below
            log.warning("killing %s: %s", program, exc)
    try:
        rpc.supervisor.stopProcess(program, True)
    except Exception as exc:  # already stopped or exited on its own: start it anyway
        log.warning("stopping %s: %s", program, exc)
    rpc.supervisor.startProcess(program, False)


class Reviver:
    """When to start a FATAL program again: ``first`` seconds after it went FATAL, then twice as long after each
    revival that ends FATAL again, at most ``longest``; back to ``first`` once it has been ready.

    >>> r = Reviver(first=10, longest=25)
    >>> [r.due(now) for now in (0, 9, 10)]  # FATAL seen at 0
    [False, False, True]
    >>> r.due(11), r.due(30), r.due(31)  # FATAL again at 11: now 20 s
    (False, False, True)
    >>> r.due(32), r.due(56), r.due(57)  # capped at 25 s
    (False, False, True)
    >>> r.ready(); r.due(100), r.due(110)
    (False, True)
    """

    def __init__(self, *, first: float, longest: float):
        self.first = first
        self.longest = longest
        self.delay = first
        self.since: float | None = None  # when the current FATAL spell was first seen

    def due(self, now: float) -> bool:
        """Called while the program is FATAL; True when it should be started now."""
        if self.since is None:
            self.since = now
        if now - self.since < self.delay:
            return False
        self.since = None
        self.delay = min(self.delay * 2, self.longest)
        return True

    def ready(self) -> None:
        """The program answered ready: the next FATAL spell starts from ``first`` again."""
        self.delay = self.first
        self.since = None


def listen(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The supervisor event-listener loop (never returns while supervisord runs)."""
    from supervisor import childutils

    watcher = Watcher(failures=args.failures, startup_seconds=args.startup_seconds)
    reviver = Reviver(first=args.revive_after, longest=args.revive_max)
    rpc = _rpc()
    while True:
        headers, _payload = childutils.listener.wait(stdin, stdout)
        try:
            if headers.get("eventname", "").startswith("TICK"):
                info = rpc.supervisor.getProcessInfo(args.program)
                state = info.get("statename")
                if state == "FATAL":
                    if reviver.due(time.monotonic()):
                        log.error("%s is FATAL (it kept exiting right after its start; last: %s); starting it "
                                  "again (next time after %.0f s if it fails again)", args.program,
                                  info.get("spawnerr") or info.get("description") or "?", reviver.delay)
                        rpc.supervisor.startProcess(args.program, False)
                    childutils.listener.ok(stdout)
                    continue
                running = state == "RUNNING"
                uptime = float(info.get("now", 0) - info.get("start", 0)) if running else 0.0
                probe = check(args.url, timeout=args.timeout, auth=args.auth) if running else Probe(False, "", "")
                if probe.ok:
                    reviver.ready()
                if running and not probe.ok:
                    log.warning("%s not ready (%s, %d/%d): %s", args.program, probe.status or "no status",
                                watcher.count + 1, args.failures, probe.detail)
                if watcher.observe(probe, running=running, uptime_s=uptime):
                    answering = probe.detail.startswith("HTTP")
                    log.error("%s failed its readiness check %d times in a row; restarting it%s", args.program,
                              args.failures, "" if answering else " (it answers nothing: SIGKILL)")
                    _restart(rpc, args.program, answering=answering)
        except Exception:  # a failing check must not kill the listener (supervisor would mark it FATAL)
            log.exception("health check failed")
        childutils.listener.ok(stdout)


class OutageTracker:
    """Notices the server coming back after an outage (``down_checks`` failed checks in a row, then ready).

    >>> t = OutageTracker(down_checks=2)
    >>> [t.observe(ok) for ok in (True, False, True, False, False, True, True)]
    [False, False, False, False, False, True, False]
    """

    def __init__(self, down_checks: int = 2):
        self.down_checks = down_checks
        self.failed = 0

    def observe(self, ok: bool) -> bool:
        """Record one check; True when this one ends an outage (the page shown is from the old server)."""
        if not ok:
            self.failed += 1
            return False
        came_back = self.failed >= self.down_checks
        self.failed = 0
        return came_back


def browser(args: argparse.Namespace) -> int:
    """Wait until ready, run the browser command; restart it on a fresh page after each server outage.

    Returns the browser's exit status when it exits on its own (supervisor then starts this again).
    """
    import signal
    import subprocess

    command = [c for c in args.command if c != "--"]
    if not command:
        print("browser: give the browser command after --", file=sys.stderr)
        return 2
    if wait(args) != 0:
        return 1
    tracker = OutageTracker(args.down_checks)
    child = subprocess.Popen(command)

    def forward(signum: int, frame: Any) -> None:  # supervisor stops us: stop the browser too
        child.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            code = child.wait(timeout=args.interval)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            return code
        if tracker.observe(check(args.url, timeout=5.0, auth=args.auth).ok):
            log.info("the server is back after an outage; restarting the browser on a fresh page")
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child = subprocess.Popen(command)


def wait(args: argparse.Namespace) -> int:
    """Block until ``url`` answers 200 (exit 0) or ``timeout`` passes (exit 1)."""
    deadline = time.monotonic() + args.timeout
    while True:
        probe = check(args.url, timeout=5.0, auth=args.auth)
        if probe.ok:
            return 0
        if time.monotonic() >= deadline:
            print(f"not ready after {args.timeout:g} s: {probe.detail}", file=sys.stderr)
            return 1
        time.sleep(args.interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zimage_ui.service.healthcheck", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lis = sub.add_parser("listen", help="supervisor event listener: restart the program when /readyz keeps failing")
    lis.add_argument("--program", required=True, help="supervisor program name (group:name inside a group)")
    lis.add_argument("--failures", type=int, default=3, help="failed checks in a row before a restart [3]")
    lis.add_argument("--startup-seconds", type=float, default=900,
                     help="loading/warming is not a failure for this long after a start [900]")
    lis.add_argument("--timeout", type=float, default=5, help="seconds to wait for one answer [5]")
    lis.add_argument("--revive-after", type=float, default=10,
                     help="start a FATAL program again after this many seconds, doubling each time [10]")
    lis.add_argument("--revive-max", type=float, default=300, help="longest wait before starting it again [300]")
    lis.set_defaults(func=listen)
    wai = sub.add_parser("wait", help="exit 0 once /readyz answers 200 (1 after --timeout)")
    wai.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds [1800]")
    wai.add_argument("--interval", type=float, default=2, help="seconds between checks [2]")
    wai.set_defaults(func=wait)
    bro = sub.add_parser("browser", help="wait until ready, then run the browser command given after --; "
                                         "restart it on a fresh page when the server comes back from an outage")
    bro.add_argument("--timeout", type=float, default=1800, help="give up waiting after this many seconds [1800]")
    bro.add_argument("--interval", type=float, default=5, help="seconds between checks [5]")
    bro.add_argument("--down-checks", type=int, default=2, help="failed checks that make an outage [2]")
    bro.add_argument("command", nargs=argparse.REMAINDER, help="-- BROWSER [ARGS...]")
    bro.set_defaults(func=browser)
    for p in (lis, wai, bro):
        p.add_argument("--url", default="http://127.0.0.1:7860/readyz", help="the server's /readyz")
        p.add_argument("--auth", default=None, help="user:password, if health checks need auth (--no-open-health)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
