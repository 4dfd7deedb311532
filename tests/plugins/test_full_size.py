"""The public release's shapes end to end: fabricated full-size files -> ``skingpt4 checkpoint
convert`` -> vLLM -> the same greedy answer as the reference pipeline.

The files (tests/plugins/release_files.py) have the release's layouts, sizes and dtypes: EVA
ViT-g/14 with 40 blocks in fp16, the BLIP-2 Q-Former, ``llama_proj`` 768 -> 5120, and a Llama of
Llama-2-13b-chat's width (hidden 5120, 40 heads, vocabulary 32000, fp16, SentencePiece tokenizer
of 32000 pieces) cut to 2 decoder layers. Weights are random; only the shapes are the release's.
The converter runs through the CLI with its default architecture, as a user runs it.

Both sides compute in float32 (the fp16 weights are widened the same way), so greedy tokens must
be equal. The load time and peak memory of each side are printed: the vision stack is the real
one (1.1B parameters), the language model about 1B of Llama-2-13b's 13B.
About 6.5 GB of files (removed at the end); peak memory about 16 GiB while vLLM runs (engine and
front end), then 13 GiB for the reference, one after the other.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import pytest

from plugins.skingpt4.config import SkinGPT4Config
from plugins.skingpt4.template import build_prompt, image_question
from tests.plugins.release_files import make_full_size_release, train_llama2_sentencepiece

pytestmark = [pytest.mark.engine, pytest.mark.full_size]

LAYERS = 2
NEW_TOKENS = 8
GIB = 2**30
FILES_GIB = 7  # the fabricated release and its converted folder, both on disk at once


def _peak_rss(pid: int | str = "self") -> int:
    """The process's resident-set high-water mark (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _reset_peak_rss() -> None:
    """Restart this process's high-water mark from its current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _descendants_peak_rss() -> int:
    import psutil

    return sum(_peak_rss(p.pid) for p in psutil.Process().children(recursive=True))


def _report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\nfull size: {line}", flush=True)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-size")
    free = shutil.disk_usage(root).free
    assert free >= FILES_GIB * GIB, (
        f"the full-size files need about {FILES_GIB} GiB free under {root}; "
        f"{free / GIB:.1f} GiB are free (deselect them with -m 'not full_size')")
    started = time.monotonic()
    files = make_full_size_release(root / "release", train_llama2_sentencepiece(32000),
                                   layers=LAYERS)
    yield files, time.monotonic() - started
    shutil.rmtree(root)  # about 4 GB


@pytest.fixture(scope="module")
def folder(release, tmp_path_factory):
    from serving.cli import main

    files, _ = release
    out = tmp_path_factory.mktemp("full-size-converted") / "skingpt4-llama2-13b"
    argv = ["checkpoint", "convert", "--vit", str(files["vit"]), "--qformer",
            str(files["qformer"]), "--proj", str(files["proj"]), "--llm", str(files["llm"]),
            str(out)]
    assert main(argv) == 0
    yield out
    shutil.rmtree(out)  # about 2.5 GB


def test_released_files_have_the_release_sizes(release):
    import torch

    files, _ = release
    vit = torch.load(files["vit"], mmap=True, weights_only=True)
    assert vit["blocks.39.attn.qkv.weight"].shape == (3 * 1408, 1408)  # 40 blocks
    assert "blocks.40.attn.qkv.weight" not in vit
    assert vit["pos_embed"].shape == (1, 257, 1408) and vit["pos_embed"].dtype == torch.float16
    proj = torch.load(files["proj"], weights_only=True)["model"]
    assert proj["llama_proj.weight"].shape == (5120, 768)
    config = json.loads((files["llm"] / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["vocab_size"]) == (
        5120, 40, 32000)


def test_converted_folder_has_the_architecture_and_image_tokens_past_the_vocabulary(folder):
    from safetensors import safe_open

    config = SkinGPT4Config.from_pretrained(folder)
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size) == (39, 1408)
    assert (qformer.num_hidden_layers, qformer.hidden_size) == (12, 768)
    assert (text.hidden_size, text.num_attention_heads, text.vocab_size) == (5120, 40, 32000)
    assert (config.image_token_id, config.image_pad_token_id) == (32000, 32001)
    assert config.image_position_token_id == 0  # <unk>, inside the vocabulary
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"  # as released
    with safe_open(str(folder / "vision.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("vision.llm_proj.weight").get_shape() == [5120, 768]
    assert "vision.vit.blocks.38.attn.qkv.weight" in keys
    assert not any(k.startswith("vision.vit.blocks.39.") for k in keys)  # the 40th is dropped


def test_vllm_answers_like_the_reference_pipeline(release, folder, photos, capsys):
    from vllm import LLM, SamplingParams

    from benchmarks.reference import ReferencePipeline

    _, fabricate_s = release
    _report(capsys, f"released files fabricated in {fabricate_s:.0f} s")
    prompt = build_prompt([("user", image_question())])
    photo = photos[0]

    _reset_peak_rss()
    started = time.monotonic()
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024,
              limit_mm_per_prompt={"image": 1}, seed=0)
    load_s = time.monotonic() - started
    started = time.monotonic()
    out = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": [photo]}}],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False,
    )[0]
    answer_s = time.monotonic() - started
    engine_peak, frontend_peak = _descendants_peak_rss(), _peak_rss()
    got, prompt_ids = list(out.outputs[0].token_ids), list(out.prompt_token_ids)
    llm.llm_engine.engine_core.shutdown()
    del llm, out
    gc.collect()
    _report(capsys, f"vLLM (float32, enforce_eager) loaded in {load_s:.0f} s, answered one photo "
            f"in {answer_s:.0f} s; peak RSS: engine {engine_peak / GIB:.1f} GiB, "
            f"front end {frontend_peak / GIB:.1f} GiB")

    _reset_peak_rss()
    started = time.monotonic()
    ref = ReferencePipeline(folder)
    ref_load_s = time.monotonic() - started
    want = ref.generate(prompt, [photo], max_new_tokens=NEW_TOKENS, temperature=0,
                        stop_at_separator=False, ignore_eos=True)
    _report(capsys, f"reference (float32) loaded in {ref_load_s:.0f} s; peak RSS "
            f"{_peak_rss() / GIB:.1f} GiB")

    assert prompt_ids == ref.prompt_token_ids(prompt)  # SentencePiece per segment, 32 positions
    assert len(got) == NEW_TOKENS
    assert got == want.token_ids
    del ref
    gc.collect()

