"""The trainer's whole-batch transformer forward is the model's own forward, in fewer, larger operations.

``train-demo`` trains through :func:`batched_forward` (the model's forward loops over the batch in Python, which on
a GPU costs more than the arithmetic for a tiny model); what it learns must be what ``ZImagePipeline`` runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from zimage_ui.models.demo import build_demo_pipeline
from zimage_ui.models.demo_train import SEQ_MULTI_OF, batched_forward, tokenize_captions

CAPTIONS = ["a red circle", "three large black crosses on a brown background", "",
            "a small green dragon triangle in the top left corner on a yellow background"]


@pytest.fixture(scope="module")
def parts():
    pipe = build_demo_pipeline(seed=5)
    ids, mask = tokenize_captions(pipe.tokenizer, CAPTIONS, "cpu")
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(len(CAPTIONS), 16, 32, 32, generator=gen)
    t = torch.rand(len(CAPTIONS), generator=gen)
    return pipe.transformer, latents, t, hidden, mask


def model_forward(tr, latents, t, hidden, mask):
    caps = [hidden[i, :n] for i, n in enumerate(mask.sum(1).tolist())]
    with torch.no_grad():
        out = tr(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def test_batched_forward_equals_the_models_forward(parts):
    tr, latents, t, hidden, mask = parts
    assert len(set(mask.sum(1).tolist())) == len(CAPTIONS)  # every caption a different length (padding matters)
    expected = model_forward(tr, latents, t, hidden, mask)
    with torch.no_grad():
        got = batched_forward(tr, latents, t, hidden, mask)
    assert got.shape == expected.shape == latents.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # each sample's own caption counts: the same latents under shuffled captions give other outputs
    with torch.no_grad():
        shuffled = batched_forward(tr, latents, t, hidden.roll(1, 0), mask.roll(1, 0))
    assert (shuffled - expected).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_caption_padding_is_the_models(parts):
    # positions past a caption's end take the model's pad token, not the text encoder's output there
    tr, latents, t, hidden, mask = parts
    with torch.no_grad():
        full = batched_forward(tr, latents, t, hidden, torch.ones_like(mask))
    assert not torch.allclose(full, model_forward(tr, latents, t, hidden, mask), atol=1e-4)


def test_too_long_captions_are_refused(parts):
    tr, latents, t, hidden, mask = parts
    long_hidden = torch.cat([hidden, hidden], 1)[:, :SEQ_MULTI_OF + 1]
    long_mask = torch.ones(long_hidden.shape[:2], dtype=torch.bool)
    with pytest.raises(ValueError, match="pad to different lengths"):
        batched_forward(tr, latents, t, long_hidden, long_mask)


@pytest.mark.slow
def test_continuing_with_guidance_distillation_keeps_the_vae_and_trains_the_rest(tmp_path, trained_demo):
    """``--init FILE --distill-guidance W``: the VAE and its latent scaling come from FILE unchanged (the transformer
    learnt in that latent space); the transformer moves towards the frozen copy's guided prediction."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from zimage_ui.models.demo_train import TrainConfig, train

    log = train(TrainConfig(out=tmp_path, init=str(trained_demo), distill_guidance=3.0, samples=64, dit_steps=2,
                            dit_batch=4, eval_prompts=2, eval_cfg_prompts=1, time_budget_s=0, workers=1,
                            device="cpu"))
    assert log["init"] == str(trained_demo) and log["vae_steps"] == 0 and log["distill_guidance"] == 3.0
    assert log["dit_steps"] == 2 and math.isfinite(log["dit_final_loss"])
    before, after = load_file(str(trained_demo)), load_file(str(tmp_path / "demo.safetensors"))
    vae = [k for k in before if k.startswith("vae.")]
    assert vae and all(torch.equal(before[k], after[k]) for k in vae)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    metas = []
    for path in (trained_demo, tmp_path / "demo.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metas.append(json.loads(f.metadata()["vae"]))
    assert (metas[1]["shift_factor"], metas[1]["scaling_factor"]) == (metas[0]["shift_factor"],
                                                                       metas[0]["scaling_factor"])


def test_the_euler_target_of_one_substep_is_the_prediction_and_of_many_the_odes_path():
    from zimage_ui.models.demo_train import euler_target

    g = torch.Generator().manual_seed(0)
    xt = torch.randn(3, 4, 2, 2, generator=g)
    a, b = torch.tensor([1.0, 0.75, 0.3]), torch.tensor([0.9545, 0.6429, 0.0])
    weight = torch.randn(4, 4, generator=g) * 0.5

    def predict(x, t):  # a linear teacher: x' = -W x along sigma, so the exact path is a matrix exponential
        return torch.einsum("ij,bjhw->bihw", weight, x)

    assert torch.allclose(euler_target(predict, xt, a, b, 1), predict(xt, 1 - a), atol=1e-5)  # (x - x')/ds rounds
    for i in range(3):
        exact = torch.einsum("ij,jhw->ihw", torch.linalg.matrix_exp(-weight * float(b[i] - a[i])), xt[i])
        want = (xt[i] - exact) / float(b[i] - a[i])
        assert torch.allclose(euler_target(predict, xt, a, b, 2000)[i], want, atol=1e-3)
        assert not torch.allclose(euler_target(predict, xt, a, b, 1)[i], want, atol=1e-3)  # one step is not it


def test_turbo_sigmas_are_the_pipelines_own(trained_demo):
    """What trajectory distillation trains at: the sigmas ZImagePipeline's Turbo run really steps through."""
    from zimage_ui.models.demo import load_trained_pipeline
    from zimage_ui.models.demo_train import turbo_sigmas

    pipe = load_trained_pipeline(trained_demo)
    seen = []
    original = pipe.scheduler.step

    def step(model_output, timestep, sample, **kw):
        seen.append(float(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0]))
        return original(model_output, timestep, sample, **kw)

    pipe.scheduler.step = step
    pipe("a red circle", height=256, width=256, num_inference_steps=8, guidance_scale=0.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert seen == pytest.approx(turbo_sigmas(pipe.scheduler, 8, 256)[:-1])


@pytest.mark.slow
def test_trajectory_distillation_trains_at_the_turbo_sigmas_and_needs_a_teacher(tmp_path, trained_demo):
    from safetensors.torch import load_file

    from zimage_ui.models.demo_train import TrainConfig, train

    common = dict(samples=64, dit_steps=2, dit_batch=4, eval_prompts=2, eval_cfg_prompts=1, time_budget_s=0,
                  workers=1, device="cpu")
    with pytest.raises(ValueError, match="--init"):
        train(TrainConfig(out=tmp_path / "no-init", distill_substeps=2, **common))
    log = train(TrainConfig(out=tmp_path, init=str(trained_demo), distill_guidance=3.0, distill_substeps=2, **common))
    assert log["distill_substeps"] == 2 and len(log["turbo_sigmas"]) == 9 and log["turbo_sigmas"][-1] == 0.0
    assert log["dit_steps"] == 2 and math.isfinite(log["dit_final_loss"])
    before, after = load_file(str(trained_demo)), load_file(str(tmp_path / "demo.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    assert "trajectory distillation, 2 teacher steps" in (tmp_path / "train_log.md").read_text()
