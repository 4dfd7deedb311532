"""Convert the released SkinGPT-4 files into a model folder (docs/architecture.md, "The model folder").

    skingpt4 checkpoint convert --vit eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
        --proj skingpt4_llama2_13b.pth --llm Llama-2-13b-chat-hf/ OUT

Inputs, in their released layouts (LAVIS ``eva_vit.py`` / ``blip2.py``, MiniGPT-4, SkinGPT-4):

- ``eva_vit_g.pth``: flat EVA names (``blocks.N.attn.qkv.weight``, ``q_bias``, ``v_bias``, ...).
  It holds 40 blocks; BLIP-2 builds 39 and loads it non-strictly. Here the depth comes from the
  preset and the extra block is dropped by name; anything else unknown (``norm.*``) is an error.
- ``blip2_pretrained_flant5xxl.pth``: ``{"model": ...}`` with ``query_tokens``, ``ln_vision.*`` and
  the BERT Q-Former (``Qformer.bert.*``). Only its query branch is used; the text branch, word and
  position embeddings, ``cls`` head and the T5 / contrastive heads are dropped by name.
- the SkinGPT-4 ``.pth``: ``{"model": ...}`` with the projection, ``llm_proj.*`` (Falcon code) or
  ``llama_proj.*`` (Llama-2 release); its output width must be the LLM's hidden size.
- the language model's Hugging Face folder (Falcon or Llama), with safetensors shards.

Output: the folder of :func:`plugins.skingpt4.checkpoint.write_model_folder` (config, tokenizer
with the image tokens and chat template, generation config, ``vision.safetensors``), the LLM's
shards as symlinks (80 GB are not copied) and ``model.safetensors.index.json`` over all of it.
A SentencePiece LLM (Llama-2) gets a tokenizer that encodes like SkinGPT-4's segment-by-segment
tokenization (:func:`plugins.skingpt4.tokenizer.encode_like_sentencepiece`); it is checked
against the release's ``tokenizer.model`` on SkinGPT-4's prompt texts, and that file is copied
along (the reference pipeline encodes with it, as the original does).
Vision tensors keep the dtype they were released in (vLLM and the reference pipeline cast when
loading); the folder's ``dtype`` is the LLM's. Only safetensors LLM folders are accepted: ``.bin``
pickles would have to be loaded and rewritten, which is a copy, and they are refused with a hint.

Key renames are data (:class:`KeyMap` tables below), tested in both directions on a tiny
checkpoint. Every original key is either renamed into ``VisionStack``'s names, dropped on purpose
by a listed pattern, or reported: missing and unexpected keys raise :class:`CheckpointKeyError`,
wrong shapes :class:`CheckpointShapeError`, unusable files :class:`CheckpointFormatError`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoTokenizer, Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from encoders import Preset, VisionStack, get_preset
from plugins.skingpt4.checkpoint import SENTENCEPIECE_MODEL, VISION_WEIGHTS, write_model_folder
from plugins.skingpt4.config import SUPPORTED_TEXT_MODELS
from plugins.skingpt4.template import CONSULT_QUESTIONS, DEFAULT_QUESTION, DEFAULT_SYSTEM, SEP
from plugins.skingpt4.tokenizer import encode_like_sentencepiece

INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Errors: one class per failure kind; all are ValueErrors so a CLI can catch them together.


class ConversionError(ValueError):
    """The released files cannot be turned into a model folder."""


class CheckpointFormatError(ConversionError):
    """A file or folder is not in the expected layout (not a state dict, no safetensors, ...)."""


class CheckpointKeyError(ConversionError):
    """A checkpoint lacks keys the model needs, or holds keys that no table knows."""

    def __init__(self, source: str, *, missing: list[str] = (), unexpected: list[str] = (),
                 note: str = "") -> None:
        self.source, self.missing, self.unexpected = source, list(missing), list(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys {_some(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_some(self.unexpected)}")
        super().__init__(f"{source}: " + "; ".join(parts + ([note] if note else [])))


class CheckpointShapeError(ConversionError):
    """A tensor's shape does not fit the architecture (or the language model)."""


def _some(keys: list[str], limit: int = 12) -> str:
    """A readable list of keys: all of a short list, the first ``limit`` of a long one."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}]" if len(keys) <= limit else f"[{shown}, ... and {len(keys) - limit} more]"


# ---------------------------------------------------------------------------------------------
# Key tables. Templates name their fields: {n} a layer index, {p} the rest of a dotted name.

_FIELDS = {"n": r"\d+", "p": r"[\w.]+"}


def _compile(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(
        re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{_FIELDS[piece]})"
        for i, piece in enumerate(pieces)
    )
    return re.compile(regex)


@dataclass(frozen=True)
class KeyMap:
    """Original (released) key names <-> ``VisionStack`` state-dict names.

    ``renames`` are ``(original, ours)`` template pairs; the first matching row wins in either
    direction. ``drops`` are templates of original keys discarded on purpose (they are checked
    first, so a dropped key never reaches a rename row).
    """

    renames: tuple[tuple[str, str], ...]
    drops: tuple[str, ...] = ()

    @cached_property
    def _forward(self) -> list[tuple[re.Pattern, str]]:
        return [(_compile(orig), ours) for orig, ours in self.renames]

    @cached_property
    def _backward(self) -> list[tuple[re.Pattern, str]]:
        return [(_compile(ours), orig) for orig, ours in self.renames]

    @cached_property
    def _drops(self) -> list[re.Pattern]:
        return [_compile(t) for t in self.drops]

    def is_dropped(self, original: str) -> bool:
        return any(p.fullmatch(original) for p in self._drops)

    def to_ours(self, original: str) -> str | None:
        """Our name of a kept original key; None for a key that no row knows."""
        return _apply(self._forward, original)

    def to_original(self, ours: str) -> str | None:
        """The released name of one of our keys; None when this table does not own it."""
        return _apply(self._backward, ours)


def _apply(rows: list[tuple[re.Pattern, str]], key: str) -> str | None:
    for pattern, template in rows:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def vit_keys(depth: int) -> KeyMap:
    """``eva_vit_g.pth``: EVA names are timm's under ``vit.``. Block ``depth`` (the 40th of the
    release, which BLIP-2 never builds) is dropped; any block after it would be unexpected."""
    return KeyMap(renames=(("{p}", "vit.{p}"),), drops=(f"blocks.{depth}.{{p}}",))


_LAYER = "Qformer.bert.encoder.layer.{n}"
_OUR_LAYER = "qformer.encoder.layer.{n}"

QFORMER_KEYS = KeyMap(
    renames=(
        ("query_tokens", "query_tokens"),
        ("ln_vision.{p}", "ln_vision.{p}"),
        ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
        (f"{_LAYER}.attention.self.{{p}}", f"{_OUR_LAYER}.attention.attention.{{p}}"),
        (f"{_LAYER}.attention.output.{{p}}", f"{_OUR_LAYER}.attention.output.{{p}}"),
        (f"{_LAYER}.crossattention.self.{{p}}", f"{_OUR_LAYER}.crossattention.attention.{{p}}"),
        (f"{_LAYER}.crossattention.output.{{p}}", f"{_OUR_LAYER}.crossattention.output.{{p}}"),
        (f"{_LAYER}.intermediate_query.{{p}}", f"{_OUR_LAYER}.intermediate_query.{{p}}"),
        (f"{_LAYER}.output_query.{{p}}", f"{_OUR_LAYER}.output_query.{{p}}"),
    ),
    drops=(
        # Text branch of the BERT Q-Former: SkinGPT-4 feeds only the 32 queries through it.
        "Qformer.bert.embeddings.word_embeddings.{p}",
        "Qformer.bert.embeddings.position_embeddings.{p}",
        "Qformer.bert.embeddings.position_ids",
        f"{_LAYER}.intermediate.{{p}}",
        f"{_LAYER}.output.{{p}}",
        "Qformer.cls.{p}",
        # BLIP-2 heads that SkinGPT-4 replaces with its own projection.
        "t5_model.{p}", "t5_proj.{p}", "vision_proj.{p}", "text_proj.{p}", "itm_head.{p}", "temp",
        # A frozen copy of the ViT, if a checkpoint carries one: the ViT comes from --vit.
        "visual_encoder.{p}",
    ),
)

# The projection's name in each release's .pth (MiniGPT-4 code for Falcon, Llama-2 release).
PROJ_KEYS = {
    "falcon": KeyMap(renames=(("llm_proj.{p}", "llm_proj.{p}"),)),
    "llama": KeyMap(renames=(("llama_proj.{p}", "llm_proj.{p}"),)),
}
# Either name is read whatever the LLM: the shape check, not the name, decides if it fits.
ANY_PROJ_KEYS = KeyMap(renames=tuple(row for m in PROJ_KEYS.values() for row in m.renames))


# ---------------------------------------------------------------------------------------------
# Released .pth files -> our names, checked.


def load_pth_state(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict, unwrapped from ``{"model": ...}`` when nested (tensors only)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise CheckpointFormatError(
            f"{path}: cannot be read with torch.load(weights_only=True): {e}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointFormatError(f"{path}: entries that are not tensors: {_some(not_tensors)}")
    return obj


def map_state(
    state: dict[str, torch.Tensor], keys: KeyMap, expected: dict[str, torch.Size], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename ``state`` with ``keys``; every expected key must arrive exactly once.

    Returns the renamed tensors and, for messages, each one's key in the file.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected = []
    for key, tensor in state.items():
        if keys.is_dropped(key):
            continue
        ours = keys.to_ours(key)
        if ours not in expected:
            unexpected.append(key)
        elif ours in mapped:
            raise CheckpointKeyError(
                source, unexpected=[key], note=f"{origin[ours]} and {key} are the same weight"
            )
        else:
            mapped[ours], origin[ours] = tensor, key
    missing = [keys.to_original(k) for k in expected if k not in mapped]
    if missing or unexpected:
        raise CheckpointKeyError(source, missing=missing, unexpected=unexpected)
    return mapped, origin


def check_shapes(
    mapped: dict[str, torch.Tensor], origin: dict[str, str], expected: dict[str, torch.Size],
    source: str,
) -> None:
    wrong = [
        f"{origin[k]} has shape {tuple(t.shape)}, the model needs {tuple(expected[k])}"
        for k, t in mapped.items()
        if t.shape != expected[k]
    ]
    if wrong:
        raise CheckpointShapeError(f"{source}: " + "; ".join(wrong[:12]))


def check_projection(proj_weight: torch.Tensor, llm: LanguageModelFolder, source: str) -> None:
    """The projection must land in the LLM's hidden size (the classic MiniGPT-4 mismatch)."""
    out_features = proj_weight.shape[0]
    if out_features != llm.hidden_size:
        raise CheckpointShapeError(
            f"{source}: the projection has shape {tuple(proj_weight.shape)} "
            f"({proj_weight.shape[-1]} -> {out_features}) but the {llm.family} language model in "
            f"{llm.path} has hidden_size {llm.hidden_size}; this --proj file was trained for a "
            f"different language model"
        )


def expected_shapes(spec: Preset, llm_hidden_size: int) -> dict[str, torch.Size]:
    """``VisionStack``'s state-dict shapes, built on the meta device (no 1B-parameter alloc)."""
    with torch.device("meta"):
        stack = VisionStack(
            Blip2VisionConfig(**spec.vision),
            Blip2QFormerConfig(**spec.qformer),
            spec.num_query_tokens,
            llm_hidden_size,
        )
    return {k: v.shape for k, v in stack.state_dict().items()}


def owned_by(keys: KeyMap, shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The part of the model one source file provides: the keys its table can name."""
    return {k: s for k, s in shapes.items() if keys.to_original(k) is not None}


def convert_source(
    path: Path, keys: KeyMap, shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """One released file -> its part of the ``VisionStack`` state dict, keys and shapes checked."""
    part = owned_by(keys, shapes)
    mapped, origin = map_state(load_pth_state(path), keys, part, str(path))
    check_shapes(mapped, origin, part, str(path))
    return mapped


def convert_projection(
    path: Path, shapes: dict[str, torch.Size], llm: LanguageModelFolder
) -> dict[str, torch.Tensor]:
    """Like :func:`convert_source`, but a wrong output width gets its own message first."""
    part = owned_by(ANY_PROJ_KEYS, shapes)
    mapped, origin = map_state(load_pth_state(path), ANY_PROJ_KEYS, part, str(path))
    check_projection(mapped["llm_proj.weight"], llm, str(path))
    check_shapes(mapped, origin, part, str(path))
    return mapped


# ---------------------------------------------------------------------------------------------
# The language-model folder (read headers only: the shards are linked, never loaded).

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass(frozen=True)
class LanguageModelFolder:
    path: Path
    family: str
    config: dict
    """config.json as released, minus entries that would point outside the new folder."""
    hidden_size: int
    shards: dict[str, dict[str, dict]]
    """shard file name -> its safetensors header (tensor name -> dtype, shape, offsets)."""

    @property
    def dtype(self) -> str:
        declared = self.config.get("dtype") or self.config.get("torch_dtype")
        if declared:
            return declared
        first = next(iter(next(iter(self.shards.values())).values()))
        return _ST_DTYPES.get(first["dtype"], "float32")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def _shard_names(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise CheckpointFormatError(f"{index} names shards that are not there: {absent}")
        return names
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" It has PyTorch .bin shards ({_some(bins, 3)}): convert them to safetensors first "
            f"(load with transformers and save_pretrained() into a new folder), then pass that."
            if bins else ""
        )
        raise CheckpointFormatError(f"{folder}: no *.safetensors weights.{hint}")
    return names


def read_llm_folder(folder: Path) -> LanguageModelFolder:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointFormatError(f"{folder}: no config.json (not a Hugging Face LLM folder)")
    raw = json.loads(config_file.read_text())
    family = raw.get("model_type")
    if family not in SUPPORTED_TEXT_MODELS:
        raise CheckpointFormatError(
            f"{config_file}: model_type is {family!r}; SkinGPT-4 supports {SUPPORTED_TEXT_MODELS}"
        )
    # auto_map points at remote-code files that stay behind; the built-in classes are used.
    config = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path")}
    names = _shard_names(folder)
    if VISION_WEIGHTS in names:
        raise CheckpointFormatError(f"{folder}: a shard is named {VISION_WEIGHTS}, ours")
    shards = {n: read_safetensors_header(folder / n) for n in names}
    clashes = [k for h in shards.values() for k in h if k.startswith("vision.")]
    if clashes:
        raise CheckpointKeyError(str(folder), unexpected=clashes, note="vision.* is ours")
    hidden = CONFIG_MAPPING[family](**config).hidden_size
    return LanguageModelFolder(folder, family, config, hidden, shards)


# ---------------------------------------------------------------------------------------------
# Writing the folder.


def link_shards(llm: LanguageModelFolder, out: Path) -> None:
    """Absolute symlinks: ``out`` can be moved or ``cp -r``'d on its own (links stay valid);
    relative ones would break unless the LLM folder moved with it. The LLM folder must stay."""
    for name in llm.shards:
        (out / name).symlink_to((llm.path / name).absolute())


def write_index(
    llm: LanguageModelFolder, vision_state: dict[str, torch.Tensor], out: Path
) -> None:
    """One index over the LM shards and ``vision.safetensors``: vLLM loads only files it names."""
    weight_map = {k: name for name, header in llm.shards.items() for k in header}
    weight_map.update({f"vision.{k}": VISION_WEIGHTS for k in vision_state})
    total = sum(
        t["data_offsets"][1] - t["data_offsets"][0] for h in llm.shards.values() for t in h.values()
    ) + sum(v.numel() * v.element_size() for v in vision_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; convert into a new folder")


def convert_release(
    *, vit: str | Path, qformer: str | Path, proj: str | Path, llm: str | Path,
    out: str | Path, preset: str = "skingpt4",
) -> Path:
    """Build the model folder ``out`` from the released files; return ``out``.

    ``preset`` gives the vision architecture (depths, widths, heads): ``skingpt4`` for the real
    release, ``tiny`` for test files. Shapes are checked against it, depths never read from files.
    Everything is validated before anything is written.
    """
    vit, qformer, proj, llm_dir, out = map(Path, (vit, qformer, proj, llm, out))
    _check_out(out)
    spec = get_preset(preset)
    lm = read_llm_folder(llm_dir)
    shapes = expected_shapes(spec, lm.hidden_size)

    vision_state = convert_projection(proj, shapes, lm)
    vision_state |= convert_source(vit, vit_keys(spec.vision["num_hidden_layers"]), shapes)
    vision_state |= convert_source(qformer, QFORMER_KEYS, shapes)

    tokenizer = encode_like_sentencepiece(_load_tokenizer(llm_dir))
    sentencepiece_model = llm_dir / SENTENCEPIECE_MODEL
    if sentencepiece_model.is_file():
        check_sentencepiece_ids(tokenizer, sentencepiece_model)
    write_model_folder(
        out, family=lm.family, tokenizer=tokenizer, vision_config=spec.vision,
        qformer_config=spec.qformer, text_config=lm.config,
        num_query_tokens=spec.num_query_tokens, vision_state=vision_state, dtype=lm.dtype,
    )
    if sentencepiece_model.is_file():
        shutil.copyfile(sentencepiece_model, out / SENTENCEPIECE_MODEL)
    link_shards(lm, out)
    write_index(lm, vision_state, out)
    return out


def check_sentencepiece_ids(tokenizer, model_file: Path) -> None:
    """The tokenizer must give ``SentencePieceProcessor.encode``'s ids on the text segments of
    SkinGPT-4's prompts (what the original encodes, one segment at a time)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    segments = [f"{DEFAULT_SYSTEM}{SEP}Human: <Img>"] + [
        f"</Img> {q}{SEP}Assistant:" for q in (DEFAULT_QUESTION, *CONSULT_QUESTIONS)
    ]
    for text in segments:
        got, want = tokenizer(text, add_special_tokens=False).input_ids, sp.encode(text)
        if got != want:
            raise CheckpointFormatError(
                f"{model_file.parent}: its tokenizer encodes {text!r} as {got}, but "
                f"{SENTENCEPIECE_MODEL} as {want}; prompts would not match SkinGPT-4's"
            )


def _load_tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{folder}: cannot load its tokenizer ({e})") from None
