"""The trainer's whole-batch transformer forward is the model's own forward, in fewer, larger operations.

``train-demo`` trains through :func:`batched_forward` (the model's forward loops over the batch in Python, which on
a GPU costs more than the arithmetic for a tiny model); what it learns must be what ``ZImagePipeline`` runs.
"""

from __future__ import annotations

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
