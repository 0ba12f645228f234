"""The per-client limits every door shares (zimage_ui/limits.py): who owns a job, and a kiosk's caps."""

from zimage_ui.limits import Client, DoorLimits, kiosk_request
from zimage_ui.presets import load_presets
from zimage_ui.settings import Settings
from zimage_ui.validation import GenerationRequest, validate


def test_each_tab_owns_its_jobs_on_ones_own_machine():
    limits = DoorLimits(Settings())
    assert limits.owner(Client("127.0.0.1"), alone="tab-1") == "tab-1"
    assert limits.hit(Client("127.0.0.1")) is None and limits.limiter is None


def test_in_a_classroom_the_client_owns_them_not_the_session_it_makes_up():
    limits = DoorLimits(Settings(auth="class:pw"))
    same = {limits.owner(Client("10.0.0.7", "class"), alone=tab) for tab in ("a", "b", "made-up")}
    assert len(same) == 1
    # one shared class login on two machines is two clients
    assert limits.owner(Client("10.0.0.8", "class"), alone="a") not in same


def test_a_kiosk_runs_the_preset_one_image_and_the_pickers_largest_size():
    book = load_presets()
    raw = GenerationRequest(prompt="x", negative_prompt="blurry", preset="turbo", steps=16, guidance=2.0,
                            width=2048, height=1536, batch=4, seed=1)
    shaped = kiosk_request(validate(raw, book), book, demo=False)
    r = shaped.request
    assert (r.steps, r.guidance, r.batch, r.negative_prompt) == (8, 0.0, 1, "")
    assert r.width * r.height <= 1536 * 1536 and r.width % 16 == 0 and r.height % 16 == 0
    assert abs(r.width / r.height - 4 / 3) < 0.05  # the same aspect ratio
    reasons = {c.field: str(c) for c in shaped.changes}
    assert reasons["batch"] == "batch 4 → 1 (kiosk: 1 image a run)"
    assert "kiosk" in reasons["width"] and "kiosk" in reasons["negative_prompt"]


def test_a_kiosk_leaves_a_request_its_page_could_send_alone():
    book = load_presets()
    validated = validate(GenerationRequest(prompt="x", preset="standard", width=1024, height=1024, seed=1), book)
    assert kiosk_request(validated, book, demo=False) is validated
