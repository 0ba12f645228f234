"""Choose where the model's weights live from a VRAM budget: pure arithmetic on injected device facts.

    >>> from zimage_ui.memory.estimator import WorkingMemoryEstimator
    >>> from zimage_ui.units import GiB
    >>> from zimage_ui.memory.planner import DeviceFacts, plan
    >>> est = WorkingMemoryEstimator.default_for("cuda", weights_bytes=int(19.28 * GiB))
    >>> facts = DeviceFacts("cuda", "RTX 4090", total_bytes=24 * GiB, fp8_supported=True)
    >>> plan(facts, est).chosen.name
    'resident'
    >>> plan(DeviceFacts("cuda", "L4 (capped)", 24 * GiB, True, budget_bytes=12 * GiB), est).chosen.name
    'fp8-storage'

Placements, fastest first (the plan chooses the fastest predicted placement that fits; the list order breaks ties):

- ``resident``: everything on the GPU (19.28 GB measured on the H200).
- ``text-encoder-offload``: the Qwen3 text encoder (7.49 GB) stays in CPU RAM and is *streamed* to the GPU block by
  block while encoding (diffusers group offloading, one decoder layer at a time, on a side stream). We assume
  streaming rather than moving it whole, because moving it whole puts it beside the resident transformer during
  encoding (11.46 + 7.49 GB) and saves nothing at the peak; streaming holds only the 0.72 GB embedding table plus
  a layer or two. (Encoding on the CPU would also work but no figure for its speed exists; we don't plan on it.)
- ``fp8-storage``: as above, plus the transformer stored in float8_e4m3fn and upcast layer by layer to bf16
  (``enable_layerwise_casting``): 11.46 → 5.74 GB. Needs compute capability ≥ 8.9. Listed after text-encoder
  offload and combined with it, because fp8 alone (5.74 + 7.49 GB) needs more memory than text-encoder offload.
- ``sequential-offload``: the transformer and text encoder streamed block by block (diffusers group offloading on
  a side stream; the engine uses it instead of ``enable_sequential_cpu_offload()``, which moves every leaf
  synchronously). Smallest, and 3.2 s an image on an H100 — faster than model offload, so chosen before it.
- ``model-offload``: ``enable_model_cpu_offload()``: one whole component on the GPU at a time (what z-image-studio
  does on CUDA): 16 s an image on the H200, and it needs the whole transformer's 11.5 GB while denoising. Never the
  plan's choice while sequential offload exists; kept for ``--placement model-offload``.

A placement fits when ``predicted peak + CUDA context + margin ≤ budget``, the budget being ``min(total,
budget_bytes)``. The predicted peak is the largest, over the encode, denoise and decode phases, of the weights on
the GPU during that phase plus that phase's working memory (from the estimator). The arithmetic at 1024², batch 1
(working 2.41 GB, context 0.5 GB, margin 0.7 GB):

====================  ========  =========  =====  =======================================================
placement             kept on   peak       needs  chosen at
                      GPU       (phase)
====================  ========  =========  =====  =======================================================
resident              19.28 GB  21.7 dec.  22.9   80 and 24 GB
text-encoder-offload  11.79 GB  14.2 dec.  15.4   16 GB
fp8-storage            6.07 GB   8.5 dec.   9.7   12 GB (needs fp8); at 8 GB it is 1.7 GB short
sequential-offload     0.17 GB   2.6 dec.   3.8   8 GB, and up to 15.4 GB without fp8
model-offload          0.17 GB  12.1 den.  13.3   never (slower than sequential offload, and larger)
====================  ========  =========  =====  =======================================================

Latencies are *priors* for an H100/H200 at 1024², Turbo (8 passes), new prompt, from measured figures
(docs/benchmarks.md, "VRAM budgets"); nothing here scales them to another GPU, since we can't measure that from
facts alone. ``latency_basis`` says where each comes from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from zimage_ui.memory.estimator import DEFAULT_MARGIN_BYTES, WorkingMemoryEstimator, WorkShape
from zimage_ui.units import GiB, MiB
from zimage_ui.units import gib_text as _gb

# Every placement's name, fastest first (the plan's tie-break order); ``engine.placement`` applies them.
PLACEMENTS = ("resident", "text-encoder-offload", "fp8-storage", "sequential-offload", "model-offload")
# fp8 storage and compute need Ada or Hopper (compute capability 8.9) or newer.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_capable(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability (major, minor) has fp8: the one test the planner, the engine's fp8
    mode and ``zimage-ui doctor`` share.

    >>> fp8_capable((8, 9)), fp8_capable((9, 0)), fp8_capable((8, 6))
    (True, True, False)
    """
    return tuple(capability) >= FP8_MIN_CAPABILITY

# A torch CUDA context with lazy module loading, plus cuBLAS workspaces: ~0.5 GB on Hopper (our estimate; SEEDS
# 000/001 saw 1.0 GB "idle" on a 4090D via nvidia-smi). Replace with a measured figure via DeviceFacts.overhead_bytes.
CUDA_CONTEXT_BYTES = 512 * MiB
# Text-encoder activations for one 512-token prompt: 37 kept hidden states (output_hidden_states=True) of
# 512 x 2560 bf16 = 97 MB, plus MLP temporaries (3 x 512 x 9728 bf16 = 30 MB). Doubled with CFG.
ENCODE_WORKING_BYTES_PER_PROMPT = 37 * 512 * 2560 * 2 + 3 * 512 * 9728 * 2

# Latency priors, seconds, 1024², 8 passes, a new prompt (docs/benchmarks.md, run B unless noted).
RESIDENT_LATENCY_S = 1.31  # vanilla diffusers, eager, H200 (shared/reference/zimage.md); 0.93 s compiled
TEXT_ENCODER_STREAM_S = 0.75  # H100: new prompt 1.927 s streamed vs 1.188 s resident, both compiled
FP8_SLOWDOWN = 1.25  # H100, eager, same prompt: 1.911 s fp8 storage (run B) vs 1.525 s resident (run D)
MODEL_OFFLOAD_LATENCY_S = 16.0  # enable_model_cpu_offload(), H200 (the figure)
SEQUENTIAL_OFFLOAD_LATENCY_S = 3.2  # H100, group offloading, eager: 3.212 s new prompt


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of each component's weights, and the few extra figures offloading needs."""

    transformer_bytes: int
    text_encoder_bytes: int
    vae_bytes: int
    extra_bytes: int = 0  # measured resident total minus the parameters: kept on the GPU in every placement
    transformer_fp8_bytes: int | None = None  # with float8 storage (None: not computed)
    text_encoder_stream_bytes: int = 0  # GPU bytes while streaming the text encoder (embedding + 2 layers)
    largest_leaf_bytes: dict[str, int] = field(default_factory=dict)  # per component, for sequential offload

    @property
    def total_bytes(self) -> int:
        """Everything resident (the ``resident`` placement's weights)."""
        return self.transformer_bytes + self.text_encoder_bytes + self.vae_bytes + self.extra_bytes

    @classmethod
    def from_modules(
        cls, transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module
    ) -> ComponentSizes:
        """Sizes of loaded modules (say, the demo model); fp8 assumes 1 byte for every parameter of ≥ 2 dims."""

        def size(module: torch.nn.Module) -> int:
            return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

        def leaf(module: torch.nn.Module) -> int:
            return max((size(m) for m in module.modules() if not list(m.children())), default=0)

        fp8 = sum(p.numel() * (1 if p.dim() >= 2 else p.element_size()) for p in transformer.parameters())
        return cls(
            transformer_bytes=size(transformer),
            text_encoder_bytes=size(text_encoder),
            vae_bytes=size(vae),
            transformer_fp8_bytes=fp8,
            text_encoder_stream_bytes=min(size(text_encoder), 3 * leaf(text_encoder)),
            largest_leaf_bytes={"transformer": leaf(transformer), "text_encoder": leaf(text_encoder), "vae": leaf(vae)},
        )


# Parameter counts of the released configs, counted on the meta device with diffusers 0.42.1 / transformers,
# bf16: transformer 6,154,908,736 params; Qwen3 text encoder 4,022,468,096 (+512 B buffers); VAE 83,819,683.
# They sum to 19.11 GiB; the H200 measured 19.28 GiB resident, and the 0.17 GiB difference (where it lives is
# unknown) is kept on the GPU in every placement. fp8 storage casts 6,144,007,744 transformer params (everything
# but t_embedder, cap_embedder and norms, diffusers' skip patterns) → 5.74 GiB.
Z_IMAGE_TURBO_BF16 = ComponentSizes(
    transformer_bytes=6_154_908_736 * 2,
    text_encoder_bytes=4_022_468_096 * 2 + 512,
    vae_bytes=83_819_683 * 2,
    extra_bytes=round(19.28 * GiB) - (6_154_908_736 + 4_022_468_096 + 83_819_683) * 2 - 512,
    transformer_fp8_bytes=6_144_007_744 + (6_154_908_736 - 6_144_007_744) * 2,
    # embedding table 151936 x 2560 bf16 (0.72 GiB) + two decoder layers in flight (2 x 0.188 GiB)
    text_encoder_stream_bytes=151_936 * 2560 * 2 + 2 * 100_930_816 * 2,
    largest_leaf_bytes={
        "text_encoder": 151_936 * 2560 * 2,  # embed_tokens
        "transformer": 3840 * 10240 * 2,  # an FFN projection
        "vae": 512 * 512 * 9 * 2,  # a 3x3 conv at 512 channels
    },
)


@dataclass(frozen=True)
class DeviceFacts:
    """What the planner needs to know about the device; injected, so planning is testable anywhere."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    fp8_supported: bool = False  # fp8_capable(compute capability)
    budget_bytes: int | None = None  # a cap below total (co-hosting); None = all of it
    overhead_bytes: int | None = None  # context + other processes if measured; None = CUDA_CONTEXT_BYTES

    @property
    def effective_budget_bytes(self) -> int:
        """``min(total, budget)``."""
        return self.total_bytes if self.budget_bytes is None else min(self.total_bytes, self.budget_bytes)

    @classmethod
    def from_torch(cls, device: torch.device | str, budget_bytes: int | None = None) -> DeviceFacts:
        """Read the facts from torch (initialises CUDA for a CUDA device; RAM via psutil for CPU)."""
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            return cls("cuda", props.name, int(props.total_memory), fp8_capable((props.major, props.minor)),
                       budget_bytes)
        import psutil

        return cls("cpu", "CPU", int(psutil.virtual_memory().total), False, budget_bytes, overhead_bytes=0)


@dataclass(frozen=True)
class Placement:
    """One way to place the weights, with its predicted memory and latency."""

    name: str
    resident_bytes: int  # weights kept on the GPU between jobs
    predicted_peak_bytes: int  # weights + working at the worst phase, excluding the CUDA context
    predicted_latency_s: float | None  # 1024² Turbo prior (see latency_basis); None where no figure exists
    description: str
    diffusers_calls: tuple[str, ...]
    latency_basis: str = ""


@dataclass(frozen=True)
class PlacementOption:
    """A placement judged against the budget."""

    placement: Placement
    fits: bool
    need_bytes: int  # predicted peak + overhead + margin
    reason: str


@dataclass(frozen=True)
class PlanResult:
    """The chosen placement and every option with whether it fits and why; for ``zimage-ui doctor``."""

    chosen: Placement
    fits: bool  # False when nothing fits: then `chosen` is the placement that needs least
    budget_bytes: int
    shape: WorkShape
    margin_bytes: int
    overhead_bytes: int
    options: tuple[PlacementOption, ...]

    def lines(self) -> list[str]:
        """Human-readable lines, one per placement, the chosen one marked."""
        head = (
            f"budget {_gb(self.budget_bytes)} for {self.shape} "
            f"(margin {_gb(self.margin_bytes)}, context/other {_gb(self.overhead_bytes)})"
        )
        out = [head]
        for option in self.options:
            mark = "→" if option.placement.name == self.chosen.name else " "
            verdict = "fits" if option.fits else "no"
            latency = option.placement.predicted_latency_s
            lat = "" if latency is None else f", ~{latency:.1f} s ({option.placement.latency_basis})"
            out.append(f"{mark} {option.placement.name:<21} {verdict:<4} {option.reason}{lat}")
        if not self.fits:
            out.append(f"nothing fits at {self.shape}; {self.chosen.name} needs least — lower the resolution")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "chosen": asdict(self.chosen),
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "shape": asdict(self.shape),
            "margin_bytes": self.margin_bytes,
            "overhead_bytes": self.overhead_bytes,
            "options": [
                {"placement": asdict(o.placement), "fits": o.fits, "need_bytes": o.need_bytes, "reason": o.reason}
                for o in self.options
            ],
        }


def _peak(resident: int, phases: Iterable[tuple[int, int]]) -> int:
    """Resident weights + the worst (transient weights + working) over the phases."""
    return resident + max(transient + working for transient, working in phases)


def _cuda_placements(sizes: ComponentSizes, estimator: WorkingMemoryEstimator, shape: WorkShape) -> list[Placement]:
    ph = estimator.phases(shape)
    fixed = ph["fixed"]
    encode = fixed + ENCODE_WORKING_BYTES_PER_PROMPT * shape.sequences
    denoise, decode = fixed + ph["denoise"], fixed + ph["decode"]
    leaf = sizes.largest_leaf_bytes
    fp8 = sizes.transformer_fp8_bytes
    stream = [
        "apply_group_offloading(pipe.text_encoder, onload_device=cuda, offload_device=cpu, "
        "offload_type='block_level', num_blocks_per_group=1, use_stream=True)",
    ]
    without_te = sizes.total_bytes - sizes.text_encoder_bytes

    placements = [
        Placement(
            "resident",
            sizes.total_bytes,
            _peak(sizes.total_bytes, [(0, encode), (0, denoise), (0, decode)]),
            RESIDENT_LATENCY_S,
            "all components on the GPU",
            ("pipe.to('cuda')",),
            "H200 measured, eager; 0.93 s compiled",
        ),
        Placement(
            "text-encoder-offload",
            without_te,
            _peak(without_te, [(sizes.text_encoder_stream_bytes, encode), (0, denoise), (0, decode)]),
            RESIDENT_LATENCY_S + TEXT_ENCODER_STREAM_S,
            "transformer + VAE on the GPU; text encoder in CPU RAM, streamed layer by layer to encode",
            ("pipe.transformer.to('cuda')", "pipe.vae.to('cuda')", *stream),
            "H200 resident + 0.75 s stream, measured",
        ),
    ]
    if fp8 is not None:
        fp8_resident = fp8 + sizes.vae_bytes + sizes.extra_bytes
        upcast = leaf.get("transformer", 0)  # one layer's bf16 copy exists while it computes
        placements.append(
            Placement(
                "fp8-storage",
                fp8_resident,
                _peak(fp8_resident, [(sizes.text_encoder_stream_bytes, encode), (upcast, denoise), (0, decode)]),
                RESIDENT_LATENCY_S * FP8_SLOWDOWN + TEXT_ENCODER_STREAM_S,
                "transformer stored as float8_e4m3fn, computed in bf16; text encoder streamed as above",
                (
                    "pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, "
                    "compute_dtype=torch.bfloat16)",
                    "pipe.transformer.to('cuda')",
                    "pipe.vae.to('cuda')",
                    *stream,
                ),
                "H200 resident x1.25 + 0.75 s stream, measured",
            )
        )
    placements += [
        Placement(
            "sequential-offload",
            sizes.extra_bytes,
            _peak(
                sizes.extra_bytes,
                [
                    (leaf.get("text_encoder", 0), encode),
                    (leaf.get("transformer", 0), denoise),
                    (leaf.get("vae", 0), decode),
                ],
            ),
            SEQUENTIAL_OFFLOAD_LATENCY_S,
            "transformer and text encoder streamed block by block from pinned CPU RAM, one block ahead on a side "
            "stream (engine/placement.py); smallest",
            (
                "apply_group_offloading(pipe.transformer, onload_device=cuda, offload_device=cpu, "
                "offload_type='block_level', num_blocks_per_group=1, use_stream=True)",
                *stream,
                "pipe.vae.to('cuda')",
            ),
            "H100 measured",
        ),
        Placement(
            "model-offload",
            sizes.extra_bytes,
            _peak(
                sizes.extra_bytes,
                [(sizes.text_encoder_bytes, encode), (sizes.transformer_bytes, denoise), (sizes.vae_bytes, decode)],
            ),
            MODEL_OFFLOAD_LATENCY_S,
            "each component moves to the GPU when called and back when the next is",
            ("pipe.enable_model_cpu_offload()",),
            "H200 measured",
        ),
    ]
    return placements


def plan(
    facts: DeviceFacts,
    estimator: WorkingMemoryEstimator,
    shape: WorkShape = WorkShape(1024, 1024),
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
    sizes: ComponentSizes = Z_IMAGE_TURBO_BF16,
) -> PlanResult:
    """Judge every placement against the budget and choose the first (most preferred) that fits.

    On CPU (or any non-CUDA device) the plan is the trivial ``resident`` in RAM.
    """
    budget = facts.effective_budget_bytes
    if facts.kind != "cuda":
        overhead = facts.overhead_bytes or 0
        peak = sizes.total_bytes + estimator.predict(shape)
        need = peak + overhead + margin_bytes
        placement = Placement(
            "resident",
            sizes.total_bytes,
            peak,
            None,
            f"resident ({facts.kind.upper()} RAM)",
            (f"pipe.to('{facts.kind}')",),
            "no latency prior for CPU",
        )
        fits = need <= budget
        reason = _reason(peak, sizes.total_bytes, overhead, margin_bytes, need, budget, fits)
        option = PlacementOption(placement, fits, need, reason)
        return PlanResult(placement, fits, budget, shape, margin_bytes, overhead, (option,))

    overhead = CUDA_CONTEXT_BYTES if facts.overhead_bytes is None else facts.overhead_bytes
    options, possible = [], []
    for placement in _cuda_placements(sizes, estimator, shape):
        need = placement.predicted_peak_bytes + overhead + margin_bytes
        if placement.name == "fp8-storage" and not facts.fp8_supported:
            options.append(PlacementOption(placement, False, need, "needs fp8 (compute capability ≥ 8.9)"))
            continue
        fits = need <= budget
        reason = _reason(
            placement.predicted_peak_bytes, placement.resident_bytes, overhead, margin_bytes, need, budget, fits
        )
        options.append(PlacementOption(placement, fits, need, reason))
        possible.append(options[-1])
    fitting = [o for o in possible if o.fits]
    if fitting:
        fastest = min(fitting, key=lambda o: (o.placement.predicted_latency_s or float("inf"), fitting.index(o)))
        return PlanResult(fastest.placement, True, budget, shape, margin_bytes, overhead, tuple(options))
    smallest = min(possible, key=lambda o: o.need_bytes)
    return PlanResult(smallest.placement, False, budget, shape, margin_bytes, overhead, tuple(options))


def plan_for_device(device: torch.device | str, *, budget_bytes: int | None = None,
                    overhead_bytes: int | None = None, shape: WorkShape = WorkShape(1024, 1024),
                    margin_bytes: int = DEFAULT_MARGIN_BYTES) -> PlanResult:
    """The plan for Z-Image-Turbo (bf16) on ``device``, as the engine's ``--placement auto`` and ``zimage-ui doctor``
    make it: the device's facts from torch, the estimator's prior for the released weights.

    ``overhead_bytes``: memory the budget must also hold (our CUDA context, other processes) when measured; None
    for :data:`CUDA_CONTEXT_BYTES`."""
    facts = DeviceFacts.from_torch(device, budget_bytes)
    if overhead_bytes is not None:
        facts = replace(facts, overhead_bytes=overhead_bytes)
    estimator = WorkingMemoryEstimator.default_for(facts.kind, Z_IMAGE_TURBO_BF16.total_bytes)
    return plan(facts, estimator, shape, margin_bytes=margin_bytes)


def _reason(peak: int, resident: int, overhead: int, margin: int, need: int, budget: int, fits: bool) -> str:
    parts = f"{_gb(resident)} weights kept, peak {_gb(peak)} + {_gb(overhead)} context + {_gb(margin)} margin"
    relation = "≤" if fits else ">"
    return f"needs {_gb(need)} ({parts}) {relation} {_gb(budget)}"
