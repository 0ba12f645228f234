"""Schemathesis over every operation of /openapi.json on a real server: no input makes a 5xx.

The server's presets allow only 1–2 steps at up to 256² (as in test_fuzz.py), so the generations it runs are cheap.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from zimage_ui.paths import PRESETS_FILE

from .helpers import LiveServer, demo_settings
from .test_fuzz import tiny_presets

EXAMPLES = 25  # per operation and mode; the valid generate cases run the pipeline (~1 s each on two busy cores)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    presets = tmp / "presets.toml"
    presets.write_text(tiny_presets(PRESETS_FILE.read_text()))
    live = LiveServer(demo_settings(tmp, warmup=False, max_side=256, presets_file=presets, max_queue=4))
    with live.client() as http:  # a few history rows, so item and image routes have something to find
        for seed in (1, 2):
            assert http.post("/api/v1/generate", json={"prompt": "a row", "seed": seed}).status_code == 200
    yield live
    assert live.stop() == 0


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# schemathesis's own pytest plugin does not run under pytest 9 yet; one test per operation, driven by hypothesis
OPERATIONS = ["GET /healthz", "GET /readyz", "GET /metrics", "GET /api/v1/vram", "GET /api/v1/presets",
              "GET /api/v1/info", "POST /api/v1/generate", "GET /api/v1/history", "GET /api/v1/history/{item_id}",
              "GET /api/v1/history/{item_id}/images/{index}"]


def test_every_operation_is_fuzzed(api_schema):
    found = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


TAKE_INPUT = [op for op in OPERATIONS if "generate" in op or "history" in op]  # the others have nothing to break


@pytest.mark.parametrize("label, mode", [(op, GenerationMode.POSITIVE) for op in OPERATIONS]
                         + [(op, GenerationMode.NEGATIVE) for op in TAKE_INPUT], ids=str)
def test_no_input_makes_a_server_error(api_schema, server, label, mode):
    """Valid inputs (positive) and inputs that break the schema (negative): never a 5xx."""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)

    check()
