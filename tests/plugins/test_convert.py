"""``convert_release``: the released SkinGPT-4 files -> a model folder that vLLM and the reference
pipeline load.

The "released" files are fabricated from a tiny checkpoint by inverting the key tables, in the
original layouts: a flat ``eva_vit_g.pth`` with one block more than the architecture, a BLIP-2
``{"model": ...}`` with the text branch, ``cls`` and T5 heads, a SkinGPT-4 ``.pth`` with
``llm_proj`` (Falcon) or ``llama_proj`` (Llama-2), and an LLM folder without image tokens.
Converting them must give back the tiny checkpoint's answers. One vLLM engine for the module
(Llama); Falcon is checked on the reference pipeline.
"""

from __future__ import annotations

import gc
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoders import get_preset
from plugins.skingpt4.checkpoint import VISION_WEIGHTS
from plugins.skingpt4.config import SkinGPT4Config
from plugins.skingpt4.convert import (
    ANY_PROJ_KEYS,
    INDEX_FILE,
    PROJ_KEYS,
    QFORMER_KEYS,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointShapeError,
    KeyMap,
    convert_release,
    vit_keys,
)
from plugins.skingpt4.template import build_prompt, image_question
from tests.plugins.release_files import blip2_extras, make_release

NEW_TOKENS = 16
DEPTH = get_preset("tiny").vision["num_hidden_layers"]
VIT_KEYS = vit_keys(DEPTH)
SOURCE_TABLES = (VIT_KEYS, QFORMER_KEYS, ANY_PROJ_KEYS)

# Written out by hand from LAVIS (eva_vit.py, Qformer.py) so the table is not only checked
# against itself.
RELEASED_NAMES = {
    "vit.cls_token": "cls_token",
    "vit.pos_embed": "pos_embed",
    "vit.patch_embed.proj.weight": "patch_embed.proj.weight",
    "vit.blocks.1.attn.q_bias": "blocks.1.attn.q_bias",
    "vit.blocks.1.attn.qkv.weight": "blocks.1.attn.qkv.weight",
    "vit.blocks.0.mlp.fc2.bias": "blocks.0.mlp.fc2.bias",
    "query_tokens": "query_tokens",
    "ln_vision.weight": "ln_vision.weight",
    "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
    "qformer.encoder.layer.0.attention.attention.query.weight":
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
    "qformer.encoder.layer.1.attention.output.LayerNorm.weight":
        "Qformer.bert.encoder.layer.1.attention.output.LayerNorm.weight",
    "qformer.encoder.layer.0.crossattention.attention.key.weight":
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
    "qformer.encoder.layer.0.crossattention.output.dense.bias":
        "Qformer.bert.encoder.layer.0.crossattention.output.dense.bias",
    "qformer.encoder.layer.1.intermediate_query.dense.weight":
        "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight",
    "qformer.encoder.layer.1.output_query.LayerNorm.bias":
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
    "llm_proj.weight": "llm_proj.weight",
}


def _edit_pth(src: Path, dst: Path, edit) -> Path:
    """Copy a released .pth to ``dst`` with ``edit`` applied to its state dict."""
    obj = torch.load(src, weights_only=True)
    edit(obj["model"] if "model" in obj else obj)
    torch.save(obj, dst)
    return dst


def _ref_tokens(ref, prompt, images) -> list[int]:
    out = ref.generate(prompt, images, max_new_tokens=NEW_TOKENS, temperature=0,
                       stop_at_separator=False, ignore_eos=True)
    return out.token_ids


@pytest.fixture(scope="module")
def releases(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    return {f: make_release(tiny_checkpoints[f], f, root / f) for f in ("llama", "falcon")}


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {
        f: convert_release(**files, out=root / f, preset="tiny") for f, files in releases.items()
    }


@pytest.fixture(scope="module")
def vllm_engine(converted):
    from vllm import LLM

    llm = LLM(
        model=str(converted["llama"]), dtype="float32", enforce_eager=True, max_model_len=1024,
        limit_mm_per_prompt={"image": 2}, seed=0,
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# --- the key tables --------------------------------------------------------------------------


def test_tables_round_trip_every_vision_key(tiny_checkpoints):
    ours = load_file(str(tiny_checkpoints["llama"] / VISION_WEIGHTS))
    originals = []
    for key in (k.removeprefix("vision.") for k in ours):
        owners = [t for t in SOURCE_TABLES if t.to_original(key) is not None]
        assert len(owners) == 1, f"{key} must come from exactly one released file"
        original = owners[0].to_original(key)
        assert owners[0].to_ours(original) == key
        assert not owners[0].is_dropped(original)
        originals.append(original)
    assert len(set(originals)) == len(originals)
    for key, original in RELEASED_NAMES.items():
        assert next(t.to_original(key) for t in SOURCE_TABLES if t.to_original(key)) == original


def test_projection_names_of_both_releases():
    assert PROJ_KEYS["llama"].to_original("llm_proj.weight") == "llama_proj.weight"
    assert PROJ_KEYS["falcon"].to_original("llm_proj.bias") == "llm_proj.bias"
    for name in ("llama_proj.weight", "llm_proj.weight"):
        assert ANY_PROJ_KEYS.to_ours(name) == "llm_proj.weight"


def test_only_listed_keys_are_dropped():
    for key in blip2_extras(get_preset("tiny").qformer):
        assert QFORMER_KEYS.is_dropped(key), key
    assert VIT_KEYS.is_dropped(f"blocks.{DEPTH}.attn.qkv.weight")
    kept = ["blocks.0.attn.qkv.weight", f"blocks.{DEPTH + 1}.attn.qkv.weight", "norm.weight"]
    assert not any(VIT_KEYS.is_dropped(k) for k in kept)
    assert not QFORMER_KEYS.is_dropped("Qformer.bert.encoder.layer.0.output_query.dense.weight")
    assert not QFORMER_KEYS.is_dropped("Qformer.bert.encoder.layer.0.attention.output.dense.weight")


# --- the converted folder --------------------------------------------------------------------


def test_language_model_shards_are_linked_not_copied(converted, releases):
    out, llm = converted["llama"], releases["llama"]["llm"]
    shards = sorted(p.name for p in llm.glob("*.safetensors"))
    assert len(shards) == 2
    for name in shards:
        link = out / name
        assert link.is_symlink()
        assert os.path.isabs(os.readlink(link))
        assert link.resolve() == (llm / name).resolve()
    regular = [p.name for p in out.glob("*.safetensors") if not p.is_symlink()]
    assert regular == [VISION_WEIGHTS]


def test_index_covers_language_model_and_vision(converted, releases, tiny_checkpoints):
    out = converted["llama"]
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    lm_keys = set(load_file(str(tiny_checkpoints["llama"] / "model.safetensors")))
    vision_keys = set(load_file(str(tiny_checkpoints["llama"] / VISION_WEIGHTS)))
    assert set(weight_map) == lm_keys | vision_keys
    assert {weight_map[k] for k in vision_keys} == {VISION_WEIGHTS}
    for key, file in weight_map.items():
        assert (out / file).exists()
        assert key in load_file(str(out / file))


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_vision_weights_and_config_equal_the_tiny_checkpoint(family, converted, tiny_checkpoints):
    out, tiny = converted[family], tiny_checkpoints[family]
    got, want = load_file(str(out / VISION_WEIGHTS)), load_file(str(tiny / VISION_WEIGHTS))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    got_cfg, want_cfg = SkinGPT4Config.from_pretrained(out), SkinGPT4Config.from_pretrained(tiny)
    assert got_cfg.text_config.model_type == family
    for field in ("image_token_id", "image_pad_token_id", "num_query_tokens"):
        assert getattr(got_cfg, field) == getattr(want_cfg, field)
    assert got_cfg.vision_config.to_dict() == want_cfg.vision_config.to_dict()
    assert got_cfg.text_config.hidden_size == want_cfg.text_config.hidden_size
    assert json.loads((out / "generation_config.json").read_text())["top_p"] == 0.9


def test_falcon_release_answers_like_the_tiny_checkpoint(converted, tiny_checkpoints, photos):
    from benchmarks.reference import ReferencePipeline

    prompt = build_prompt([("user", image_question())])
    got = ReferencePipeline(converted["falcon"])
    want = ReferencePipeline(tiny_checkpoints["falcon"])
    assert got.tokenizer.bos_token_id is None  # Falcon: no BOS
    assert got.tokenizer.chat_template == want.tokenizer.chat_template
    answers = [_ref_tokens(got, prompt, [p]) for p in photos[:2]]
    assert answers == [_ref_tokens(want, prompt, [p]) for p in photos[:2]]
    assert answers[0] != answers[1], "the converted vision weights must reach the answer"


def test_vllm_on_converted_llama_matches_reference(
    vllm_engine, converted, tiny_checkpoints, photos
):
    from vllm import SamplingParams

    from benchmarks.reference import ReferencePipeline

    prompt = build_prompt([("user", image_question())])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ref_converted = ReferencePipeline(converted["llama"])
    ref_tiny = ReferencePipeline(tiny_checkpoints["llama"])
    answers = []
    for photo in photos[:2]:
        out = vllm_engine.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": [photo]}}], params, use_tqdm=False
        )[0]
        got = list(out.outputs[0].token_ids)
        assert got == _ref_tokens(ref_converted, prompt, [photo])
        assert got == _ref_tokens(ref_tiny, prompt, [photo])
        answers.append(got)
    assert answers[0] != answers[1]


# --- errors ----------------------------------------------------------------------------------


def _convert(files: dict[str, Path], out: Path, **changes) -> Path:
    return convert_release(**(files | changes), out=out, preset="tiny")


def test_missing_key_is_named(releases, tmp_path):
    files = releases["llama"]
    key = "Qformer.bert.encoder.layer.1.output_query.dense.weight"
    blip2 = _edit_pth(files["qformer"], tmp_path / "blip2.pth", lambda s: s.pop(key))
    with pytest.raises(CheckpointKeyError) as err:
        _convert(files, tmp_path / "out", qformer=blip2)
    assert err.value.missing == [key] and not err.value.unexpected
    assert key in str(err.value) and "blip2.pth" in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing is written when a check fails"


def test_final_norm_keys_are_unexpected_not_ignored(releases, tmp_path):
    files = releases["llama"]

    def add_norm(state):
        state["norm.weight"], state["norm.bias"] = torch.ones(64), torch.zeros(64)

    vit = _edit_pth(files["vit"], tmp_path / "vit.pth", add_norm)
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys \[norm\.bias, norm\.weight\]"):
        _convert(files, tmp_path / "out", vit=vit)


def test_depth_comes_from_the_architecture_not_the_file(releases, tmp_path):
    files = releases["llama"]
    extra = f"blocks.{DEPTH + 1}.attn.qkv.weight"  # a second block past the architecture
    vit = _edit_pth(files["vit"], tmp_path / "vit.pth",
                    lambda s: s.__setitem__(extra, s["blocks.0.attn.qkv.weight"].clone()))
    with pytest.raises(CheckpointKeyError) as err:
        _convert(files, tmp_path / "out", vit=vit)
    assert err.value.unexpected == [extra]


def test_projection_for_another_llm_names_both_shapes(releases, tmp_path):
    files = releases["llama"]

    def llama13b_proj(state):
        state["llama_proj.weight"] = torch.zeros(5120, 768)  # Llama-2-13B's projection
        state["llama_proj.bias"] = torch.zeros(5120)

    proj = _edit_pth(files["proj"], tmp_path / "proj.pth", llama13b_proj)
    with pytest.raises(CheckpointShapeError) as err:
        _convert(files, tmp_path / "out", proj=proj)
    message = str(err.value)
    assert "(5120, 768)" in message and "768 -> 5120" in message and "hidden_size 64" in message


def test_wrong_shape_names_both_shapes(releases, tmp_path):
    files = releases["llama"]
    blip2 = _edit_pth(files["qformer"], tmp_path / "blip2.pth",
                      lambda s: s.__setitem__("ln_vision.weight", torch.ones(65)))
    want = r"ln_vision\.weight has shape \(65,\), the model needs \(64,\)"
    with pytest.raises(CheckpointShapeError, match=want):
        _convert(files, tmp_path / "out", qformer=blip2)


def test_both_projection_names_at_once_is_an_error(releases, tmp_path):
    files = releases["llama"]

    def add_llm_proj(state):
        state["llm_proj.weight"] = state["llama_proj.weight"].clone()

    proj = _edit_pth(files["proj"], tmp_path / "proj.pth", add_llm_proj)
    with pytest.raises(CheckpointKeyError, match="llama_proj.weight and llm_proj.weight"):
        _convert(files, tmp_path / "out", proj=proj)


def test_bin_only_llm_folder_asks_for_safetensors(releases, tmp_path):
    llm = tmp_path / "llm-bin"
    llm.mkdir()
    for p in releases["llama"]["llm"].glob("*.json"):
        if p.name != INDEX_FILE:
            (llm / p.name).write_bytes(p.read_bytes())
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, llm / "pytorch_model.bin")
    want = r"pytorch_model\.bin.*convert them to safetensors"
    with pytest.raises(CheckpointFormatError, match=want):
        _convert(releases["llama"], tmp_path / "out", llm=llm)


def test_unsupported_language_model_is_refused(releases, tmp_path):
    llm = tmp_path / "gpt2"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointFormatError, match="'gpt2'"):
        _convert(releases["llama"], tmp_path / "out", llm=llm)


def test_non_empty_output_folder_is_refused(releases, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _convert(releases["llama"], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_converts_against_the_full_architecture(releases, tmp_path, capsys):
    """The CLI passes no preset: tiny files are checked against SkinGPT-4's real shapes."""
    from serving.cli import main

    files = releases["falcon"]
    argv = ["checkpoint", "convert", "--vit", str(files["vit"]), "--qformer", str(files["qformer"]),
            "--proj", str(files["proj"]), "--llm", str(files["llm"]), str(tmp_path / "out")]
    want = r"llm_proj\.weight has shape \(64, 64\), the model needs \(64, 768\)"
    assert main(argv) == 2  # reported on one line, not as a traceback
    assert re.search(want, capsys.readouterr().err)
