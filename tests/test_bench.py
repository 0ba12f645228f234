"""`zimage-ui bench` on the demo model (CPU smoke test) and the synthetic builder at the demo model's sizes: the
report's JSON shape, the baseline ratio, latents comparison, the sweep through admission, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from zimage_ui.bench import BenchOptions, bench_prompt, read_baseline, run_bench, summary_lines, to_json
from zimage_ui.settings import Settings

VANILLA = ('{"stage": "built", "gpu": "X", "weights_gb": 19.28}\n=== noise line\n{"stage": "first", "seconds": 4.5}\n'
           '{"stage": "run", "size": 256, "steps": 8, "median_s": 2.0, "min_s": 1.9, "peak_working_gb": 0.1}\n')


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "vanilla.jsonl").write_text(VANILLA)
    settings = Settings(model="demo", output_dir=tmp / "out", cache_dir=tmp / "cache")
    options = BenchOptions(runs=2, width=256, height=256, sweep=True, sides=(256, 320), batches=(1, 2), soak=3,
                           idle_test=True, http=True, concurrency=2, latents=tmp / "latents.pt",
                           baseline=tmp / "vanilla.jsonl", out=tmp / "report.json")
    first = run_bench(settings, options)
    second = run_bench(settings, BenchOptions(runs=1, width=256, height=256, quick=True, latents=tmp / "latents.pt"))
    return first, second, tmp


def test_report_has_the_documented_shape(report):
    r, _, tmp = report
    assert r["bench_version"] == 1 and r["device"]["kind"] == "cpu" and r["model"]["id"] == "demo"
    assert set(r["cold_start"]) >= {"load_s", "to_device_s", "placement_s", "accelerate_s", "warmup_s", "ready_s",
                                    "wall_s"}
    assert r["first_request"]["seconds"] > 0 and r["first_request"]["ratio"] > 0
    new, same = r["warm"]
    for row in (new, same):
        assert row["runs"] == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert (row["width"], row["height"], row["batch"], row["steps"]) == (256, 256, 1, 8)
    assert r["direct"]["runs"] == 2 and isinstance(r["app_overhead_pct"], float)
    assert r["save_png_median_s"] > 0 and "app_overhead_without_png_pct" in r
    assert r["memory"]["peak_working_bytes"] >= 0 and r["memory"]["predicted_bytes"] > 0
    assert r["vram_bar"]["idle"]["segments_sum_equals_total"]
    assert r["placement"]["name"] == "resident" and r["acceleration"]["attention"]["backend"] == "native"
    assert r["prompt_cache"]["hits"] >= 2  # the same-prompt runs
    json.loads(to_json(r))  # strict JSON
    assert json.loads((tmp / "report.json").read_text())["bench_version"] == 1  # the checkpoint file


def test_sweep_goes_through_admission(report):
    sweep = report[0]["sweep"]
    assert sweep["summary"]["shapes"] == 4 == len(sweep["rows"]) and sweep["summary"]["ooms"] == 0
    for row in sweep["rows"]:
        assert row["admission"] in ("admitted", "over") and row["predicted_bytes"] > 0
        if row["admission"] == "admitted":
            assert "measured_bytes" in row and "error_pct" in row


def test_soak_idle_and_baseline(report):
    r = report[0]
    assert r["soak"]["generations"] == 3
    assert r["idle_unload"]["reload_s"] is not None and r["idle_unload"]["first_request_after_reload_s"] > 0
    b = r["baseline"]
    assert b["vanilla_median_s"] == 2.0 and b["speedup_same_prompt"] == pytest.approx(2.0 / b["ours_median_s"],
                                                                                      rel=1e-2)


def test_http_path_is_timed_through_the_rest_service(report):
    r, _, tmp = report
    http = r["http"]
    for key in ("new_prompt", "same_prompt"):
        assert http[key]["runs"] == 2 and 0 < http[key]["min_s"] <= http[key]["median_s"] <= http[key]["max_s"]
    assert http["png_bytes"] > 1000 and isinstance(http["overhead_pct"], float)
    assert r["baseline"]["speedup_http_new_prompt"] == pytest.approx(2.0 / http["new_prompt"]["median_s"], rel=1e-2)
    # two client processes at once, three requests each; the two requests also made alone: the same pixels
    crowd = http["concurrent"]
    assert (crowd["clients"], crowd["requests"], crowd["answered"], crowd["errors"]) == (2, 6, 6, [])
    assert crowd["same_pixels_as_alone"] and crowd["checked"] == 2 and crowd["ratio_to_sequential"] > 0
    # the real service path: its history database got a row for every answered request
    import sqlite3

    with sqlite3.connect(tmp / "out" / "history.sqlite3") as db:
        assert db.execute("select count(*) from generations").fetchone()[0] >= 5 + 8
    assert any(line.startswith("HTTP POST /api/v1/generate") for line in summary_lines(r))


def test_latents_are_saved_then_compared(report):
    first, second, _ = report
    assert first["latents"]["shape"] == [1, 16, 32, 32]
    assert second["latents"]["cosine"] == pytest.approx(1.0) and second["latents"]["finite"]
    # the same model twice: every seed's image identical (no PSNR), and all 8 seeds compared
    assert second["latents"]["seeds"] == 8 and second["latents"]["identical_images"] == 8
    assert "direct" not in second and "during_job" not in second["vram_bar"]  # --quick


def test_summary_lines_read_well(report):
    lines = summary_lines(report[0])
    assert any(line.startswith("first request after ready") for line in lines)
    assert any("vanilla diffusers median 2.000 s" in line for line in lines)


def test_read_baseline_needs_a_run_line(tmp_path):
    good = tmp_path / "v.jsonl"
    good.write_text(VANILLA)
    assert read_baseline(good)["run"]["median_s"] == 2.0 and read_baseline(good)["first"]["seconds"] == 4.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stage": "built"}\n')
    with pytest.raises(ValueError, match="no 'run' line"):
        read_baseline(bad)


def test_bench_prompts_are_sixty_words_and_differ():
    assert len(bench_prompt(0).split()) == 60 and bench_prompt(1) != bench_prompt(2)


def test_synthetic_builder_gives_every_matrix_weights():
    from zimage_ui.models.synthetic import build_synthetic_pipeline, demo_configs, parameter_count

    pipe = build_synthetic_pipeline("cpu", torch.float32, configs=demo_configs())
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                assert float(p.detach().std()) == pytest.approx(0.02, rel=0.25), name  # none left at zero
    assert parameter_count(pipe)["transformer"] > 0
    out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(0)).images
    assert torch.isfinite(out).all()


def test_full_size_config_matches_the_released_model():
    from diffusers import ZImageTransformer2DModel

    from zimage_ui.models.synthetic import FULL_TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736  # 6.155B, as published


def test_synthetic_folder_round_trips_through_the_real_loader(tmp_path):
    from zimage_ui.models.loading import load_model
    from zimage_ui.models.sources import resolve_model
    from zimage_ui.models.synthetic import build_synthetic_pipeline, demo_configs, save_synthetic

    folder = save_synthetic(build_synthetic_pipeline("cpu", torch.float32, configs=demo_configs()), tmp_path / "s")
    loaded = load_model(resolve_model(str(folder)).source, device="cpu")
    assert loaded.pipe.transformer.config.dim == demo_configs().transformer["dim"]


def test_cli_bench_prints_json(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "zimage_ui.cli", "bench", "--model", "demo", "--runs", "1",
                          "--width", "256", "--height", "256", "--quick", "--json", "--cache-dir",
                          str(tmp_path / "c"), "--output-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)
    assert data["warm"][0]["runs"] == 1 and "first request after ready" in run.stderr
