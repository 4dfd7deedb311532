"""The Hugging Face baselines: parity with the reference pipeline, static batching, the chat template,
and the OpenAI wire format (in process, on the tiny checkpoint)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from benchmarks.hf_engine import HFEngine, Job, Sampling
from benchmarks.hf_server import ChatMessage, GenerationDefaults, create_app, render_messages, visible_text
from benchmarks.reference import ReferencePipeline
from benchmarks.scenarios import photo_data_url
from encoders.samples import synthetic_skin_photo
from plugins.skingpt4.template import CONSULT_QUESTIONS, build_prompt, image_question

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return ReferencePipeline(tiny_model)


def _prompts() -> list[tuple[str, list]]:
    """Prompts of different lengths (so the batch is padded) with one or two photos."""
    out = []
    for i in range(4):
        question = "Could you describe it? " * i + "What's wrong with my skin?"
        n = 1 + i % 2
        out.append((build_prompt([("user", image_question(question, n))]), [synthetic_skin_photo(i + k) for k in range(n)]))
    return out


def _run_jobs(engine: HFEngine, prompts, sampling: Sampling) -> list[Job]:
    async def go():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, imgs, sampling, loop) for p, imgs in prompts]
        for job in jobs:
            engine.submit(job)
        for job in jobs:
            while (await job.events.get())[0] not in ("done", "error"):
                pass
        return jobs

    return asyncio.run(go())


def test_static_batch_matches_the_reference_pipeline_greedy(pipeline):
    prompts = _prompts()
    with HFEngine(pipeline, max_batch_size=8, batch_wait_s=1.0) as engine:
        jobs = _run_jobs(engine, prompts, Sampling(MAX_TOKENS, temperature=0.0, top_p=1.0))
    assert engine.batch_sizes == [len(prompts)]  # one left-padded generate over all four
    for (prompt, images), job in zip(prompts, jobs):
        expected = pipeline.generate(prompt, images, max_new_tokens=MAX_TOKENS, temperature=0)
        assert job.token_ids == expected.token_ids


def test_reference_mode_runs_one_request_at_a_time(pipeline):
    with HFEngine(pipeline, max_batch_size=1) as engine:
        jobs = _run_jobs(engine, _prompts()[:3], Sampling(4, temperature=0.0, top_p=1.0))
    assert engine.batch_sizes == [1, 1, 1]
    assert all(len(job.token_ids) <= 4 for job in jobs)


def test_batches_group_requests_by_sampling_settings(pipeline):
    greedy, sampled = Sampling(3, 0.0, 1.0), Sampling(3, 1.0, 0.9, seed=1)

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, imgs, s, loop) for (p, imgs), s in zip(_prompts(), (greedy, sampled, greedy, sampled))]
        for job in jobs:
            engine.submit(job)
        for job in jobs:
            while (await job.events.get())[0] != "done":
                pass

    with HFEngine(pipeline, max_batch_size=8, batch_wait_s=0.5) as engine:
        asyncio.run(go())
    assert sorted(engine.batch_sizes) == [2, 2]


def test_close_stops_the_worker_thread(pipeline):
    engine = HFEngine(pipeline, max_batch_size=4)
    assert engine.thread in threading.enumerate()
    engine.close()
    assert not engine.thread.is_alive() and engine.thread not in threading.enumerate()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(Job("x", [], Sampling(1, 0.0, 1.0), asyncio.new_event_loop()))


def test_close_ends_a_running_batch_and_fails_waiting_jobs(pipeline):
    engine = HFEngine(pipeline, max_batch_size=1)
    long = Sampling(10_000, temperature=0.0, top_p=1.0)

    async def go():
        loop = asyncio.get_running_loop()
        (p0, imgs0), (p1, imgs1) = _prompts()[:2]
        running, waiting = Job(p0, imgs0, long, loop), Job(p1, imgs1, long, loop)
        engine.submit(running)
        engine.submit(waiting)
        while (await running.events.get())[0] != "token":
            pass  # the first batch is in generate
        await asyncio.to_thread(engine.close)
        last = [event async for event in _drain(running)][-1]
        assert last[0] == "done" and len(running.token_ids) < 10_000
        assert [event async for event in _drain(waiting)][-1][0] == "error"

    asyncio.run(go())
    assert not engine.thread.is_alive()


async def _drain(job: Job):
    while True:
        event = await job.events.get()
        yield event
        if event[0] in ("done", "error"):
            return


def _messages(photos: list[str], turns: int) -> list[dict]:
    first = [{"type": "image_url", "image_url": {"url": url}} for url in photos]
    msgs = [{"role": "user", "content": first + [{"type": "text", "text": CONSULT_QUESTIONS[0]}]}]
    for q in CONSULT_QUESTIONS[1:turns]:
        msgs += [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": q}]
    return msgs


@pytest.mark.parametrize("n_photos,turns", [(1, 1), (2, 1), (1, 4)])
def test_rendering_matches_the_skingpt4_chat_template(pipeline, n_photos, turns):
    msgs = _messages([photo_data_url(i, (32, 32)) for i in range(n_photos)], turns)
    prompt, images = render_messages([ChatMessage.model_validate(m) for m in msgs])
    tok = pipeline.tokenizer
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).removeprefix(tok.bos_token)
    assert prompt == expected
    assert len(images) == n_photos and prompt.count("<ImageHere>") == n_photos


def test_assistant_parts_are_trimmed_and_images_come_in_order():
    photos = [photo_data_url(i, (32, 32)) for i in range(2)]
    msgs = [
        {"role": "user", "content": [
            {"type": "text", "text": "Close-up:"}, {"type": "image_url", "image_url": {"url": photos[0]}},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": " Eczema. "}]},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": photos[1]}}, {"type": "text", "text": "And?"},
        ]},
    ]
    prompt, images = render_messages([ChatMessage.model_validate(m) for m in msgs])
    assert prompt.endswith(
        "###Human: Close-up: <Img><ImageHere></Img>###Assistant: Eczema.###Human: <Img><ImageHere></Img> And?###Assistant:"
    )
    assert [im.size for im in images] == [(32, 32), (32, 32)]


def test_generation_defaults_come_from_the_model_folder(tiny_model, tmp_path):
    demo = GenerationDefaults(max_tokens=300, temperature=1.0, top_p=0.9)
    assert GenerationDefaults.from_folder(tiny_model) == demo
    assert GenerationDefaults.from_folder(tmp_path) == GenerationDefaults()  # no generation_config.json
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 7}')
    assert GenerationDefaults.from_folder(tmp_path) == GenerationDefaults(max_tokens=7, temperature=0.0, top_p=0.9)


def test_a_system_message_replaces_the_default_system_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt, _ = render_messages([ChatMessage.model_validate(m) for m in msgs])
    assert prompt == "Be brief.###Human: Hi###Assistant:"


def test_visible_text_holds_back_a_possible_separator():
    assert visible_text(" Red plaque #", final=False) == "Red plaque"
    assert visible_text(" Red plaque ##", final=True) == "Red plaque ##"
    assert visible_text(" Red plaque ### Human", final=False) == "Red plaque"


@pytest.fixture(scope="module")
def client(pipeline):
    engine = HFEngine(pipeline, max_batch_size=4, batch_wait_s=0.01)
    with TestClient(create_app(engine, "tiny", GenerationDefaults())) as c:
        yield c
    assert not engine.thread.is_alive()  # the app's shutdown closed the engine


def _body(**extra) -> dict:
    return {"model": "tiny", "messages": _messages([photo_data_url(3, (64, 48))], 1),
            "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def _sse_events(client, body) -> list[dict]:
    events = []
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_streaming_matches_non_streaming_and_ends_with_usage(client):
    full = client.post("/v1/chat/completions", json=_body())
    assert full.status_code == 200
    answer = full.json()
    events = _sse_events(client, _body(stream=True, stream_options={"include_usage": True}))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == answer["choices"][0]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == answer["usage"]
    assert answer["usage"]["completion_tokens"] <= MAX_TOKENS
    assert answer["usage"]["prompt_tokens"] > 32  # text tokens + the image's 32 positions
    assert events[-2]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
    ChatCompletion.model_validate(answer)  # the wire format is the openai package's
    for event in events:
        ChatCompletionChunk.model_validate(event)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["delta"] == {} and events[-2]["choices"][0]["logprobs"] is None


def test_streaming_without_include_usage_sends_no_usage(client):
    events = _sse_events(client, _body(stream=True))
    assert all("usage" not in e for e in events)


def test_health_and_models(client):
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("body,status,needle", [
    (_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.jpg"}}]}]), 400, "not a data URL"),
    (_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}]), 400, "not an image PIL can read"),
    (_body(model="other"), 404, "'other'"),
    (_body(n=2), 400, "n is 2"),
    (_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "last message"),
])
def test_bad_requests_get_openai_errors(client, body, status, needle):
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == status
    assert needle in resp.json()["error"]["message"]
