"""``zimage-ui bench --cohost GB``: memory truth on one GPU, as a person sharing the card would see it.

    zimage-ui bench --synthetic --cohost 100 --vram-budget-gb 24 --out cohost24.json

One process, read from outside the way ``nvidia-smi`` reads it (NVML's per-process figure for this PID, sampled
every 20 ms on a thread, and ``nvidia-smi --query-compute-apps`` once a second as a cross-check):

1. **start**: the per-process peak while loading and warming up, against the budget;
2. **idle footprint** 2.5 s after warm-up: what we hold, against weights + memory outside the allocator + 1 GiB;
3. **first request after the release** (queue empty for 2.5 s, cache given back) against warm requests;
4. the **sweep** over HTTP (the REST service on loopback, the path users take): every size class at 1:1, the
   middle one at 16:9, and 2048², × batch 1–4; halfway through, a **co-hosted process grabs ``GB`` GiB while a
   job runs** and holds it; every answer is counted: 200, 409 (refused, with the reason), 507 (out of memory);
   an out-of-memory error in a job the estimator admitted with the co-host steady is the estimator's
   misjudgement;
5. the **fallback**: the estimator is made to under-predict one batch-4 decode so that it really runs out of
   memory on the GPU; the decode that recovers is timed against the normal decode of the same images;
6. the idle footprint again, after all of that.

Needs CUDA; ``--synthetic`` gives the full-size architecture without a download.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.api import BenchAPI

from .units import GiB, gib

# A process that holds GPU memory when told to: "grab N" allocates N GiB, "free" lets it go, EOF ends it.
_COHOST = r"""
import sys, torch
torch.cuda.init(); held = []
print("ready", flush=True)
for line in sys.stdin:
    word, *rest = line.split()
    if word == "grab":
        held.append(torch.empty(int(float(rest[0]) * 2**30), dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize(); print("held", flush=True)
    elif word == "free":
        held.clear(); torch.cuda.empty_cache(); print("freed", flush=True)
"""


class CoHost:
    """Another process on the same GPU (an LLM server, say) that grabs memory on demand."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _COHOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"co-host process said {line!r}, expected {word!r}")

    def grab(self, gib: float) -> None:
        self.proc.stdin.write(f"grab {gib}\n")
        self.proc.stdin.flush()
        self._expect("held")

    def free(self) -> None:
        self.proc.stdin.write("free\n")
        self.proc.stdin.flush()
        self._expect("freed")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ProcessWatch:
    """This process's GPU memory as NVML (what nvidia-smi shows) reports it, sampled on a thread."""

    def __init__(self, index: int = 0, period_s: float = 0.02) -> None:
        self.index, self.period_s = index, period_s
        self.phase = lambda: "start"  # the bench sets it to the engine's state: peaks are kept per phase
        self.phase_peaks: dict[str, int] = {}
        self.pid = os.getpid()
        self.peak = 0
        self.samples = 0
        self.smi_peak_mib = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._nvml, daemon=True),
                         threading.Thread(target=self._smi, daemon=True)]

    def current(self) -> int:
        from .memory import nvml

        return nvml.process_used_bytes(self.index, self.pid) or 0

    def reset(self) -> int:
        peak, self.peak = self.peak, self.current()
        return peak

    def _nvml(self) -> None:
        while not self._stop.is_set():
            now = self.current()
            self.peak = max(self.peak, now)
            phase = self.phase()
            self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), now)
            self.samples += 1
            self._stop.wait(self.period_s)

    def _smi(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=5).stdout
                for line in out.splitlines():
                    pid, _, used = line.partition(",")
                    if pid.strip() == str(self.pid):
                        self.smi_peak_mib = max(self.smi_peak_mib, int(used.strip()))
            self._stop.wait(1.0)

    def __enter__(self) -> ProcessWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


def sweep_shapes(engine: BenchAPI) -> list[tuple[int, int]]:
    """Every size class the page offers at 1:1, the middle class at 16:9, and the largest square the limits
    allow."""
    from .sizes import load_sizes

    low, high = engine.presets().limits.side
    table = load_sizes()
    classes = table.classes(demo=engine.model.is_demo, max_side=high)
    shapes = [table.size(name, "1:1") for name in classes]
    middle = classes[len(classes) // 2]
    shapes.append(table.size(middle, "16:9"))
    shapes.append((high, high))
    return list(dict.fromkeys(shapes))


def run_cohost(settings: Any, options: Any, cohost_gib: float) -> dict[str, Any]:
    """The programme in the module docstring; returns the JSON-able report."""
    import torch

    from .bench import _progress, bench_prompt
    from .engine.engine import Engine
    from .models.synthetic import FULL_CONFIGS, demo_configs, load_synthetic

    if not torch.cuda.is_available():
        raise ValueError("bench --cohost measures a GPU shared with another process: it needs CUDA")
    configs = demo_configs() if options.synthetic_scale == "demo" else FULL_CONFIGS
    loader = (lambda s, device: load_synthetic(device, s.dtype, configs=configs)) if options.synthetic else None
    report: dict[str, Any] = {"cohost_gib": cohost_gib, "budget_gib": settings.vram_budget_gb,
                              "keep_cache": settings.keep_cache,
                              "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    budget_set = settings.vram_budget_gb is not None
    with ProcessWatch() as watch:
        engine: BenchAPI = Engine(settings, loader=loader)
        watch.phase = lambda: engine.state.value
        t0 = time.perf_counter()
        engine.start()
        try:
            report["ready_s"] = round(time.perf_counter() - t0, 2)
            report["start"] = {"peak_process_gib": gib(watch.reset()), "nvidia_smi_peak_mib": watch.smi_peak_mib,
                               "peak_by_state_gib": {k: gib(v) for k, v in watch.phase_peaks.items()}}
            report["model"] = {k: engine.model_info()[k] for k in ("placement", "budget", "estimator", "allocator")}
            report["idle_after_warmup"] = _idle_footprint(engine, watch)
            _progress(report, options, "start and idle footprint")
            if not options.quick:
                report["first_after_release"] = _first_after_release(engine, bench_prompt)
                _progress(report, options, "first request after release")
            watch.reset()
            watch.smi_peak_mib = 0  # the sweep's own nvidia-smi peak from here
            report["sweep"] = _http_sweep(engine, options, cohost_gib, bench_prompt, watch)
            report["sweep"]["nvidia_smi_peak_mib"] = watch.smi_peak_mib
            _progress(report, options, "sweep")
            report["fallback"] = _fallback(engine, bench_prompt) if budget_set else {"skipped": "no budget"}
            report["oom_events"] = dict(engine.model_info()["oom_events"])
            report["idle_after_sweep"] = _idle_footprint(engine, watch)
            report["estimator_after"] = engine.estimator.description
            budget = settings.vram_budget_gb
            peaks = [report["start"]["peak_process_gib"], report["sweep"]["peak_process_gib"]]
            if options.synthetic and engine.placement.name != "resident":
                # the synthetic model is built whole on the GPU before it is placed (real weights load to CPU
                # RAM first): judge the start from warm-up on
                peaks[0] = gib(watch.phase_peaks.get("warming", 0))
            report["start"]["judged_peak_gib"] = peaks[0]
            report["verdict"] = {
                "budget_kept": None if budget is None else max(p for p in peaks if p is not None) <= budget,
                "idle_within_weights_context_plus_1gib": report["idle_after_warmup"]["within"]
                and report["idle_after_sweep"]["within"],
                "misjudged_ooms": report["sweep"]["misjudged_ooms"],
                "fallback_ratio_le_2": None if report["fallback"].get("ratio") is None
                else report["fallback"]["ratio"] <= 2.0,
                "first_after_release_ratio_le_1_05": report["first_after_release"]["ratio"] <= 1.05
                if "first_after_release" in report else None,
            }
            _progress(report, options, "all")
        finally:
            engine.shutdown(grace_s=0)
    return report


def _idle_footprint(engine: BenchAPI, watch: ProcessWatch) -> dict[str, Any]:
    time.sleep(2.5)  # the release comes within 2 s of the queue going empty
    held = watch.current()
    weights = engine.weights_bytes()
    outside = engine.allocator.outside_bytes() if engine.allocator is not None else None
    import torch

    reserved = torch.cuda.memory_reserved()
    limit = weights + (outside or 0) + GiB
    return {"process_gib": gib(held), "weights_gib": gib(weights), "outside_allocator_gib": gib(outside),
            "reserved_gib": gib(reserved), "limit_gib": gib(limit), "within": held <= limit,
            "last_release": engine.model_info()["last_cache_release"]}


def _first_after_release(engine: BenchAPI, prompt: Any, runs: int = 5) -> dict[str, Any]:
    """Warm requests back to back (no release between them) against requests after 2.5 s idle (released)."""
    from .bench import _timed_generate

    book = engine.presets()
    preset = book.presets[book.default]
    base = {"preset": preset.name, "width": preset.width, "height": preset.height, "steps": preset.steps}
    _timed_generate(engine, {**base, "prompt": prompt(800), "seed": 800})
    warm = [_timed_generate(engine, {**base, "prompt": prompt(801 + i), "seed": 801 + i})[0] for i in range(5)]
    # paired: after the same 2.5 s idle, with the cache given back and (the control) with it kept, alternating;
    # the control shows what idling costs by itself (the GPU's clocks drop when it idles)
    after, kept = [], []
    keep = engine.settings.keep_cache
    try:
        for i in range(runs):
            for series, keep_cache in ((after, False), (kept, True)):
                engine.settings.keep_cache = keep_cache
                time.sleep(2.5)
                series.append(_timed_generate(engine, {**base, "prompt": prompt(810 + 2 * i + keep_cache),
                                                       "seed": 810 + i})[0])
    finally:
        engine.settings.keep_cache = keep
    median = statistics.median
    return {"warm_s": [round(s, 4) for s in warm], "after_release_s": [round(s, 4) for s in after],
            "after_idle_cache_kept_s": [round(s, 4) for s in kept],
            "ratio": round(median(after) / median(warm), 3),
            "ratio_cache_kept": round(median(kept) / median(warm), 3),
            "ratio_release_vs_kept": round(median(after) / median(kept), 3),
            "releases": engine.model_info()["cache_releases"]}


def _http_sweep(engine: BenchAPI, options: Any, cohost_gib: float, prompt: Any,
                watch: ProcessWatch) -> dict[str, Any]:
    import httpx
    import uvicorn

    from .service.app import create_app
    from .service.server import loopback_socket

    shapes = [(w, h, b) for w, h in sweep_shapes(engine) for b in (1, 2, 3, 4)]
    grab_at = len(shapes) // 2
    app = create_app(engine.settings, engine, ui=False)
    sock = loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    cohost = CoHost() if cohost_gib > 0 else None
    rows: list[dict[str, Any]] = []
    cohost_error: list[str] = []
    saving = engine.settings.save_images
    engine.settings.save_images = False
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(base_url=url, timeout=600, headers={"Accept": "application/json"}) as client:
            for i, (w, h, b) in enumerate(shapes):
                body = {"prompt": prompt(900 + i), "width": w, "height": h, "batch": b, "seed": i,
                        "steps": options.sweep_steps}
                grabbing = cohost is not None and i == grab_at
                if grabbing:  # the co-host grabs its memory while this job runs
                    def grab() -> None:
                        time.sleep(0.05)
                        try:
                            cohost.grab(cohost_gib)
                        except Exception as exc:  # it could not get the memory: say so in the report
                            cohost_error.append(f"{type(exc).__name__}: {exc}")

                    grabber = threading.Thread(target=grab)
                    grabber.start()
                t0 = time.perf_counter()
                answer = client.post("/api/v1/generate", json=body)
                seconds = time.perf_counter() - t0
                if grabbing:
                    grabber.join()
                data = answer.json()
                row = {"width": w, "height": h, "batch": b, "status": answer.status_code, "seconds": round(seconds, 3),
                       "cohost_holding": cohost is not None and i >= grab_at, "cohost_grabbed_during": grabbing}
                if answer.status_code == 200:
                    row.update(notes=data["notes"], decode_s=round(data["timings"].get("decode_s", 0), 3),
                               peak_working_gib=gib(data["peak_working_bytes"]))
                else:
                    row.update(error=data.get("error"), message=data.get("message"))
                rows.append(row)
    finally:
        engine.settings.save_images = saving
        server.should_exit = True
        thread.join(30)
        if cohost is not None:
            cohost.close()
        if app.state.history is not None:
            app.state.history.close()

    def oom(row: dict[str, Any]) -> bool:
        return row["status"] == 507 or any("out of memory" in n for n in row.get("notes", []))

    misjudged = [r for r in rows if oom(r) and not r["cohost_grabbed_during"]]
    return {"rows": rows, "requests": len(rows), "ok": sum(r["status"] == 200 for r in rows),
            "refused": sum(r["status"] == 409 for r in rows), "ooms": sum(oom(r) for r in rows),
            "misjudged_ooms": len(misjudged), "failed_507": sum(r["status"] == 507 for r in rows),
            "peak_process_gib": gib(watch.peak), "cohost_error": cohost_error or None,
            "shapes": len(shapes) // 4, "grab_at": grab_at}


def _fallback(engine: BenchAPI, prompt: Any) -> dict[str, Any]:
    """Make the estimator under-predict one batch-4 decode so it really runs out of memory, and time the decode
    that recovers against the normal decode of the same four images."""
    from .bench import _timed_generate
    from .engine.jobs import EngineError
    from .memory.estimator import WorkShape

    # the largest square whose one-image decode fits now but whose four-image decode does not
    available = engine.available_working_bytes()
    low, high = engine.presets().limits.side
    side = low
    for candidate in range(high, low - 1, -256):
        one = engine.estimator.decode_need(WorkShape(candidate, candidate, 4), 1)
        if one < 0.8 * available and engine.estimator.decode_need(WorkShape(candidate, candidate, 4), 4) > available:
            side = candidate
            break
    shape = WorkShape(side, side, 4)
    raw = {"prompt": prompt(950), "width": side, "height": side, "batch": 4, "steps": 1, "seed": 950}
    # the normal decode: one image at a time is how a batch that does not fit decodes
    normal = []
    for i in range(4):
        try:
            _, result = _timed_generate(engine, {**raw, "batch": 1, "seed": 950 + i})
        except EngineError as exc:
            return {"skipped": f"{side}x{side} batch 1 does not run here: {exc}"}
        normal.append(result.timings["decode_s"])
    admission = engine.admit(engine.validate(raw).request)
    out: dict[str, Any] = {"shape": str(shape), "admission_before": admission.to_dict(),
                           "normal_decode_s_per_image": [round(s, 4) for s in normal]}
    est = engine.estimator
    saved_theta, saved_learned = est._theta.copy(), dict(est.learned)
    est._theta[1] /= 8  # a misjudgement: the per-image decode term an eighth of what it is
    est.learned.pop(shape, None)
    try:
        fooled = engine.admit(engine.validate(raw).request)
        out["admission_fooled"] = {"state": fooled.state, "decode_batch": fooled.decode_batch,
                                   "need_gib": gib(fooled.need_bytes), "available_gib": gib(fooled.available_bytes)}
        seconds, result = _timed_generate(engine, raw)
    except EngineError as exc:
        out["error"] = str(exc)
        return out
    finally:
        learned = dict(est.learned)
        est._theta = saved_theta
        est.learned = {**saved_learned, **learned}
        if engine.estimator_path is not None:  # what the fooled estimator saved must not outlive this test
            est.save(engine.estimator_path)
    notes = [str(n) for n in result.notes]
    out.update(notes=notes, decode_s=round(result.timings["decode_s"], 4), total_s=round(seconds, 3),
               normal_decode_s=round(sum(normal), 4), ran_out_of_memory=any("out of memory" in n for n in notes))
    out["ratio"] = round(result.timings["decode_s"] / sum(normal), 3) if out["ran_out_of_memory"] else None
    out["learned_gib"] = gib(est.learned.get(shape, (None,))[0])
    out["admission_after"] = engine.admit(engine.validate(raw).request).to_dict()
    return out
