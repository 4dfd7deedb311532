"""Tensor parallelism (TP=2) on the CPU against the Hugging Face reference pipeline.

The tiny Llama checkpoint (2 attention heads of 32, 1 KV head, which vLLM replicates per rank)
runs at ``tensor_parallel_size=2``; float32, greedy, 16 new tokens, EOS ignored: the token ids must
equal the reference's. On the CPU a TP engine starts only with one thread binding per rank
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``), set here before the engine starts and restored after.

Two engines, one after the other (each ~1 min to start on 2 cores), because the two encoder
modes are different code paths and neither is covered elsewhere:

- ``weights`` (vLLM's default): every rank encodes every photo with the replicated vision stack;
- ``data`` (``mm_encoder_tp_mode="data"``): each rank encodes its share of the photos (zero-padded
  to an equal share) and the embeddings are all-gathered (``run_dp_sharded_vision_model``).
"""

from __future__ import annotations

import gc
import os

import pytest

from plugins.skingpt4.template import build_prompt, image_question

pytestmark = [pytest.mark.engine, pytest.mark.slow]

NEW_TOKENS = 16
THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"


@pytest.fixture(scope="module", params=["weights", "data"])
def tp_engine(request, tiny_checkpoints):
    from vllm import LLM

    from benchmarks.reference import ReferencePipeline

    mode = request.param
    folder = tiny_checkpoints["llama"]
    saved = os.environ.get(THREADS_BIND)
    os.environ[THREADS_BIND] = "0|1"
    try:
        llm = LLM(
            model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024,
            limit_mm_per_prompt={"image": 2}, seed=0, tensor_parallel_size=2,
            mm_encoder_tp_mode=mode,
        )
        try:
            yield mode, llm, ReferencePipeline(folder)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    finally:
        if saved is None:
            os.environ.pop(THREADS_BIND, None)
        else:
            os.environ[THREADS_BIND] = saved


def _request(prompt, images):
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


def _vllm_tokens(llm, requests):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(requests, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]


def _ref_tokens(ref, prompt, images):
    out = ref.generate(prompt, images, max_new_tokens=NEW_TOKENS, temperature=0,
                       stop_at_separator=False, ignore_eos=True)
    return out.token_ids, out.prompt_len


def test_tiny_llama_splits_over_two_ranks(tiny_checkpoints):
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(tiny_checkpoints["llama"]).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.num_attention_heads % 2 == 0 and head_dim >= 32  # CPU kernel: head_dim >= 32


def test_engine_runs_the_requested_encoder_mode(tp_engine):
    from plugins.skingpt4.model import SkinGPT4ForConditionalGeneration

    mode, llm, _ = tp_engine
    assert SkinGPT4ForConditionalGeneration.supports_encoder_tp_data
    config = llm.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == 2
    # vLLM falls back to "weights" (with a warning) for a model that does not declare support.
    assert config.model_config.multimodal_config.mm_encoder_tp_mode == mode


def test_one_photo_matches_reference(tp_engine, photos):
    _, llm, ref = tp_engine
    prompt = build_prompt([("user", image_question())])
    answers = []
    for photo in photos[:2]:
        [(got, n_prompt)] = _vllm_tokens(llm, [_request(prompt, [photo])])
        want, n_ref = _ref_tokens(ref, prompt, [photo])
        assert got == want
        assert n_prompt == n_ref
        answers.append(got)
    assert answers[0] != answers[1], "different photos must give different greedy answers"


def test_two_photos_in_one_prompt_match_reference(tp_engine, photos):
    _, llm, ref = tp_engine
    prompt = build_prompt([("user", image_question("Compare the close-up and the wider photo.", 2))])
    [(got, n_prompt)] = _vllm_tokens(llm, [_request(prompt, photos[:2])])
    want, n_ref = _ref_tokens(ref, prompt, photos[:2])
    assert got == want
    assert n_prompt == n_ref
    [(swapped, _)] = _vllm_tokens(llm, [_request(prompt, photos[1::-1])])
    assert swapped != got, "image order must matter"


def test_three_photos_over_two_requests_in_one_batch_match_reference(tp_engine, photos):
    """An odd number of photos in one step: in data mode one rank encodes a zero-padded slot."""
    _, llm, ref = tp_engine
    one = build_prompt([("user", image_question())])
    two = build_prompt([("user", image_question("Compare the close-up and the wider photo.", 2))])
    got = _vllm_tokens(llm, [_request(one, [photos[2]]), _request(two, photos[:2])])
    assert [ids for ids, _ in got] == [
        _ref_tokens(ref, one, [photos[2]])[0],
        _ref_tokens(ref, two, photos[:2])[0],
    ]
