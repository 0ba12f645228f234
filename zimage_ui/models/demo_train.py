"""Train the demo model on the shapes world: ``zimage-ui train-demo --out DIR`` (one GPU, a few minutes).

Same architecture as the untrained demo model (``demo.py``): tiny ``ZImageTransformer2DModel``, tiny Qwen3 text
encoder over the word-level tokenizer, tiny 16-channel ``AutoencoderKL``. Three phases, all from one seed:

1. **Data.** ``--samples`` training scenes (``shapes_world.training_scene(seed, i)``) rendered with Pillow by a
   pool of worker processes; the held-out (colour, shape, background) triples are never drawn. 8% of captions
   carry one word from outside the world ("a beautiful red circle"), so such words do not derail the picture.
2. **VAE** as an autoencoder (MSE + L1 on pixels, a small KL on the posterior). Its latents' mean and standard
   deviation become the VAE config's ``shift_factor`` and ``scaling_factor``, which the pipeline uses.
3. **Transformer and text encoder together**, flow matching in that latent space as ``ZImagePipeline`` samples it:
   ``x_t = sigma * noise + (1 - sigma) * z``, the transformer sees ``t = 1 - sigma`` and predicts ``z - noise``
   (the pipeline negates its output and hands it to ``FlowMatchEulerDiscreteScheduler.step``); sigma is uniform
   then shifted with the scheduler's shift (3.0), the density the Turbo schedule visits. Captions are dropped to
   the empty prompt ``--drop`` of the time so classifier-free guidance (Standard, Quality) has an unconditional
   model to push against. An EMA of the weights is what is saved.

At the end the real ``ZImagePipeline`` with the EMA weights draws the 200 held-out prompts with the Turbo preset
(8 passes, guidance 0) and 50 with the Standard preset (25 steps, guidance 4); the judge (``judge.py``) scores
them. Everything lands in ``--out``: ``demo.safetensors``, ``train_log.json``, ``train_log.md``, sample sheets.

Wall time: ``--time-budget-s`` (0 = none). Each phase first times a few steps, then fixes its step count to what
fits in its share of the budget (never more than asked); the log records the counts, so a run with
``--vae-steps N --dit-steps M --time-budget-s 0`` repeats it. With the same counts and seed the data, the
initialisation and the batch order are identical; GPU kernels are run in deterministic mode where torch has one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("demo-train-out")


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to its log)."""

    out: Path = DEFAULT_OUT
    seed: int = 0
    side: int = 256
    samples: int = 40000
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    dit_steps: int = 40000
    dit_batch: int = 128
    dit_lr: float = 6e-4
    drop: float = 0.1
    ema: float = 0.998
    eval_prompts: int = 200
    eval_cfg_prompts: int = 50
    time_budget_s: float = 400.0
    vae_share: float = 0.22  # of the budget left after rendering and the evaluation reserve
    eval_reserve_s: float = 40.0
    compile: bool = False  # torch.compile the transformer's blocks for training (the saved weights are the same)
    init: str = ""  # a demo-weights file to continue from: its VAE and latent scaling are kept, only the transformer
    #                 and text encoder train on
    distill_guidance: float = 0.0  # > 0: the target is a frozen copy of the starting model's guided prediction
    #                                (uncond + w * (cond - uncond)), so Turbo (guidance 0) draws what CFG draws
    distill_substeps: int = 0  # > 0: train only at the Turbo preset's own 8 sigmas, towards where the teacher gets
    #                            in this many (guided) Euler steps from one of them to the next: one student pass
    #                            does what several teacher passes do (trajectory distillation; needs --init)
    turbo_steps: int = 8  # the preset the trajectory distillation trains for
    device: str = "auto"
    workers: int = 0  # 0: one per CPU core
    log_every: int = 25
    print_every: int = 250


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


# Words a user may add that the world does not have ("a beautiful red circle", "a red dragon"): a few training
# captions carry one, so the model learns to draw the rest of the caption and ignore them (the UI names them).
FILLER_RATE = 0.08


def _filler_words() -> list[str]:
    from zimage_ui.models.demo import VOCAB_WORDS
    from zimage_ui.models.shapes_world import world_words

    known = world_words()
    return sorted({w for w in VOCAB_WORDS if w not in known}) + ["dragon", "please", "very"]


def training_caption(seed: int, index: int, caption: str) -> str:
    """Training scene ``index``'s caption as trained on: sometimes with one out-of-world word inserted."""
    import random

    rng = random.Random(f"filler:{seed}:{index}")
    if rng.random() >= FILLER_RATE:
        return caption
    words = caption.split()
    words.insert(rng.randrange(len(words) + 1), rng.choice(_filler_words()))
    return " ".join(words)


def _render_chunk(job: tuple[int, int, int, int]):
    import numpy as np

    from zimage_ui.models.shapes_world import render, training_scene

    seed, start, stop, side = job
    scenes = [training_scene(seed, i) for i in range(start, stop)]
    pixels = np.stack([np.asarray(render(s, side), dtype=np.uint8) for s in scenes])
    return [training_caption(seed, i, s.caption) for i, s in zip(range(start, stop), scenes, strict=True)], pixels


def _judge_one(job):
    from zimage_ui.models.judge import read_picture, score

    scene, pixels = job
    reading = read_picture(pixels)
    return reading, score(scene, reading)


def render_dataset(cfg: TrainConfig, pool) -> tuple[list[str], Any]:
    """(captions, uint8 array N×side×side×3) of the first ``cfg.samples`` training scenes."""
    import numpy as np

    step = 500
    jobs = [(cfg.seed, a, min(a + step, cfg.samples), cfg.side) for a in range(0, cfg.samples, step)]
    captions: list[str] = []
    pixels = np.empty((cfg.samples, cfg.side, cfg.side, 3), dtype=np.uint8)
    at = 0
    for caps, px in pool.imap(_render_chunk, jobs):  # imap keeps order: sample i is always scene i
        captions += caps
        pixels[at:at + len(px)] = px
        at += len(px)
    return captions, pixels


# ---------------------------------------------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------------------------------------------


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _StepBudget:
    """Fixes a phase's step count once its speed is known: steps 10–30 are timed (the first ones pay for kernel
    selection), then the count becomes what fits in ``seconds`` (never more than asked; 0 seconds = no limit)."""

    def __init__(self, asked: int, seconds: float, device, log: dict, key: str):
        self.asked = self.total = asked
        self.seconds, self.device, self.log, self.key = seconds, device, log, key
        self.start = time.perf_counter()
        self.mark = 0.0
        self.losses: list[float] = []

    def step_done(self, done: int, loss, print_every: int) -> None:
        """After each step: record the loss (read every 5th step: a read syncs the GPU), fix the step count,
        print progress."""
        self.losses.append(float(loss.detach()) if (done - 1) % 5 == 0 else self.losses[-1])
        self.after(done)
        if done % print_every == 0:
            print(f"[train-demo] {self.key} step {done}/{self.total} loss {self.losses[-1]:.4f} "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)

    def finish(self, done: int, log_every: int) -> None:
        """Write the phase's steps, seconds and loss curve into the log."""
        _sync(self.device)
        tail = self.losses[-50:]
        self.log.update({f"{self.key}_steps": done, f"{self.key}_asked": self.asked,
                         f"{self.key}_seconds": time.perf_counter() - self.start,
                         f"{self.key}_loss_curve": _curve(self.losses, log_every),
                         f"{self.key}_final_loss": sum(tail) / len(tail)})

    def after(self, done: int) -> None:
        """Call after each step with the number of steps done."""
        if self.seconds <= 0 or done not in (10, 30) or self.total <= 30:
            return
        _sync(self.device)
        now = time.perf_counter()
        if done == 10:
            self.mark = now
            return
        per = (now - self.mark) / 20
        left = self.seconds - (now - self.start)
        self.total = max(30, min(self.total, 30 + int(left / per)))
        self.log[f"{self.key}_seconds_per_step"] = per


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _curve(losses: list[float], every: int) -> list[list[float]]:
    """[step, mean loss] over consecutive windows of ``every`` steps."""
    out = []
    for a in range(0, len(losses), every):
        window = losses[a:a + every]
        out.append([a + len(window), sum(window) / len(window)])
    return out


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_vae(vae, images, cfg: TrainConfig, device, budget_s: float, log: dict) -> None:
    """Train ``vae`` (in place) as an autoencoder on ``images`` (uint8 N×3×H×W on ``device``)."""
    import torch
    import torch.nn.functional as F

    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    n = images.shape[0]
    budget = _StepBudget(cfg.vae_steps, budget_s, device, log, "vae")
    step = 0
    while step < budget.total:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, budget.total, cfg.vae_lr, warmup=100)
        idx = torch.randint(n, (cfg.vae_batch,), generator=gen, device=device)
        x = images[idx].float() / 127.5 - 1.0
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
            rec = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        budget.step_done(step, loss, cfg.print_every)
    budget.finish(step, cfg.log_every)
    vae.eval().requires_grad_(False)


def encode_latents(vae, images, device, batch: int = 256):
    """Posterior means of every image, and (shift, scale) so that (z - shift) * scale has mean 0, std 1."""
    import torch

    out = []
    with torch.no_grad():
        for a in range(0, images.shape[0], batch):
            x = images[a:a + batch].float() / 127.5 - 1.0
            with _autocast(device):
                out.append(vae.encode(x).latent_dist.mean.float())
    z = torch.cat(out)
    shift, std = float(z.mean()), float(z.std())
    return z, shift, 1.0 / std


def tokenize_captions(tokenizer, captions: Sequence[str], device):
    """Token ids and masks of ``captions`` through the pipeline's own chat template (right-padded)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True) for c in captions]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device).bool()


SEQ_MULTI_OF = 32  # ZImageTransformer2DModel pads the caption and image sequences to a multiple of this


def batched_forward(tr, latents, t, cap_feats, cap_mask, patch: int = 2):
    """``ZImageTransformer2DModel.forward`` (basic mode) for a batch of same-size latents, in whole-batch operations.

    The model's own forward loops over the batch in Python (patchify, padding, position ids per sample): on a GPU a
    batch of 128 tiny samples spends most of its time launching those small kernels. This does the same arithmetic
    with the same modules when every caption pads to the same length (all at most ``SEQ_MULTI_OF`` tokens, as in
    the shapes world) and the image's token count is a multiple of it: the caption's padding positions take the
    model's ``cap_pad_token`` and positions ``1..P`` as the model gives them, the image's positions start at
    ``P + 1``. ``tests/models/test_demo_train.py`` checks it against the model's forward. Returns the model's
    output as one (B, C, H, W) tensor.

    ``cap_feats``: (B, L, D) right-padded caption features, ``cap_mask``: (B, L) bool, True on real tokens."""
    import torch

    b, c, h, w = latents.shape
    ht, wt = h // patch, w // patch
    n_img = ht * wt
    if n_img % SEQ_MULTI_OF:
        raise ValueError(f"{n_img} image tokens: not a multiple of {SEQ_MULTI_OF}")
    width = cap_feats.shape[1]
    p_len = max(SEQ_MULTI_OF, -(-width // SEQ_MULTI_OF) * SEQ_MULTI_OF)
    if width > SEQ_MULTI_OF:
        raise ValueError(f"captions of {width} tokens: they would pad to different lengths")
    if width < p_len:
        cap_feats = torch.nn.functional.pad(cap_feats, (0, 0, 0, p_len - width))
        cap_mask = torch.nn.functional.pad(cap_mask, (0, p_len - width), value=False)
    device = latents.device
    adaln = tr.t_embedder(t * tr.t_scale).type_as(latents)
    key = f"{patch}-1"
    # patchify: (B, C, H, W) -> (B, ht*wt, patch*patch*C), the model's token order (h, w, ph, pw, c)
    x = latents.view(b, c, ht, patch, wt, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, patch * patch * c)
    x = tr.all_x_embedder[key](x)
    cap_ids = torch.zeros(p_len, 3, dtype=torch.int32, device=device)
    cap_ids[:, 0] = torch.arange(1, p_len + 1, dtype=torch.int32, device=device)
    grid = torch.stack(torch.meshgrid(torch.arange(ht, device=device), torch.arange(wt, device=device),
                                      indexing="ij"), -1).reshape(-1, 2).to(torch.int32)
    img_ids = torch.cat([torch.full((n_img, 1), p_len + 1, dtype=torch.int32, device=device), grid], 1)
    x_freqs = tr.rope_embedder(img_ids)[None].expand(b, -1, -1)
    cap_freqs = tr.rope_embedder(cap_ids)[None].expand(b, -1, -1)
    for layer in tr.noise_refiner:
        x = layer(x, None, x_freqs, adaln)
    cap = tr.cap_embedder(cap_feats)
    cap = torch.where(cap_mask[..., None], cap, tr.cap_pad_token.to(cap.dtype))
    for layer in tr.context_refiner:
        cap = layer(cap, None, cap_freqs)
    u = torch.cat([x, cap], 1)
    u_freqs = torch.cat([x_freqs, cap_freqs], 1)
    for layer in tr.layers:
        u = layer(u, None, u_freqs, adaln)
    u = tr.all_final_layer[key](u, c=adaln)[:, :n_img]
    out_c = u.shape[-1] // (patch * patch)
    return u.view(b, ht, wt, patch, patch, out_c).permute(0, 5, 1, 3, 2, 4).reshape(b, out_c, h, w)


def _uncompile(module) -> None:
    """Undo ``compile_repeated_blocks`` (each block runs eagerly again)."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None


def turbo_sigmas(scheduler, steps: int = 8, side: int = 256) -> list[float]:
    """The sigmas ``ZImagePipeline`` steps through for ``steps`` passes at ``side``², ending at 0 (``steps + 1``
    values), computed the pipeline's own way from a copy of ``scheduler``.

    >>> from diffusers import FlowMatchEulerDiscreteScheduler
    >>> [round(x, 4) for x in turbo_sigmas(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))]
    [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    """
    from diffusers.pipelines.z_image.pipeline_z_image import (
        calculate_shift,
        get_default_z_image_sigmas,
        retrieve_timesteps,
    )

    sched = copy.deepcopy(scheduler)
    c = sched.config
    seq = (side // 16) ** 2  # latents are side/8, patched 2x2
    mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return [float(x) for x in sched.sigmas]


def euler_target(predict, xt, sigma_a, sigma_b, substeps: int):
    """The output that takes ``xt`` from ``sigma_a`` to ``sigma_b`` in one step of the pipeline's update
    (``x_next = x - (s_next - s) * output``) to where ``substeps`` such steps of ``predict(x, t)`` (``t = 1 - s``)
    take it. ``sigma_a``, ``sigma_b``: one per sample. One substep: ``predict`` itself; many: the ODE's path.

    >>> import torch
    >>> x, a, b = torch.ones(1, 1, 1, 1), torch.tensor([1.0]), torch.tensor([0.5])
    >>> [round(float(euler_target(lambda x, t: 2 * x, x, a, b, k)), 3) for k in (1, 2, 1000)]
    [2.0, 2.5, 3.434]

    (the exact path: ``x(0.5) = e``, so ``(1 - e) / (0.5 - 1) = 3.437``)
    """
    x = xt
    for k in range(substeps):
        s = sigma_a + (sigma_b - sigma_a) * (k / substeps)
        s_next = sigma_a + (sigma_b - sigma_a) * ((k + 1) / substeps)
        x = x - (s_next - s)[:, None, None, None] * predict(x, 1 - s)
    return (xt - x) / (sigma_b - sigma_a)[:, None, None, None]


def train_transformer(pipe, latents, captions, cfg: TrainConfig, device, budget_s: float, log: dict):
    """Train the transformer and text encoder together (flow matching); returns their EMA copies."""
    import torch
    import torch.nn.functional as F

    tr, te = pipe.transformer, pipe.text_encoder
    tr.train().requires_grad_(True)
    te.train().requires_grad_(True)
    ema_tr = copy.deepcopy(tr).eval().requires_grad_(False)
    ema_te = copy.deepcopy(te).eval().requires_grad_(False)
    # guidance (and trajectory) distillation: a frozen copy of the starting model is the teacher (eager)
    distill = cfg.distill_guidance > 0 or cfg.distill_substeps > 0
    teacher = (copy.deepcopy(ema_tr), copy.deepcopy(ema_te)) if distill else None
    if cfg.distill_guidance > 0:
        log["distill_guidance"] = cfg.distill_guidance
    grid = None
    if cfg.distill_substeps > 0:
        grid = torch.tensor(turbo_sigmas(pipe.scheduler, cfg.turbo_steps, cfg.side), device=device)
        log.update(distill_substeps=cfg.distill_substeps, turbo_sigmas=[round(float(x), 4) for x in grid])
    params = [p for p in list(tr.parameters()) + list(te.parameters())]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    # the empty prompt (caption dropout) last, padded to the same width as the captions
    ids, masks = tokenize_captions(pipe.tokenizer, list(captions) + [""], device)
    empty_ids, empty_mask, ids, masks = ids[-1:], masks[-1:], ids[:-1], masks[:-1]
    # whole-batch forward when every caption pads to the same length (the shapes world's do), else the model's own
    batched = ids.shape[1] <= SEQ_MULTI_OF and (cfg.side // 16) ** 2 % SEQ_MULTI_OF == 0
    log["dit_forward"] = "batched" if batched else "per-sample"
    if cfg.compile:
        tr.compile_repeated_blocks(fullgraph=False, dynamic=False)  # after the EMA copy: the copy stays eager
        log["dit_forward"] += ", compiled blocks"
    shift = float(pipe.scheduler.config.shift)
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)
    n = latents.shape[0]

    def predict(t_model, e_model, tok, mask, xt, t):
        hidden = e_model(input_ids=tok, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        if batched:
            return batched_forward(t_model, xt, t, hidden, mask).float()
        lengths = mask.sum(1).tolist()  # right-padded: row i's tokens are its first lengths[i]
        cap_feats = [hidden[i, :n] for i, n in enumerate(lengths)]
        out = t_model(list(xt.unsqueeze(2).unbind(0)), t, cap_feats, return_dict=False)[0]
        return torch.stack(out).squeeze(2).float()

    def guided_target(tok, mask, drop, xt, t):
        """The teacher's guided prediction (its unconditional one for dropped captions; with no guidance to
        distil, its conditional one)."""
        b = tok.shape[0]
        if cfg.distill_guidance <= 0:
            with torch.no_grad(), _autocast(device):
                return predict(*teacher, tok, mask, xt, t)
        with torch.no_grad(), _autocast(device):
            both = predict(*teacher, torch.cat([tok, empty_ids.expand(b, -1)]),
                           torch.cat([mask, empty_mask.expand(b, -1)]), torch.cat([xt, xt]), torch.cat([t, t]))
        cond, uncond = both[:b], both[b:]
        guided = uncond + cfg.distill_guidance * (cond - uncond)
        return torch.where(drop[:, None, None, None], uncond, guided)

    def trajectory_target(tok, mask, drop, xt, sigma_a, sigma_b):
        return euler_target(lambda x, t: guided_target(tok, mask, drop, x, t), xt, sigma_a, sigma_b,
                            cfg.distill_substeps)

    def forward_backward(tok, mask, xt, t, target):
        with _autocast(device):
            pred = predict(tr, te, tok, mask, xt, t)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    budget = _StepBudget(cfg.dit_steps, budget_s, device, log, "dit")
    step = 0
    while step < budget.total:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, budget.total, cfg.dit_lr, warmup=200)
        b = cfg.dit_batch
        idx = torch.randint(n, (b,), generator=gen, device=device)
        drop = torch.rand(b, generator=gen, device=device) < cfg.drop
        tok = torch.where(drop[:, None], empty_ids, ids[idx])
        mask = torch.where(drop[:, None], empty_mask, masks[idx])
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen, device=device)
        if grid is None:
            u = torch.rand(b, generator=gen, device=device)
            sigma = shift * u / (1 + (shift - 1) * u)
        else:  # one of the preset's steps, each as often
            step_of = torch.randint(len(grid) - 1, (b,), generator=gen, device=device)
            sigma, sigma_next = grid[step_of], grid[step_of + 1]
        s = sigma[:, None, None, None]
        xt = s * noise + (1 - s) * z0
        if teacher is None:
            target = z0 - noise
        elif grid is None:
            target = guided_target(tok, mask, drop, xt, 1 - sigma)
        else:
            target = trajectory_target(tok, mask, drop, xt, sigma, sigma_next)
        try:
            loss = forward_backward(tok, mask, xt, 1 - sigma, target)
        except Exception as exc:  # a compiler failure on the first step: go on eagerly, and say so in the log
            if not (cfg.compile and step == 0):
                raise
            log["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log["dit_forward"] = log["dit_forward"].replace(", compiled blocks", ", eager (compile failed)")
            print(f"[train-demo] compile failed, training eagerly: {log['compile_error'][:300]}", flush=True)
            _uncompile(tr)
            loss = forward_backward(tok, mask, xt, 1 - sigma, target)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_tr, tr), (ema_te, te)):
                torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)
        step += 1
        budget.step_done(step, loss, cfg.print_every)
    budget.finish(step, cfg.log_every)
    tr.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    return ema_tr, ema_te


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and outputs
# ---------------------------------------------------------------------------------------------------------------


def _sheet(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    if not images:
        return
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for i, img in enumerate(images):
        sheet.paste(img, ((i % cols) * w, (i // cols) * h))
    sheet.save(path)


def evaluate(pipe, cfg: TrainConfig, pool, out: Path) -> dict[str, Any]:
    """Judge the held-out prompts drawn by ``pipe`` (Turbo, and Standard on a subset) and the rendered truth."""
    import numpy as np
    import torch

    from zimage_ui.models.judge import summarise
    from zimage_ui.models.shapes_world import held_out_scenes, render

    scenes = held_out_scenes(cfg.eval_prompts)
    results: dict[str, Any] = {}
    truth_px = [np.asarray(render(s, cfg.side)) for s in scenes]
    truth = pool.map(_judge_one, list(zip(scenes, truth_px, strict=True)))
    results["ground_truth"] = summarise(r[1] for r in truth)
    # the VAE alone (encode, decode the truth): tells a VAE that loses shapes from a transformer that never drew them
    with torch.no_grad():
        x = torch.from_numpy(np.stack(truth_px[:64])).to(pipe._execution_device).permute(0, 3, 1, 2).float()
        rec = pipe.vae.decode(pipe.vae.encode(x / 127.5 - 1).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    results["vae_reconstruction"] = summarise(r[1] for r in pool.map(_judge_one, list(zip(scenes, rec, strict=False))))
    runs = [("turbo", scenes, 8, 0.0), ("standard", scenes[:cfg.eval_cfg_prompts], 25, 4.0)]
    for name, subset, steps, guidance in runs:
        t0 = time.perf_counter()
        images = []
        for a in range(0, len(subset), 50):
            chunk = subset[a:a + 50]
            gens = [torch.Generator(pipe._execution_device).manual_seed(a + i) for i in range(len(chunk))]
            images += pipe([s.caption for s in chunk], height=cfg.side, width=cfg.side, num_inference_steps=steps,
                           guidance_scale=guidance, generator=gens).images
        gen_s = time.perf_counter() - t0
        judged = pool.map(_judge_one, [(s, np.asarray(img)) for s, img in zip(subset, images, strict=True)])
        summary = summarise(r[1] for r in judged)
        summary.update(steps=steps, guidance=guidance, generate_seconds=gen_s)
        results[name] = summary
        _sheet(images[:32], out / f"samples_{name}.png")
        results[f"{name}_examples"] = [
            {"caption": s.caption, "read": {"background": r.background, "colour": r.colour, "shape": r.shape,
                                            "cell": r.cell, "count": r.count}, "score": sc}
            for s, (r, sc) in list(zip(subset, judged, strict=True))[:32]
        ]
    _sheet([render(s, cfg.side) for s in scenes[:32]], out / "samples_truth.png")
    return results


def _markdown(cfg: TrainConfig, log: dict[str, Any]) -> str:
    from zimage_ui.models.judge import TARGETS

    lines = ["# Demo model training log", "", f"Wall time {log['wall_seconds']:.0f} s on {log['device']}.", ""]
    if log.get("init"):
        lines += [f"Continued from `{log['init']}` (its VAE kept); guidance distillation "
                  f"w = {log.get('distill_guidance', 0)}"
                  + (f"; trajectory distillation, {log['distill_substeps']} teacher steps per Turbo step "
                     f"(sigmas {log['turbo_sigmas']})" if log.get("distill_substeps") else "") + ".", ""]
    lines += ["| phase | steps (asked) | seconds | final loss |", "|---|---|---|---|",
              f"| render {cfg.samples} scenes | | {log['render_seconds']:.1f} | |",
              f"| VAE | {log['vae_steps']} ({log['vae_asked']}) | {log['vae_seconds']:.1f} | "
              f"{log['vae_final_loss']:.4f} |",
              f"| transformer + text encoder | {log['dit_steps']} ({log['dit_asked']}) | {log['dit_seconds']:.1f} | "
              f"{log['dit_final_loss']:.4f} |",
              f"| evaluation | | {log['eval_seconds']:.1f} | |", ""]
    lines += ["## Judge on held-out prompts", "", "| run | prompts | background | colour | shape | position | count |",
              "|---|---|---|---|---|---|---|"]
    for name in ("ground_truth", "vae_reconstruction", "turbo", "standard"):
        m = log["metrics"][name]

        def pct(key: str, m: dict = m) -> str:
            return "n/a" if m.get(key) is None else f"{100 * m[key]:.1f}%"

        lines.append(f"| {name} | {m['prompts']} | {pct('background')} | {pct('colour')} | {pct('shape')} | "
                     f"{pct('position')} ({m['position_n']}) | {pct('count')} |")
    lines += ["", "Targets (Turbo): " + ", ".join(f"{k} ≥ {int(v * 100)}%" for k, v in TARGETS.items()), ""]
    for phase in ("vae", "dit"):
        lines += [f"## {phase} loss curve (mean per {cfg.log_every} steps)", "", "```"]
        curve = log[f"{phase}_loss_curve"]
        stride = max(1, len(curve) // 40)
        lines += [f"{int(s):6d}  {v:.5f}" for s, v in curve[::stride]] + ["```", ""]
    lines += ["## Config", "", "```json", json.dumps(log["config"], indent=1), "```", ""]
    return "\n".join(lines)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole programme; returns the log (also written to ``cfg.out``)."""
    # Deterministic cuBLAS needs this before CUDA starts (set here, in the run, never at import).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import multiprocessing

    clock = _Clock()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # The pool forks before torch touches CUDA (a forked CUDA context is unusable).
    workers = cfg.workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        return _train(cfg, clock, out, pool, workers)
    finally:
        pool.terminate()
        pool.join()


def _train(cfg: TrainConfig, clock: _Clock, out: Path, pool, workers: int) -> dict[str, Any]:
    if cfg.distill_substeps > 0 and not cfg.init:
        raise ValueError("--distill-substeps distils a trained model: give it with --init FILE")
    import torch

    from zimage_ui.models.demo import build_demo_pipeline, load_trained_pipeline, save_demo_weights

    log: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log["workers"] = workers
    print(f"[train-demo] device {log['device']}, {workers} render workers, budget {cfg.time_budget_s:.0f} s",
          flush=True)

    t0 = time.perf_counter()
    captions, pixels = render_dataset(cfg, pool)
    log["render_seconds"] = time.perf_counter() - t0
    print(f"[train-demo] rendered {len(captions)} scenes in {log['render_seconds']:.1f} s", flush=True)

    pipe = load_trained_pipeline(Path(cfg.init)) if cfg.init else build_demo_pipeline(cfg.seed, trained_sizes=True)
    for part in ("transformer", "text_encoder", "vae"):
        torch.nn.Module.to(getattr(pipe, part), device, torch.float32)
    images = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous()
    del pixels

    left = cfg.time_budget_s - clock.elapsed() - cfg.eval_reserve_s if cfg.time_budget_s > 0 else 0
    if cfg.init:  # continuing: the VAE and the latent scaling the transformer learnt in stay as they are
        log.update(init=cfg.init, vae_steps=0, vae_asked=0, vae_seconds=0.0, vae_final_loss=float("nan"),
                   vae_loss_curve=[])
        latents, _, _ = encode_latents(pipe.vae, images, device)
        shift, scale = float(pipe.vae.config.shift_factor), float(pipe.vae.config.scaling_factor)
    else:
        train_vae(pipe.vae, images, cfg, device, left * cfg.vae_share, log)
        print(f"[train-demo] VAE: {log['vae_steps']} steps, {log['vae_seconds']:.1f} s, "
              f"loss {log['vae_final_loss']:.4f}", flush=True)
        latents, shift, scale = encode_latents(pipe.vae, images, device)
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    log.update(latent_shift=shift, latent_scale=scale)
    del images

    left = cfg.time_budget_s - clock.elapsed() - cfg.eval_reserve_s if cfg.time_budget_s > 0 else 0
    ema_tr, ema_te = train_transformer(pipe, latents, captions, cfg, device, left, log)
    print(f"[train-demo] transformer: {log['dit_steps']} steps, {log['dit_seconds']:.1f} s, "
          f"loss {log['dit_final_loss']:.4f}", flush=True)
    del latents

    from diffusers import ZImagePipeline

    final = ZImagePipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=ema_te, tokenizer=pipe.tokenizer,
                           transformer=ema_tr)
    final.set_progress_bar_config(disable=True)
    weights = save_demo_weights(final, out / "demo.safetensors", info={"seed": cfg.seed})
    log["weights_bytes"] = weights.stat().st_size

    t0 = time.perf_counter()
    try:
        log["metrics"] = evaluate(final, cfg, pool, out)
    except Exception:
        # the weights are saved; keep the training record even when the evaluation breaks
        import traceback

        log.update(eval_error=traceback.format_exc(), wall_seconds=clock.elapsed())
        (out / "train_log.json").write_text(json.dumps(log, indent=1, default=_jsonable), encoding="utf-8")
        raise
    log["eval_seconds"] = time.perf_counter() - t0
    log["wall_seconds"] = clock.elapsed()
    m = log["metrics"]["turbo"]
    print(f"[train-demo] held-out Turbo: background {m['background']:.3f} colour {m['colour']:.3f} "
          f"shape {m['shape']:.3f} position {m['position']} in {log['wall_seconds']:.0f} s", flush=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1, default=_jsonable), encoding="utf-8")
    (out / "train_log.md").write_text(_markdown(cfg, log), encoding="utf-8")
    # re-save with the metrics in the weights' metadata (the file the product ships says how good it is)
    save_demo_weights(final, weights, info={"seed": cfg.seed, "turbo": {k: m[k] for k in ("background", "colour",
                                                                                           "shape", "position")},
                                            "dit_steps": log["dit_steps"], "vae_steps": log["vae_steps"]})
    return log


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Command line (zimage-ui train-demo)
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-demo`` flags (one per TrainConfig field)."""
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=value)
            continue
        kind = Path if name == "out" else type(value)
        parser.add_argument(flag, dest=name, type=kind, default=value, help=f"[default: {value}]")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zimage_ui.models.demo_train`` — the same as ``zimage-ui train-demo``."""
    parser = argparse.ArgumentParser(prog="zimage-ui train-demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    train(config_from_args(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
