"""``zimage-ui bench``: the seeds' measurement programme, run through the app's own engine.

    zimage-ui bench [--model SPEC] [--synthetic] [--preset P] [--width W] [--height H] [--batch N] [--runs N] [--json]

What it measures, in one process (see docs/benchmarks.md for figures and the exact commands):

- **cold start**, broken into load / to-device / placement / acceleration (attention probe, compile set-up) /
  warm-up (compilation happens here) / ready;
- the **first request after ready** (a prompt warm-up never saw) against warm requests with new prompts;
- **warm latency** per preset and size: median, min and max over ``--runs``, with a new prompt each run (the text
  encoder runs) and with the same prompt and new seeds (the prompt cache answers);
- a **direct pipeline call** on the same pipeline (what a script would do) and so the **app overhead** of the
  engine's path: validation, queue, progress callbacks, PNG encode with metadata, atomic file write;
- **peak working memory** and the estimator's prediction for it; the VRAM bar's segments against NVML;
- optionally the **HTTP path** (``--http``): the REST service on a loopback port over the same engine, timed from
  the client's side — POST /api/v1/generate to the last byte of the PNG answer — against the direct call;
- optionally the estimator **sweep** (``--sweep``: 512²–2048² × batch 1–4, through admission, so a refused request
  is counted as refused and an admitted one that runs out of memory as an OOM), a VRAM **soak** (``--soak N``),
  **idle unload** and reload (``--idle-test``), final latents for an fp8-vs-bf16 **cosine** (``--latents FILE``),
  and the ratio against the vanilla diffusers baseline (``--baseline FILE``: the JSON lines that
  ``../shared/bench/vanilla_diffusers.py`` printed in the same command).

``--synthetic`` builds the full-size Z-Image-Turbo architecture with random weights on the device
(:mod:`zimage_ui.models.synthetic`), so anyone can learn what their GPU will do before downloading 33 GB;
``--save-synthetic DIR`` writes it as a diffusers folder instead, so ``--model DIR`` can measure the real loading
path from the page cache. On the demo model the whole programme runs on a laptop CPU in seconds (a smoke test).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .benchclient import run_clients

if TYPE_CHECKING:
    from .engine.api import BenchAPI

from .units import GiB

BENCH_VERSION = 1
log = logging.getLogger(__name__)

# One word = one token for the demo/synthetic tokenizer, like the baseline script's 60-word prompt ("w0 … w59").
_WORDS = ("red orange yellow green blue purple pink brown black white gray gold silver dark light bright circle "
          "square triangle star heart line dot ring cube sphere cat dog bird fish horse tree flower sun moon sky "
          "sea river mountain city house street car boat cloud rain snow fire water forest field garden portrait "
          "photo painting drawing sketch watercolor oil cinematic realistic detailed beautiful small big").split()
PROMPT_WORDS = 60
SWEEP_SIDES = (512, 768, 1024, 1536, 2048)
SWEEP_BATCHES = (1, 2, 3, 4)
SOAK_SIZES = ((1024, 1024), (768, 768), (1280, 720), (1536, 1536), (864, 1152), (1024, 1024), (1344, 576))


def bench_prompt(index: int) -> str:
    """The ``index``-th benchmark prompt: 60 words, a different word order for each index."""
    n = len(_WORDS)
    return " ".join(_WORDS[(index * 7 + i * (1 + index % 5)) % n] for i in range(PROMPT_WORDS))


@dataclass
class BenchOptions:
    synthetic: bool = False
    synthetic_scale: str = "full"  # "demo": the same builder at the demo model's sizes (CPU tests)
    preset: str | None = None
    width: int | None = None
    height: int | None = None
    batch: int = 1
    runs: int = 5
    steps: int | None = None
    sweep: bool = False
    sweep_steps: int = 1
    soak: int = 0
    idle_test: bool = False
    components: bool = False
    http: bool = False
    concurrency: int = 0  # with http: this many clients at once
    latent_seeds: int = 8
    quick: bool = False  # skip the direct pipeline call and the VRAM-bar sampling (budget runs)
    latents: Path | None = None
    baseline: Path | None = None
    save_synthetic: Path | None = None
    out: Path | None = None  # the report is (re)written here after every section, so a killed run leaves data
    sides: tuple[int, ...] = SWEEP_SIDES
    batches: tuple[int, ...] = SWEEP_BATCHES
    extra_sizes: list[tuple[int, int]] = field(default_factory=list)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
            "max_s": round(max(values), 4), "runs": len(values)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def read_baseline(path: Path) -> dict[str, Any]:
    """The vanilla script's JSON lines → {"built": ..., "first": ..., "run": ...} (the last of each stage)."""
    stages: dict[str, Any] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and "stage" in data:
                stages[data["stage"]] = data
    if "run" not in stages:
        raise ValueError(f"{path}: no 'run' line from vanilla_diffusers.py")
    return stages


# --------------------------------------------------------------------------------------------------------------
def _device_facts(engine: BenchAPI) -> dict[str, Any]:
    import torch

    from .metadata import package_versions

    device = engine.model.device
    info: dict[str, Any] = {"kind": device.type, "torch": torch.__version__,
                            "diffusers": package_versions().get("diffusers")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    else:
        info["name"] = "CPU"
    return info


def _timed_generate(engine: BenchAPI, raw: dict[str, Any]) -> tuple[float, Any]:
    _sync()
    t0 = time.perf_counter()
    result = engine.generate(raw, timeout=3600)
    _sync()
    return time.perf_counter() - t0, result


def _direct_call(engine: BenchAPI, raw: dict[str, Any], seed: int) -> float:
    """The same pipeline called as a script would: prompt encoded every time, PIL output, no queue, no file."""
    import torch

    pipe = engine.model.pipe
    device = engine.model.device
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe(prompt=[raw["prompt"]] * raw.get("batch", 1), height=raw["height"], width=raw["width"],
             num_inference_steps=raw["steps"], guidance_scale=raw.get("guidance", 0.0),
             generator=torch.Generator(device.type).manual_seed(seed), output_type="pil")
    _sync()
    return time.perf_counter() - t0


def _vram_bar(engine: BenchAPI, during: list[Any] | None = None) -> dict[str, Any]:
    """The VRAM bar's used bytes (everything but 'free') against NVML's device 'used', at idle and during a job."""

    def compare(snap: Any) -> dict[str, Any]:
        used = snap.total_bytes - snap.free_bytes
        row: dict[str, Any] = {"segments": dict(snap.segments()), "bar_used_bytes": used,
                               "segments_sum_equals_total": sum(s for _, s in snap.segments()) == snap.total_bytes}
        nv = snap.nvml or {}
        if nv.get("device_used_bytes"):
            row["nvml_used_bytes"] = nv["device_used_bytes"]
            row["nvml_total_bytes"] = nv.get("device_total_bytes")
            row["diff_pct"] = round(100.0 * (used - nv["device_used_bytes"]) / nv["device_used_bytes"], 3)
            row["diff_bytes"] = used - nv["device_used_bytes"]
        return row

    out: dict[str, Any] = {"idle": compare(engine.memory_snapshot())}
    if during:
        rows = [compare(s) for s in during]
        diffs = [abs(r["diff_pct"]) for r in rows if "diff_pct" in r]
        out["during_job"] = {"samples": len(rows), "max_abs_diff_pct": round(max(diffs), 3) if diffs else None}
    return out


def _sample_during(engine: BenchAPI, raw: dict[str, Any], period_s: float = 0.02) -> list[Any]:
    snaps: list[Any] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            snaps.append(engine.memory_snapshot())
            stop.wait(period_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        engine.generate(raw, timeout=3600)
    finally:
        stop.set()
        thread.join(5)
    return snaps


def _sweep(engine: BenchAPI, options: BenchOptions, steps: int) -> dict[str, Any]:
    """Every side × batch through admission; measured peak vs the estimator's prediction for those admitted."""
    from .engine.jobs import JobFailed, MemoryRefused

    rows = []
    for side in options.sides:
        for batch in options.batches:
            raw = {"prompt": bench_prompt(1), "width": side, "height": side, "batch": batch, "steps": steps,
                   "seed": 1, "preset": "turbo"}
            validated = engine.validate(raw)
            request = validated.request
            predicted = engine.predict_working_bytes(request)
            row: dict[str, Any] = {"width": side, "height": side, "batch": batch, "cfg": request.cfg,
                                   "predicted_bytes": predicted}
            try:
                seconds, result = _timed_generate(engine, raw)
            except MemoryRefused as exc:
                row.update(admission="over", refused=str(exc.admission.message))
            except JobFailed as exc:
                row.update(admission="admitted", oom=exc.kind == "oom", error=str(exc))
            else:
                measured = result.peak_working_bytes
                recovered = any("out of memory" in n for n in result.notes)
                row.update(admission="admitted", measured_bytes=measured, seconds=round(seconds, 3),
                           oom=recovered, error_pct=round(100.0 * (predicted - measured) / measured, 2)
                           if measured > 0 else None)
            rows.append(row)
            log.info("sweep %s", row)
    measured = [r for r in rows if r.get("error_pct") is not None]
    summary = {
        "steps": steps,
        "shapes": len(rows),
        "admitted": sum(1 for r in rows if r["admission"] == "admitted"),
        "refused": sum(1 for r in rows if r["admission"] == "over"),
        "ooms": sum(1 for r in rows if r.get("oom")),
        "max_abs_error_pct": max((abs(r["error_pct"]) for r in measured), default=None),
        "max_under_prediction_pct": min((r["error_pct"] for r in measured), default=None),
    }
    return {"rows": rows, "summary": summary}


def _soak(engine: BenchAPI, n: int, steps: int) -> dict[str, Any]:
    """``n`` generations cycling through mixed sizes; reserved memory after the first round vs at the end."""
    import torch

    cuda = engine.model.device.type == "cuda"

    def reserved() -> int:
        return int(torch.cuda.memory_reserved()) if cuda else 0

    first_round = len(SOAK_SIZES) * 2
    after_first = None
    readings = []
    t0 = time.perf_counter()
    for i in range(n):
        w, h = SOAK_SIZES[i % len(SOAK_SIZES)]
        engine.generate({"prompt": bench_prompt(i % 9), "width": w, "height": h, "batch": 1 + (i // 7) % 2,
                         "steps": steps, "seed": i}, timeout=3600)
        if i + 1 == min(first_round, n):
            after_first = reserved()
        if (i + 1) % 50 == 0 or i + 1 == n:
            readings.append({"after": i + 1, "reserved_bytes": reserved()})
    end = reserved()
    growth = None if not after_first else round(100.0 * (end - after_first) / after_first, 3)
    return {"generations": n, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "reserved_after_first_round_bytes": after_first, "reserved_end_bytes": end, "growth_pct": growth,
            "readings": readings}


def _idle_test(engine: BenchAPI, raw: dict[str, Any]) -> dict[str, Any]:
    """Unload on the worker's thread as the idle hook would, then time a request (which reloads)."""
    before = engine.memory_snapshot()
    t0 = time.perf_counter()
    engine.on_worker(engine.unload).result()
    unload_s = time.perf_counter() - t0
    after = engine.memory_snapshot()
    seconds, _ = _timed_generate(engine, raw)
    return {"unload_s": round(unload_s, 3), "reload_s": engine.model_info()["last_reload_seconds"],
            "first_request_after_reload_s": round(seconds, 3),
            "weights_on_gpu_loaded_bytes": before.weights_bytes, "weights_on_gpu_unloaded_bytes": after.weights_bytes,
            "gpu_used_loaded_bytes": before.total_bytes - before.free_bytes,
            "gpu_used_unloaded_bytes": after.total_bytes - after.free_bytes,
            "nvml_used_unloaded_bytes": (after.nvml or {}).get("device_used_bytes")}


def _http(engine: BenchAPI, base: dict[str, Any], runs: int, concurrency: int = 0) -> dict[str, Any]:
    """The REST service (no web UI: it is not on this path) on a loopback port over ``engine``; seconds from POST
    /api/v1/generate to the whole PNG answer, timed by a client in a process of its own (as a browser or ``curl``
    is: :mod:`.benchclient`), new prompt each run, then the same prompt; with ``concurrency``, that many client
    processes at once (:func:`_concurrent`)."""
    import uvicorn

    from .service.app import create_app
    from .service.server import loopback_socket

    app = create_app(engine.settings, engine, ui=False)
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="bench-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the bench's HTTP server did not start")
            time.sleep(0.02)
        out: dict[str, Any] = {"url": url, "clients": "one process per client"}

        def sequential(plan: list[tuple[str, int]]) -> tuple[list[float], float]:
            done = _answers(run_clients(url, base, [plan]))
            out["png_bytes"] = done["rows"][-1]["bytes"]
            return [r["seconds"] for r in done["rows"]], done["wall_s"]

        sequential([(bench_prompt(599), 599)])  # the first request on the route
        seconds, wall = sequential([(bench_prompt(600 + i), 600 + i) for i in range(runs)])
        out["new_prompt"] = _stats(seconds)
        out["sequential_images_per_s"] = round(runs / wall, 4)
        out["same_prompt"] = _stats(sequential([(bench_prompt(200), 700 + i) for i in range(runs)])[0])
        if concurrency > 0:
            out["concurrent"] = _concurrent(engine, url, base, concurrency, out["sequential_images_per_s"])
        return out
    finally:
        server.should_exit = True
        thread.join(30)
        history = app.state.history
        if history is not None:
            history.close()


def _answers(done: dict[str, Any]) -> dict[str, Any]:
    """``run_clients``'s result, raising on the first answer that is not a PNG."""
    for row in done["rows"]:
        if row.get("status") != 200 or row.get("type") != "image/png":
            raise RuntimeError(f"POST /api/v1/generate answered {row.get('status')}: {row.get('error', '')[:300]}")
    return done


def _concurrent(engine: BenchAPI, url: str, base: dict[str, Any], clients: int, sequential_rate: float,
                per_client: int = 3) -> dict[str, Any]:
    """``clients`` client processes at once, ``per_client`` requests each, new prompts (the prompt cache is
    cleared first): images per second against one client's sequential rate. Two of the requests were first made
    alone; their pixels must come back identical from the crowd."""
    alone = [(bench_prompt(900 + k), 900 + k) for k in range(2)]
    engine.prompt_cache.clear()
    reference = {(r["prompt"], r["seed"]): r["digest"]
                 for r in _answers(run_clients(url, base, [alone], digest=alone))["rows"]}
    engine.prompt_cache.clear()
    plans = [[(bench_prompt(1000 + c * per_client + i), 1000 + c * per_client + i) for i in range(per_client)]
             for c in range(clients)]
    for k, key in enumerate(alone):  # the second request of clients 0 and 1: in the middle of the crowd
        plans[k % clients][min(1, per_client - 1)] = key
    done = run_clients(url, base, plans, digest=alone)
    ok = [r for r in done["rows"] if r.get("status") == 200]
    errors = [str(r.get("error") or r.get("status"))[:200] for r in done["rows"] if r.get("status") != 200]
    digests = {(r["prompt"], r["seed"]): r["digest"] for r in ok if "digest" in r}
    wall = done["wall_s"]
    rate = len(ok) / wall if wall > 0 else 0.0
    return {"clients": clients, "requests": clients * per_client, "answered": len(ok), "errors": errors[:5],
            "wall_s": round(wall, 3), "images_per_s": round(rate, 4),
            "ratio_to_sequential": round(rate / sequential_rate, 3) if sequential_rate else None,
            "latency": _stats([r["seconds"] for r in ok]) if ok else None,
            "same_pixels_as_alone": all(digests.get(k) == v for k, v in reference.items()),
            "checked": len(digests)}


def _cuda_ms(fn, repeats: int = 5) -> float:
    import torch

    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        _sync()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 2)


def _components(engine: BenchAPI, width: int, height: int) -> dict[str, Any]:
    """Milliseconds of the parts around the denoise loop at ``width×height`` (CUDA): prompt encode, VAE decode
    eager / channels-last / compiled, and the two ways to turn the decoded tensor into PIL images."""
    import torch

    from .engine.runner import to_pil

    pipe = engine.model.pipe
    device = engine.model.device
    vae = pipe.vae
    out: dict[str, Any] = {"width": width, "height": height}
    prompt = bench_prompt(700)
    from .engine.runner import encode_prompt

    with torch.no_grad():
        out["encode_pipeline_ms"] = _cuda_ms(lambda: pipe._encode_prompt(prompt=[prompt], device=device))
        out["encode_ms"] = _cuda_ms(lambda: encode_prompt(pipe, prompt, device))  # ours: as the runner does
        out["encode_128_tokens_ms"] = _cuda_ms(lambda: encode_prompt(pipe, prompt, device, max_sequence_length=128))
        latents = torch.randn(1, 16, height // 8, width // 8, device=device, dtype=vae.dtype)

        def decode(decoder: Any) -> Any:
            # Z-Image's VAE has no post-quant conv: decode() is the decoder on the rescaled latents
            return decoder(latents / vae.config.scaling_factor + vae.config.shift_factor)

        gate = getattr(vae.decoder, "_compiled_call_impl", None)
        if gate is not None and hasattr(gate, "shapes"):  # the engine's static compile (compile_vae)
            out["vae_decode_engine_ms"] = _cuda_ms(lambda: decode(vae.decoder))
            out["vae_gate_calls"] = dict(gate.calls)
        out["vae_decode_eager_ms"] = _cuda_ms(lambda: _without_compiled([vae.decoder], lambda: decode(vae.decoder)))
        image = (decode(vae.decoder) / 2 + 0.5).clamp(0, 1)
        out["to_pil_diffusers_ms"] = _cuda_ms(
            lambda: pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(image)))
        out["to_pil_on_device_ms"] = _cuda_ms(lambda: to_pil(image))
        out["png"] = _png_levels(to_pil(image)[0])
        out["transformer_pass_top_kernels"] = _profile_pass(engine, width, height)
        try:
            if gate is not None:  # compiled already (above); the channels-last eager figure needs it off
                raise RuntimeError("skipped: the engine compiled the decoder (vae_decode_engine_ms)")
            compiled = torch.compile(vae.decoder)
            t0 = time.perf_counter()
            decode(compiled)
            _sync()
            out["vae_compile_s"] = round(time.perf_counter() - t0, 1)
            out["vae_decode_compiled_ms"] = _cuda_ms(lambda: decode(compiled))
            vae.decoder.to(memory_format=torch.channels_last)
            out["vae_decode_channels_last_eager_ms"] = _cuda_ms(lambda: decode(vae.decoder))
        except Exception as exc:  # report, don't fail the benchmark
            out["vae_compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            vae.decoder.to(memory_format=torch.contiguous_format)
    return out


def _without_compiled(modules: list[Any], fn: Any) -> Any:
    """``fn()`` with the compiled calls of ``modules`` switched off (eager), restored after."""
    saved = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        return fn()
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


def _png_levels(image: Any) -> dict[str, Any]:
    """Milliseconds and bytes of the PNG encode (metadata included) at ISA-L levels 0-3 for one decoded image."""
    from .metadata import encode_png, png_info
    from .validation import RunRequest

    info = png_info(RunRequest("x", "", "turbo", 8, 0.0, image.width, image.height, 0, 1), seed=0, model="bench")
    out = {}
    for level in (0, 1, 2, 3):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            data = encode_png(image, info, level)
            times.append(time.perf_counter() - t0)
        out[f"level{level}"] = {"ms": round(1e3 * statistics.median(times), 2), "bytes": len(data)}
    return out


def _profile_pass(engine: BenchAPI, width: int, height: int, top: int = 12) -> list[dict[str, Any]]:
    """The CUDA kernels of one transformer pass (a 1-step generation to latents, its prompt encode included), by
    GPU time: what SDPA really runs, and where the rest goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    pipe = engine.model.pipe
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe(prompt=[bench_prompt(701)], height=height, width=width, num_inference_steps=1, guidance_scale=0.0,
                 generator=torch.Generator("cuda").manual_seed(0), output_type="latent")
            _sync()
        rows = []
        for e in prof.key_averages():
            ms = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if ms:
                rows.append({"name": e.key[:120], "ms": round(ms / 1e3, 3), "calls": e.count})
        rows.sort(key=lambda r: -r["ms"])
        total = round(sum(r["ms"] for r in rows), 2)
        return [{"name": "ALL KERNELS", "ms": total, "calls": sum(r["calls"] for r in rows)}] + rows[:top]
    except Exception as exc:  # report, don't fail the benchmark
        return [{"name": f"profile failed: {type(exc).__name__}: {str(exc)[:200]}", "ms": 0, "calls": 0}]


def _latents(engine: BenchAPI, raw: dict[str, Any], path: Path, seeds: int = 8) -> dict[str, Any]:
    """Final latents and decoded images for seeds ``0 … seeds−1`` at the preset size: saved to ``path`` if absent,
    else compared with the saved ones — latents cosine and relative L2, image PSNR (dB, 8-bit), per seed and the
    worst. Run bf16 first, then fp8 with the same file, to measure what fp8 changes."""
    import numpy as np
    import torch

    pipe = engine.model.pipe
    device = engine.model.device
    runner = engine.runners["turbo"]
    all_latents, all_images = [], []
    for seed in range(seeds):
        with torch.no_grad():
            latents = pipe(prompt=[raw["prompt"]], height=raw["height"], width=raw["width"],
                           num_inference_steps=raw["steps"], guidance_scale=0.0,
                           generator=torch.Generator(device.type).manual_seed(seed), output_type="latent").images
        all_images.append(np.asarray(runner._decode(latents, None)[0]))
        all_latents.append(latents.float().cpu())
    latents = torch.stack(all_latents)
    images = torch.from_numpy(np.stack(all_images))
    if not Path(path).exists():
        torch.save({"latents": latents, "images": images}, path)
        return {"saved": str(path), "shape": list(latents.shape[1:]), "seeds": seeds}
    saved = torch.load(path)
    reference, ref_images = saved["latents"], saved["images"]
    rows = []
    for seed in range(min(seeds, len(reference))):
        a, b = latents[seed].flatten().double(), reference[seed].flatten().double()
        mse = float(((images[seed].float() - ref_images[seed].float()) ** 2).mean())
        rows.append({"seed": seed, "cosine": round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6),
                     "relative_l2": round(float((a - b).norm() / b.norm()), 6),
                     "psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else None})
    psnrs = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    return {"compared_with": str(path), "seeds": len(rows), "cosine": min(r["cosine"] for r in rows),
            "cosine_mean": round(statistics.mean(r["cosine"] for r in rows), 6),
            "relative_l2": max(r["relative_l2"] for r in rows),
            "psnr_db_min": min(psnrs) if psnrs else None, "psnr_db_mean": round(statistics.mean(psnrs), 2)
            if psnrs else None, "identical_images": sum(r["psnr_db"] is None for r in rows),
            "finite": bool(torch.isfinite(latents).all()), "per_seed": rows}


# --------------------------------------------------------------------------------------------------------------
def run_bench(settings: Any, options: BenchOptions) -> dict[str, Any]:
    """Run the programme; returns the JSON-able report (shape documented in docs/benchmarks.md)."""
    from .engine.engine import Engine

    if options.save_synthetic is not None:
        return save_synthetic_model(settings, options.save_synthetic, scale=options.synthetic_scale)
    loader = None
    if options.synthetic:
        from .models.synthetic import FULL_CONFIGS, demo_configs, load_synthetic

        configs = demo_configs() if options.synthetic_scale == "demo" else FULL_CONFIGS

        def loader(s: Any, device: Any) -> Any:
            return load_synthetic(device, s.dtype, configs=configs)

    engine: BenchAPI = Engine(settings, loader=loader)
    t0 = time.perf_counter()
    engine.start()
    wall_ready = time.perf_counter() - t0
    try:
        return _programme(engine, options, wall_ready)
    finally:
        engine.shutdown(grace_s=0)


def _progress(report: dict[str, Any], options: BenchOptions, section: str) -> None:
    import sys

    print(f"bench: {section} done", file=sys.stderr, flush=True)
    if options.out is not None:
        Path(options.out).write_text(to_json(report) + "\n")


def _programme(engine: BenchAPI, options: BenchOptions, wall_ready: float) -> dict[str, Any]:
    info = engine.model_info()
    book = engine.presets()
    preset = book.presets[options.preset or book.default]
    width, height = options.width or preset.width, options.height or preset.height
    steps = options.steps or preset.steps
    base = {"preset": preset.name, "width": width, "height": height, "batch": options.batch, "steps": steps,
            "guidance": preset.guidance}
    report: dict[str, Any] = {
        "bench_version": BENCH_VERSION,
        "device": _device_facts(engine),
        "model": {"id": info["id"], "label": info["label"], "synthetic": options.synthetic, "dtype": info["dtype"],
                  "weights_on_device_bytes": engine.weights_bytes()},
        "settings": {k: getattr(engine.settings, k) for k in ("compile", "compile_vae", "attention", "fp8", "placement",
                                                              "vram_budget_gb", "prompt_cache_size", "warmup")},
        "cold_start": {**info["stages"], "wall_s": round(wall_ready, 3)},
        "placement": engine.placement.to_dict() if engine.placement else None,
        "plan": info["plan"],
        "acceleration": info["acceleration"],
        "warmup_runs": engine.warmup_runs,
        "request": base,
    }
    _progress(report, options, "cold start")
    # 1. first request after ready: a prompt nobody has seen (the text encoder runs)
    first_s, first = _timed_generate(engine, {**base, "prompt": bench_prompt(100), "seed": 100})
    # 2. warm: new prompt every run (encoder runs), then the same prompt with new seeds (prompt cache)
    new_prompt, same_prompt, results = [], [], []
    for i in range(options.runs):
        seconds, result = _timed_generate(engine, {**base, "prompt": bench_prompt(200 + i), "seed": 200 + i})
        new_prompt.append(seconds)
        results.append(result)
    for i in range(options.runs):
        seconds, result = _timed_generate(engine, {**base, "prompt": bench_prompt(200), "seed": 300 + i})
        same_prompt.append(seconds)
        results.append(result)
    timings = {k: statistics.median(r.timings[k] for r in results) for k in ("encode_s", "denoise_s", "decode_s")}
    warm_new = _stats(new_prompt)
    report["first_request"] = {"seconds": round(first_s, 4), "warm_new_prompt_median_s": warm_new["median_s"],
                               "ratio": round(first_s / warm_new["median_s"], 3),
                               "timings": {k: round(v, 4) for k, v in first.timings.items()},
                               "warm_timings": {k: round(v, 4) for k, v in results[0].timings.items()}}
    report["warm"] = [
        {**base, "prompt": "new each run", **warm_new,
         **{k: round(v, 4) for k, v in timings.items()}},
        {**base, "prompt": "same, new seeds (prompt cache)", **_stats(same_prompt)},
    ]
    for w, h in options.extra_sizes:
        extra = []
        for i in range(options.runs):
            seconds, _ = _timed_generate(engine, {**base, "width": w, "height": h, "prompt": bench_prompt(200),
                                                  "seed": 400 + i})
            extra.append(seconds)
        report["warm"].append({**base, "width": w, "height": h, "prompt": "same, new seeds (prompt cache)",
                               **_stats(extra)})
    _progress(report, options, "warm latency")
    saves = [r.timings["save_s"] for r in results if "save_s" in r.timings]
    if saves:  # PNG encode + metadata + atomic write, inside the engine's figures
        report["save_png_median_s"] = round(statistics.median(saves), 4)
    # 3. direct pipeline call, same pipeline, new prompt each time: the app's overhead over it
    if not options.quick:
        direct = [_direct_call(engine, {**base, "prompt": bench_prompt(500 + i)}, seed=500 + i)
                  for i in range(options.runs)]
        report["direct"] = _stats(direct)
        d = report["direct"]["median_s"]
        report["app_overhead_pct"] = round(100.0 * (warm_new["median_s"] / d - 1), 2)
        if saves:
            report["app_overhead_without_png_pct"] = round(
                100.0 * ((warm_new["median_s"] - report["save_png_median_s"]) / d - 1), 2)
    # 4. memory at the request size: measured peak vs the estimator
    peak = max(r.peak_working_bytes for r in results)
    request = engine.validate({**base, "prompt": "x"}).request
    predicted = engine.predict_working_bytes(request)
    report["memory"] = {"peak_working_bytes": peak, "predicted_bytes": predicted,
                        "error_pct": round(100.0 * (predicted - peak) / peak, 2) if peak else None,
                        "estimator": engine.estimator.description, "estimator_file": str(engine.estimator_path)
                        if engine.estimator_path else None}
    if engine.model.device.type == "cuda":
        import torch

        report["memory"]["max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        report["memory"]["reserved_bytes"] = int(torch.cuda.memory_reserved())
    # 5. the VRAM bar against NVML
    during = None if options.quick else _sample_during(engine, {**base, "prompt": bench_prompt(200), "seed": 7})
    report["vram_bar"] = _vram_bar(engine, during)
    if first.notes:
        report["first_request"]["notes"] = [str(n) for n in first.notes]
    _progress(report, options, "memory and VRAM bar")
    # 6. optional parts
    if options.components and engine.model.device.type == "cuda":
        report["components"] = _components(engine, width, height)
    if options.latents is not None:
        report["latents"] = _latents(engine, {**base, "prompt": bench_prompt(200)}, options.latents,
                                     options.latent_seeds)
    saving = engine.settings.save_images
    engine.settings.save_images = False  # the sweep and soak measure memory; PNG files would only cost time
    try:
        if options.sweep:
            report["sweep"] = _sweep(engine, options, options.sweep_steps)
            _progress(report, options, "sweep")
        if options.soak:
            report["soak"] = _soak(engine, options.soak, options.sweep_steps)
            _progress(report, options, "soak")
    finally:
        engine.settings.save_images = saving
    if options.http:
        report["http"] = _http(engine, base, options.runs, options.concurrency)
        if "direct" in report:
            report["http"]["overhead_pct"] = round(
                100.0 * (report["http"]["new_prompt"]["median_s"] / report["direct"]["median_s"] - 1), 2)
        _progress(report, options, "HTTP path")
    if options.idle_test:
        report["idle_unload"] = _idle_test(engine, {**base, "prompt": bench_prompt(200), "seed": 9})
    if options.baseline is not None:
        stages = read_baseline(options.baseline)
        run = stages["run"]
        report["baseline"] = {"vanilla": stages, "vanilla_median_s": run["median_s"],
                              "ours_median_s": report["warm"][1]["median_s"],
                              "speedup_same_prompt": round(run["median_s"] / report["warm"][1]["median_s"], 3),
                              "speedup_new_prompt": round(run["median_s"] / warm_new["median_s"], 3)}
        if "http" in report:
            report["baseline"]["speedup_http_same_prompt"] = round(
                run["median_s"] / report["http"]["same_prompt"]["median_s"], 3)
            report["baseline"]["speedup_http_new_prompt"] = round(
                run["median_s"] / report["http"]["new_prompt"]["median_s"], 3)
    report["prompt_cache"] = engine.model_info()["prompt_cache"]
    _progress(report, options, "all")
    return report


def save_synthetic_model(settings: Any, folder: Path, scale: str = "full") -> dict[str, Any]:
    """Build the synthetic model on the device and write it as a diffusers folder."""
    from .models.loading import pick_device, pick_dtype
    from .models.synthetic import FULL_CONFIGS, build_synthetic_pipeline, demo_configs, save_synthetic

    device = pick_device(settings.device)
    t0 = time.perf_counter()
    configs = demo_configs() if scale == "demo" else FULL_CONFIGS
    pipe = build_synthetic_pipeline(device, pick_dtype(device, settings.dtype), configs=configs)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_synthetic(pipe, folder)
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return {"bench_version": BENCH_VERSION, "saved": str(folder), "bytes": size, "build_s": round(built, 2),
            "save_s": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------------------
def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human table of the report."""
    if "saved" in report:
        return [f"saved {report['saved']} ({report['bytes'] / GiB:.2f} GiB) in {report['save_s']} s"]
    lines = []
    dev = report["device"]
    acc = report.get("acceleration") or {}
    att = (acc.get("attention") or {})
    lines.append(f"device {dev.get('name')} · torch {dev.get('torch')} · diffusers {dev.get('diffusers')}")
    lines.append(f"model {report['model']['label']} · placement {(report.get('placement') or {}).get('name')} · "
                 f"attention {att.get('backend')}/{att.get('masked_backend')} · compiled {acc.get('compiled')} · "
                 f"fp8 {acc.get('fp8')}")
    cs = report["cold_start"]
    lines.append("cold start " + ", ".join(f"{k} {v}" for k, v in cs.items()))
    fr = report["first_request"]
    lines.append(f"first request after ready {fr['seconds']:.3f} s = {fr['ratio']:.2f}x warm (new prompt)")
    for row in report["warm"]:
        lines.append(f"warm {row['width']}x{row['height']} b{row['batch']} {row['steps']} steps, prompt "
                     f"{row['prompt']}: median {row['median_s']:.3f} s "
                     f"(min {row['min_s']:.3f}, max {row['max_s']:.3f})")
    if "direct" in report:
        lines.append(f"direct pipeline call median {report['direct']['median_s']:.3f} s · app overhead "
                     f"{report['app_overhead_pct']:+.1f}% (PNG save {report.get('save_png_median_s')} s; "
                     f"without it {report.get('app_overhead_without_png_pct')}%)")
    if "http" in report:
        h = report["http"]
        lines.append(f"HTTP POST /api/v1/generate median {h['new_prompt']['median_s']:.3f} s new prompt, "
                     f"{h['same_prompt']['median_s']:.3f} s same prompt (PNG {h['png_bytes'] / 1024:.0f} KB)"
                     + (f" · {h['overhead_pct']:+.1f}% over the direct call" if "overhead_pct" in h else ""))
    mem = report["memory"]
    err = mem["error_pct"]
    lines.append(f"peak working {mem['peak_working_bytes'] / GiB:.2f} GiB, predicted "
                 f"{mem['predicted_bytes'] / GiB:.2f} GiB" + ("" if err is None else f" ({err:+.1f}%)"))
    bar = report["vram_bar"]["idle"]
    if "diff_pct" in bar:
        lines.append(f"VRAM bar used {bar['bar_used_bytes'] / GiB:.2f} GiB vs NVML "
                     f"{bar['nvml_used_bytes'] / GiB:.2f} GiB "
                     f"({bar['diff_pct']:+.2f}%); during a job max |diff| "
                     f"{report['vram_bar'].get('during_job', {}).get('max_abs_diff_pct')}%")
    if "sweep" in report:
        s = report["sweep"]["summary"]
        lines.append(f"sweep {s['shapes']} shapes: {s['admitted']} admitted, {s['refused']} refused, {s['ooms']} OOM, "
                     f"max |error| {s['max_abs_error_pct']}%")
    if "soak" in report:
        s = report["soak"]
        lines.append(f"soak {s['generations']} generations: reserved grew {s['growth_pct']}% after the first round")
    if "idle_unload" in report:
        s = report["idle_unload"]
        lines.append(f"idle unload {s['unload_s']} s, reload {s['reload_s']} s, GPU used "
                     f"{s['gpu_used_loaded_bytes'] / GiB:.2f} → {s['gpu_used_unloaded_bytes'] / GiB:.2f} GiB")
    if "concurrent" in report.get("http", {}):
        c = report["http"]["concurrent"]
        lines.append(f"{c['clients']} clients at once: {c['images_per_s']:.3f} images/s = "
                     f"{c['ratio_to_sequential']}x one client's {report['http']['sequential_images_per_s']:.3f}; "
                     f"same pixels as alone: {c['same_pixels_as_alone']} ({c['checked']} checked)")
    if "latents" in report:
        lat = {k: v for k, v in report["latents"].items() if k != "per_seed"}
        lines.append(f"latents {json.dumps(lat)}")
    if "baseline" in report:
        b = report["baseline"]
        lines.append(f"vanilla diffusers median {b['vanilla_median_s']:.3f} s → speedup "
                     f"{b['speedup_same_prompt']:.2f}x (same prompt), {b['speedup_new_prompt']:.2f}x (new prompt)"
                     + (f"; over HTTP {b['speedup_http_same_prompt']:.2f}x / {b['speedup_http_new_prompt']:.2f}x"
                        if "speedup_http_new_prompt" in b else ""))
    return lines


def default_output_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="zimage-bench-"))


def _finite(x: Any) -> Any:  # json.dumps refuses NaN only with allow_nan=False; keep reports strict JSON
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_finite(report), indent=2, default=str, allow_nan=False)
