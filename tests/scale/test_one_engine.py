"""Without Ray: the in-process engine answers the same new fields (one replica, ``local``), so a client reads
``X-Zimage-Replica`` and ``/api/v1/vram``'s ``replicas`` the same way on one GPU as on eight."""

from __future__ import annotations

import httpx
import pytest

from tests.service.helpers import LiveServer, demo_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(demo_settings(tmp_path_factory.mktemp("one"), save_images=False), app_kwargs={"ui": False})
    yield live
    live.stop()


def test_one_engine_names_itself_local_and_lists_one_replica(server):
    answer = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "a red circle", "seed": 1}, timeout=120)
    assert answer.status_code == 200 and answer.headers["X-Zimage-Replica"] == "local"
    vram = httpx.get(f"{server.url}/api/v1/vram").json()
    [only] = vram["replicas"]
    assert only["replica"] == "local" and only["ready"] and only["state"] == "ready"
    top = {k: v for k, v in vram.items() if k != "replicas"}
    assert only["snapshot"]["weights_bytes"] == top["weights_bytes"] > 0  # the same reading, twice
    info = httpx.get(f"{server.url}/api/v1/info").json()
    assert info["queue"] == {"depth": 0, "max_queue": server.settings.max_queue, "running": False}
    assert "zimage_replica_ready" not in httpx.get(f"{server.url}/metrics").text  # per-replica series: Ray only
