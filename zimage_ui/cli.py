"""The ``zimage-ui`` command: serve, generate, doctor, download (and bench).

Arguments are parsed in ``main()`` only; importing this module does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from . import __version__

log = logging.getLogger("zimage_ui")

# Settings that are flags on serve/generate/doctor/bench (each field is --field-name).
_SETTING_FLAGS = ("model", "model_dir", "base_model", "device", "dtype", "presets_file", "max_side", "warmup",
                  "max_queue", "jobs_per_client", "vram_budget_gb", "memory_margin_gb", "vram_poll_seconds",
                  "output_dir", "save_images", "host", "port", "auth", "kiosk", "language", "log_level",
                  "auth_file", "open_health", "cors_origins", "rate_limit_per_minute", "watchdog_seconds",
                  "grace_seconds", "history_db", "ui_gallery_max", "kiosk_idle_seconds",
                  "compile", "compile_vae", "attention", "fp8", "placement", "prompt_cache_size",
                  "idle_unload_minutes", "cache_dir", "keep_cache")

# Flags that only mean something to a running server (or that generate sets itself: no warm-up for one run, and
# images are saved where --output says).
_SERVE_ONLY = ("host", "port", "auth", "kiosk", "language", "auth_file", "open_health", "cors_origins",
               "rate_limit_per_minute", "watchdog_seconds", "grace_seconds", "history_db",
               "ui_gallery_max", "kiosk_idle_seconds", "max_queue", "jobs_per_client", "vram_poll_seconds",
               "idle_unload_minutes", "warmup", "save_images")

# What a flag's value is, where the last word of its name does not say it (--max-queue N, not QUEUE).
_METAVARS = {"max_queue": "N", "jobs_per_client": "N", "rate_limit_per_minute": "N", "ui_gallery_max": "N",
             "prompt_cache_size": "N", "max_side": "PIXELS", "auth": "USER:PASSWORD", "history_db": "FILE",
             "port": "PORT", "cors_origins": "ORIGINS", "login_failures_per_minute": "N", "max_connections": "N",
             "allowed_hosts": "HOSTS", "header_timeout_seconds": "SECONDS", "vram_budget_gb": "GIB",
             "replicas": "N", "ray_address": "ADDRESS", "ray_app": "NAME"}

# The server's door limits (docs/deployment.md, "Security defaults"): serve-only flags too.
_DOOR_FLAGS = ("allowed_hosts", "login_failures_per_minute", "max_connections", "header_timeout_seconds")
_SETTING_FLAGS += _DOOR_FLAGS
_SERVE_ONLY += _DOOR_FLAGS
# Scale-out on Ray Serve (zimage_ui/scale): serve only.
_SCALE_FLAGS = ("replicas", "ray_address", "ray_app")
_SETTING_FLAGS += _SCALE_FLAGS
_SERVE_ONLY += _SCALE_FLAGS


class CliError(Exception):
    """A one-line error for the user; main() prints it and exits 2."""


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    from .settings import Settings

    group = parser.add_argument_group("settings (also ZIMAGE_UI_<NAME> or --config FILE)")
    group.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as below, with underscores)")
    for name in names:
        field = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" [default: {field.default}]"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = _METAVARS.get(name, name.split("_")[-1].upper())
            group.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_text)


def _settings(args: argparse.Namespace, names: Sequence[str], **forced: typing.Any):
    from .settings import load_settings

    values = {n: getattr(args, n, None) for n in names}
    values.update(forced)
    return load_settings(getattr(args, "config", None), **values)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # third-party chatter (tqdm bars, deprecation notes) is not for our users
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


# --- generate -------------------------------------------------------------------------------------------------
def _output_paths(output: Path, seeds: list[int]) -> list[Path]:
    if output.is_dir() or str(output).endswith(("/", "\\")):
        return [output / f"zimage-{seed}.png" for seed in seeds]
    if output.suffix.lower() != ".png":
        raise CliError(f"output: images are PNG files, got {output.name!r}; name a .png file or a folder")
    return [output] + [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, len(seeds))]


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.api import EngineAPI
    from .engine.engine import Engine
    from .engine.jobs import EngineError
    from .metadata import save_png
    from .validation import GenerationRequest, RequestError

    settings = _settings(args, _SETTING_FLAGS, warmup=False, save_images=args.output is None)
    _setup_logging("warning" if settings.log_level == "info" else settings.log_level)
    raw = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, preset=args.preset,
                            steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                            seed=args.seed, batch=args.batch)
    engine: EngineAPI = Engine(settings)
    try:
        from .validation import validate

        validate(raw, engine.presets())  # bad input fails before the model loads
        engine.start()
        if banner := engine.model_info().get("banner"):
            print(banner, file=sys.stderr)
        validated = engine.validate(raw)
        for change in validated.changes:
            if not change.is_seed_draw:  # a drawn seed is printed with the result, it was not clamped
                print(f"clamped: {change}", file=sys.stderr)
        job = engine.submit(validated)
        if sys.stderr.isatty():
            job.on_change(lambda j: print(f"\rstep {j.step}/{j.total_steps}", end="", file=sys.stderr, flush=True))
        result = job.wait()
        if sys.stderr.isatty():
            print(file=sys.stderr)
    except RequestError as exc:
        raise CliError(str(exc)) from None
    except EngineError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.shutdown(grace_s=0)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output is None:
        paths = [Path(p) for p in result.paths]
    else:
        paths = [save_png(image, path, result.request, seed=seed, model=result.model_id,
                          extra={"timings": result.timings})
                 for image, seed, path in zip(result.images, result.seeds, _output_paths(Path(args.output),
                                                                                          result.seeds), strict=True)]
    for path in paths:
        print(Path(path).resolve())
    print(f"{result.model_label} · seed {result.request.seed} · {result.request.width}x{result.request.height} · "
          f"{result.request.steps} steps · {result.timings['total_s']:.2f} s", file=sys.stderr)
    return 0


# --- doctor ---------------------------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report

    settings = _settings(args, _SETTING_FLAGS)
    info = report(settings)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for section, rows in info.items():
            print(f"{section}:")
            for key, value in rows.items():
                print(f"  {key}: {value}")
    return 0


# --- download -------------------------------------------------------------------------------------------------
def cmd_download(args: argparse.Namespace) -> int:
    from .models.download import DownloadError, download_model

    try:
        path = download_model(args.source, args.repo, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except DownloadError as exc:
        raise CliError(str(exc)) from None
    print(path)
    return 0


# --- train-demo -----------------------------------------------------------------------------------------------
def cmd_train_demo(args: argparse.Namespace) -> int:
    from .models.demo_train import config_from_args, train

    _setup_logging("warning")
    log = train(config_from_args(args))
    print(Path(args.out) / "demo.safetensors", f"({log['wall_seconds']:.0f} s)")
    return 0


# --- bench ----------------------------------------------------------------------------------------------------
_BENCH_SETTINGS = ("model", "model_dir", "device", "dtype", "presets_file", "max_side", "warmup", "compile",
                   "compile_vae", "attention", "fp8", "placement", "vram_budget_gb", "memory_margin_gb",
                   "prompt_cache_size", "cache_dir", "output_dir", "save_images", "log_level", "keep_cache")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, default_output_dir, run_bench, summary_lines, to_json

    forced = {}
    if args.synthetic and args.model is None:
        forced["model"] = "demo"  # not used: the synthetic loader replaces resolution
    if args.output_dir is None:
        forced["output_dir"] = str(default_output_dir())
    settings = _settings(args, _BENCH_SETTINGS, **forced)
    if args.synthetic and args.synthetic_scale == "full" and not args.save_synthetic:
        import torch

        if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
            raise CliError("bench --synthetic builds the full-size model (about 20 GB of random weights in float32 "
                           "on a CPU, and minutes an image): it needs a CUDA GPU; on this machine use "
                           "--synthetic-scale demo (the same code at the demo model's sizes)")
    _setup_logging(settings.log_level)  # a benchmark wants the plan and start-up lines
    options = BenchOptions(
        synthetic=args.synthetic, synthetic_scale=args.synthetic_scale, preset=args.preset, width=args.width,
        height=args.height, batch=args.batch,
        runs=args.runs, steps=args.steps, sweep=args.sweep, sweep_steps=args.sweep_steps, soak=args.soak,
        idle_test=args.idle_test, components=args.components, http=args.http, concurrency=args.concurrency,
        quick=args.quick, latents=Path(args.latents) if args.latents else None,
        baseline=Path(args.baseline) if args.baseline else None,
        save_synthetic=Path(args.save_synthetic) if args.save_synthetic else None,
        extra_sizes=[_size(s) for s in args.size or []], out=Path(args.out) if args.out else None,
    )
    if args.sweep_sides:
        options.sides = tuple(int(v) for v in args.sweep_sides.split(","))
    if args.sweep_batches:
        options.batches = tuple(int(v) for v in args.sweep_batches.split(","))
    if args.cohost is not None:
        from .bench_memory import run_cohost

        report = run_cohost(settings, options, args.cohost)
        text = to_json(report)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        return 0
    report = run_bench(settings, options)
    text = to_json(report)
    if args.out:
        Path(args.out).write_text(text + "\n")  # save-synthetic writes no checkpoints
    if args.json:
        print(text)
    for line in summary_lines(report):
        print(line, file=sys.stderr if args.json else sys.stdout)
    return 0


# --- serve ----------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .service.startup import CannotBind, EarlyResponder, bind_socket, stop_on_signals

    settings = _settings(args, _SETTING_FLAGS)
    # bind before the heavy imports: a port in use is one line at once, and /healthz answers within a second
    try:
        sock = bind_socket(settings.host, settings.port)
    except CannotBind as exc:
        from .service.startup import EXIT_CANNOT_BIND

        print(f"zimage-ui: error: {exc.strerror}", file=sys.stderr)
        return EXIT_CANNOT_BIND
    early = EarlyResponder(sock).start()
    stop_on_signals()  # serve() puts Python's defaults back before uvicorn installs its own
    _setup_logging(settings.log_level)
    from .service.server import serve

    return serve(settings, sock=sock, early=early)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-ui", description="Make images with Z-Image-Turbo: web UI, REST "
                                     "API and command line over one preloaded pipeline and one GPU queue.")
    parser.add_argument("--version", action="version", version=f"zimage-ui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the web UI and REST API (embedded demo model when no weights)")
    _add_setting_flags(serve, _SETTING_FLAGS)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="make image(s) from a prompt and save them as PNG")
    gen.add_argument("--prompt", required=True, help="what to draw")
    gen.add_argument("--negative-prompt", help="what to avoid (needs guidance > 0)")
    gen.add_argument("--preset", help="turbo (default), standard or quality")
    gen.add_argument("--steps", help="transformer passes (Turbo: 8)")
    gen.add_argument("--guidance", help="CFG scale (Turbo: 0)")
    gen.add_argument("--width", help="pixels, multiple of 16")
    gen.add_argument("--height", help="pixels, multiple of 16")
    gen.add_argument("--seed", help="0–4294967295; omitted or -1 = random (printed)")
    gen.add_argument("--batch", help="images per run, 1–4 (seeds seed, seed+1, …)")
    gen.add_argument("--output", "-o", help="PNG file or folder (default: output_dir/<date>/…)")
    _add_setting_flags(gen, [n for n in _SETTING_FLAGS if n not in _SERVE_ONLY])
    gen.set_defaults(func=cmd_generate)

    doc = sub.add_parser("doctor", help="GPU, driver, memory, versions, where the model is, what to do next")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    _add_setting_flags(doc, ["model", "model_dir", "device", "dtype", "vram_budget_gb", "memory_margin_gb",
                             "placement", "fp8", "cache_dir"])
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="measure cold start, latency, memory and the estimator on this machine")
    bench.add_argument("--synthetic", action="store_true",
                       help="full-size Z-Image-Turbo architecture with random weights (no download needed)")
    bench.add_argument("--synthetic-scale", choices=["full", "demo"], default="full",
                       help="full: the released architecture; demo: the demo model's sizes (a CPU smoke test)")
    bench.add_argument("--preset", help="preset to time (default: the default preset)")
    bench.add_argument("--width", type=int, help="pixels (default: the preset's)")
    bench.add_argument("--height", type=int, help="pixels (default: the preset's)")
    bench.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    bench.add_argument("--steps", type=int, help="transformer passes (default: the preset's)")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    bench.add_argument("--size", action="append", metavar="WxH", help="also time this size (repeatable)")
    bench.add_argument("--sweep", action="store_true", help="estimator sweep: sides x batches through admission")
    bench.add_argument("--sweep-sides", help="comma-separated sides (default 512,768,1024,1536,2048)")
    bench.add_argument("--sweep-batches", help="comma-separated batches (default 1,2,3,4)")
    bench.add_argument("--sweep-steps", type=int, default=1,
                       help="passes per sweep/soak run (peak memory does not depend on it; default 1)")
    bench.add_argument("--soak", type=int, default=0, metavar="N", help="N generations at mixed sizes: VRAM growth")
    bench.add_argument("--idle-test", action="store_true", help="unload as when idle, then time the reload")
    bench.add_argument("--quick", action="store_true", help="skip the direct pipeline call and VRAM-bar sampling")
    bench.add_argument("--http", action="store_true",
                       help="also time POST /api/v1/generate on the REST service (loopback), PNG answer included")
    bench.add_argument("--concurrency", type=int, default=0, metavar="N",
                       help="with --http: N clients at once, images per second against one client's")
    bench.add_argument("--components", action="store_true",
                       help="time prompt encode, VAE decode (eager / compiled / channels-last) and PIL conversion")
    bench.add_argument("--latents", metavar="FILE",
                       help="final latents and images for seeds 0-7: saved to FILE if absent, else compared "
                            "(cosine, PSNR)")
    bench.add_argument("--baseline", metavar="FILE", help="vanilla_diffusers.py output (JSON lines) for the ratio")
    bench.add_argument("--save-synthetic", metavar="DIR", help="write the synthetic model as a diffusers folder")
    bench.add_argument("--cohost", type=float, metavar="GIB",
                       help="memory truth on a shared GPU: another process grabs GIB GiB mid-sweep; the sweep runs "
                            "over HTTP under --vram-budget-gb, read per process as nvidia-smi does (needs CUDA)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON (summary to stderr)")
    bench.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    _add_setting_flags(bench, _BENCH_SETTINGS)
    bench.set_defaults(func=cmd_bench)

    dl = sub.add_parser("download", help="download the weights (the only command that uses the network)")
    dl.add_argument("--source", choices=["hf", "modelscope"], default="hf", help="Hugging Face or ModelScope")
    dl.add_argument("--repo", default="Tongyi-MAI/Z-Image-Turbo",
                    help="Tongyi-MAI/Z-Image-Turbo (default) or Tongyi-MAI/Z-Image (base)")
    dl.add_argument("--cache-dir", help="where to put it (default: the source's own cache)")
    dl.set_defaults(func=cmd_download)

    from .models.demo_train import add_arguments as add_train_arguments

    train = sub.add_parser("train-demo", help="train the embedded demo model on the shapes world (one GPU, minutes)")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zimage-ui`` console script."""
    from .memory.allocator import configure
    from .settings import SettingsError

    configure()  # expandable segments unless the user set the allocator up: before anything initialises CUDA
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (CliError, SettingsError) as exc:
        print(f"zimage-ui: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # model folder errors and the like: one line, no traceback
        import torch

        from .models.sources import ModelNotFoundError

        if isinstance(exc, ModelNotFoundError | ValueError | OSError | torch.OutOfMemoryError):
            print(f"zimage-ui: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
