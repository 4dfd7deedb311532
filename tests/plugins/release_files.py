"""SkinGPT-4's released files, fabricated in their original layouts for the converter's tests.

- :func:`make_release`: from a generated model folder, by inverting the key tables (tiny sizes).
- :func:`make_full_size_release`: from scratch, at the release's own sizes and dtypes: a flat
  fp16 ``eva_vit_g.pth`` with 40 blocks, the BLIP-2 Q-Former ``{"model": ...}`` with its text
  branch and heads, the SkinGPT-4 ``.pth`` with ``llama_proj`` 768 -> 5120, and a Llama of
  Llama-2-13b-chat's width (hidden 5120, 40 heads, vocabulary 32000, fp16 shards) cut to a few
  layers, with a SentencePiece tokenizer of exactly 32000 pieces (so the image tokens land past
  the vocabulary, as on the real release).
- :func:`train_llama2_sentencepiece` / :func:`write_llama2_tokenizer`: a SentencePiece model with
  Llama-2's trainer settings, shipped as Llama-2 folders ship it.

Every file is written tensor by tensor where it can be, so the full size needs about the
largest file's worth of memory (the 2 GiB ViT), not the whole model's.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from encoders import get_preset
from plugins.skingpt4.checkpoint import VISION_WEIGHTS
from plugins.skingpt4.config import SkinGPT4Config
from plugins.skingpt4.convert import (
    INDEX_FILE,
    PROJ_KEYS,
    QFORMER_KEYS,
    KeyMap,
    expected_shapes,
    vit_keys,
)
from plugins.skingpt4.tokenizer import _CORPUS, build_tiny_tokenizer

LLAMA2_TOKENIZER_CONFIG = {  # as in Llama-2-13b-chat-hf, less the chat template
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
    "clean_up_tokenization_spaces": False, "model_max_length": 4096, "sp_model_kwargs": {},
}


# --- tokenizers ------------------------------------------------------------------------------


def _filler_sentences(count: int, seed: int = 0) -> Iterator[str]:
    """Made-up words, so that a BPE vocabulary as large as Llama-2's has something to learn."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    for _ in range(count):
        yield " ".join(rng.choice(words) for _ in range(12))


def train_llama2_sentencepiece(vocab_size: int) -> bytes:
    """A SentencePiece BPE model with Llama-2's trainer settings (byte fallback, dummy prefix,
    whitespace kept as is, identity normalization, <unk>/<s>/</s> = 0/1/2) and exactly
    ``vocab_size`` pieces: SkinGPT-4's prompt texts, plus made-up words for large vocabularies."""
    import sentencepiece as spm

    sentences = list(_CORPUS * 4)
    if vocab_size > 1000:
        sentences += list(_filler_sentences(40000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return model.getvalue()


def write_llama2_tokenizer(out: Path, sp_model: bytes, variant: str = "tokenizer-json") -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` (+ ``tokenizer.json``) as Llama-2 ships.
    ``variant``: ``legacy``, ``non-legacy``, or ``tokenizer-json`` (non-legacy with the fast
    tokenizer's file, as the Llama-2 release has)."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(sp_model)
    config = dict(LLAMA2_TOKENIZER_CONFIG, legacy=variant == "legacy")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if variant == "tokenizer-json":
        # Llama-2's tokenizer.json: the per-piece dummy prefix as a normalizer, no pre-tokenizer.
        backend = AutoTokenizer.from_pretrained(out).backend_tokenizer
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.pre_tokenizer = None
        backend.save(str(out / "tokenizer.json"))


# --- from a generated model folder (tiny sizes) ----------------------------------------------


def released(state: dict[str, torch.Tensor], keys: KeyMap) -> dict[str, torch.Tensor]:
    """Our state dict -> the part one released file holds, under the released names."""
    out = {}
    for k, v in state.items():
        original = keys.to_original(k)
        if original is not None:
            out[original] = v.clone()
    return out


def blip2_extras(qformer: dict, vocab: int = 30, positions: int = 16,
                 make: Callable[[tuple[int, ...]], torch.Tensor] = torch.randn
                 ) -> dict[str, torch.Tensor]:
    """Keys of the BLIP-2 file that SkinGPT-4 does not use (the converter drops them by name):
    the Q-Former's text branch and ``cls`` head, and BLIP-2's T5 and contrastive heads."""
    hidden, inter = qformer["hidden_size"], qformer["intermediate_size"]
    extras = {
        "Qformer.bert.embeddings.word_embeddings.weight": make((vocab, hidden)),
        "Qformer.bert.embeddings.position_embeddings.weight": make((positions, hidden)),
        "Qformer.bert.embeddings.position_ids": torch.arange(positions)[None],
        "Qformer.cls.predictions.bias": make((vocab,)),
        "Qformer.cls.predictions.transform.dense.weight": make((hidden, hidden)),
        "t5_model.shared.weight": make((30, 8)),
        "t5_proj.weight": make((8, hidden)),
        "t5_proj.bias": make((8,)),
        "vision_proj.weight": make((256, hidden)),
        "text_proj.weight": make((256, hidden)),
        "itm_head.weight": make((2, hidden)),
        "temp": torch.tensor(0.07),
    }
    for n in range(qformer["num_hidden_layers"]):  # the text branch of every layer
        layer = f"Qformer.bert.encoder.layer.{n}"
        extras |= {
            f"{layer}.intermediate.dense.weight": make((inter, hidden)),
            f"{layer}.intermediate.dense.bias": make((inter,)),
            f"{layer}.output.dense.weight": make((hidden, inter)),
            f"{layer}.output.dense.bias": make((hidden,)),
            f"{layer}.output.LayerNorm.weight": make((hidden,)),
            f"{layer}.output.LayerNorm.bias": make((hidden,)),
        }
    return extras


def _write_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """``model.safetensors``, or ``shards`` files with ``model.safetensors.index.json``."""
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index))


def make_release(
    tiny: Path, family: str, root: Path, write_tokenizer: Callable[[Path], None] | None = None
) -> dict[str, Path]:
    """The four inputs of ``convert_release`` in their released layouts, holding the weights of
    the generated folder ``tiny``. ``write_tokenizer`` writes the LLM folder's tokenizer files
    (default: the family's tiny byte-level BPE, without the image tokens)."""
    if write_tokenizer is None:
        write_tokenizer = build_tiny_tokenizer(family).save_pretrained
    root.mkdir(parents=True)
    ours = {k.removeprefix("vision."): v for k, v in load_file(str(tiny / VISION_WEIGHTS)).items()}
    config = SkinGPT4Config.from_pretrained(tiny)
    depth = config.vision_config.num_hidden_layers

    vit = released(ours, vit_keys(depth))
    block0 = {k.removeprefix("blocks.0."): v for k, v in vit.items() if k.startswith("blocks.0.")}
    # The release's 40th block: one more than BLIP-2 builds.
    vit |= {f"blocks.{depth}.{k}": torch.randn_like(v) for k, v in block0.items()}
    torch.save(vit, root / "eva_vit_g.pth")

    qformer = config.qformer_config.to_dict()
    blip2 = released(ours, QFORMER_KEYS) | blip2_extras(qformer)
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")

    proj = released(ours, PROJ_KEYS[family])
    torch.save({"model": proj, "epoch": 4}, root / f"skingpt4_{family}.pth")

    llm = root / "llm"
    llm.mkdir()
    config.text_config.save_pretrained(llm)
    write_tokenizer(llm)
    _write_shards(load_file(str(tiny / "model.safetensors")), llm, 2 if family == "llama" else 1)
    return {"vit": root / "eva_vit_g.pth", "qformer": root / "blip2_pretrained_flant5xxl.pth",
            "proj": root / f"skingpt4_{family}.pth", "llm": llm}


# --- from scratch, at the release's sizes ----------------------------------------------------


def _init(name: str, shape: tuple[int, ...], std: float, generator: torch.Generator,
          dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, std): what a trained checkpoint's scale
    looks like to the numerics, without its values."""
    last = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and last == "weight":
        return torch.ones(shape, dtype=dtype)  # LayerNorm / RMSNorm
    if last in ("bias", "q_bias", "v_bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def full_size_llm_config(layers: int) -> dict:
    """Llama-2-13b-chat-hf's config.json, with ``layers`` decoder layers."""
    text = dict(get_preset("skingpt4").text["llama"])
    return dict(
        text, num_hidden_layers=layers, architectures=["LlamaForCausalLM"], torch_dtype="float16",
        hidden_act="silu", initializer_range=0.02, pad_token_id=None, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, use_cache=True,
    )


def make_full_size_release(root: Path, sp_model: bytes, *, layers: int = 2, std: float = 0.02,
                           seed: int = 0) -> dict[str, Path]:
    """The released files at SkinGPT-4's own sizes (see the module docstring); random weights.

    Returns the ``convert_release`` inputs, as :func:`make_release` does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = get_preset("skingpt4")
    hidden = spec.text["llama"]["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    ours = expected_shapes(spec, hidden)  # our names -> shapes (meta device)

    def fill(keys: KeyMap, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for k, shape in ours.items():
            original = keys.to_original(k)
            if original is not None:
                out[original] = _init(original, tuple(shape), std, generator, dtype)
        return out

    # eva_vit_g.pth: LAVIS ships it in fp16, flat names, 40 blocks (BLIP-2 builds 39).
    depth = spec.vision["num_hidden_layers"]
    vit = fill(vit_keys(depth), torch.float16)
    vit |= {f"blocks.{depth}.{k.removeprefix('blocks.0.')}": torch.zeros_like(v)
            for k, v in vit.items() if k.startswith("blocks.0.")}
    torch.save(vit, root / "eva_vit_g.pth")
    del vit

    qformer = fill(QFORMER_KEYS, torch.float32)
    qformer |= blip2_extras(
        spec.qformer, vocab=30522, positions=512,
        make=lambda shape: torch.zeros(shape),  # dropped by name: their values never matter
    )
    torch.save({"model": qformer}, root / "blip2_pretrained_flant5xxl.pth")
    del qformer

    proj = fill(PROJ_KEYS["llama"], torch.float32)
    assert proj["llama_proj.weight"].shape == (hidden, spec.qformer["hidden_size"])
    torch.save({"model": proj, "epoch": 4}, root / "skingpt4_llama.pth")

    llm = root / "Llama-2-13b-chat-hf"
    llm.mkdir()
    config = full_size_llm_config(layers)
    (llm / "config.json").write_text(json.dumps(config, indent=2))
    write_llama2_tokenizer(llm, sp_model)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**config)).state_dict().items()}
    _write_shards(
        {k: _init(k, shape, std, generator, torch.float16) for k, shape in sorted(shapes.items())},
        llm, shards=3,
    )
    return {"vit": root / "eva_vit_g.pth", "qformer": root / "blip2_pretrained_flant5xxl.pth",
            "proj": root / "skingpt4_llama.pth", "llm": llm}
