"""Predicted peak working memory of one generation, and whether a request fits (admission).

    >>> from zimage_ui.memory.estimator import WorkShape, WorkingMemoryEstimator
    >>> from zimage_ui.units import GiB
    >>> est = WorkingMemoryEstimator.default_for("cuda", weights_bytes=int(19.28 * GiB))
    >>> round(est.predict(WorkShape(1024, 1024)) / GiB, 1)   # H200 baseline measured 2.41 GB
    2.4
    >>> round(est.predict(WorkShape(2048, 2048)) / GiB, 1)   # measured 9.54 GB
    9.5

Units: messages say GiB (2**30 bytes), the unit nvidia-smi's MiB add up to; the figures in this docstring are GiB.

The model
---------
``peak working = fixed + max(decode, denoise)`` where, for ``W×H`` pixels, batch ``B`` and CFG on or off,

- ``decode  = a·W·H·B + c·W·H`` — the VAE decode, which dominates the peak of this pipeline. ``a`` is per image;
  ``c`` is per call (a per-call temporary that doesn't grow with the batch: the H200 baseline's batch 1 peak,
  2.41 GB, is more than half its batch 2 peak, 4.0 GB);
- ``denoise = (t·T + q·T²)·S`` — one transformer call, with ``T`` tokens per sequence (``W/16·H/16`` image tokens
  + ``CAPTION_TOKENS``) and ``S = B·(2 if CFG else 1)`` sequences, because ``ZImagePipeline`` repeats the latents
  (``latents.repeat(2, ...)``) and runs positive and negative prompts through one transformer call. ``q`` stays 0
  unless calibration finds a quadratic attention term (SDPA's flash/efficient kernels don't materialise T²).

The ``max`` is why CFG barely moves the 1024² peak (2.41 → 2.42 GB on the H200): doubling the transformer's
activations still leaves them under the decode's. Where denoise does dominate, CFG doubles it.

``calibrate`` fits all five coefficients to measured peaks by least squares on *relative* error (a 10% miss at
512² counts as much as one at 2048²): it assigns each sample to the branch that is larger under the current fit,
solves the now-linear problem, and improves the assignment (re-assigning by the fit, flipping single samples)
until no change lowers the error, from a few starting assignments. The two-branch result is kept only when it
beats a decode-only fit by the Bayesian information criterion, so a handful of noisy samples can't conjure a
denoise term. A weak pull towards the prior (ridge, 1e-4) keeps coefficients that the samples cannot tell apart
(say, ``a`` vs ``c`` with batch 1 only, or the whole denoise branch when decode always dominates) at their prior
values; coefficients are kept ≥ 0. The current coefficients are the prior, so calibrate a ``default_for`` estimator.

Admission (does a request fit now?) is :mod:`.admission`, next door; it judges against these predictions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from zimage_ui.files import write_atomic
from zimage_ui.messages import Count, Message
from zimage_ui.units import GiB, MiB

# Caption tokens in the transformer's sequence: a 20-word prompt in the chat template is ~40 tokens, padded to a
# multiple of 32 (SEQ_MULTI_OF); 128 is a generous round figure. It only shifts the denoise branch slightly.
CAPTION_TOKENS = 128
CFG_FACTOR = 2  # ZImagePipeline runs positive + negative prompts as one doubled batch

# The 0.7 GB "gray buffer" of SEEDS 004, which its author chose from 200+ OOM tests on a 24 GB card.
DEFAULT_MARGIN_BYTES = int(0.7 * GiB)
# Allocations outside PyTorch's caching allocator that appear during a job and so are not yet in `other`.
CUDA_RUNTIME_RESERVE_BYTES = 256 * MiB

# Coefficient names and their natural units, used in JSON and the description.
COEFFICIENTS = (
    "fixed_bytes",
    "decode_bytes_per_pixel_per_image",
    "decode_bytes_per_pixel",
    "denoise_bytes_per_token",
    "denoise_bytes_per_token_squared",
)
# Fitting happens in scaled units (GiB, MiP = 2**20 pixels, kilotokens = 1024 tokens) so the numbers are O(1).
_SCALE = np.array([GiB, GiB / MiB, GiB / MiB, GiB / 1024, GiB / 1024**2], dtype=float)
_RIDGE = 1e-4

# H200 baseline (shared/reference/zimage.md, diffusers 0.42.1, bf16, full-size model): least-squares fit of
# 768² 1.37, 1024² 2.41, 2048² 9.54, 1024² batch 2 4.0, batch 4 8.0, 1024² CFG 2.42 GB (max error 4.6%, batch 2).
# The denoise term is not in that data (decode dominates every row); 100 kB per token per sequence is our estimate
# from the block shapes (dim 3840, FFN 10240: three FFN-wide bf16 tensors ≈ 60 kB/token + attention temporaries in
# fp32 for RoPE ≈ 40 kB/token). The data caps it: with CFG at 1024² it must stay under the decode's 2.4 GB, i.e.
# below ~300 kB/token.
_H200_FULL_BF16 = {
    "fixed_bytes": 0.0331 * GiB,
    "decode_bytes_per_pixel_per_image": 1.784 * GiB / MiB,
    "decode_bytes_per_pixel": 0.584 * GiB / MiB,
    "denoise_bytes_per_token": 100e3,
    "denoise_bytes_per_token_squared": 0.0,
}
# Demo model (zimage_ui/models/demo.py) on CPU, float32, torch 2.13, 2 cores: measured peak RSS growth (ru_maxrss
# in a fresh process after warm-up) 21 MiB at 256², 158 at 512², 230 at 768², 330 at 1024², 372 at 512² batch 4,
# 160 at 512² CFG. glibc arenas make these noisy, so the prior is a round upper envelope: 128 MiB + 0.5 GiB per
# MiP per image, which over-predicts every measurement by 1.6–7x.
_DEMO_CPU = {
    "fixed_bytes": 128 * MiB,
    "decode_bytes_per_pixel_per_image": 0.5 * GiB / MiB,
    "decode_bytes_per_pixel": 0.0,
    "denoise_bytes_per_token": 8e3,
    "denoise_bytes_per_token_squared": 0.0,
}
# Anything with at least this many bytes of weights is taken to be the full-size architecture.
_FULL_SIZE_WEIGHTS = 1 * GiB


@dataclass(frozen=True)
class WorkShape:
    """What one generation call processes: image size, batch, and whether CFG doubles the transformer batch."""

    width: int
    height: int
    batch: int = 1
    cfg: bool = False

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.batch <= 0:
            raise ValueError(f"width, height and batch must be positive, got {self.width}x{self.height}x{self.batch}")

    @property
    def pixels(self) -> int:
        """Pixels per image."""
        return self.width * self.height

    @property
    def tokens(self) -> int:
        """Transformer sequence length: image tokens (8x VAE, 2x2 patches) plus caption tokens."""
        return (self.width // 16) * (self.height // 16) + CAPTION_TOKENS

    @property
    def sequences(self) -> int:
        """Sequences per transformer call: the batch, doubled by CFG."""
        return self.batch * (CFG_FACTOR if self.cfg else 1)

    def __str__(self) -> str:
        text = f"{self.width}x{self.height}"
        if self.batch != 1:
            text += f" batch {self.batch}"
        return text + (" CFG" if self.cfg else "")


def _rows(shape: WorkShape) -> tuple[np.ndarray, np.ndarray]:
    """Scaled feature rows of the decode and denoise branches (both include the fixed term)."""
    mp = shape.pixels / MiB
    kt = shape.tokens / 1024
    decode = np.array([1.0, mp * shape.batch, mp, 0.0, 0.0])
    denoise = np.array([1.0, 0.0, 0.0, kt * shape.sequences, kt * kt * shape.sequences])
    return decode, denoise


class WorkingMemoryEstimator:
    """peak working bytes ≈ fixed + max(decode: a·pixels·batch + c·pixels, denoise: (t·T + q·T²)·batch·cfg_factor)."""

    def __init__(
        self,
        coefficients: dict[str, float],
        *,
        calibrated: bool = False,
        source: str = "",
        fit: dict[str, Any] | None = None,
    ) -> None:
        missing = [name for name in COEFFICIENTS if name not in coefficients]
        if missing:
            raise ValueError(f"missing coefficients: {', '.join(missing)}")
        values = [float(coefficients[name]) for name in COEFFICIENTS]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"coefficients must be finite and >= 0, got {values}")
        self._theta = np.array(values) / _SCALE
        self.calibrated = calibrated
        self.source = source
        self.fit = fit
        # Needs learned from out-of-memory errors on admitted work: shape → (bytes at least, phase). A lower bound
        # measured on this machine beats the fitted curve for that shape (see :meth:`learn`).
        self.learned: dict[WorkShape, tuple[int, str]] = {}

    @property
    def coefficients(self) -> dict[str, float]:
        """The five coefficients in natural units (bytes, bytes per pixel, bytes per token, ...)."""
        return {name: float(v) for name, v in zip(COEFFICIENTS, self._theta * _SCALE, strict=True)}

    def phases(self, shape: WorkShape) -> dict[str, int]:
        """Bytes of the ``fixed`` term and of the ``decode`` and ``denoise`` branches (without ``fixed``)."""
        decode, denoise = _rows(shape)
        fixed = self._theta[0]
        return {
            "fixed": math.ceil(fixed * GiB),
            "decode": math.ceil((decode @ self._theta - fixed) * GiB),
            "denoise": math.ceil((denoise @ self._theta - fixed) * GiB),
        }

    def _model(self, shape: WorkShape) -> int:
        parts = self.phases(shape)
        return parts["fixed"] + max(parts["decode"], parts["denoise"])

    def predict(self, shape: WorkShape) -> int:
        """Predicted peak working bytes for ``shape`` (``fixed + max(decode, denoise)`` of :meth:`phases`), never
        below what an out-of-memory error taught us about this shape (:meth:`learn`)."""
        model = self._model(shape)
        learned = self.learned.get(shape)
        return model if learned is None else max(model, learned[0])

    def predict_chunked(self, shape: WorkShape, chunk: int) -> int:
        """Peak working bytes when the VAE decodes ``chunk`` images at a time (the denoise still runs the whole
        batch). A need learned for the whole shape scales the decode by the same factor, or bounds the denoise."""
        parts = self.phases(replace(shape, batch=chunk))
        decode = parts["decode"]
        denoise = self.phases(shape)["denoise"]
        learned = self.learned.get(shape)
        if learned is not None:
            need, phase = learned
            model = self._model(shape)
            if phase == "decode" and need > model:
                decode = math.ceil(decode * need / model)
            elif phase != "decode":
                denoise = max(denoise, need - parts["fixed"])
        return parts["fixed"] + max(decode, denoise)

    def decode_need(self, shape: WorkShape, chunk: int, tile: int | None = None) -> int:
        """Bytes of the VAE decode alone for ``chunk`` images of ``shape`` (or, tiled, one ``tile``² tile at a
        time), with any learned correction of the decode branch."""
        part = replace(shape, batch=chunk) if tile is None else WorkShape(tile, tile, 1)
        phases = self.phases(part)
        decode = phases["decode"]
        learned = self.learned.get(shape)
        if learned is not None and learned[1] == "decode":
            model = self._model(shape)
            if learned[0] > model:
                decode = math.ceil(decode * learned[0] / model)
        return phases["fixed"] + decode

    def learn(self, shape: WorkShape, need_at_least: int, phase: str) -> int:
        """Record that ``shape`` needs at least ``need_at_least`` bytes (an admitted job ran out of memory in
        ``phase``: "denoise" or "decode"), with a 10% margin for what the failed run never reached. Returns the
        new prediction. Kept with the calibration by :meth:`save`."""
        need = int(need_at_least * 1.10)
        old = self.learned.get(shape)
        if old is None or need > old[0]:
            self.learned[shape] = (need, phase)
        return self.predict(shape)

    def calibrate(self, samples: Sequence[tuple[WorkShape, int]]) -> None:
        """Fit the coefficients to measured ``(shape, peak working bytes)`` samples; the current ones act as prior.

        Raises ``ValueError`` with fewer than 2 distinct shapes or a non-positive measurement.
        """
        if len({shape for shape, _ in samples}) < 2:
            raise ValueError("calibration needs measured peaks for at least 2 distinct shapes")
        if any(peak <= 0 for _, peak in samples):
            raise ValueError("measured peaks must be positive")
        y = np.array([peak / GiB for _, peak in samples], dtype=float)
        rows = [_rows(shape) for shape, _ in samples]
        decode = np.stack([d for d, _ in rows])
        denoise = np.stack([n for _, n in rows])
        prior = self._theta.copy()

        def fit(assign: np.ndarray) -> tuple[float, np.ndarray]:
            theta = _solve(np.where(assign[:, None], decode, denoise), y, prior)
            rel = (np.maximum(decode @ theta, denoise @ theta) - y) / y
            return float(rel @ rel + _RIDGE * np.sum((theta - prior) ** 2)), theta

        # A max of two linear branches: pick which branch explains each sample, then it is linear least squares.
        # Start from a few plausible assignments (the prior's, all-decode, CFG samples on denoise), then improve
        # by re-assigning each sample to the branch the fit says dominates, and by greedy single-sample flips.
        cfg = np.array([shape.cfg for shape, _ in samples])
        starts = [decode @ prior >= denoise @ prior, np.ones(len(y), dtype=bool), ~cfg]
        best: tuple[float, np.ndarray] | None = None
        for assign in starts:
            cost, theta = fit(assign)
            improved = True
            while improved:
                improved = False
                candidates = [decode @ theta >= denoise @ theta]
                for i in range(len(y)):
                    flipped = assign.copy()
                    flipped[i] = ~flipped[i]
                    candidates.append(flipped)
                for candidate in candidates:
                    if np.array_equal(candidate, assign):
                        continue
                    c_cost, c_theta = fit(candidate)
                    if c_cost < cost - 1e-12:
                        cost, theta, assign, improved = c_cost, c_theta, candidate, True
            if best is None or cost < best[0]:
                best = (cost, theta)
        assert best is not None
        # With few samples the max form can "explain" noise by switching a sample to the denoise branch (the
        # baseline table does this: 4.6% → 4.3% max error with a made-up quadratic term). Keep the two-branch fit
        # only if it beats decode-only by the Bayesian information criterion (3 vs 5 fitted coefficients).
        decode_only = fit(np.ones(len(y), dtype=bool))
        n = len(y)

        def bic(cost: float, k: int) -> float:
            return n * math.log(cost / n + 1e-15) + k * math.log(n)

        if bic(decode_only[0], 3) <= bic(best[0], 5):
            best = decode_only
        self._theta = best[1]
        pred = np.maximum(decode @ self._theta, denoise @ self._theta)
        rel = (pred - y) / y
        self.calibrated = True
        self.fit = {
            "samples": len(samples),
            "max_relative_error": float(np.max(np.abs(rel))),
            "rms_relative_error": float(np.sqrt(np.mean(rel**2))),
            "denoise_dominated_samples": int(np.sum(denoise @ self._theta > decode @ self._theta)),
        }

    @property
    def description(self) -> str:
        """One line for docs, ``doctor`` and the UI."""
        c = self.coefficients
        text = (
            f"peak working ≈ {c['fixed_bytes'] / MiB:.0f} MB + max("
            f"decode {c['decode_bytes_per_pixel_per_image'] * MiB / GiB:.2f} GiB/MP × batch"
            f" + {c['decode_bytes_per_pixel'] * MiB / GiB:.2f} GiB/MP, "
            f"denoise {c['denoise_bytes_per_token'] / 1e3:.0f} kB/token"
        )
        if c["denoise_bytes_per_token_squared"] > 0:
            text += f" + {c['denoise_bytes_per_token_squared']:.3g} B/token²"
        text += " × batch × (2 with CFG))"
        if self.calibrated and self.fit:
            text += (
                f"; calibrated on {self.fit['samples']} measurements"
                f" (max error {100 * self.fit['max_relative_error']:.1f}%)"
            )
        else:
            text += f"; uncalibrated prior: {self.source or 'given coefficients'}"
        if self.learned:
            text += f"; {len(self.learned)} need(s) learned from out-of-memory errors"
        return text

    @classmethod
    def default_for(cls, device_kind: str, weights_bytes: int) -> WorkingMemoryEstimator:
        """Uncalibrated prior: H200 baseline for the full-size model on CUDA (x2 on CPU, float32 activations);
        the demo model's CPU measurements (an upper envelope) for 0 < weights < 1 GiB. ``weights_bytes <= 0`` means
        "not known yet" and gets the full-size prior, the conservative choice."""
        if 0 < weights_bytes < _FULL_SIZE_WEIGHTS:
            return cls(_DEMO_CPU, source="demo model measured on CPU (float32), upper envelope")
        if device_kind == "cuda":
            return cls(_H200_FULL_BF16, source="H200 baseline, full-size model, bf16")
        doubled = {name: 2 * value for name, value in _H200_FULL_BF16.items()}
        return cls(doubled, source="H200 baseline x2 for float32 activations on CPU (not measured)")

    def to_json(self) -> dict[str, Any]:
        """JSON-able state; ``from_json`` reads it back."""
        return {
            "format": "zimage-ui/working-memory-estimator",
            "version": 1,
            "coefficients": self.coefficients,
            "caption_tokens": CAPTION_TOKENS,
            "cfg_factor": CFG_FACTOR,
            "calibrated": self.calibrated,
            "source": self.source,
            "fit": self.fit,
            "learned": [{"width": s.width, "height": s.height, "batch": s.batch, "cfg": s.cfg, "need_bytes": need,
                         "phase": phase}
                        for s, (need, phase) in sorted(self.learned.items(), key=lambda kv: str(kv[0]))],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkingMemoryEstimator:
        """Rebuild from ``to_json`` output; ``ValueError`` on a foreign or damaged document."""
        if not isinstance(data, dict) or data.get("format") != "zimage-ui/working-memory-estimator":
            raise ValueError("not a zimage-ui working-memory estimator document")
        if data.get("version") != 1:
            raise ValueError(f"unsupported estimator version {data.get('version')!r}")
        coefficients = data.get("coefficients")
        if not isinstance(coefficients, dict):
            raise ValueError("estimator document has no coefficients")
        estimator = cls(
            coefficients,
            calibrated=bool(data.get("calibrated", False)),
            source=str(data.get("source", "")),
            fit=data.get("fit"),
        )
        for row in data.get("learned") or []:
            try:
                shape = WorkShape(int(row["width"]), int(row["height"]), int(row["batch"]), bool(row["cfg"]))
                estimator.learned[shape] = (int(row["need_bytes"]), str(row.get("phase", "decode")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"estimator document: bad learned row {row!r}") from exc
        return estimator

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (:func:`zimage_ui.files.write_atomic`: temp file beside it, fsync, rename)."""
        write_atomic(path, json.dumps(self.to_json(), indent=2).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WorkingMemoryEstimator:
        """Read a file written by ``save``."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def __repr__(self) -> str:
        return f"WorkingMemoryEstimator({self.description})"


def _solve(x: np.ndarray, y: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Ridge-to-prior least squares on relative error, with coefficients held ≥ 0 (small active-set loop)."""
    a = np.vstack([x / y[:, None], math.sqrt(_RIDGE) * np.eye(x.shape[1])])
    b = np.concatenate([np.ones(len(y)), math.sqrt(_RIDGE) * prior])
    free = np.ones(x.shape[1], dtype=bool)
    theta = np.zeros(x.shape[1])
    for _ in range(x.shape[1] + 1):
        theta = np.zeros(x.shape[1])
        theta[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        negative = free & (theta < 0)
        if not negative.any():
            break
        free[np.argmin(np.where(negative, theta, np.inf))] = False  # pin the most negative at 0 and re-solve
    return np.maximum(theta, 0.0)


# Tile sides (pixels) the fallback decode tries, largest first: the VAE's own default tile is its sample size.
TILE_SIDES = (1024, 768, 512, 256)


@dataclass(frozen=True)
class DecodePlan:
    """How the VAE decodes a job's latents: ``chunk`` images per call, tiled with ``tile``² tiles or not."""

    chunk: int
    tile: int | None = None
    need_bytes: int = 0

    def describe(self) -> str:
        return str(self.message)

    @property
    def message(self) -> Message:
        """``1 image per decode, 512px tiles`` as a message."""
        images = Count(self.chunk, "images")
        if self.tile:
            return Message("decode_plan_tiled", {"images": images, "tile": self.tile})
        return Message("decode_plan", {"images": images})


def decode_fallbacks(shape: WorkShape, after: DecodePlan) -> list[DecodePlan]:
    """Every plan smaller than ``after``, in the order to try: fewer images per call, then tiles, then smaller
    tiles (a tile as large as the image is no tiling, so it is left out)."""
    plans = []
    if after.tile is None:
        plans += [DecodePlan(chunk) for chunk in range(after.chunk - 1, 0, -1)]
    side = max(shape.width, shape.height)
    plans += [DecodePlan(1, tile) for tile in TILE_SIDES
              if tile < side and (after.tile is None or tile < after.tile)]
    return plans


def plan_decode(estimator: WorkingMemoryEstimator, shape: WorkShape, available: int,
                after: DecodePlan) -> DecodePlan | None:
    """The first of :func:`decode_fallbacks` predicted to fit in ``available`` bytes, else the smallest one
    (predictions err high, so it is worth a try); ``None`` when nothing smaller than ``after`` exists."""
    options = decode_fallbacks(shape, after)
    for option in options:
        need = estimator.decode_need(shape, option.chunk, option.tile)
        if need <= available:
            return replace(option, need_bytes=need)
    if not options:
        return None
    last = options[-1]
    return replace(last, need_bytes=estimator.decode_need(shape, last.chunk, last.tile))
