"""The embedded server through the official ``openai`` SDK: image chat, streaming, consults,
several images, the JSON report, models and metrics."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from transformers import AutoTokenizer

from plugins.skingpt4.template import CONSULT_QUESTIONS
from serving.api.json_schema import report_schema
from tests.serving.helpers import image_message

GREEDY = dict(temperature=0, max_tokens=12)


def expected_prompt_tokens(folder, messages) -> int:
    """Text tokens of the SkinGPT-4 prompt plus 32 positions per image."""
    tok = AutoTokenizer.from_pretrained(folder)
    plain, images = [], 0
    for m in messages:
        if isinstance(m["content"], str):
            plain.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image_url":
                images += 1
                parts.append({"type": "image"})
            else:
                parts.append(p)
        plain.append({"role": m["role"], "content": parts})
    text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    return len(ids) - images + 32 * images


def test_image_chat(server, photo_urls):
    messages = [image_message(photo_urls[:1])]
    r = server.client().chat.completions.create(model=server.model, messages=messages, **GREEDY)
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == expected_prompt_tokens(server.folder, messages)


def test_different_photos_give_different_answers(server, photo_urls):
    client = server.client()
    answers = {
        client.chat.completions.create(model=server.model, messages=[image_message([u])], **GREEDY)
        .choices[0].message.content
        for u in photo_urls[:2]
    }
    assert len(answers) == 2


def test_streaming_matches_non_streaming(server, photo_urls):
    client = server.client()
    messages = [image_message(photo_urls[:1])]
    whole = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model=server.model, messages=messages, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_three_turn_consult_keeps_the_image(server, photo_urls):
    client = server.client()
    messages = [image_message(photo_urls[:1], CONSULT_QUESTIONS[0])]
    counts = []
    for question in CONSULT_QUESTIONS[1:3]:
        r = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
        counts.append(r.usage.prompt_tokens)
        assert r.usage.prompt_tokens == expected_prompt_tokens(server.folder, messages)
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": question}]
    last = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    assert last.usage.prompt_tokens == expected_prompt_tokens(server.folder, messages)
    assert counts[0] < counts[1] < last.usage.prompt_tokens
    # The image still shapes the third answer: another photo in turn 1 changes it.
    other = [image_message(photo_urls[1:2], CONSULT_QUESTIONS[0]), *messages[1:]]
    changed = client.chat.completions.create(model=server.model, messages=other, **GREEDY)
    assert changed.choices[0].message.content != last.choices[0].message.content


def test_two_images_in_one_request(server, photo_urls):
    messages = [image_message(photo_urls[:2], "Close-up and wider photo: what is it?")]
    r = server.client().chat.completions.create(model=server.model, messages=messages, **GREEDY)
    assert r.usage.prompt_tokens == expected_prompt_tokens(server.folder, messages)
    one = server.client().chat.completions.create(
        model=server.model, messages=[image_message(photo_urls[:1], "Close-up and wider photo: what is it?")], **GREEDY
    )
    assert r.usage.prompt_tokens > one.usage.prompt_tokens + 32


@pytest.mark.parametrize("seed", [0, 1])
def test_dermatology_report_is_schema_valid(server, photo_urls, seed):
    r = server.client().chat.completions.create(
        model=server.model,
        messages=[image_message(photo_urls[:1], "Write a dermatology report as JSON.")],
        response_format={"type": "json_schema", "json_schema": {"name": "dermatology_report"}},
        max_tokens=900, seed=seed,
    )
    assert r.choices[0].finish_reason == "stop"
    report = json.loads(r.choices[0].message.content)
    jsonschema.validate(report, report_schema())


def test_models_health_metrics(server, photo_urls):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics", headers=server.headers())
    assert metrics.status_code == 200
    assert "vllm:prompt_tokens_total" in metrics.text
    assert "vllm:request_success_total" in metrics.text


def test_defaults_follow_skingpt4(server, photo_urls):
    """No sampling fields: the model folder's generation_config.json applies (sampling, up to 300
    tokens) and answers stop at ###."""
    gen = json.loads((server.folder / "generation_config.json").read_text())
    client, messages = server.client(timeout=300), [image_message(photo_urls[:1])]
    r = client.chat.completions.create(model=server.model, messages=messages)
    assert "###" not in r.choices[0].message.content
    # min_tokens holds EOS and the ### stop off until the cap, so only the cap can end this answer
    # at exactly max_new_tokens; without the folder's default vLLM would allow the rest of the
    # 1024-position context.
    capped = client.chat.completions.create(model=server.model, messages=messages,
                                            extra_body={"min_tokens": gen["max_new_tokens"]})
    assert capped.usage.completion_tokens == gen["max_new_tokens"] == 300
    assert capped.choices[0].finish_reason == "length"
    # Sampling is on (do_sample, temperature 1.0): seeds change the answer, a seed repeats it.
    answers = [client.chat.completions.create(model=server.model, messages=messages, seed=seed,
                                              max_tokens=16).choices[0].message.content
               for seed in (0, 1, 2, 0)]
    assert answers[3] == answers[0]
    assert len(set(answers[:3])) > 1
