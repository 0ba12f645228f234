"""The shipped supervisor files under a real supervisord: SIGKILL → restarted and ready (five times in a row); a
wedged server (SIGSTOP) → the readiness listener kills and restarts it; a server that went FATAL → the listener
starts it again; the kiosk browser gets a fresh page after the server comes back.

The config is supervisor/*.conf with only paths, port, user and log files rewritten for a temporary folder, so
every other line of the files we ship, timings included, is exercised as written.
"""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import psutil
import pytest
from supervisor.xmlrpc import SupervisorTransport

from .helpers import free_port, wait_ready, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHIPPED = PROJECT_ROOT / "supervisor"
PY = shlex.quote(sys.executable)
pytestmark = pytest.mark.slow  # a real supervisord restarting real servers: 1-5 min a test on a 2-core machine


def rewrite(path: Path, changes: dict[str, dict[str, str | None]]) -> str:
    """The shipped file with ``changes[section][key]`` replaced (None removes the key); each must exist."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",), strict=True)
    parser.optionxform = str  # supervisor keys are case-sensitive
    parser.read_string(path.read_text())
    for section, keys in changes.items():
        assert parser.has_section(section), f"{path.name}: no [{section}]"
        for key, value in keys.items():
            assert parser.has_option(section, key), f"{path.name}: [{section}] has no {key}"
            if value is None:
                parser.remove_option(section, key)
            else:
                parser.set(section, key, value)
    lines = []
    for section in parser.sections():
        lines.append(f"[{section}]")
        lines += [f"{k}={v}" for k, v in parser.items(section)]
        lines.append("")
    return "\n".join(lines)


@pytest.fixture
def supervisord(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sock = tmp_path / "supervisor.sock"
    shipped = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    shipped.read(SHIPPED / "zimage-ui.conf")
    shipped_listener = shipped.get("eventlistener:zimage-ui-health", "command")
    assert "/opt/zimage-ui/.venv/bin/python" in shipped_listener and "http://127.0.0.1:7860" in shipped_listener
    env = f'HOME="{tmp_path}",PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",HF_HUB_OFFLINE="1",' \
          'GRADIO_ANALYTICS_ENABLED="False",TOKENIZERS_PARALLELISM="false",PYTHONUNBUFFERED="1"'
    server = rewrite(SHIPPED / "zimage-ui.conf", {
        "program:zimage-ui": {
            "command": f"{PY} -m zimage_ui.cli serve --model demo --no-warmup --port {port} "
                       f"--output-dir {tmp_path / 'out'}",
            "directory": str(PROJECT_ROOT), "user": None, "environment": env,
            "stdout_logfile": str(tmp_path / "server.log"),
        },
        "eventlistener:zimage-ui-health": {
            # the shipped command and timings; only the interpreter and the port differ
            "command": shipped_listener.replace("/opt/zimage-ui/.venv/bin/python", PY)
                                       .replace("http://127.0.0.1:7860", url),
            "directory": str(PROJECT_ROOT), "stderr_logfile": str(tmp_path / "health.log"),
        },
    })
    browser = rewrite(SHIPPED / "kiosk-browser.conf", {
        "program:kiosk-browser": {
            # a stand-in browser: a process that lives until it is stopped
            "command": f"{PY} -m zimage_ui.service.healthcheck browser --url {url}/readyz --interval 1 "
                       f"-- {PY} -c 'import time; time.sleep(10**6)'",
            "user": None, "environment": f'HOME="{tmp_path}"', "stdout_logfile": str(tmp_path / "browser.log"),
        },
    })
    (tmp_path / "zimage-ui.conf").write_text(server)
    (tmp_path / "kiosk-browser.conf").write_text(browser)
    (tmp_path / "supervisord.conf").write_text(f"""
[unix_http_server]
file={sock}
[supervisord]
logfile={tmp_path / 'supervisord.log'}
pidfile={tmp_path / 'supervisord.pid'}
childlogdir={tmp_path}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{sock}
[include]
files = {tmp_path / 'zimage-ui.conf'} {tmp_path / 'kiosk-browser.conf'}
""")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c",
                             str(tmp_path / "supervisord.conf")], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    wait_until(sock.exists, 30, what="supervisord socket")
    rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{sock}"))
    try:
        yield rpc, url, tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def server_pid(rpc) -> int:
    info = rpc.supervisor.getProcessInfo("zimage-ui")
    return info["pid"] if info["statename"] in ("STARTING", "RUNNING") else 0


def browser_child(rpc) -> int:
    """The stand-in browser's pid (a child of the kiosk-browser program), 0 while none runs."""
    pid = rpc.supervisor.getProcessInfo("kiosk-browser")["pid"]
    try:
        children = psutil.Process(pid).children() if pid else []
    except psutil.NoSuchProcess:
        return 0
    return children[0].pid if children else 0


def test_supervisor_restarts_a_killed_or_wedged_server(supervisord):
    rpc, url, tmp = supervisord
    wait_ready(url)
    first = server_pid(rpc)
    browser = wait_until(lambda: browser_child(rpc), 30, what="kiosk browser started after ready")

    # 1. the process dies: supervisor's autorestart brings it back, and it becomes ready again
    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (p := server_pid(rpc)) not in (0, first) and p, 60, what="restart")
    wait_ready(url)
    # the kiosk browser was given a fresh page once the server was back
    wait_until(lambda: browser_child(rpc) not in (0, browser), 30, what="browser restarted")

    # 2. the process hangs (answers nothing): the readiness listener kills it through supervisor, which restarts
    # it; 3 checks of 5 s (+ up to one 5 s tick) ≈ 20 s, no stopwaitsecs (45 s) spent waiting on a frozen process
    os.kill(second, signal.SIGSTOP)
    hung = time.monotonic()
    third = wait_until(lambda: (p := server_pid(rpc)) not in (0, second) and p, 90, 0.2, what="listener restart")
    assert time.monotonic() - hung < 35, "a hung server took too long to be replaced"
    wait_ready(url)
    assert psutil.pid_exists(third) and not psutil.pid_exists(second)
    assert "restarting it" in (tmp / "health.log").read_text()
    assert rpc.supervisor.getProcessInfo("zimage-ui")["statename"] in ("STARTING", "RUNNING")

    # 3. a stop asked of supervisor is a clean SIGTERM drain: exit 0
    rpc.supervisor.stopProcess("zimage-ui", True)
    wait_until(lambda: "exited: zimage-ui (exit status 0; expected)" in (tmp / "supervisord.log").read_text()
               or "stopped: zimage-ui (exit status 0)" in (tmp / "supervisord.log").read_text(), 30,
               what="clean exit")


def _new_server(rpc, old: set[int], timeout: float = 120) -> int:
    return wait_until(lambda: (p := server_pid(rpc)) not in old and p, timeout, 0.05, what="a new server process")


@pytest.mark.timeout(900)
def test_a_kiosk_server_killed_five_times_in_a_row_comes_back_ready_each_time(supervisord):
    # the kiosk's failure: killed soon after it was ready, again and again; startsecs=180 turned the fourth such
    # death into FATAL and the kiosk stayed dead
    rpc, url, tmp = supervisord
    killed: set[int] = set()
    pid = _new_server(rpc, killed)
    for _ in range(5):
        wait_ready(url)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        pid = _new_server(rpc, killed)  # autorestart, or the listener reviving a FATAL program
    wait_ready(url)
    assert len(killed) == 5
    # supervisor says RUNNING once the process has lived startsecs (10 s); the server may be ready before that
    wait_until(lambda: rpc.supervisor.getProcessInfo("zimage-ui")["statename"] == "RUNNING", 30, 0.2,
               what="supervisor's RUNNING (not FATAL, not BACKOFF)")


@pytest.mark.timeout(600)
def test_a_server_that_went_fatal_is_started_again_by_the_listener(supervisord):
    rpc, url, tmp = supervisord
    killed: set[int] = set()
    # every new process dies at once, until supervisor gives up on it
    end = time.monotonic() + 120
    while rpc.supervisor.getProcessInfo("zimage-ui")["statename"] != "FATAL":
        assert time.monotonic() < end, "supervisor never marked the program FATAL"
        pid = server_pid(rpc)
        if pid and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)
    fatal = time.monotonic()
    _new_server(rpc, killed, timeout=60)
    assert time.monotonic() - fatal >= 9  # --revive-after 10 (the next 5 s tick at the latest)
    wait_ready(url)
    assert "is FATAL" in (tmp / "health.log").read_text()
