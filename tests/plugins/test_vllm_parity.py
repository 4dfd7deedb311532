"""vLLM (the plugin) against the Hugging Face reference pipeline on tiny checkpoints.

float32, greedy, 16 new tokens, EOS ignored: the token ids must be equal. One engine per
language-model family for the whole module (an engine start costs ~40 s on 2 cores).
"""

from __future__ import annotations

import gc

import pytest

from plugins.skingpt4.template import CONSULT_QUESTIONS, IMAGE_SEGMENT, build_prompt, image_question

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "falcon"])
def engines(request, tiny_checkpoints):
    from vllm import LLM

    from benchmarks.reference import ReferencePipeline

    folder = tiny_checkpoints[request.param]
    llm = LLM(
        model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024,
        limit_mm_per_prompt={"image": 2}, seed=0,
    )
    yield request.param, llm, ReferencePipeline(folder)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _vllm_tokens(llm, prompt, images):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), len(out.prompt_token_ids)


def _ref_tokens(ref, prompt, images):
    out = ref.generate(prompt, images, max_new_tokens=NEW_TOKENS, temperature=0,
                       stop_at_separator=False, ignore_eos=True)
    return out.token_ids, out.prompt_len


def test_single_image_mid_prompt_matches_reference(engines, photos):
    _, llm, ref = engines
    prompt = build_prompt([("user", image_question())])
    assert prompt.index(IMAGE_SEGMENT) > 0 and not prompt.endswith(IMAGE_SEGMENT)
    answers = []
    for photo in photos[:2]:
        got, n_prompt = _vllm_tokens(llm, prompt, [photo])
        want, n_ref = _ref_tokens(ref, prompt, [photo])
        assert got == want
        assert n_prompt == n_ref  # 32 positions per image on both sides
        answers.append(got)
    assert answers[0] != answers[1], "different photos must give different greedy answers"


def test_two_images_in_one_prompt_match_reference(engines, photos):
    _, llm, ref = engines
    prompt = build_prompt([("user", image_question("Compare the close-up and the wider photo.", 2))])
    got, n_prompt = _vllm_tokens(llm, prompt, photos[:2])
    want, n_ref = _ref_tokens(ref, prompt, photos[:2])
    assert got == want
    assert n_prompt == n_ref
    swapped, _ = _vllm_tokens(llm, prompt, photos[1::-1])
    assert swapped != got, "image order must matter"


def test_new_photo_in_a_later_turn_matches_reference(engines, photos):
    _, llm, ref = engines
    prompt = build_prompt([
        ("user", image_question(CONSULT_QUESTIONS[0])),
        ("assistant", "A red scaly plaque."),
        ("user", image_question("Here is a wider photo. Has it spread?")),
    ])
    got, _ = _vllm_tokens(llm, prompt, [photos[0], photos[2]])
    want, _ = _ref_tokens(ref, prompt, [photos[0], photos[2]])
    assert got == want


def test_prompt_length_counts_32_positions_per_image(engines, photos):
    family, llm, ref = engines
    prompt = build_prompt([("user", image_question())])
    text_only = len(ref.tokenizer(prompt).input_ids) - 1  # <ImageHere> is one token
    _, n_prompt = _vllm_tokens(llm, prompt, [photos[0]])
    assert n_prompt == text_only + 32
    starts_with_bos = ref.tokenizer(prompt).input_ids[0] == ref.tokenizer.bos_token_id
    assert starts_with_bos == (family == "llama")  # Falcon has no BOS


def test_image_token_ids_in_text_positions_do_not_crash_the_engine(engines, photos):
    """A token-id prompt carrying the (out-of-vocabulary) image tokens without images must not
    take the engine down; the next image request is still answered exactly."""
    from vllm import SamplingParams

    _, llm, ref = engines
    cfg = ref.config
    assert cfg.image_token_id >= cfg.text_config.vocab_size
    ids = ref.tokenizer("What is it?", add_special_tokens=False).input_ids
    bad = {"prompt_token_ids": [*ids, cfg.image_token_id, cfg.image_pad_token_id, *ids]}
    out = llm.generate([bad], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    prompt = build_prompt([("user", image_question())])
    got, _ = _vllm_tokens(llm, prompt, [photos[0]])
    want, _ = _ref_tokens(ref, prompt, [photos[0]])
    assert got == want


def test_prompt_logprobs_and_penalties_over_image_positions(engines, photos):
    """Prompt logprobs (what chat ``echo`` asks for) and a repetition penalty index the logits
    with every prompt id, the image positions included: the engine answers both and stays exact."""
    from vllm import SamplingParams

    _, llm, ref = engines
    cfg = ref.config
    assert 0 <= cfg.image_position_token_id < cfg.text_config.vocab_size
    prompt = build_prompt([("user", image_question())])
    request = {"prompt": prompt, "multi_modal_data": {"image": [photos[0]]}}
    params = [
        SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.5),
        SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=5, logprobs=2),
    ]
    outs = llm.generate([request] * len(params), params, use_tqdm=False)
    logprobs = outs[0].prompt_logprobs
    assert len(logprobs) == len(outs[0].prompt_token_ids)  # None for the first position
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    got, _ = _vllm_tokens(llm, prompt, [photos[0]])
    want, _ = _ref_tokens(ref, prompt, [photos[0]])
    assert got == want


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_served_cpu_engine_matches_reference(tiny_checkpoints, photos, compiled):
    """``serve``'s CPU engine options give the reference's tokens, one photo and two in one
    prompt: the model run inside the engine core's process (``serving.engine.cpu_executor``, no
    ``VLLM::Worker``), eager and with ``--cpu-compile`` (vLLM's compiled CPU mode)."""
    import psutil
    from vllm import LLM

    from benchmarks.reference import ReferencePipeline
    from serving.engine.offline import generate_engine_kwargs
    from serving.engine.server import INLINE_CPU_EXECUTOR, EngineConfig

    folder = tiny_checkpoints["llama"]
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=1024, cpu_compile=compiled)
    kwargs = generate_engine_kwargs(config, 2, on_gpu=False, seed=0)
    assert ("enforce_eager" not in kwargs) is compiled
    assert kwargs["distributed_executor_backend"] == INLINE_CPU_EXECUTOR
    # The module's other engines (the llm fixture's, vLLM's two processes) are running too.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    llm = LLM(**kwargs)
    try:
        titles = {" ".join(p.cmdline()[:1]) for p in psutil.Process().children(recursive=True)
                  if p.pid not in before}
        assert "VLLM::EngineCore" in titles and "VLLM::Worker" not in titles, titles
        ref = ReferencePipeline(folder)
        for prompt, images in (
            (build_prompt([("user", image_question())]), [photos[0]]),
            (build_prompt([("user", image_question("Compare the two photos.", 2))]), photos[:2]),
        ):
            assert _vllm_tokens(llm, prompt, images)[0] == _ref_tokens(ref, prompt, images)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
