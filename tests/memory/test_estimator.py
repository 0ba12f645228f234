"""Working-memory estimator (fit, prior, persistence) and admission (thresholds, largest size that fits)."""

from __future__ import annotations

import json

import pytest

from zimage_ui.memory.admission import AdmissionState, admit, admit_shape, available_bytes, largest_fitting
from zimage_ui.memory.estimator import (
    CUDA_RUNTIME_RESERVE_BYTES,
    GiB,
    MiB,
    WorkingMemoryEstimator,
    WorkShape,
)
from zimage_ui.memory.probe import MemorySnapshot

WEIGHTS = int(19.28 * GiB)
# shared/reference/zimage.md, "Our GPU baseline" (H200, diffusers 0.42.1, bf16): peak working memory in GB (GiB)
BASELINE = [
    (WorkShape(768, 768), 1.37),
    (WorkShape(1024, 1024), 2.41),
    (WorkShape(2048, 2048), 9.54),
    (WorkShape(1024, 1024, batch=2), 4.0),
    (WorkShape(1024, 1024, batch=4), 8.0),
    (WorkShape(1024, 1024, cfg=True), 2.42),
]


def snapshot(total=80 * GiB, weights=WEIGHTS, other=1 * GiB, kind="cuda") -> MemorySnapshot:
    free = total - weights - other
    return MemorySnapshot(kind, "test", "GPU · VRAM", total, weights, 0, 0, other, free, 0)


def truth() -> WorkingMemoryEstimator:
    # a made-up device where the transformer dominates with CFG and large batches, so both branches are exercised
    return WorkingMemoryEstimator(
        {
            "fixed_bytes": 0.2 * GiB,
            "decode_bytes_per_pixel_per_image": 1500.0,
            "decode_bytes_per_pixel": 400.0,
            "denoise_bytes_per_token": 250e3,
            "denoise_bytes_per_token_squared": 5.0,
        }
    )


# --- the model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "measured_gb"), BASELINE, ids=[str(s) for s, _ in BASELINE])
def test_cuda_prior_is_within_10_percent_of_the_h200_baseline(shape, measured_gb):
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    assert not est.calibrated
    assert est.predict(shape) / GiB == pytest.approx(measured_gb, rel=0.10)


def test_calibration_on_the_baseline_stays_within_10_percent():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    est.calibrate([(shape, int(gb * GiB)) for shape, gb in BASELINE])
    assert est.calibrated and est.fit["samples"] == 6
    for shape, gb in BASELINE:
        assert est.predict(shape) / GiB == pytest.approx(gb, rel=0.10), shape
    assert est.fit["max_relative_error"] < 0.10
    # decode dominates every row of the baseline: the fit must not invent a denoise term to chase noise
    assert est.fit["denoise_dominated_samples"] == 0
    assert est.coefficients["denoise_bytes_per_token_squared"] == 0


def test_cfg_barely_moves_the_peak_where_decode_dominates_and_doubles_denoise_where_it_does_not():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    plain, cfg = WorkShape(1024, 1024), WorkShape(1024, 1024, cfg=True)
    assert est.predict(cfg) == est.predict(plain)  # baseline: 2.41 vs 2.42 GB
    t = truth()
    big = WorkShape(1024, 1024, batch=4)
    assert t.phases(big)["decode"] > t.phases(big)["denoise"]
    big_cfg = WorkShape(1024, 1024, batch=4, cfg=True)
    assert t.phases(big_cfg)["denoise"] == pytest.approx(2 * t.phases(big)["denoise"], abs=2)
    assert t.predict(big_cfg) == t.phases(big_cfg)["fixed"] + t.phases(big_cfg)["denoise"]


def test_calibration_recovers_known_coefficients_from_synthetic_samples():
    t = truth()
    samples = [
        (shape, t.predict(shape))
        for side in (512, 768, 1024, 1536, 2048)
        for batch in (1, 2, 4)
        for cfg in (False, True)
        for shape in [WorkShape(side, side, batch, cfg)]
    ]
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)  # start from a prior that is wrong on purpose
    est.calibrate(samples)
    for name, value in t.coefficients.items():
        assert est.coefficients[name] == pytest.approx(value, rel=0.005), name
    assert est.fit["max_relative_error"] < 1e-3
    assert 0 < est.fit["denoise_dominated_samples"] < len(samples)
    assert "calibrated on 30 measurements" in est.description


def test_calibration_keeps_unidentifiable_coefficients_at_the_prior():
    prior = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    est.calibrate([(WorkShape(512, 512), int(0.7 * GiB)), (WorkShape(1536, 1536), int(5.2 * GiB))])
    assert est.predict(WorkShape(512, 512)) / GiB == pytest.approx(0.7, rel=0.01)
    assert est.predict(WorkShape(1536, 1536)) / GiB == pytest.approx(5.2, rel=0.01)
    # no CFG-heavy sample says anything about the transformer: its coefficient is the prior's
    assert est.coefficients["denoise_bytes_per_token"] == pytest.approx(prior.coefficients["denoise_bytes_per_token"])


def test_calibration_refuses_too_few_distinct_samples():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    with pytest.raises(ValueError, match="2 distinct"):
        est.calibrate([(WorkShape(1024, 1024), 2 * GiB)] * 5)
    with pytest.raises(ValueError, match="2 distinct"):
        est.calibrate([])
    with pytest.raises(ValueError, match="positive"):
        est.calibrate([(WorkShape(1024, 1024), 2 * GiB), (WorkShape(512, 512), 0)])
    assert not est.calibrated


def test_priors_by_device_and_model_size():
    cuda = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    cpu_full = WorkingMemoryEstimator.default_for("cpu", 2 * WEIGHTS)
    demo = WorkingMemoryEstimator.default_for("cpu", 4 * MiB)
    shape = WorkShape(1024, 1024)
    assert cpu_full.predict(shape) == pytest.approx(2 * cuda.predict(shape), abs=2)  # float32 activations
    # the demo prior is an upper envelope of measured RSS growth (330 MiB at 1024², 158 MiB at 512²)
    assert 330 * MiB < demo.predict(shape) < cuda.predict(shape)
    assert demo.predict(WorkShape(512, 512)) > 158 * MiB
    for est in (cuda, cpu_full, demo):
        assert est.source and "uncalibrated prior" in est.description
    # weights not known yet (0): assume the full-size model, the conservative prior
    assert WorkingMemoryEstimator.default_for("cuda", 0).predict(shape) == cuda.predict(shape)


def test_work_shape_validates_and_counts_tokens():
    with pytest.raises(ValueError):
        WorkShape(0, 512)
    with pytest.raises(ValueError):
        WorkShape(512, 512, batch=0)
    shape = WorkShape(1024, 768, batch=2, cfg=True)
    assert shape.sequences == 4 and shape.tokens == 64 * 48 + 128
    assert str(shape) == "1024x768 batch 2 CFG"


def test_coefficients_must_be_complete_and_non_negative():
    coefficients = truth().coefficients
    with pytest.raises(ValueError, match="missing"):
        WorkingMemoryEstimator({k: v for k, v in coefficients.items() if k != "fixed_bytes"})
    with pytest.raises(ValueError, match=">= 0"):
        WorkingMemoryEstimator({**coefficients, "decode_bytes_per_pixel": -1.0})


# --- persistence --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    est.calibrate([(shape, int(gb * GiB)) for shape, gb in BASELINE])
    path = tmp_path / "nested" / "estimator.json"
    est.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["estimator.json"]  # no temp file left behind
    loaded = WorkingMemoryEstimator.load(path)
    assert loaded.calibrated and loaded.fit == est.fit and loaded.source == est.source
    for side in (256, 512, 1024, 1536, 2048):
        for batch in (1, 4):
            shape = WorkShape(side, side, batch, cfg=batch == 4)
            assert loaded.predict(shape) == est.predict(shape)
    assert json.loads(path.read_text())["format"] == "zimage-ui/working-memory-estimator"
    est.save(path)  # overwriting is fine too
    assert WorkingMemoryEstimator.load(path).coefficients == est.coefficients


def test_from_json_rejects_foreign_documents():
    with pytest.raises(ValueError):
        WorkingMemoryEstimator.from_json({"format": "something else"})
    with pytest.raises(ValueError):
        WorkingMemoryEstimator.from_json({**truth().to_json(), "version": 99})
    with pytest.raises(ValueError):
        WorkingMemoryEstimator.from_json({**truth().to_json(), "coefficients": None})


# --- admission ----------------------------------------------------------------------------------------------------


def test_available_is_total_minus_weights_other_and_reserve():
    snap = snapshot(total=80 * GiB, weights=20 * GiB, other=1 * GiB)
    assert available_bytes(snap) == 59 * GiB - CUDA_RUNTIME_RESERVE_BYTES
    assert available_bytes(snap, reserve_bytes=0) == 59 * GiB
    assert available_bytes(snapshot(kind="cpu", total=16 * GiB, weights=1 * GiB, other=5 * GiB)) == 10 * GiB
    # working memory and cache of a running job don't reduce it: the request runs after that job
    busy = MemorySnapshot("cuda", "t", "GPU · VRAM", 80 * GiB, 20 * GiB, 9 * GiB, 3 * GiB, 1 * GiB, 47 * GiB, 9 * GiB)
    assert available_bytes(busy) == available_bytes(snap)
    assert available_bytes(snapshot(total=10 * GiB, weights=9 * GiB, other=2 * GiB)) == 0


def test_admission_thresholds_exactly_at_the_boundaries():
    snap = snapshot(total=80 * GiB, weights=20 * GiB, other=1 * GiB)
    avail, margin = 59 * GiB, 1 * GiB

    def state(need):
        return admit(snap, need, margin, reserve_bytes=0).state

    assert state(avail - margin) == AdmissionState.OK  # need + margin == available
    assert state(avail - margin + 1) == AdmissionState.TIGHT
    assert state(avail) == AdmissionState.TIGHT  # need == available
    assert state(avail + 1) == AdmissionState.OVER
    result = admit(snap, avail - margin, margin, reserve_bytes=0)
    assert (result.need_bytes, result.available_bytes, result.margin_bytes) == (avail - margin, avail, margin)
    assert result.runnable and not admit(snap, avail + 1, margin, reserve_bytes=0).runnable


def test_admission_messages_name_the_numbers_and_a_fitting_size():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    snap = snapshot(total=int(27.7 * GiB), weights=WEIGHTS, other=int(0.5 * GiB))  # ~7.6 GB available
    over = admit_shape(est, snap, WorkShape(2048, 2048))
    assert over.state == "over"
    assert over.message.code == "admission.over_suggest" and over.message.values["need_bytes"] == over.need_bytes
    assert str(over.message).startswith("needs 9.5 GiB working memory, 7.7 GiB available — too large")
    s = over.suggestion
    assert s is not None and s.width == s.height and s.width % 16 == 0
    assert f"largest that fits at this aspect: {s.width}x{s.height}" in over.message
    assert admit(snap, est.predict(s), reserve_bytes=None).state == "ok"
    ok = admit_shape(est, snap, WorkShape(1024, 1024))
    assert ok.state == "ok" and "fits" in ok.message and ok.suggestion is None
    assert json.dumps(over.to_dict())


def test_largest_fitting_keeps_aspect_multiples_and_is_the_largest():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    snap = snapshot(total=int(25 * GiB), weights=WEIGHTS, other=int(0.5 * GiB))
    margin = int(0.7 * GiB)
    for shape in (WorkShape(1920, 1080), WorkShape(1080, 1920, batch=2), WorkShape(2048, 2048), WorkShape(1344, 576)):
        best = largest_fitting(est, snap, shape, margin)
        assert best is not None, shape
        assert best.width % 16 == 0 and best.height % 16 == 0
        assert (best.width >= best.height) == (shape.width >= shape.height)
        assert best.batch == shape.batch and best.cfg == shape.cfg
        short = min(best.width, best.height)
        assert abs(best.width / best.height - shape.width / shape.height) <= 16 / short  # within one multiple
        assert admit(snap, est.predict(best), margin).state == "ok"
        bigger = largest_fitting(est, snap, shape, margin, min_side=short + 16)
        assert bigger is None  # nothing with a longer short side is ok


def test_largest_fitting_none_when_even_the_smallest_is_over_and_tight_on_request():
    est = WorkingMemoryEstimator.default_for("cuda", WEIGHTS)
    full = snapshot(total=WEIGHTS + int(0.2 * GiB), weights=WEIGHTS, other=0)
    assert largest_fitting(est, full, WorkShape(1024, 1024), margin_bytes=0) is None
    snap = snapshot(total=WEIGHTS + 2 * GiB, weights=WEIGHTS, other=0)
    strict = largest_fitting(est, snap, WorkShape(1024, 1024), margin_bytes=int(0.7 * GiB))
    loose = largest_fitting(est, snap, WorkShape(1024, 1024), margin_bytes=int(0.7 * GiB), allow_tight=True)
    assert strict is not None and loose is not None and loose.width > strict.width
    # a request that fits easily grows up to max_side
    roomy = largest_fitting(est, snapshot(), WorkShape(512, 512), max_side=1536)
    assert (roomy.width, roomy.height) == (1536, 1536)
