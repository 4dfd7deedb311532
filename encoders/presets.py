"""Model sizes as data: the full SkinGPT-4 architecture and small stand-ins of the same shape.

- ``skingpt4``: EVA ViT-g/14 (39 blocks, width 1408) + BLIP-2 Q-Former (BERT-base) + projection
  into Falcon-40B-Instruct (hidden 8192) or Llama-2-13b-chat (hidden 5120).
- ``tiny``: seconds on a CPU; for tests and the demo.
- ``bench``: small, but the language model has about 40x the parameters of the vision stack, as
  ViT-g + Q-Former (about 1.1B) against Falcon-40B, so benchmarks stress the decoder as
  production does.

Every size keeps 224-pixel input, 14-pixel patches (257 tokens) and 32 query tokens, so data
flows with production shapes. Attention head sizes are at least 32 (vLLM's CPU kernel rejects 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

LLMFamily = Literal["falcon", "llama"]
LLM_FAMILIES: tuple[str, ...] = ("falcon", "llama")


@dataclass(frozen=True)
class Preset:
    name: str
    vision: dict[str, Any]
    """Blip2VisionConfig fields of the EVA ViT."""
    qformer: dict[str, Any]
    """Blip2QFormerConfig fields."""
    text: dict[str, dict[str, Any]]
    """Language-model config fields per family (``falcon``, ``llama``)."""
    num_query_tokens: int = 32
    init_std: float = 0.02
    """Std of random weights in generated checkpoints. Tiny models with 0.02 answer the same
    whatever the image; a larger std makes the greedy answer depend on it."""
    description: str = ""


_FULL_VISION = dict(
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
    image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
)
_FULL_QFORMER = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12,
)
# Falcon-40B-Instruct and Llama-2-13b-chat-hf, from their released config.json files.
_FALCON_40B = dict(
    model_type="falcon", hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
    num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
    vocab_size=65024, bos_token_id=11, eos_token_id=11, layer_norm_epsilon=1e-5,
    max_position_embeddings=2048,
)
_LLAMA2_13B = dict(
    model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, rms_norm_eps=1e-5,
    max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
)


def _small_text(hidden: int, layers: int, heads: int, inter: int, vocab: int) -> dict[str, dict]:
    return {
        "falcon": dict(
            model_type="falcon", hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_kv_heads=max(1, heads // 2),
            new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
            vocab_size=vocab, layer_norm_epsilon=1e-5, max_position_embeddings=2048,
        ),
        "llama": dict(
            model_type="llama", hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), vocab_size=vocab, rms_norm_eps=1e-5,
            max_position_embeddings=2048,
        ),
    }


PRESETS: dict[str, Preset] = {
    "skingpt4": Preset(
        name="skingpt4",
        vision=_FULL_VISION,
        qformer=_FULL_QFORMER,
        text={"falcon": _FALCON_40B, "llama": _LLAMA2_13B},
        description="SkinGPT-4: EVA ViT-g/14 + Q-Former + Falcon-40B or Llama-2-13B",
    ),
    "tiny": Preset(
        name="tiny",
        vision=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            cross_attention_frequency=2, encoder_hidden_size=64, layer_norm_eps=1e-12,
        ),
        # vocab_size is replaced by the generated tokenizer's size.
        text=_small_text(hidden=64, layers=2, heads=2, inter=128, vocab=0),
        init_std=0.3,
        description="seconds on a CPU; tests and demo",
    ),
    "bench": Preset(
        name="bench",
        vision=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
            image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            cross_attention_frequency=2, encoder_hidden_size=96, layer_norm_eps=1e-12,
        ),
        text=_small_text(hidden=512, layers=6, heads=8, inter=1280, vocab=0),
        init_std=0.3,
        description="language model ~40x the vision stack, for CPU benchmarks",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
