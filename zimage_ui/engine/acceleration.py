"""Speed for the resident transformer: the fastest attention backend this GPU runs, regional compilation with an
on-disk cache, an opt-in fp8 mode, and VAE decode options.

Nothing here runs at import; the engine calls these while it starts (after placement, before warm-up).

Attention
    :func:`probe_attention` times every attention backend that diffusers offers and this machine can run (native
    SDPA, cuDNN, PyTorch's flash and memory-efficient kernels, the ``flash-attn`` packages' FA2/FA3 when installed;
    hub kernels need the network and are never tried) on the transformer's own shapes, checks each output against
    native SDPA, and picks the fastest (:func:`cached_probe` keeps the answer in the cache folder for the next
    start). Masks are probed separately: classifier-free guidance and batched prompts of
    different lengths give the transformer a padding mask, and ``flash``/``_flash_3``/``_native_flash``/``sage``
    raise on one. :class:`RoutedAttnProcessor` therefore carries two backends and uses the mask-capable one only
    for calls that have a mask, so the fastest kernel serves the common Turbo case and CFG still works.

Compilation
    ``transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)``: the 34 ``ZImageTransformerBlock``\\ s
    compile to a few graphs, with symbolic sequence length and batch, so a new prompt length or image size does not
    recompile. :func:`configure_compile_cache` points Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``: the FX-graph
    and AOT-autograd caches and the Triton kernels) at a persistent folder, so a restart re-uses the compiled
    kernels instead of rebuilding them (Dynamo still re-traces; that part is seconds).

fp8
    :func:`fp8_support` says whether this GPU can (compute capability ≥ 8.9 and torchao installed) or why not;
    :func:`quantize_fp8` swaps the blocks' large linear layers for torchao float8 (dynamic per-row activation
    scales, per-row weight scales) — weights stored in fp8 and matrix products on the fp8 units.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..memory.planner import FP8_MIN_CAPABILITY, fp8_capable

log = logging.getLogger(__name__)

# Every diffusers backend worth trying for Z-Image, in order of preference on a tie. Hub kernels (*_hub) download
# code at run time and are never tried; xformers and sage are tried when their packages are installed.
ATTENTION_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_flash_3", "flash",
                        "_flash_varlen_3", "flash_varlen", "sage", "xformers")
# Backends known to raise on an attention mask (the reference's note); the probe checks the rest itself.
MASKLESS_BACKENDS = frozenset({"_native_flash", "flash", "_flash_3", "sage"})
DEFAULT_BACKEND = "native"


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionChoice:
    """The backends in use: ``backend`` for calls without a mask, ``masked_backend`` for calls with one."""

    backend: str = DEFAULT_BACKEND
    masked_backend: str = DEFAULT_BACKEND
    probed: bool = False
    shape: tuple[int, ...] | None = None  # (batch, tokens, heads, head_dim) the probe timed
    timings_ms: dict[str, float] = field(default_factory=dict)  # no mask, median ms per call
    masked_timings_ms: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # backend → why it was not used
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = self.backend if self.backend == self.masked_backend else f"{self.backend} (masks: {self.masked_backend})"
        if self.probed and self.timings_ms:
            text += f" — {self.timings_ms.get(self.backend, float('nan')):.2f} ms per call"
        return text


def _backend_enum(name: str) -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(name)


def backend_available(name: str) -> str | None:
    """``None`` if diffusers can run backend ``name`` here (its package installed), else the reason it can't."""
    try:
        from diffusers.models.attention_dispatch import _check_attention_backend_requirements

        backend = _backend_enum(name)
        if name.endswith("_hub"):
            return "hub kernels need the network"
        _check_attention_backend_requirements(backend)
    except Exception as exc:  # ValueError for unknown names, RuntimeError/ImportError for missing packages
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    return None


def _time_call(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` timed calls after two warm-up calls (CUDA events)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def attention_shape(transformer: Any, width: int = 1024, height: int = 1024, caption_tokens: int = 96,
                    batch: int = 1) -> tuple[int, int, int, int]:
    """(batch, tokens, heads, head_dim) of the transformer's attention at ``width×height``."""
    cfg = transformer.config
    heads = int(cfg.n_heads)
    head_dim = int(cfg.dim) // heads
    patch = int(cfg.all_patch_size[0]) * 8  # VAE 8x, then the patch
    tokens = (width // patch) * (height // patch) + caption_tokens
    tokens += (-tokens) % 32
    return batch, tokens, heads, head_dim


@torch.no_grad()
def probe_attention(device: torch.device, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.bfloat16, *,
                    candidates: Iterable[str] = ATTENTION_CANDIDATES, repeats: int = 10,
                    tolerance: float = 0.05) -> AttentionChoice:
    """Time each runnable backend at ``shape`` = (batch, tokens, heads, head_dim), without and with a padding mask.

    A backend counts only if its output matches native SDPA's within ``tolerance`` (relative to the output's
    largest magnitude). The fastest without a mask becomes ``backend``; the fastest with a mask ``masked_backend``.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    choice = AttentionChoice(probed=True, shape=tuple(shape))
    batch, tokens, heads, head_dim = shape
    gen = torch.Generator(device.type).manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    # A mask like CFG's: two sequences, the second shorter by a caption's padding.
    mq, mk, mv = (torch.randn(2, tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
                  for _ in range(3))
    mask = torch.ones(2, tokens, dtype=torch.bool, device=device)
    mask[1, tokens - 64:] = False
    mask4 = mask[:, None, None, :]

    def run(name: str, masked: bool):
        backend = _backend_enum(name)
        if masked:
            return dispatch_attention_fn(mq, mk, mv, attn_mask=mask4, backend=backend)
        return dispatch_attention_fn(q, k, v, attn_mask=None, backend=backend)

    reference = {m: run("native", m).float() for m in (False, True)}
    for name in candidates:
        why = backend_available(name)
        if why is not None:
            choice.unavailable[name] = why
            continue
        for masked in (False, True):
            if masked and name in MASKLESS_BACKENDS:
                choice.unavailable.setdefault(name + "+mask", "raises on attention masks")
                continue
            try:
                out = run(name, masked).float()
                ref = reference[masked]
                rows = slice(None) if not masked else (0,)  # padded rows of sequence 1 are undefined
                err = float((out[rows] - ref[rows]).abs().max() / ref[rows].abs().max().clamp_min(1e-6))
                if not err <= tolerance:
                    raise ValueError(f"output differs from native SDPA by {err:.3f}")
                ms = _time_call(lambda n=name, m=masked: run(n, m), repeats, device)
            except Exception as exc:
                key = name + ("+mask" if masked else "")
                choice.unavailable[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                continue
            (choice.masked_timings_ms if masked else choice.timings_ms)[name] = round(ms, 4)
    if choice.timings_ms:
        choice.backend = min(choice.timings_ms, key=choice.timings_ms.__getitem__)
    if choice.masked_timings_ms:
        choice.masked_backend = min(choice.masked_timings_ms, key=choice.masked_timings_ms.__getitem__)
    choice.reason = "fastest measured at " + "x".join(map(str, shape))
    return choice


PROBE_CACHE_FILE = "attention-probe.json"


def _probe_key(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype,
               candidates: Iterable[str]) -> tuple[str, dict[str, Any]]:
    """What a probe's answer depends on (the GPU, the library versions, the shape, the runnable backends) and its
    digest."""
    import hashlib
    import json

    import diffusers

    facts: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "diffusers": diffusers.__version__, "shape": list(shape), "dtype": str(dtype),
                             "runnable": sorted(n for n in candidates if backend_available(n) is None)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = list(torch.cuda.get_device_capability(device))
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]
    return digest, facts


def cached_probe(device: torch.device, shape: tuple[int, int, int, int], dtype: torch.dtype, cache_dir: Path, *,
                 candidates: Iterable[str] = ATTENTION_CANDIDATES, **probe_kwargs: Any) -> AttentionChoice:
    """:func:`probe_attention`, its answer kept in ``cache_dir/attention-probe.json`` under a key of everything it
    depends on (:func:`_probe_key`): a restart on the same GPU and libraries skips the probe (about 1 s on an H200);
    a new GPU, driver stack, diffusers or an installed backend probes again. Delete the file to force a probe."""
    import json

    candidates = tuple(candidates)
    path = Path(cache_dir) / PROBE_CACHE_FILE
    key, facts = _probe_key(device, shape, dtype, candidates)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    saved = entries.get(key)
    if isinstance(saved, dict) and isinstance(saved.get("choice"), dict):
        try:
            choice = AttentionChoice(**saved["choice"])
            choice.shape = tuple(choice.shape) if choice.shape is not None else None
            choice.reason += f" (saved probe, {path.name})"
            return choice
        except TypeError:  # written by another version of this class: probe again
            pass
    choice = probe_attention(device, shape, dtype, candidates=candidates, **probe_kwargs)
    entries[key] = {"for": facts, "choice": choice.to_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder costs the next start a probe, nothing more
        log.warning("could not save the attention probe to %s: %s", path, exc)
    return choice


def choose_attention(setting: str, device: torch.device, transformer: Any, *, width: int = 1024,
                     height: int = 1024, cache_dir: Path | None = None) -> AttentionChoice:
    """The ``attention`` setting → an :class:`AttentionChoice`: ``auto`` probes on CUDA (``native`` on CPU), a
    backend name is used as given (with ``native`` for masks when it can't take one). With ``cache_dir`` the
    probe's answer is kept there and re-used (:func:`cached_probe`)."""
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        if device.type != "cuda":
            return AttentionChoice(reason="CPU: native SDPA (nothing to probe)")
        try:
            shape = attention_shape(transformer, width, height)
            dtype = next(transformer.parameters()).dtype
            if cache_dir is not None:
                return cached_probe(device, shape, dtype, cache_dir)
            return probe_attention(device, shape, dtype=dtype)
        except Exception as exc:  # never fail a start over a probe
            log.warning("attention probe failed, using native SDPA: %s", exc)
            return AttentionChoice(reason=f"probe failed ({type(exc).__name__}); native SDPA")
    why = backend_available(setting)
    if why is not None:
        raise ValueError(f"attention: backend {setting!r} can't run here: {why}")
    masked = DEFAULT_BACKEND if setting in MASKLESS_BACKENDS else setting
    return AttentionChoice(backend=setting, masked_backend=masked, reason="set by the attention setting")


class RoutedAttnProcessor:
    """Z-Image's single-stream attention (diffusers' ``ZSingleStreamAttnProcessor``) with two backends: ``backend``
    for calls without a mask, ``masked_backend`` for calls with one; with ``real_rope`` (under compile) RoPE in
    real instead of complex arithmetic.

    Dynamo guards on whether the mask is ``None``, so under ``torch.compile`` each case gets its own graph.
    """

    _parallel_config = None

    def __init__(self, backend: str = DEFAULT_BACKEND, masked_backend: str = DEFAULT_BACKEND, *,
                 real_rope: bool = False):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        self._dispatch = dispatch_attention_fn
        self._attention_backend = _backend_enum(backend)
        self._masked_backend = _backend_enum(masked_backend)
        self.real_rope = real_rope

    def _rope(self, x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        with torch.amp.autocast("cuda", enabled=False):
            if not self.real_rope:  # upstream's complex product: fewest kernels when running eagerly
                x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
                return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x_in)
            # Inductor can't generate code for complex arithmetic (it would run the product eagerly, extra passes
            # over q and k); the same fp32 product in real arithmetic fuses with the norm and the cast.
            x = x_in.float().reshape(*x_in.shape[:-1], -1, 2)
            f = torch.view_as_real(freqs_cis).unsqueeze(2)
            cos, sin = f[..., 0], f[..., 1]
            x0, x1 = x[..., 0], x[..., 1]
            out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3)
            return out.type_as(x_in)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = self._rope(query, freqs_cis)
            key = self._rope(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        backend = self._attention_backend if attention_mask is None else self._masked_backend
        hidden_states = self._dispatch(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                       backend=backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


def install_attention(transformer: Any, choice: AttentionChoice, *, real_rope: bool = False) -> int:
    """Give every Z-Image attention module a :class:`RoutedAttnProcessor` for ``choice``; returns how many."""
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None or type(processor).__name__ not in ("ZSingleStreamAttnProcessor", "RoutedAttnProcessor"):
            continue
        module.set_processor(RoutedAttnProcessor(choice.backend, choice.masked_backend, real_rope=real_rope))
        count += 1
    return count


# --------------------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/zimage-ui`` (``~/.cache/zimage-ui``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage-ui"


def configure_compile_cache(cache_dir: Path) -> dict[str, Any]:
    """Point Inductor's on-disk caches at ``cache_dir/inductor`` (unless ``TORCHINDUCTOR_CACHE_DIR`` is already
    set) and make sure the FX-graph and AOT-autograd caches are on. Returns what was configured."""
    folder = Path(cache_dir) / "inductor"
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return {"inductor_cache_dir": str(path), "cached_files_before": _count_files(path)}


def _count_files(path: Path) -> int:
    try:
        return sum(1 for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def compile_transformer(transformer: Any, *, dynamic: bool = True) -> None:
    """Regional compilation of the repeated blocks (lazy: the work happens on the first call, i.e. warm-up)."""
    import torch._dynamo.config as dynamo_config

    # each new (batch 1 / batch ≥ 2 / masked) case is one more graph per block class; leave room for them
    try:
        dynamo_config.recompile_limit = max(int(getattr(dynamo_config, "recompile_limit", 8)), 32)
    except AttributeError:  # older torch: cache_size_limit
        dynamo_config.cache_size_limit = max(int(getattr(dynamo_config, "cache_size_limit", 8)), 32)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic)


class ShapeGate:
    """A compiled module's call that runs the compiled graph only for the input shapes in ``shapes`` and the module
    eagerly for every other shape: a static-shape compile that never compiles in the middle of a user's request.
    If the compiled call fails (not for lack of memory: the decode's own fallback handles that), it logs why and
    runs eagerly from then on: a failed compile costs its speed-up, never the request.

    Installed as the module's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets), so :func:`uncompile`
    removes it like any other compile."""

    def __init__(self, module: torch.nn.Module, shapes: Iterable[tuple[int, ...]], *, compiled: Any = None):
        self.eager = module._call_impl
        self.compiled = compiled if compiled is not None else torch.compile(module._call_impl, dynamic=False)
        self.shapes = {tuple(s) for s in shapes}
        self.failed = ""  # why the compiled call failed, once it has
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.failed and tuple(x.shape) in self.shapes:
            try:
                out = self.compiled(x, *args, **kwargs)
            except Exception as exc:
                if "out of memory" in str(exc).lower():
                    raise
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.warning("compiled call failed, running eagerly from now on: %s", self.failed)
            else:
                self.calls["compiled"] += 1
                return out
        self.calls["eager"] += 1
        return self.eager(x, *args, **kwargs)


def vae_latent_shape(vae: Any, width: int, height: int, batch: int = 1) -> tuple[int, int, int, int]:
    """The decoder's input shape for ``batch`` images of ``width×height``."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return batch, int(vae.config.latent_channels), height // scale, width // scale


def compile_vae_decoder(vae: Any, sizes: Iterable[tuple[int, int]]) -> ShapeGate:
    """Compile the VAE decoder with static shapes for one image at each of ``sizes`` (the presets' sizes): the
    ``compile_vae`` setting. Other sizes and batches decode eagerly, so no request ever waits for a compile.

    Dynamic shapes (the first version) gave nothing on an H100 and cost four minutes of warm-up; a static graph
    decodes 1024² in 35 ms against 87 ms eagerly on an H200, for a few seconds at most on a restart with the
    on-disk cache (docs/benchmarks.md, section 6)."""
    gate = ShapeGate(vae.decoder, [vae_latent_shape(vae, w, h) for w, h in sizes])
    vae.decoder._compiled_call_impl = gate
    return gate


def uncompile(module: torch.nn.Module) -> int:
    """Undo ``nn.Module.compile()`` on ``module`` and its children (they run eagerly again); returns how many."""
    count = 0
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
            count += 1
    return count


def fall_back(pipe: Any, report: AccelerationReport, exc: BaseException) -> bool:
    """A compiled first run failed: step back once per call — first to native attention (the probed backend may
    not trace), then to eager. Returns False when there is nothing left to give up (re-raise then)."""
    import torch._dynamo

    if not (report.compiled or report.vae_compiled):
        return False
    first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if report.attention.backend != DEFAULT_BACKEND or report.attention.masked_backend != DEFAULT_BACKEND:
        log.warning("compiled run failed with attention %s (%s); retrying with native SDPA",
                    report.attention.summary(), first_line)
        report.attention = AttentionChoice(reason=f"fell back from {report.attention.summary()}: {first_line}")
        install_attention(pipe.transformer, report.attention, real_rope=report.compiled)
    else:
        log.warning("compiled run failed (%s); running eagerly", first_line)
        uncompile(pipe.transformer)
        uncompile(pipe.vae)
        report.compiled = report.vae_compiled = False
        install_attention(pipe.transformer, report.attention, real_rope=False)
        report.compile_note = f"fell back to eager: {first_line}"
    torch._dynamo.reset()
    return True


# --------------------------------------------------------------------------------------------------------------
# fp8
# --------------------------------------------------------------------------------------------------------------
def fp8_support(device: torch.device) -> tuple[bool, str]:
    """(True, "") when fp8 compute can run here, else (False, the reason in one line)."""
    if device.type != "cuda":
        return False, "fp8 mode needs a CUDA GPU (this is the CPU)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if not fp8_capable((major, minor)):
        name, need = torch.cuda.get_device_name(index), ".".join(map(str, FP8_MIN_CAPABILITY))
        return False, (f"fp8 mode needs compute capability ≥ {need} (Ada or Hopper); {name} is {major}.{minor} — "
                       "use bf16, or the fp8-storage placement to save memory")
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig  # noqa: F401
    except Exception as exc:
        return False, f"fp8 mode needs torchao (pip install 'zimage-ui[fp8]'): {type(exc).__name__}: {exc}"
    return True, ""


def _fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    inside_blocks = fqn.startswith(("layers.", "noise_refiner.", "context_refiner."))
    big = module.in_features >= 1024 and module.out_features >= 1024
    return inside_blocks and big and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Float8 dynamic-activation / float8-weight (per-row scales) for the blocks' large linears. Returns how many."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(1 for name, m in transformer.named_modules() if _fp8_filter(m, name))
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=_fp8_filter)
    return count


# --------------------------------------------------------------------------------------------------------------
# What the engine applied
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AccelerationReport:
    """What :func:`accelerate` did, for ``model_info()``, ``doctor`` and the benchmark."""

    attention: AttentionChoice = field(default_factory=AttentionChoice)
    compiled: bool = False
    compile_note: str = ""
    compile_cache: dict[str, Any] = field(default_factory=dict)
    vae_compiled: bool = False
    vae_sizes: list[tuple[int, int]] = field(default_factory=list)  # sizes whose decode runs compiled
    fp8: bool = False
    fp8_note: str = ""
    fp8_linears: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention"] = self.attention.to_dict()
        return data


def accelerate(pipe: Any, device: torch.device, *, attention: str = "auto", compile: bool = True,
               compile_vae: bool = False, fp8: bool = False, cache_dir: Path | None = None,
               compile_allowed: bool = True, width: int = 1024, height: int = 1024,
               choice: AttentionChoice | None = None,
               vae_sizes: Iterable[tuple[int, int]] | None = None) -> AccelerationReport:
    """Apply the speed settings to a placed pipeline. ``fp8`` raises ``ValueError`` (with the reason) where fp8 can't
    run, or with a placement that hooks the transformer; ``compile`` is skipped on the CPU and where the placement
    hooks the transformer (``compile_allowed``). ``choice`` re-uses an attention choice (no second probe). With
    ``compile_vae`` the decoder is compiled for one image at each of ``vae_sizes`` (default: ``width×height``)."""
    t0 = time.perf_counter()
    report = AccelerationReport()
    transformer = pipe.transformer
    if fp8:
        ok, why = fp8_support(device)
        if not ok:
            raise ValueError(why)
        if not compile_allowed:
            raise ValueError("fp8 mode needs the resident or text-encoder-offload placement (it stores the "
                             "transformer in fp8 itself); the fp8-storage and offload placements hook its weights")
        report.fp8_linears = quantize_fp8(transformer)
        report.fp8 = True
        report.fp8_note = (f"torchao float8 (per-row dynamic activations, per-row weights) on "
                           f"{report.fp8_linears} linears")
    report.attention = choice or choose_attention(attention, device, transformer, width=width, height=height,
                                                  cache_dir=cache_dir or default_cache_dir())
    will_compile = compile and device.type == "cuda" and compile_allowed
    install_attention(transformer, report.attention, real_rope=will_compile)
    if not compile:
        report.compile_note = "off (compile setting)"
    elif device.type != "cuda":
        report.compile_note = "off on the CPU"
    elif not compile_allowed:
        report.compile_note = "off: this placement streams or casts the transformer's weights with hooks"
    else:
        report.compile_cache = configure_compile_cache(cache_dir or default_cache_dir())
        compile_transformer(transformer)
        report.compiled = True
        report.compile_note = "compile_repeated_blocks(fullgraph=True, dynamic=True); compiled during warm-up"
        if compile_vae:
            report.vae_sizes = sorted(set(vae_sizes or [(width, height)]))
            compile_vae_decoder(pipe.vae, report.vae_sizes)
            report.vae_compiled = True
            report.compile_note += "; VAE decoder compiled for " + ", ".join(f"{w}x{h}" for w, h in report.vae_sizes)
    report.seconds = time.perf_counter() - t0
    return report
