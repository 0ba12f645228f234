"""The embedded demo model: a tiny ``ZImagePipeline`` of the real architecture, built in memory.

With no GPU and no downloaded weights the whole product still runs end to end on it, and every test uses it.
:func:`build_demo_pipeline` builds it untrained (random weights of a fixed seed: a model of the right shape for
tests). :func:`load_demo_pipeline` — what ``--model demo`` runs — loads the weights shipped in
``demo_weights/demo.safetensors`` when they are there: a model trained by ``zimage-ui train-demo`` on the shapes
world (``shapes_world.py``), which draws "a red circle on a blue background"; without that file it falls back to
the untrained builder. Everything that shows a model name says "demo model".

    >>> pipe = build_demo_pipeline()
    >>> type(pipe).__name__
    'ZImagePipeline'

Keep all of its construction in this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from zimage_ui.messages import Message

DEMO_MODEL_ID = "demo"
DEMO_MODEL_LABEL = "demo model (tiny, untrained)"
DEMO_TRAINED_LABEL = "demo model (tiny, trained on simple shapes)"
DEMO_SEED = 20251126
DEMO_WEIGHTS = Path(__file__).with_name("demo_weights") / "demo.safetensors"
WEIGHTS_FORMAT = "zimage-ui-demo/1"
TRAINED_SIDE = 256  # the trained demo model draws 256x256 pictures (its training resolution)

# The trained demo model's sizes (``zimage-ui train-demo`` trains these; its weights file carries them too), chosen
# so a 256x256 Turbo image (8 passes) takes well under 2 s on 2 CPU cores while keeping every structural feature of
# the released model: 16 latent channels, 8x VAE, patch 2, qk-norm, 3-axis RoPE, refiners.
# head_dim = dim / n_heads = sum(axes_dims) = 32. The VAE's full-resolution stage (16 channels) is its costly part.
TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=192,
    n_layers=5,
    n_refiner_layers=1,
    n_heads=6,
    n_kv_heads=6,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=128,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 512, 512],
)
TEXT_ENCODER_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,  # the pipeline reads hidden_states[-2]: the output of the second layer
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    scaling_factor=0.3611,  # the trained weights carry their own (measured on their latents)
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

# The untrained builder's sizes: the same architecture, smaller, so that what runs it untrained (the fallback
# without the weights file, and the many tests that generate at 512-1024² on a CPU) stays fast — a 1024² CFG step
# costs ~0.8 CPU-seconds here against ~5.4 at the trained sizes.
UNTRAINED_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=64)
UNTRAINED_TEXT_ENCODER_CONFIG = dict(TEXT_ENCODER_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1)
UNTRAINED_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=[16, 16, 32, 32])

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]
# Qwen3's template, reduced to what ZImagePipeline uses (a user turn, generation prompt, enable_thinking=True).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
VOCAB_WORDS = (
    "a an the of and with in on at by for to from under over near behind beside user assistant "
    "red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright "
    "circle square triangle star heart line dot ring cube sphere cat dog bird fish horse tree flower sun moon "
    "sky sea river mountain city house street car boat cloud rain snow fire water forest field garden portrait "
    "photo painting drawing sketch watercolor oil cinematic realistic detailed beautiful small big tiny huge "
    "old young man woman child girl boy face eyes hair hat dress coat night day morning evening sunset sunrise "
    "blurry deformed extra fingers lowres bad anatomy ugly"
).split()


def vocabulary() -> list[str]:
    """The tokenizer's words: the general ones above and every word of the shapes world."""
    from zimage_ui.models.shapes_world import world_words

    return sorted(set(VOCAB_WORDS) | world_words())


def build_demo_tokenizer():
    """A word-level tokenizer with a Qwen-style chat template, built with the ``tokenizers`` library.

    Punctuation is read as a space ("a red circle, on blue" = "a red circle on blue")."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIAL_TOKENS[:5])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="[UNK]",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_demo_pipeline(seed: int = DEMO_SEED, *, trained_sizes: bool = False):
    """Build the untrained demo ``ZImagePipeline`` (float32, CPU). Same seed → bit-identical weights.

    ``trained_sizes``: the trained model's sizes (what ``train-demo`` starts from) instead of the small ones."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    te_cfg, tr_cfg, vae_cfg = ((TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG) if trained_sizes else
                               (UNTRAINED_TEXT_ENCODER_CONFIG, UNTRAINED_TRANSFORMER_CONFIG, UNTRAINED_VAE_CONFIG))
    tokenizer = build_demo_tokenizer()
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **te_cfg)).eval()
        transformer = ZImageTransformer2DModel(**tr_cfg).eval()
        vae = AutoencoderKL(**vae_cfg).eval()
        with torch.no_grad():
            # diffusers zero-initialises the final layers; give them weights so the image depends on prompt
            # and seed instead of being flat grey.
            for p in transformer.parameters():
                if p.dim() > 1 and float(p.abs().max()) == 0.0:
                    p.normal_(0.0, 0.02)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Trained weights
# ---------------------------------------------------------------------------------------------------------------

_PARTS = ("transformer", "text_encoder", "vae")


WEIGHTS_ENV = "ZIMAGE_UI_DEMO_WEIGHTS"
"""Environment variable: another demo-weights file to load instead of the shipped one, or ``untrained`` for the
untrained builder (the test suite runs most tests on it: smaller, so large pictures stay cheap on a CPU)."""


def demo_weights_path() -> Path | None:
    """The weights file ``--model demo`` loads: ``$ZIMAGE_UI_DEMO_WEIGHTS`` or the shipped one; None when there is
    none (or the variable says ``untrained``)."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    if value.lower() == "untrained":
        return None
    path = Path(value) if value else DEMO_WEIGHTS
    return path if path.is_file() else None


def has_trained_weights(path: Path | None = None) -> bool:
    """Whether the trained weights file is there (``zimage-ui train-demo`` writes it)."""
    return path.is_file() if path is not None else demo_weights_path() is not None


def save_demo_weights(pipe: Any, path: Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``pipe``'s three trained parts (float32) into one safetensors file, their configs in its metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for part in _PARTS:
        for key, value in getattr(pipe, part).state_dict().items():
            tensors[f"{part}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    # the whole config (transformers 5 keeps rope_theta inside rope_parameters), less bookkeeping
    te_config = {k: v for k, v in pipe.text_encoder.config.to_dict().items()
                 if k not in ("transformers_version", "id2label", "label2id", "_name_or_path", "architectures")}
    meta = {
        "format": WEIGHTS_FORMAT,
        "transformer": json.dumps(dict(pipe.transformer.config)),
        "text_encoder": json.dumps(te_config),
        "vae": json.dumps(dict(pipe.vae.config)),
        "vocabulary": json.dumps(vocabulary()),
        "info": json.dumps(info or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _config(meta: dict[str, str], part: str) -> dict[str, Any]:
    cfg = json.loads(meta[part])
    return {k: (tuple(v) if k in ("all_patch_size", "all_f_patch_size") else v) for k, v in cfg.items()
            if not k.startswith("_")}


def load_trained_pipeline(path: Path | None = None):
    """The demo ``ZImagePipeline`` with the trained weights of ``path`` (default: the shipped file), float32, CPU.

    Raises ``ValueError`` when the file is not a demo-weights file or was trained with another vocabulary."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path or DEMO_WEIGHTS)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a {WEIGHTS_FORMAT} weights file")
    if json.loads(meta["vocabulary"]) != vocabulary():
        raise ValueError(f"{path}: trained with another vocabulary; retrain with `zimage-ui train-demo`")
    state = load_file(str(path))
    tokenizer = build_demo_tokenizer()
    with torch.random.fork_rng(devices=[]):  # the modules' random init is overwritten; keep the caller's RNG
        text_encoder = Qwen3Model(Qwen3Config.from_dict(json.loads(meta["text_encoder"]))).eval()
        transformer = ZImageTransformer2DModel(**_config(meta, "transformer")).eval()
        vae = AutoencoderKL(**_config(meta, "vae")).eval()
    for part, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        prefix = part + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    # The engine's hook for notes on a request (see Engine.notes_for): words this model was never taught, sizes it
    # was not trained at.
    tokenizer.request_notes = request_notes
    return pipe


def load_demo_pipeline():
    """What ``--model demo`` runs: the trained demo model when its weights are shipped, else the untrained one."""
    path = demo_weights_path()
    return load_trained_pipeline(path) if path is not None else build_demo_pipeline()


def is_trained(pipe: Any) -> bool:
    """Whether ``pipe`` is the trained demo model (it carries the request-notes hook)."""
    return getattr(getattr(pipe, "tokenizer", None), "request_notes", None) is request_notes


def demo_label(trained: bool | None = None) -> str:
    """The demo model's name for the UI and logs (trained or not; default: whether the weights are shipped)."""
    trained = has_trained_weights() if trained is None else trained
    return DEMO_TRAINED_LABEL if trained else DEMO_MODEL_LABEL


def demo_description(trained: bool | None = None) -> str:
    """What the demo model's pictures are, for the banner and the logs."""
    trained = has_trained_weights() if trained is None else trained
    if trained:
        from zimage_ui.models.shapes_world import EXAMPLE_PROMPTS

        return (f"it draws simple shapes and colours at {TRAINED_SIDE}×{TRAINED_SIDE} — try "
                f"'{EXAMPLE_PROMPTS[0]}'")
    return "its images are abstract colour fields"


def prompt_notes(prompt: str) -> list[Message]:
    """Notes on a prompt for the trained demo model: the words it does not know (they are not drawn)."""
    from zimage_ui.models.shapes_world import unknown_words

    unknown = unknown_words(prompt)
    if not unknown:
        return []
    return [Message("note.demo_unknown_words", {"words": list(unknown)})]


def request_notes(request: Any) -> list[Message]:
    """Notes on a request (``prompt``, ``width``, ``height``) for the trained demo model, as messages: unknown
    words, and a size other than the one it was trained at."""
    notes = prompt_notes(request.prompt)
    if (request.width, request.height) != (TRAINED_SIDE, TRAINED_SIDE):
        notes.append(Message("note.demo_size", {"side": TRAINED_SIDE, "width": request.width,
                                                "height": request.height}))
    return notes
