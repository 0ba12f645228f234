"""The embedded demo model: a tiny ``ZImagePipeline`` of the real architecture, built in memory.

With no GPU and no weights the whole product still runs end to end on it, and every test uses it. It is untrained,
so its images are abstract colour fields; everything that shows a model name says "demo model".

    >>> pipe = build_demo_pipeline()
    >>> type(pipe).__name__
    'ZImagePipeline'

A later issue gives it trained weights; keep all of its construction in this module.
"""

from __future__ import annotations

import torch

DEMO_MODEL_ID = "demo"
DEMO_MODEL_LABEL = "demo model (tiny, untrained)"
DEMO_SEED = 20251126

# Sizes chosen so a 256x256 Turbo image (8 passes) takes well under 2 s on 2 CPU cores while keeping every
# structural feature of the released model: 16 latent channels, 8x VAE, patch 2, qk-norm, 3-axis RoPE, refiners.
TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=64,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 512, 512],
)
TEXT_ENCODER_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
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
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=1,
    norm_num_groups=8,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

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


def build_demo_tokenizer():
    """A word-level tokenizer with a Qwen-style chat template, built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(set(VOCAB_WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIAL_TOKENS[:5])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="[UNK]",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_demo_pipeline(seed: int = DEMO_SEED):
    """Build the demo ``ZImagePipeline`` (float32, CPU). Same seed → bit-identical weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_demo_tokenizer()
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG)).eval()
        transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
        vae = AutoencoderKL(**VAE_CONFIG).eval()
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
