"""Llama-2 (SentencePiece) tokenizers: vLLM's prompt token ids equal the original's.

The public SkinGPT-4 release runs on Llama-2-13b-chat. The original code (MiniGPT-4
``Chat.get_context_emb``) splits the prompt at ``<ImageHere>`` and tokenizes each segment on its
own, BOS on the first only, so every segment starts with SentencePiece's dummy prefix "▁"
(``</Img>`` after an image is ``▁</``...). vLLM tokenizes the whole prompt at once; the converted
model folder's tokenizer must give the same ids for raw prompts and for chat messages.

Fixture: a SentencePiece BPE model trained here (Llama-2's trainer settings, small vocabulary),
shipped as Llama-2 folders ship it, in three variants: ``legacy: true``, ``legacy: false``, and
``legacy: false`` with a ``tokenizer.json`` (as the Llama-2 release has). Each is converted with
``convert_release`` into a SkinGPT-4 folder (tiny vision stack and language model, vocabulary =
the SentencePiece model's). The oracle is ``SentencePieceProcessor.encode`` per segment with 32
image positions per photo (``image_position_token_id``, as vLLM carries them).
The converter gives all three variants byte-identical tokenizer files (checked without an
engine below), so one engine, on the variant the Llama-2 release ships, covers them all.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest

from plugins.skingpt4.config import IMAGE_PLACEHOLDER, SkinGPT4Config
from plugins.skingpt4.template import CONSULT_QUESTIONS, SEP, build_prompt, image_question
from tests.plugins.release_files import (
    make_release,
    train_llama2_sentencepiece,
    write_llama2_tokenizer,
)

pytestmark = pytest.mark.engine

VARIANTS = ("legacy", "non-legacy", "tokenizer-json")
SP_VOCAB = 800


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return train_llama2_sentencepiece(SP_VOCAB)


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model)


@pytest.fixture(scope="module")
def sp_releases(sp_model, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{variant: released files}: the weights of one tiny checkpoint, the variant's tokenizer."""
    from transformers import AutoTokenizer

    from plugins.skingpt4.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("sentencepiece")
    write_llama2_tokenizer(root / "tok", sp_model, "non-legacy")
    tiny = write_tiny_checkpoint(
        root / "tiny", family="llama", tokenizer=AutoTokenizer.from_pretrained(root / "tok")
    )
    return {
        variant: make_release(
            tiny, "llama", root / f"release-{variant}",
            lambda out, v=variant: write_llama2_tokenizer(out, sp_model, v),
        )
        for variant in VARIANTS
    }


@pytest.fixture(scope="module")
def sp_folders(sp_releases, tmp_path_factory) -> dict[str, Path]:
    """{variant: SkinGPT-4 folder}, converted as ``skingpt4 checkpoint convert`` does."""
    from plugins.skingpt4.convert import convert_release

    root = tmp_path_factory.mktemp("converted")
    return {
        variant: convert_release(**files, out=root / variant, preset="tiny")
        for variant, files in sp_releases.items()
    }


@pytest.fixture(scope="module", params=["tokenizer-json"])
def sp_engine(request, sp_folders):
    from vllm import LLM

    folder = sp_folders[request.param]
    llm = LLM(
        model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024,
        limit_mm_per_prompt={"image": 2}, seed=0,
    )
    yield request.param, folder, llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# --- the original's tokenization -------------------------------------------------------------


def original_ids(sp, prompt: str, config: SkinGPT4Config, expanded: bool = True) -> list[int]:
    """MiniGPT-4 ``get_context_emb``: segments split at ``<ImageHere>``, each encoded alone,
    BOS before the first. Between segments: the 32 image positions (``expanded``, as vLLM
    carries them), or the one ``<ImageHere>`` token that the tokenizer gives."""
    image = [config.image_position_token_id] * config.num_query_tokens if expanded else [
        config.image_token_id]
    ids = [sp.bos_id()]
    for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        ids += (image if i else []) + sp.encode(segment)
    return ids


# (name, conversation turns, number of photos): one photo, two photos, a new photo later.
CONSULTS = [
    ("one photo", [("user", image_question())], 1),
    ("two photos", [("user", image_question("Compare the close-up and the wider photo.", 2))], 2),
    ("new photo later", [
        ("user", image_question(CONSULT_QUESTIONS[0])),
        ("assistant", " A red scaly plaque. "),
        ("user", image_question("Here is a wider photo. Has it spread?")),
    ], 2),
]


def _messages(turns, photos) -> list[dict]:
    """The same consult as OpenAI chat messages: photos first in each user turn, then text."""
    photos = iter(photos)
    messages = []
    for role, text in turns:
        if role == "assistant":
            messages.append({"role": role, "content": text})
            continue
        n = text.count(IMAGE_PLACEHOLDER)
        question = text.rsplit("</Img> ", 1)[-1]
        parts = [{"type": "image_pil", "image_pil": next(photos)} for _ in range(n)]
        messages.append({"role": role, "content": [*parts, {"type": "text", "text": question}]})
    return messages


def _mismatches(got: list[list[int]], want: list[list[int]]) -> list[str]:
    return [name for (name, _, _), g, w in zip(CONSULTS, got, want) if g != w]


# --- tests -----------------------------------------------------------------------------------


def test_converted_tokenizer_encodes_like_sentencepiece(sp_folders, sp):
    """Without an engine: the folder's tokenizer (what vLLM loads) on whole prompts."""
    from transformers import AutoTokenizer

    probes = [" foo  bar ", "</Img> What's wrong?###Assistant:", "Give the following", "", "é ü 🙂"]
    files = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")
    first = sp_folders[VARIANTS[0]]
    for variant, folder in sp_folders.items():
        # the converter gives every variant of the release the same tokenizer
        assert all((folder / f).read_bytes() == (first / f).read_bytes() for f in files), variant
        tok = AutoTokenizer.from_pretrained(folder)
        config = SkinGPT4Config.from_pretrained(folder)
        assert config.text_config.vocab_size == sp.vocab_size()
        for text in probes:
            assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), (variant, text)
        for _, turns, _ in CONSULTS:
            prompt = build_prompt(turns)
            want = original_ids(sp, prompt, config, expanded=False)
            assert tok(prompt).input_ids == want, variant


def test_converter_refuses_a_tokenizer_unlike_its_sentencepiece_model(sp_releases, tmp_path):
    from plugins.skingpt4.convert import CheckpointFormatError, convert_release
    from plugins.skingpt4.tokenizer import build_tiny_tokenizer

    files = dict(sp_releases["non-legacy"])
    llm = shutil.copytree(files["llm"], tmp_path / "llm", symlinks=True)
    (llm / "tokenizer_config.json").unlink()
    build_tiny_tokenizer("llama").save_pretrained(llm)  # byte-level, beside tokenizer.model
    with pytest.raises(CheckpointFormatError, match="tokenizer.model as"):
        convert_release(**(files | {"llm": llm}), out=tmp_path / "out", preset="tiny")
    assert not (tmp_path / "out").exists()


def test_reference_pipeline_tokenizes_like_the_original(sp_folders, sp):
    from benchmarks.reference import ReferencePipeline

    ref = ReferencePipeline(sp_folders["non-legacy"])
    for _, turns, _ in CONSULTS:
        prompt = build_prompt(turns)
        assert ref.prompt_token_ids(prompt) == original_ids(sp, prompt, ref.config)


def test_raw_prompts_are_token_exact(sp_engine, sp, photos):
    from vllm import SamplingParams

    variant, folder, llm = sp_engine
    config = SkinGPT4Config.from_pretrained(folder)
    requests = [
        {"prompt": build_prompt(turns), "multi_modal_data": {"image": photos[:n]}}
        for _, turns, n in CONSULTS
    ]
    outs = llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    got = [list(o.prompt_token_ids) for o in outs]
    want = [original_ids(sp, build_prompt(turns), config) for _, turns, _ in CONSULTS]
    assert not _mismatches(got, want), f"{variant}: not token-exact: {_mismatches(got, want)}"


def test_chat_messages_are_token_exact(sp_engine, sp, photos):
    from vllm import SamplingParams

    variant, folder, llm = sp_engine
    config = SkinGPT4Config.from_pretrained(folder)
    conversations = [_messages(turns, photos[:n]) for _, turns, n in CONSULTS]
    outs = llm.chat(conversations, SamplingParams(max_tokens=1), use_tqdm=False)
    got = [list(o.prompt_token_ids) for o in outs]
    want = [original_ids(sp, build_prompt(turns), config) for _, turns, _ in CONSULTS]
    assert not _mismatches(got, want), f"{variant}: not token-exact: {_mismatches(got, want)}"


def test_answers_match_the_reference_pipeline(sp_engine, photos):
    """Greedy tokens on the converted folder equal the reference pipeline's (which encodes the
    segments with the folder's ``tokenizer.model``)."""
    from vllm import SamplingParams

    from benchmarks.reference import ReferencePipeline

    _, folder, llm = sp_engine
    ref = ReferencePipeline(folder)
    assert ref.sentencepiece is not None
    _, turns, n = CONSULTS[-1]
    prompt = build_prompt(turns)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": photos[:n]}}], params,
                       use_tqdm=False)[0]
    want = ref.generate(prompt, photos[:n], max_new_tokens=8, temperature=0,
                        stop_at_separator=False, ignore_eos=True)
    assert list(out.outputs[0].token_ids) == want.token_ids
    assert len(out.prompt_token_ids) == want.prompt_len


def test_generation_stops_at_either_encoding_of_the_separator(sp_engine, sp, photos):
    """The original stops on either encoding of ``###`` (with the "▁" prefix or without, in one
    piece or two); vLLM's stop string ``###`` works on text: the answer must end at the token
    that completes ``###``, and hold nothing of it. Seed 0 allows only separator pieces; other
    seeds mix in words, so that an answer comes before the separator."""
    from vllm import SamplingParams

    _, _, llm = sp_engine
    tok = llm.get_tokenizer()
    ids = {p: sp.piece_to_id(p) for p in ("▁###", "###", "##", "#", "▁skin", "▁the")}
    assert sp.unk_id() not in ids.values()
    words = [ids["▁skin"], ids["▁the"]]
    cases = {  # allowed tokens -> how many tokens complete the first "###"
        "▁###": ([ids["▁###"]], 1),
        "###": ([ids["###"]], 1),
        "## #": ([ids["##"], ids["#"]], None),
        "# # #": ([ids["#"]], 3),
    }
    prompt = {"prompt": build_prompt([("user", image_question())]),
              "multi_modal_data": {"image": [photos[0]]}}
    answers = []
    for name, (allowed, n_tokens) in cases.items():
        for seed in range(4):
            params = SamplingParams(
                max_tokens=40, stop=[SEP], seed=seed, temperature=1.0,
                allowed_token_ids=allowed + (words if seed else []),
            )
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            tokens = list(out.token_ids)
            full = tok.decode(tokens)
            assert out.finish_reason == "stop" and out.stop_reason == SEP, (name, seed, full)
            assert SEP in full and SEP not in tok.decode(tokens[:-1]), (name, seed, full)
            # (vLLM keeps the space of a first "▁" piece; answers are stripped, as the original's)
            assert out.text.strip() == full.split(SEP)[0].strip(), (name, seed)
            if not seed and n_tokens:
                assert len(tokens) == n_tokens, name
            answers.append(out.text.strip())
    assert any(answers), "some answers must hold words before the separator"
