"""Model folders that the plugin loads (see docs/architecture.md, "The model folder").

- :func:`write_tiny_checkpoint`: a complete folder with random weights of a preset's shapes,
  whose greedy answer depends on the image. Used by tests, the demo and the benchmarks. The
  ``bench`` preset gets a word-level tokenizer, so that its answers are canonical: sent back as
  history, they tokenize to the ids generated, and a consult's later turns find the whole
  history in the prefix cache, as with trained weights.
- :func:`write_model_folder`: the common tail: config, tokenizer, generation config, vision
  weights. The converter of released weights (``convert.py``) uses it too.

Layout::

    config.json               model_type skingpt4 (vision / qformer / text sub-configs)
    generation_config.json    the original demo's sampling defaults
    tokenizer files           + <ImageHere>, <ImagePad>, SkinGPT-4 chat template; a
                              SentencePiece tokenizer encodes each text piece as
                              SkinGPT-4's per-segment tokenization does
    tokenizer.model           (converted Llama-2 only) the release's SentencePiece model
    vision.safetensors        vision.{vit,ln_vision,query_tokens,qformer,llm_proj}.*
    model*.safetensors        the language model under its own Hugging Face names
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from encoders import VisionStack, get_preset
from plugins.skingpt4 import ARCHITECTURE
from plugins.skingpt4.config import SkinGPT4Config
from plugins.skingpt4.tokenizer import (
    add_skingpt4_tokens,
    build_tiny_tokenizer,
    build_word_tokenizer,
    encode_like_sentencepiece,
)

TEXT_ARCHITECTURES = {"falcon": "FalconForCausalLM", "llama": "LlamaForCausalLM"}
VISION_WEIGHTS = "vision.safetensors"
SENTENCEPIECE_MODEL = "tokenizer.model"
"""A Llama-2 release's SentencePiece model, copied along by the converter for the reference."""
# Presets whose generated checkpoints use the word-level tokenizer (canonical answers).
WORD_TOKENIZER_PRESETS = frozenset({"bench"})
# SkinGPT-4 demo defaults (sampling on, T=1.0, top_p=0.9, repetition penalty 1.0, 300 tokens).
GENERATION_DEFAULTS = dict(
    do_sample=True, temperature=1.0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=300
)


def write_model_folder(
    out: Path,
    *,
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    vision_config: dict,
    qformer_config: dict,
    text_config: dict,
    num_query_tokens: int,
    vision_state: dict[str, torch.Tensor] | None,
    dtype: str,
) -> SkinGPT4Config:
    """Write everything but the LM weights; return the folder's config."""
    out.mkdir(parents=True, exist_ok=True)
    text_config = dict(text_config)
    text_config.setdefault("vocab_size", len(tokenizer))
    text_config["architectures"] = [TEXT_ARCHITECTURES[family]]
    tokenizer = encode_like_sentencepiece(tokenizer)
    image_id, pad_id = add_skingpt4_tokens(tokenizer, family)
    tokenizer.save_pretrained(out)
    config = SkinGPT4Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_id=image_id,
        image_pad_token_id=pad_id,
        image_position_token_id=_position_token_id(tokenizer, text_config["vocab_size"]),
        architectures=[ARCHITECTURE],
        dtype=dtype,
    )
    config.save_pretrained(out)
    eos = [i for i in (tokenizer.eos_token_id,) if i is not None]
    gen = dict(GENERATION_DEFAULTS, eos_token_id=eos[0] if len(eos) == 1 else eos)
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if vision_state is not None:
        save_vision_weights(out, vision_state)
    return config


def _position_token_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The id image positions carry: the unknown token (never generated) when the LM has one."""
    unk = tokenizer.unk_token_id
    return unk if unk is not None and 0 <= unk < vocab_size else 0


def save_vision_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    """``vision.safetensors``: the stack's state dict under the ``vision.`` prefix."""
    save_file(
        {f"vision.{k}": v.contiguous() for k, v in state.items()},
        str(out / VISION_WEIGHTS),
        metadata={"format": "pt"},
    )


def _randomize(module: nn.Module, std: float, generator: torch.Generator) -> None:
    """N(0, std) for every weight matrix and embedding; norms stay at 1/0, biases at 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 or name.endswith(("query_tokens", "cls_token", "pos_embed")):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif "bias" in name.rsplit(".", 1)[-1]:  # bias, q_bias, v_bias
                p.zero_()


def _never_generate(lm: nn.Module, token_ids: list[int]) -> None:
    """Zero the output rows of ``token_ids``: their logit is 0 while the random rows give the
    others logits of a few units either side (std ``init_std`` x sqrt(hidden)), so greedy
    decoding, which takes the largest of about a thousand, does not pick them."""
    with torch.no_grad():
        lm.get_output_embeddings().weight[token_ids] = 0.0


def write_tiny_checkpoint(
    out: str | Path, preset: str = "tiny", family: str = "llama", seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None, word_tokenizer: bool | None = None,
) -> Path:
    """A complete model folder with random weights of ``preset``'s shapes (float32).

    ``tokenizer``: the language model's (e.g. a SentencePiece Llama tokenizer in tests); by
    default a small byte-level BPE of the family, or with ``word_tokenizer`` (default: for the
    ``WORD_TOKENIZER_PRESETS``) a word-level one whose decode/encode round-trips; then the
    output rows of the special tokens other than EOS are zero, so that greedy answers never
    hold a token that decoding drops. The vocabulary is the tokenizer's size.
    """
    out = Path(out)
    spec = get_preset(preset)
    if family not in spec.text:
        raise ValueError(f"unknown language model {family!r}; choose one of {sorted(spec.text)}")
    if word_tokenizer is None:
        word_tokenizer = tokenizer is None and preset in WORD_TOKENIZER_PRESETS
    if word_tokenizer and tokenizer is not None:
        raise ValueError("give a tokenizer or word_tokenizer=True, not both")
    if tokenizer is None:
        tokenizer = build_word_tokenizer(family) if word_tokenizer else build_tiny_tokenizer(family)
    text = dict(spec.text[family])
    text["vocab_size"] = len(tokenizer)  # the image tokens are added after: outside the vocab
    if tokenizer.bos_token_id is not None:
        text["bos_token_id"] = tokenizer.bos_token_id
    text["eos_token_id"] = tokenizer.eos_token_id
    text["pad_token_id"] = None
    text["tie_word_embeddings"] = False

    generator = torch.Generator().manual_seed(seed)
    config = write_model_folder(
        out, family=family, tokenizer=tokenizer, vision_config=spec.vision,
        qformer_config=spec.qformer, text_config=text,
        num_query_tokens=spec.num_query_tokens, vision_state=None, dtype="float32",
    )
    vision = VisionStack(
        config.vision_config, config.qformer_config, config.num_query_tokens,
        config.text_config.hidden_size,
    )
    _randomize(vision, spec.init_std, generator)
    save_vision_weights(out, vision.state_dict())
    lm = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.float32)
    _randomize(lm, spec.init_std, generator)
    if word_tokenizer:
        # The LM's vocabulary ends before the image tokens, which are special too.
        _never_generate(lm, [i for i in tokenizer.all_special_ids
                             if i != tokenizer.eos_token_id and i < text["vocab_size"]])
    save_file(
        {k: v.contiguous() for k, v in lm.state_dict().items()},
        str(out / "model.safetensors"), metadata={"format": "pt"},
    )
    return out
