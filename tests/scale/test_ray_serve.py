"""Scale-out on Ray Serve, for real: a local Ray instance (2 CPUs) with 2 demo-model replicas, each pinned to one
torch thread, behind the real HTTP server and page (``Service`` over ``RemoteEngine``).

One Ray instance for the whole module (Ray's start-up is the expensive part); the tests run in file order and
the last one stops the server (SIGTERM's drain) and checks that no Ray process is left.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import time

import httpx
import psutil
import pytest

from tests.scale.bare import parallel_ratio
from tests.service.helpers import LiveServer, demo_settings, wait_until

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
LONG = {"prompt": "a red circle", "preset": "quality", "width": 512, "height": 512}  # CFG: ~2-3 s on one thread
SHORT = {"prompt": "a blue square", "width": 384, "height": 384}  # ~0.4 s on one quiet thread
# the throughput rounds' job: long enough that the door's own work for a job (Ray's calls, the image's trip back)
# is small beside it; at 512² (~0.4 s on one quiet thread) that share alone held the ratio near 1.5 on a quiet
# 2-core machine
MID = {"prompt": "a green triangle", "width": 1024, "height": 1024}


def _ray_processes() -> list[psutil.Process]:
    names = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard")
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(n in " ".join(proc.cmdline()) or n in proc.name() for n in names):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def plan():
    from zimage_ui.scale.local import LocalPlan

    return LocalPlan(replicas=2, num_gpus=0, num_cpus=1, threads=1)


@pytest.fixture(scope="module")
def machine_ratio() -> float:
    """Two bare processes' throughput over one's, measured before Ray starts (``tests/scale/bare.py``)."""
    return max(parallel_ratio(MID) for _ in range(2))


@pytest.fixture(scope="module")
def server(tmp_path_factory, plan, machine_ratio):
    from zimage_ui.scale.local import start_local

    tmp = tmp_path_factory.mktemp("scale")
    ray.init(num_cpus=2, include_dashboard=False, namespace="zimage", log_to_driver=False)
    try:
        settings = demo_settings(tmp, replicas=2, max_queue=2, save_images=False, grace_seconds=60)
        engine = start_local(settings, plan=plan, health_period_s=1.0)
        wait_until(lambda: sum(1 for r in engine.replicas() if r["ready"]) >= 2, 300, 0.1, "both replicas ready")
        live = LiveServer(settings, engine=engine)
        yield live
        live.stop()
    finally:
        ray.shutdown()
        wait_until(lambda: not _ray_processes(), 30, 0.2, "no Ray process left")


def _post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/generate", json=body, timeout=timeout)


def _replica_ids(engine) -> set[str]:
    return {r["replica"] for r in engine.replicas() if r.get("ready")}


def test_requests_spread_over_both_replicas_and_every_answer_names_its_replica(server):
    ids = _replica_ids(server.engine)
    assert len(ids) == 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _post(server.url, {**SHORT, "seed": i}), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    named = [a.headers["X-Zimage-Replica"] for a in answers]
    assert set(named) == ids  # both replicas took work, and each answer names one of them
    assert all(a.content.startswith(b"\x89PNG") for a in answers)

    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready"
    vram = httpx.get(f"{server.url}/api/v1/vram").json()
    assert {"total_bytes", "weights_bytes", "segments"} <= set(vram)  # the single-engine shape, as before
    assert {r["replica"] for r in vram["replicas"]} == ids
    assert len({r["pid"] for r in vram["replicas"]}) == 2  # two processes, each with its own model
    for r in vram["replicas"]:
        assert r["snapshot"]["weights_bytes"] > 0 and r["host"] and r["gpu"] == "cpu"
        assert sum(s["bytes"] for s in r["snapshot"]["segments"]) == r["snapshot"]["total_bytes"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for replica in ids:
        assert re.search(rf'zimage_replica_ready{{gpu="cpu",host="[^"]+",replica="{replica}"}} 1\.0', metrics)
    assert server.engine.model_info()["knows_shapes"] is False  # the replicas' word (untrained weights here)
    served = {r["replica"]: r["served"] for r in server.engine.replicas()}
    assert sum(served.values()) >= 8 and all(served.values())


def test_a_full_queue_answers_503_with_retry_after(server):
    # 2 replicas x 2 ongoing requests + max_queue 2 waiting: of 10 long requests at once, some are refused. Each
    # job must outlast the ten arrivals by far (1024², CFG, 12 steps: ~10 s on one thread), or the first ones end
    # before the last arrive and the queue never fills (at 512² a job took ~1 s and CI once saw ten 200s)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: _post(server.url, {**LONG, "width": 1024, "height": 1024, "steps": 12,
                                                             "seed": i}), range(10)))
    codes = sorted(a.status_code for a in answers)
    full = [a for a in answers if a.status_code == 503]
    assert full and set(codes) == {200, 503}, codes
    assert all(a.json()["error"] == "queue_full" and int(a.headers["Retry-After"]) >= 1 for a in full)
    assert len([c for c in codes if c == 200]) >= 6  # what fits was served


def test_a_killed_replica_fails_its_job_explicitly_the_other_answers_and_ray_replaces_it(server):
    engine = server.engine
    before = {r["replica"]: r for r in engine.replicas()}
    assert len(before) == 2
    def running() -> set[str]:
        return {r["replica"] for r in engine.replicas() if r["queue"]["running"]}

    # the board settled (no replica still finishing an earlier test's job), then one job on each replica: the
    # second goes to the replica with the fewer requests, the idle one
    wait_until(lambda: not running(), 60, 0.1, "both replicas idle")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_post, server.url, {**LONG, "seed": 0})]
        wait_until(lambda: len(running()) == 1, 60, 0.1, "one replica running a job")
        futures.append(pool.submit(_post, server.url, {**LONG, "seed": 1}))
        wait_until(lambda: len(running()) == 2, 60, 0.1, "both replicas running a job")
        victim = next(r for r in engine.replicas() if r["queue"]["running"])
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        t_kill = time.monotonic()
        answers = [f.result(timeout=120) for f in futures]
    lost = [a for a in answers if a.status_code != 200]
    kept = [a for a in answers if a.status_code == 200]
    assert len(lost) == 1 and len(kept) == 1, (victim["replica"], [(a.status_code, a.headers.get(
        "X-Zimage-Replica"), a.text[:100] if a.status_code != 200 else "") for a in answers], engine.replicas())
    assert lost[0].status_code == 500 and victim["replica"] in lost[0].json()["message"]  # explicit, named
    assert lost[0].headers["X-Zimage-Replica"] == victim["replica"]
    assert kept[0].headers["X-Zimage-Replica"] != victim["replica"]
    assert time.monotonic() - t_kill < 60  # never a hang

    # the survivor answers at once, while Ray starts a replacement
    answer = _post(server.url, {**SHORT, "seed": 99})
    assert answer.status_code == 200 and answer.headers["X-Zimage-Replica"] != victim["replica"]
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # ready while one replica is
    wait_until(lambda: len(_replica_ids(engine)) == 2 and victim["replica"] not in _replica_ids(engine), 300, 0.5,
               "a replacement replica ready")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: _post(server.url, {**SHORT, "seed": 100 + i}), range(6)))
    assert {a.headers["X-Zimage-Replica"] for a in answers} == _replica_ids(engine)  # back in service


def test_cancel_reaches_the_replica_and_jobs_per_client_hold_across_replicas(server):
    from zimage_ui.engine.jobs import ClientBusy, JobState

    engine = server.engine
    job = engine.submit({**LONG, "seed": 5}, owner="client:10.0.0.7")
    wait_until(lambda: job.state == JobState.RUNNING and job.step >= 1, 60, 0.05, "the job running")
    assert engine.status(job).position == 0 and job.replica in _replica_ids(engine)
    with pytest.raises(ClientBusy):  # one job per client, whichever replica would take the next
        engine.submit({**SHORT, "seed": 6}, owner="client:10.0.0.7")
    engine.cancel(job)
    assert job.wait_done(30) and job.state == JobState.CANCELLED
    assert job.step < job.total_steps  # stopped mid-run, not finished
    wait_until(lambda: not any(r["queue"]["running"] for r in engine.replicas()), 30, 0.1, "the replica idle")
    assert engine.generate({**SHORT, "seed": 8}, owner="client:10.0.0.7", timeout=120).seeds == [8]


def _throughput(engine, jobs: int, concurrency: int) -> float:
    """Jobs per second for ``jobs`` requests of a few seconds each, ``concurrency`` in flight."""
    def one(i: int) -> None:
        engine.generate({**MID, "seed": 1000 + i}, timeout=300)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(jobs)))
    return jobs / (time.perf_counter() - start)


def _scale(server, plan, replicas: int) -> None:
    from ray import serve

    from zimage_ui.scale.local import APP_NAME
    from zimage_ui.scale.replica import build_app

    serve.run(build_app(server.settings, replicas=replicas, app_name=APP_NAME, num_cpus=plan.num_cpus,
                        threads=plan.threads, health_period_s=1.0), name=APP_NAME, route_prefix=None)
    wait_until(lambda: len(server.engine.replicas()) == replicas == len(_replica_ids(server.engine)), 300, 0.5,
               f"{replicas} replica(s) ready")


def test_two_replicas_serve_at_least_1_6_times_one_replica(server, plan, machine_ratio):
    """Concurrent throughput, 2 replicas against 1 (one torch thread each, 2 CPUs). The machine may be shared, so
    the figure is the best of a few turns, each a 2-replica round and a 1-replica round right after it (the pair's
    ratio: the host's speed drifts over minutes here, 0.17 to 0.22 jobs/s for one replica), until the ratio holds
    or the turns run out: a busy neighbour slows a round, it never makes one faster. Each round starts with one
    job on each replica: ``serve.run`` with another replica count deploys a new version, so every round's replicas
    are new ones, and a new replica pays its first large picture's allocations.

    The bar is 1.6x, or 90% of what two bare processes reach against one on this machine (``machine_ratio``,
    measured before Ray starts) when that is less: a VM whose two CPUs share a core, or memory bandwidth, caps any
    server below 2x. What this holds Ray Serve to is that it adds little to the machine's own parallelism (Ray's
    controller, GCS, board and the door share the two cores with the replicas; ``-s`` prints each round)."""
    engine = server.engine
    bare = machine_ratio
    need = min(1.6, 0.9 * bare)
    turns = int(os.environ.get("ZIMAGE_SCALE_TURNS", "5"))
    rounds: list[tuple[float, float]] = []
    for _ in range(turns):
        _throughput(engine, 2, 2)  # warm: one job each
        two = _throughput(engine, 8, 4)
        _scale(server, plan, 1)
        _throughput(engine, 1, 1)  # warm
        one = _throughput(engine, 4, 2)
        _scale(server, plan, 2)
        rounds.append((two, one))
        print(f"throughput: 1 replica {one:.2f} jobs/s, 2 replicas {two:.2f} jobs/s, ratio {two / one:.2f} "
              f"(two bare processes {bare:.2f}x one; the bar {need:.2f})")
        if two / one >= need:
            break
    best = max(two / one for two, one in rounds)
    assert best >= need, (f"2 replicas against 1, round by round: {[f'{t:.2f}/{o:.2f}' for t, o in rounds]} jobs/s; "
                          f"best {best:.2f}x (two bare processes: {bare:.2f}x one)")


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_the_page_shows_one_bar_per_replica(server):
    from playwright.sync_api import sync_playwright

    ids = _replica_ids(server.engine)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_function("() => document.querySelectorAll('.zb-bar[data-replica]').length === 2",
                                   timeout=60_000)
            shown = page.evaluate("() => Array.from(document.querySelectorAll('.zb-bar[data-replica]'))"
                                  ".map(e => [e.dataset.replica, Number(e.dataset.totalBytes),"
                                  " e.querySelectorAll('[data-segment=weights]').length])")
            assert {r for r, _, _ in shown} == ids
            assert all(total > 0 and weights == 1 for _, total, weights in shown)
            assert page.locator("#vram-bar[data-replica]").count() == 1  # the one that takes the next request
        finally:
            browser.close()


def test_stop_drains_every_replica_then_the_application_and_ray_go(server):
    from ray import serve

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(_post, server.url, {**LONG, "steps": 12, "seed": 7})
        wait_until(lambda: any(r["queue"]["running"] for r in server.engine.replicas()), 60, 0.1, "a job running")
        code = server.stop()  # what SIGTERM does: drain, then stop
        answer = running.result(timeout=120)
    assert code == 0
    assert answer.status_code == 200  # the running job finished within the grace period
    assert "zimage" not in serve.status().applications
