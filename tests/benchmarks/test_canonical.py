"""Canonical answers: the word-level tokenizer of benchmark checkpoints decodes and re-encodes
any generated ids to themselves, so a consult's history tokenizes as it was generated; and
against a server, the next turn finds the previous prompt and answer in the prefix cache."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from benchmarks.__main__ import has_word_tokenizer
from benchmarks.loadgen import LoadConfig, make_client, run_load
from benchmarks.metrics import history_reuse
from benchmarks.scenarios import build_conversations
from benchmarks.targets import LaunchedTarget, Target
from plugins.skingpt4.checkpoint import WORD_TOKENIZER_PRESETS, write_tiny_checkpoint
from plugins.skingpt4.template import CONSULT_QUESTIONS
from plugins.skingpt4.tokenizer import build_tiny_tokenizer, build_word_tokenizer

BLOCK = 32  # the embedded server's KV-cache block on a CPU


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """The tiny preset's shapes with the bench preset's tokenizer: seconds to build, to serve."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("word") / "tiny-words", preset="tiny", word_tokenizer=True)


def _ordinary_ids(tokenizer, vocab_size: int) -> list[int]:
    """What the language model can generate (its vocabulary ends before the image tokens) but
    the special tokens."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(vocab_size) if i not in special]


def _lm_vocab_size(folder) -> int:
    return json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]


def _random_answers(tokenizer, count: int, seed: int, vocab_size: int | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    ids = _ordinary_ids(tokenizer, vocab_size or len(tokenizer))
    return [[rng.choice(ids) for _ in range(rng.randint(1, 96))] for _ in range(count)]


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_any_ids_decode_and_encode_to_themselves(family):
    tokenizer = build_word_tokenizer(family)
    assert len(tokenizer) == 1024
    for ids in _random_answers(tokenizer, 300, seed=1):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text


def test_the_byte_level_tokenizer_does_not_round_trip():
    """Why the bench checkpoint needs the word tokenizer: random ids of a byte-level BPE come
    back as other ids (merged neighbours, broken UTF-8)."""
    tokenizer = build_tiny_tokenizer("llama")
    answers = _random_answers(tokenizer, 50, seed=2)
    same = [tokenizer(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False).input_ids == ids
            for ids in answers]
    assert not all(same)


def test_the_history_tokenizes_as_generated(word_checkpoint):
    """Turn 1's prompt ids, then the answer's generated ids, are the start of turn 2's prompt
    as the served tokenizer renders and encodes it (chat template, BOS, the ``###`` turns)."""
    tokenizer = AutoTokenizer.from_pretrained(word_checkpoint)
    photo = {"type": "image_url", "image_url": {"url": "data:,"}}
    for generated in _random_answers(tokenizer, 20, seed=3, vocab_size=_lm_vocab_size(word_checkpoint)):
        messages = [{"role": "user", "content": [photo, {"type": "text", "text": CONSULT_QUESTIONS[0]}]}]
        first = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answer = tokenizer.decode(generated, skip_special_tokens=True)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": CONSULT_QUESTIONS[1]}]
        second = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids1 = tokenizer(first, add_special_tokens=False).input_ids
        ids2 = tokenizer(second, add_special_tokens=False).input_ids
        assert ids2[: len(ids1) + len(generated)] == ids1 + generated
        assert tokenizer.unk_token_id not in ids2  # every prompt word is in the vocabulary


def test_only_eos_of_the_special_tokens_can_be_generated(word_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(word_checkpoint)
    head = load_file(str(word_checkpoint / "model.safetensors"))["lm_head.weight"]
    silent = {tokenizer.bos_token_id, tokenizer.unk_token_id}
    for i in silent:
        assert torch.count_nonzero(head[i]) == 0
    assert torch.count_nonzero(head[tokenizer.eos_token_id]) > 0
    assert all(torch.count_nonzero(head[i]) > 0 for i in range(head.shape[0]) if i not in silent)


def test_bench_checkpoints_get_the_word_tokenizer(word_checkpoint, tiny_model):
    assert "bench" in WORD_TOKENIZER_PRESETS and "tiny" not in WORD_TOKENIZER_PRESETS
    assert has_word_tokenizer(word_checkpoint)
    assert not has_word_tokenizer(tiny_model)  # the tiny preset keeps its byte-level BPE
    with pytest.raises(ValueError, match="not both"):
        write_tiny_checkpoint(word_checkpoint.parent / "x", tokenizer=build_tiny_tokenizer("llama"), word_tokenizer=True)


@pytest.mark.engine
def test_a_consult_reuses_its_whole_history(word_checkpoint, tmp_path):
    """Against the embedded server: every later turn's ``cached_tokens`` covers the previous
    turn's prompt and answer, down to whole KV blocks."""
    convs = build_conversations("consult", 2, (96, 64), seed=70)
    with LaunchedTarget(Target.named("embedded", word_checkpoint), tmp_path / "embedded.log", startup_timeout_s=300) as server:

        async def go():
            client = make_client(server.base_url, timeout_s=120)
            try:
                config = LoadConfig(max_concurrency=2, max_tokens=24, show_progress=False)
                return await run_load(client, server.model, convs, config)
            finally:
                await client.close()

        load = asyncio.run(go())
    done = {(r.conversation, r.turn): r for r in load.results}
    assert len(done) == 8 and all(r.success for r in done.values()), [r.error for r in load.results]
    for (conv, turn), r in done.items():
        if turn == 1:
            continue
        prev = done[(conv, turn - 1)]
        # The previous prompt and answer, but the last generated token (never fed back).
        history = prev.prompt_len + prev.output_len - 1
        assert history // BLOCK * BLOCK <= r.cached_tokens < r.prompt_len
    assert history_reuse(load.results) > 0.8
