"""One typed settings object, read by the CLI, the web UI and the REST API.

Precedence, highest first: command-line flags, environment variables ``ZIMAGE_UI_<FIELD>``, the TOML file named by
``--config`` / ``ZIMAGE_UI_CONFIG``, then the defaults below.

    >>> Settings().host
    '127.0.0.1'
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .units import GiB, gib_bytes

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("zimage_ui_config_file", default=None)


class Settings(BaseSettings):
    """Every knob of zimage-ui. Each field is also ``--flag-name`` on ``zimage-ui serve``/``generate``."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_UI_", extra="forbid", validate_default=True)

    # Model
    model: str = Field("auto", description="Model to load: auto, demo, a folder, an HF repo id (hf:Org/Name) "
                                           "or modelscope:Org/Name. auto = ZIMAGE_UI_MODEL_DIR, HF cache, "
                                           "ModelScope cache, else the embedded demo model.")
    model_dir: Path | None = Field(None, description="A local diffusers-layout folder that `auto` tries first.")
    base_model: str | None = Field(None, description="Optional base Z-Image (Tongyi-MAI/Z-Image) for the Standard "
                                                     "and Quality presets; shares the text encoder and VAE.")
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
    dtype: str = Field("auto", description="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32. "
                                           "float16 is refused: Z-Image gives black images in fp16.")
    presets_file: Path | None = Field(None, description="A presets TOML replacing zimage_ui/assets/presets.toml.")
    max_side: int = Field(2048, ge=256, le=4096, description="Largest width or height a request may ask for.")
    warmup: bool = Field(True, description="Run one generation before declaring ready, so the first user "
                                           "request is as fast as the rest.")

    # Speed (zimage_ui/engine/acceleration.py, docs/benchmarks.md)
    compile: bool = Field(True, description="On CUDA, compile the transformer's repeated blocks with torch.compile "
                                            "during warm-up (the first start takes about a minute longer; kernels "
                                            "are cached under cache_dir and re-used by a restart). Only with the "
                                            "resident and text-encoder-offload placements.")
    compile_vae: bool = Field(True, description="Also compile the VAE decoder (with compile on), with static "
                                                "shapes for one image at each preset's size (other sizes and "
                                                "batches decode eagerly): 35 instead of 87 ms at 1024² on an H200, "
                                                "compiled during warm-up (docs/benchmarks.md).")
    attention: str = Field("auto", description="Attention backend: auto (time every backend this GPU and torch "
                                               "can run at start-up and use the fastest, with a mask-capable one "
                                               "for CFG), or a diffusers backend name: native, _native_cudnn, "
                                               "_native_flash, _native_efficient, flash, _flash_3, ...")
    fp8: bool = Field(False, description="fp8 mode: the transformer's linear layers run in float8 (torchao) on "
                                         "GPUs of compute capability >= 8.9 (Ada, Hopper); refused with the "
                                         "reason elsewhere. Faster; images differ slightly from bf16.")
    placement: str = Field("auto", description="Where the weights live: auto (the planner's choice for the VRAM "
                                               "budget), resident, text-encoder-offload, fp8-storage, "
                                               "model-offload or sequential-offload.")
    prompt_cache_size: int = Field(16, ge=0, le=10_000, description="Prompt embeddings kept (LRU): the same "
                                                                    "prompt with a new seed skips the text "
                                                                    "encoder (0 = off).")
    idle_unload_minutes: float = Field(0.0, ge=0, description="Release the GPU after this many idle minutes "
                                                              "(weights move to CPU RAM) and reload on the next "
                                                              "request (0 = never).")
    cache_dir: Path | None = Field(None, description="Where zimage-ui keeps what it learns about this machine: "
                                                     "compiled kernels and the memory estimator's calibration "
                                                     "(default: ~/.cache/zimage-ui).")

    # Queue
    max_queue: int = Field(16, ge=1, le=1000, description="Jobs that may wait behind the running one; more get "
                                                          "'queue full' (HTTP 503 with Retry-After).")
    jobs_per_client: int = Field(1, ge=1, le=100, description="Jobs one browser session or API client may have "
                                                              "waiting or running at once.")

    # Memory
    vram_budget_gb: float | None = Field(None, gt=0, description="Cap this whole process's GPU memory at this "
                                                                 "many GiB as nvidia-smi counts it (CUDA context "
                                                                 "included), e.g. to share the card with an LLM "
                                                                 "server. GiB = 2^30 bytes (nvidia-smi's MiB / 1024).")
    keep_cache: bool = Field(False, description="Keep PyTorch's allocator cache between jobs (a private card): "
                                                "by default the cache goes back to the driver as soon as the queue "
                                                "is empty, so an idle server holds only weights + CUDA context.")
    memory_margin_gb: float = Field(0.7, ge=0, description="Headroom kept free beyond a request's predicted need; "
                                                           "the VRAM bar turns 'tight' inside it.")
    vram_poll_seconds: float = Field(1.0, gt=0.05, le=60, description="How often the VRAM bar refreshes.")

    # Output
    output_dir: Path = Field(Path("outputs"), description="Where generated images (and the history) are written.")
    save_images: bool = Field(True, description="Save every finished image with its metadata under output_dir.")

    # Service
    host: str = Field("127.0.0.1", description="Address to bind. Use 0.0.0.0 to serve a LAN (set auth too).")
    port: int = Field(7860, ge=1, le=65535, description="TCP port of the web UI and REST API.")
    auth: str | None = Field(None, description="user:password protecting the UI and API.")
    auth_file: Path | None = Field(None, description="A file of users, one user:password a line (# comments), "
                                                     "protecting the UI and API; combines with --auth.")
    open_health: bool = Field(True, description="Leave /healthz, /readyz and /metrics open without auth, for "
                                                "supervisor and Prometheus checks.")
    cors_origins: str = Field("", description="Comma-separated browser origins (https://host:port) allowed to "
                                              "call the API from other pages; empty = same origin only.")
    rate_limit_per_minute: int = Field(0, ge=0, le=100_000, description="Generations one client (address, "
                                                                        "plus login) may start per minute, web "
                                                                        "UI and API together (0 = no limit). "
                                                                        "When set, jobs_per_client counts a "
                                                                        "client's tabs and API calls together.")
    allowed_hosts: str = Field("", description="Comma-separated host names (or addresses) the server answers to, "
                                               "besides localhost, 127.0.0.1 and [::1]. Bound to loopback, every "
                                               "other Host header is refused (a DNS-rebinding guard); bound to a LAN "
                                               "address, the check is on once this is set. '*' = any host.")
    login_failures_per_minute: int = Field(10, ge=0, le=10_000, description="Wrong passwords one client address "
                                                                            "may try per minute before its logins "
                                                                            "are refused for a while (429 with "
                                                                            "Retry-After; 0 = no throttle).")
    max_connections: int = Field(200, ge=8, le=100_000, description="Open connections (and requests in flight) "
                                                                   "served at once; requests beyond get 503.")
    header_timeout_seconds: float = Field(10.0, gt=0, le=600, description="A connection must send a request's "
                                                                         "headers within this long (after "
                                                                         "connecting, or after its previous "
                                                                         "answer), else it is closed.")
    watchdog_seconds: float = Field(600.0, ge=0, description="A running job that makes no progress for this "
                                                             "long marks the server unhealthy and exits it so "
                                                             "a supervisor restarts it (0 = off).")
    grace_seconds: float = Field(30.0, ge=0, le=3600, description="On SIGTERM, how long the running job may "
                                                                  "take to finish before it is cancelled.")
    history_db: Path | None = Field(None, description="SQLite file of the generation history "
                                                      "(default: output_dir/history.sqlite3).")
    kiosk: bool = Field(False, description="Kiosk mode: locked presets, advanced controls hidden, no history.")
    language: Literal["auto", "en", "zh"] = Field("auto", description="UI language; auto follows the browser.")
    ui_gallery_max: int = Field(24, ge=1, le=500, description="Images one browser session's gallery keeps "
                                                              "(newest first).")
    kiosk_idle_seconds: float = Field(120.0, ge=10, description="Kiosk mode: clear the gallery and prompt after "
                                                                "this long without activity.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")
    # scale-out on Ray Serve (zimage_ui/scale, docs/deployment.md): both need the `ray` extra
    replicas: int = Field(0, ge=0, le=256, description="Serve through N engine replicas on a local Ray instance: "
                                                       "one per GPU (at most N), or N on the CPUs without a GPU "
                                                       "(0 = one engine in this process).")
    ray_address: str | None = Field(None, description="Serve through the replicas of a Ray cluster (`auto` or "
                                                      "HOST:PORT), deployed with deploy/ray-serve.yaml.")
    ray_app: str = Field("zimage", description="The Ray Serve application's name (with --ray-address).")

    @field_validator("dtype")
    @classmethod
    def _no_fp16(cls, value: str) -> str:
        if value.lower() in ("float16", "fp16", "half"):
            raise ValueError("float16 gives black/NaN images with Z-Image; use bfloat16 (CUDA) or float32 (CPU)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def memory_margin_bytes(self) -> int:
        return int(self.memory_margin_gb * GiB)

    @property
    def vram_budget_bytes(self) -> int | None:
        """``vram_budget_gb`` in bytes; None: no budget (0 is refused by the setting's ``gt=0``)."""
        return gib_bytes(self.vram_budget_gb)


class SettingsError(ValueError):
    """Settings that can't be used; the message is one line naming the setting."""


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (``overrides``; ``None`` values mean 'not given'), environment and a TOML file."""
    from pydantic import ValidationError

    path = config_file or os.environ.get("ZIMAGE_UI_CONFIG")
    if path is not None and not Path(path).is_file():
        raise SettingsError(f"config: file not found: {path}")
    token = _CONFIG_FILE.set(Path(path) if path else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise SettingsError(f"{where}: {first['msg']}") from None
    finally:
        _CONFIG_FILE.reset(token)
