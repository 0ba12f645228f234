"""Placement planner: choices for known budgets, the arithmetic behind them, the CPU case."""

from __future__ import annotations

import json

import pytest
import torch

from zimage_ui.memory.estimator import DEFAULT_MARGIN_BYTES, WorkingMemoryEstimator, WorkShape
from zimage_ui.memory.planner import (
    CUDA_CONTEXT_BYTES,
    PLACEMENTS,
    Z_IMAGE_TURBO_BF16,
    ComponentSizes,
    DeviceFacts,
    plan,
    plan_for_device,
)
from zimage_ui.units import GiB, MiB

EST = WorkingMemoryEstimator.default_for("cuda", Z_IMAGE_TURBO_BF16.total_bytes)


def cuda(budget_gb: float, fp8: bool = True, total_gb: float | None = None) -> DeviceFacts:
    total = int((total_gb or budget_gb) * GiB)
    return DeviceFacts("cuda", f"{budget_gb:g} GB GPU", total, fp8, budget_bytes=int(budget_gb * GiB))


@pytest.mark.parametrize(
    ("budget_gb", "expected"),
    [(80, "resident"), (24, "resident"), (16, "text-encoder-offload"), (12, "fp8-storage"), (8, "sequential-offload")],
)
def test_budgets_pick_the_most_preferred_placement_that_fits(budget_gb, expected):
    result = plan(cuda(budget_gb), EST)
    assert result.fits and result.chosen.name == expected
    chosen = next(o for o in result.options if o.placement.name == expected)
    assert chosen.fits and chosen.need_bytes <= budget_gb * GiB
    # everything more preferred than the choice does not fit
    for option in result.options[: PLACEMENTS.index(expected)]:
        assert not option.fits, option


def test_options_are_every_placement_in_preference_order_with_reasons():
    result = plan(cuda(24), EST)
    assert tuple(o.placement.name for o in result.options) == PLACEMENTS
    for option in result.options:
        assert option.reason.startswith("needs ")
        assert option.placement.diffusers_calls and option.placement.description
        assert option.placement.latency_basis  # every latency says where it comes from
    lines = result.lines()
    assert lines[0].startswith("budget 24.0 GiB for 1024x1024")
    assert sum(line.startswith("→") for line in lines) == 1
    assert json.loads(json.dumps(result.to_dict()))["chosen"]["name"] == "resident"


def test_the_arithmetic_behind_the_choices():
    sizes = Z_IMAGE_TURBO_BF16
    assert sizes.total_bytes == round(19.28 * GiB)  # measured resident total
    work = EST.predict(WorkShape(1024, 1024))
    options = {o.placement.name: o for o in plan(cuda(80), EST).options}
    resident = options["resident"].placement
    assert resident.resident_bytes == sizes.total_bytes
    assert resident.predicted_peak_bytes == sizes.total_bytes + work  # decode is the worst phase
    assert options["resident"].need_bytes == resident.predicted_peak_bytes + CUDA_CONTEXT_BYTES + DEFAULT_MARGIN_BYTES
    te = options["text-encoder-offload"].placement
    assert te.resident_bytes == sizes.total_bytes - sizes.text_encoder_bytes
    assert te.resident_bytes / GiB == pytest.approx(11.79, abs=0.01)
    fp8 = options["fp8-storage"].placement
    assert fp8.resident_bytes / GiB == pytest.approx(6.07, abs=0.01)
    # 8 GB: fp8 + text-encoder offload is short (6.07 GB weights + 2.41 working + upcast + context + margin)
    assert 8 * GiB < options["fp8-storage"].need_bytes < 10 * GiB
    # model offload holds the whole bf16 transformer while denoising: more than fp8 storage needs
    assert options["model-offload"].placement.predicted_peak_bytes > sizes.transformer_bytes
    assert options["model-offload"].need_bytes > options["fp8-storage"].need_bytes
    seq = options["sequential-offload"]
    assert seq.need_bytes < 4 * GiB
    # group offloading streams ahead on a side stream: smaller *and* faster than moving whole components
    assert seq.placement.predicted_latency_s < options["model-offload"].placement.predicted_latency_s
    assert seq.placement.latency_basis == "H100 measured"


def test_latency_priors_come_from_the_measured_figures():
    options = {o.placement.name: o.placement for o in plan(cuda(80), EST).options}
    assert options["resident"].predicted_latency_s == 1.31
    assert options["text-encoder-offload"].predicted_latency_s == pytest.approx(1.31 + 0.75)
    assert options["fp8-storage"].predicted_latency_s == pytest.approx(1.31 * 1.25 + 0.75)
    assert options["sequential-offload"].predicted_latency_s == 3.2
    assert options["model-offload"].predicted_latency_s == 16.0
    # fastest first: the list order is the order of predicted latency
    latencies = [o.placement.predicted_latency_s for o in plan(cuda(80), EST).options]
    assert latencies == sorted(latencies)


def test_without_fp8_twelve_gb_falls_back_past_model_offload():
    result = plan(cuda(12, fp8=False), EST)
    assert result.chosen.name == "sequential-offload" and result.fits
    fp8 = next(o for o in result.options if o.placement.name == "fp8-storage")
    assert not fp8.fits and "compute capability" in fp8.reason
    # between model offload's and text-encoder offload's needs, without fp8, model offload fits too, but
    # sequential offload is faster (3.2 s against 16 s) and is chosen
    result = plan(cuda(14, fp8=False), EST)
    fits = {o.placement.name for o in result.options if o.fits}
    assert {"model-offload", "sequential-offload"} <= fits and result.chosen.name == "sequential-offload"


def test_budget_caps_a_larger_card_and_measured_overhead_is_used():
    assert plan(cuda(16, total_gb=80), EST).chosen.name == "text-encoder-offload"
    facts = DeviceFacts("cuda", "H100", 80 * GiB, True, budget_bytes=24 * GiB, overhead_bytes=3 * GiB)
    result = plan(facts, EST)  # an LLM beside us takes 3 GB: resident no longer fits in 24
    assert result.overhead_bytes == 3 * GiB and result.chosen.name == "text-encoder-offload"


def test_larger_images_push_towards_offloading():
    assert plan(cuda(24), EST, WorkShape(2048, 2048)).chosen.name == "text-encoder-offload"


def test_nothing_fits_reports_the_smallest():
    result = plan(cuda(2), EST)
    assert not result.fits and result.chosen.name == "sequential-offload"
    assert "nothing fits" in result.lines()[-1]


def test_cpu_plan_is_trivially_resident_in_ram():
    demo = ComponentSizes(transformer_bytes=2 * MiB, text_encoder_bytes=1 * MiB, vae_bytes=1 * MiB)
    est = WorkingMemoryEstimator.default_for("cpu", demo.total_bytes)
    result = plan(DeviceFacts("cpu", "CPU", 16 * GiB), est, WorkShape(256, 256), sizes=demo)
    assert result.fits and len(result.options) == 1
    chosen = result.chosen
    assert chosen.name == "resident" and chosen.description == "resident (CPU RAM)"
    assert chosen.resident_bytes == 4 * MiB and chosen.predicted_latency_s is None
    assert chosen.predicted_peak_bytes == 4 * MiB + est.predict(WorkShape(256, 256))
    facts = DeviceFacts.from_torch("cpu")
    assert facts.kind == "cpu" and facts.total_bytes > 0 and facts.overhead_bytes == 0


def test_plan_for_device_reads_the_device_and_plans_the_released_model():
    # what the engine's --placement auto and doctor both call: on this CPU the facts come from psutil
    facts = DeviceFacts.from_torch("cpu", budget_bytes=512 * GiB)
    est = WorkingMemoryEstimator.default_for("cpu", Z_IMAGE_TURBO_BF16.total_bytes)
    result = plan_for_device("cpu", budget_bytes=512 * GiB, shape=WorkShape(512, 512), margin_bytes=0)
    assert result.to_dict() == plan(facts, est, WorkShape(512, 512), margin_bytes=0).to_dict()
    assert result.chosen.resident_bytes == Z_IMAGE_TURBO_BF16.total_bytes and result.overhead_bytes == 0
    measured = plan_for_device("cpu", overhead_bytes=3 * GiB, margin_bytes=0)
    assert measured.overhead_bytes == 3 * GiB and measured.options[0].need_bytes == (
        measured.chosen.predicted_peak_bytes + 3 * GiB)


def test_component_sizes_from_modules():
    transformer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    text_encoder = torch.nn.Embedding(100, 16)
    vae = torch.nn.Conv2d(4, 4, 3)
    sizes = ComponentSizes.from_modules(transformer, text_encoder, vae)
    assert sizes.transformer_bytes == (16 * 32 + 32 + 32 + 32) * 4
    assert sizes.transformer_fp8_bytes == 16 * 32 + (32 + 32 + 32) * 4  # only ≥2-D weights shrink to 1 byte
    assert sizes.text_encoder_bytes == 100 * 16 * 4
    assert sizes.largest_leaf_bytes["transformer"] == (16 * 32 + 32) * 4
    assert sizes.total_bytes == sizes.transformer_bytes + sizes.text_encoder_bytes + sizes.vae_bytes
