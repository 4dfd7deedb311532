"""``POST /v1/responses``: the route's contract and checks without an engine, the prompt vLLM
renders from it (the same conversation as chat's), the contract tables of docs/responses.md, and
the embedded server through the unmodified ``openai`` SDK (``client.responses.create`` and
``client.responses.stream``): the same greedy answer as chat, usage, refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from serving.api.json_schema import report_schema
from serving.api.errors import (
    InvalidImage,
    InvalidRequest,
    PayloadTooLarge,
    RemoteImageRefused,
    ServingError,
)
from serving.api.policy import ServePolicy
from serving.api.responses import EXCLUDED, ResponsesRequest, prepare_responses_request
from serving.api.routes import RESPONSES
from tests.serving.helpers import data_url, image_message

DOCS = Path(__file__).resolve().parents[3] / "docs" / "responses.md"
QUESTION = "What's wrong with my skin?"
GREEDY_TOKENS = 12
POLICY = ServePolicy()


def prepare(body, policy: ServePolicy = POLICY) -> dict:
    return asyncio.run(prepare_responses_request(body, policy))


def refusal(body, policy: ServePolicy = POLICY) -> ServingError:
    with pytest.raises(ServingError) as info:
        prepare(body, policy)
    return info.value


def photo_input(url: str, text: str = QUESTION) -> list[dict]:
    """The issue's example: one user message, the photo then the question."""
    return [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                         {"type": "input_text", "text": text}]}]


def body_with(**fields) -> dict:
    return {"model": "skingpt4", "input": "Hello", **fields}


@pytest.fixture(scope="module")
def photo(photos):
    from encoders.samples import encode_image

    return data_url(encode_image(photos[0]))


# --------------------------------------------------------------------------- the contract


def test_the_issue_example_is_forwarded_checked(photo):
    out = prepare({"model": "skingpt4", "input": photo_input(photo)})
    part = out["input"][0]["content"][0]
    assert part["type"] == "input_image"
    assert part["image_url"].startswith("data:image/png;base64,")  # decoded once, forwarded small
    png = base64.b64decode(part["image_url"].split(",", 1)[1])
    assert png[16:24] == (224).to_bytes(4, "big") * 2  # IHDR: 224 x 224
    assert out["input"][0]["content"][1] == {"type": "input_text", "text": QUESTION}
    assert out["store"] is False
    assert out["stop"] == ["###"]
    assert out["chat_template_kwargs"] == {"tokenize": True}


def test_vllm_accepts_the_forwarded_body(photo):
    """What the middleware forwards is a valid vLLM ResponsesRequest with the SkinGPT-4 stop,
    nothing stored, and the report schema as the structured-output grammar."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmRequest

    plain = VllmRequest.model_validate(prepare({"model": "skingpt4", "input": photo_input(photo),
                                                "max_output_tokens": 7}))
    params = plain.to_sampling_params(300, {})
    assert params.stop == ["###"] and params.max_tokens == 7
    assert plain.store is False and plain.previous_response_id is None
    report = VllmRequest.model_validate(prepare(body_with(
        text={"format": {"type": "json_schema", "name": "dermatology_report"}})))
    assert report.extract_structured_outputs().json == report_schema()
    assert report.to_sampling_params(300, {}).stop == []  # the grammar ends a JSON answer


def test_every_vllm_field_is_accepted_or_refused_with_a_reason():
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmRequest

    ours = {info.alias or name for name, info in ResponsesRequest.model_fields.items()}
    theirs = {info.alias or name for name, info in VllmRequest.model_fields.items()}
    assert theirs - ours - set(EXCLUDED) == set()
    assert ours & set(EXCLUDED) == set()


@pytest.mark.parametrize("field, value", [
    ("foo", None), ("previous_response_id", "resp_1"), ("tools", [{"type": "web_search"}]),
    ("seed", 1), ("stop", ["x"]), ("truncation", "auto"), ("include", ["message.output_text.logprobs"]),
    ("chat_template_kwargs", {"tokenize": False}), ("mm_processor_kwargs", {"size": 1}),
    ("structured_outputs", {"regex": "a"}), ("conversation", "conv_1"),
])
def test_fields_outside_the_contract_are_named(field, value):
    error = refusal(body_with(**{field: value}))
    assert isinstance(error, InvalidRequest) and error.status == 400
    assert error.param == field
    reason = EXCLUDED[field].reason if field in EXCLUDED else "it is not part of this API"
    assert f"unknown or unsupported field {field!r} on {RESPONSES}: {reason}" in error.message


def test_previous_response_id_says_to_send_the_conversation():
    error = refusal(body_with(previous_response_id="resp_0123"))
    assert "conversations are not stored" in error.message
    assert "send the whole conversation in input" in error.message


@pytest.mark.parametrize("given", [None, False])
def test_store_is_forced_off(given):
    body = body_with() if given is None else body_with(store=given)
    assert prepare(body)["store"] is False


def test_store_true_is_refused():
    error = refusal(body_with(store=True))
    assert error.param == "store" and "not stored" in error.message


@pytest.mark.parametrize("field, value, words", [
    ("temperature", "1", "valid number"),
    ("temperature", 2.5, "at most 2"),
    ("top_p", 0, "greater than 0"),
    ("max_output_tokens", 0, "at least 1"),
    ("max_output_tokens", True, "valid integer"),
    ("stream", 1, "valid boolean"),
    ("user", "u" * 257, "at most 256"),
    ("metadata", {str(i): "v" for i in range(17)}, "at most 16"),
    ("metadata", {"k": 1}, "valid string"),
    ("metadata", {"k": "v" * 513}, "values of at most 512"),
    ("instructions", 5, "valid string"),
    ("model", "", "at least 1"),
])
def test_values_are_checked_strictly(field, value, words):
    error = refusal(body_with(**{field: value}))
    assert error.status == 400 and error.param.split(".")[0] == field
    assert words in error.message


@pytest.mark.parametrize("value", [5, None, {"role": "user"}, []])
def test_input_must_be_text_or_messages(value):
    error = refusal(body_with(input=value))
    assert error.param == "input" and "input" in error.message


def test_input_is_required():
    error = refusal({"model": "skingpt4"})
    assert error.param == "input" and "required" in error.message


@pytest.mark.parametrize("item, where, words", [
    ({"type": "function_call_output", "call_id": "c", "output": "x"}, "input[0].type",
     "item type 'function_call_output' is not accepted"),
    ({"type": "item_reference", "id": "msg_1"}, "input[0].type", "is not accepted"),
    ({"role": "tool", "content": "x"}, "input[0].role", "accepted roles"),
    ({"role": "user", "content": "x", "name": "n"}, "input[0].name", "unknown field 'name'"),
    ({"role": "user", "content": 5}, "input[0].content", "a string or a list of parts"),
    ({"role": "user", "content": [{"type": "text", "text": "chat-style"}]}, "input[0].content[0]",
     "part type 'text' is not accepted"),
    ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}, "input[0].content[0]",
     "part type 'input_file' is not accepted"),
    ({"role": "assistant", "status": "incomplete", "content": "It is"}, "input[0].status",
     "only completed answers"),
    ({"role": "assistant", "content": "x", "phase": "draft"}, "input[0].phase", "phase"),
    ("just text", "input[0]", "must be a message object"),
])
def test_input_items_outside_the_contract(item, where, words):
    error = refusal(body_with(input=[item]))
    assert error.status == 400 and error.param == where and words in error.message


@pytest.mark.parametrize("role", ["system", "assistant"])
def test_photos_only_in_user_messages(photo, role):
    item = {"role": role, "content": [{"type": "input_image", "image_url": photo}]}
    error = refusal(body_with(input=[item, {"role": "user", "content": QUESTION}]))
    assert error.param == "input[0].content[0]"
    assert "photos only in user messages" in error.message


@pytest.mark.parametrize("part, error_type, words", [
    ({"type": "input_image", "image_url": "data:image/jpeg;base64,@@not-base64@@"}, InvalidImage,
     "base64"),
    ({"type": "input_image", "image_url": data_url(b"%PDF-1.4 not a photo " * 8)}, InvalidImage,
     "image"),
    ({"type": "input_image", "file_id": "file-123"}, InvalidRequest, "unknown field 'file_id'"),
    ({"type": "input_image", "image_url": ""}, InvalidRequest, "non-empty string"),
    ({"type": "input_image", "image_url": {"url": "data:,"}}, InvalidRequest, "non-empty string"),
    ({"type": "input_image", "image_url": "data:,", "detail": "huge"}, InvalidRequest, "detail"),
    ({"type": "input_image", "image_url": "https://images.example.org/a.jpg"}, RemoteImageRefused,
     "remote image URLs are disabled"),
])
def test_bad_input_images(part, error_type, words):
    error = refusal(body_with(input=[{"role": "user", "content": [part]}]))
    assert isinstance(error, error_type) and 400 <= error.status < 500
    assert words in error.message
    assert "input[0].content[0]" in error.message


def test_an_oversized_photo_is_refused_before_decoding(photo):
    small = ServePolicy(max_image_bytes=1000)
    error = refusal(body_with(input=photo_input(photo)), small)
    assert isinstance(error, PayloadTooLarge) and error.status == 413


def test_too_many_photos(photo):
    parts = [{"type": "input_image", "image_url": photo}] * (POLICY.max_images_per_request + 1)
    error = refusal(body_with(input=[{"role": "user", "content": parts}]))
    assert error.param == "input" and f"limit is {POLICY.max_images_per_request}" in error.message


@pytest.mark.parametrize("field", ["input", "instructions"])
def test_text_is_checked_as_on_chat(field):
    for text, words in (("<ImageHere>", "reserved token"), ("\ud800", "not valid Unicode")):
        error = refusal(body_with(**{field: text}))
        assert error.param == field and words in error.message


def test_text_size_counts_instructions_and_every_message():
    small = ServePolicy(max_text_chars=10)
    messages = [{"role": "user", "content": "12345"}, {"role": "assistant", "content": "123"}]
    assert prepare(body_with(input=messages), small)
    error = refusal(body_with(input=messages, instructions="123"), small)
    assert "11 characters of text; the limit is 10" in error.message


def test_earlier_answers_come_back_as_they_left():
    """A previous response's output message (what the SDK sends back, nulls included) becomes
    the plain assistant message chat would get; all its text parts are kept."""
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
              "phase": None, "content": [
                  {"type": "output_text", "text": " It looks like eczema. ", "annotations": [],
                   "logprobs": None},
                  {"type": "output_text", "text": "See a doctor.", "annotations": []}]}
    out = prepare(body_with(input=[{"role": "user", "content": QUESTION}, answer,
                                   {"type": "message", "role": "user", "content": "Sure?"}]))
    assert out["input"] == [{"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": "It looks like eczema. See a doctor."},
                            {"role": "user", "content": "Sure?"}]


def test_instructions_and_system_messages_pass_unchanged():
    system = {"role": "system", "content": [{"type": "input_text", "text": "Be brief."}]}
    out = prepare(body_with(instructions="You are a dermatologist.", input=[system]))
    assert out["instructions"] == "You are a dermatologist."
    assert out["input"] == [system]


def test_report_schema_by_name():
    out = prepare(body_with(text={"format": {"type": "json_schema", "name": "dermatology_report"}}))
    assert out["text"]["format"]["schema"] == report_schema()
    assert "stop" not in out  # a ### inside a JSON string must not cut the answer


@pytest.mark.parametrize("fmt, stop", [({"type": "json_object"}, None), ({"type": "text"}, ["###"])])
def test_text_formats_and_the_stop(fmt, stop):
    out = prepare(body_with(text={"format": fmt}))
    assert out["text"]["format"] == fmt and out.get("stop") == stop


@pytest.mark.parametrize("fmt, param, words", [
    ({"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}, "text.format.schema",
     "text.format.schema is not a valid JSON schema"),
    ({"type": "json_schema", "name": "x", "schema": {"$ref": "#/definitions/missing"}},
     "text.format.schema", "cannot compile it"),
    ({"type": "json_schema", "name": "x"}, "text.format.schema", "must be a JSON schema object"),
    ({"type": "json_schema", "schema": {}}, "text.format", "needs a name"),
    ({"type": "json_object", "schema": {}}, "text.format", "only with type json_schema"),
    ({"type": "regex", "pattern": "a+"}, "text.format.type", "Input should be"),
    ({"type": "json_schema", "name": "bad name!", "schema": {}}, "text.format.name", "pattern"),
])
def test_text_format_outside_the_contract(fmt, param, words):
    error = refusal(body_with(text={"format": fmt}))
    assert error.param == param and words in error.message
    assert "response_format" not in error.message


def test_text_verbosity_is_refused():
    error = refusal(body_with(text={"format": {"type": "text"}, "verbosity": "low"}))
    assert error.param == "text.verbosity"


# --------------------------------------------------------------------------- the prompt


@pytest.fixture(scope="module")
def model_config(tiny_checkpoints):
    """vLLM's model config of the tiny Llama folder (the plugin registered in this process)."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return ModelConfig(model=str(tiny_checkpoints["llama"]), dtype="float32", max_model_len=1024)


def test_vllm_renders_the_chat_prompt(model_config, photo, tiny_checkpoints):
    """vLLM's own steps (Responses input -> chat messages -> template conversation) give the
    conversation chat gives for the same consult: instructions as the system message, input_image
    and input_text parts as chat's image and text parts, earlier answers as assistant messages.
    The template then renders both to the same token ids."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmRequest
    from vllm.entrypoints.openai.responses.utils import construct_input_messages
    from vllm.renderers.chat_utils import parse_chat_messages

    from serving.api.chat import prepare_chat_request

    answer = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": " Eczema. ", "annotations": []}]}
    responses = VllmRequest.model_validate(prepare(body_with(
        instructions="Be brief.", input=[*photo_input(photo), answer, {"role": "user", "content": "Sure?"}])))
    chat_body = asyncio.run(prepare_chat_request({"model": "skingpt4", "messages": [
        {"role": "system", "content": "Be brief."}, image_message([photo], QUESTION),
        {"role": "assistant", "content": " Eczema. "}, {"role": "user", "content": "Sure?"}]}, POLICY))
    chat = ChatCompletionRequest.model_validate(chat_body)

    messages = construct_input_messages(request_instructions=responses.instructions,
                                        request_input=responses.input)
    ours, ours_mm, _ = parse_chat_messages(messages, model_config, "openai")
    theirs, theirs_mm, _ = parse_chat_messages(chat.messages, model_config, "openai")

    def plain(conversation):  # what the template reads (it trims answers)
        def part(p, role):
            out = {k: p[k] for k in ("type", "text") if k in p}
            return {**out, "text": out["text"].strip()} if role == "assistant" else out
        return [{"role": m["role"], "content": [part(p, m["role"]) for p in m["content"]]}
                for m in conversation]

    assert plain(ours) == plain(theirs)
    assert len(ours_mm["image"]) == len(theirs_mm["image"]) == 1
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    chat_ids = tok(tok.apply_chat_template(theirs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    ours_ids = tok.apply_chat_template(ours, tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
    assert ours_ids == chat_ids
    assert chat_ids.count(tok.bos_token_id) == 1


# --------------------------------------------------------------------------- docs


def table_after(heading: str) -> list[list[str]]:
    text = DOCS.read_text()
    rows = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def test_docs_list_the_accepted_fields():
    documented = {re.fullmatch(r"`(\w+)`", row[0]).group(1)
                  for row in table_after("### Request contract")}
    assert documented == {info.alias or name for name, info in ResponsesRequest.model_fields.items()}


def test_docs_list_the_refused_fields_with_their_reasons_and_neutral_values():
    rows = table_after("Fields vLLM or OpenAI know that are refused")
    documented = {row[0].strip("`"): (row[1], row[2]) for row in rows}
    assert documented == {name: (rule.reason, rule.accepted_as()) for name, rule in EXCLUDED.items()}


# --------------------------------------------------------------------------- the server


def chat_answer(server, messages, **kw):
    return server.client().chat.completions.create(
        model=server.model, messages=messages, temperature=0, max_tokens=GREEDY_TOKENS, **kw)


def test_create_answers_like_chat(server, photo_urls):
    """The issue's example: the same greedy text as chat, the same prompt and answer lengths."""
    client = server.client()
    r = client.responses.create(model=server.model, input=photo_input(photo_urls[0]),
                                temperature=0, max_output_tokens=GREEDY_TOKENS)
    chat = chat_answer(server, [image_message(photo_urls[:1], QUESTION)])
    assert r.object == "response" and r.output_text
    assert r.output_text == chat.choices[0].message.content
    assert "###" not in r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status in ("completed", "incomplete")
    # Another photo changes the answer: the photo reached the model.
    other = client.responses.create(model=server.model, input=photo_input(photo_urls[1]),
                                    temperature=0, max_output_tokens=GREEDY_TOKENS)
    assert other.output_text != r.output_text


def test_stream_answers_like_create(server, photo_urls):
    client = server.client()
    whole = client.responses.create(model=server.model, input=photo_input(photo_urls[0]),
                                    temperature=0, max_output_tokens=GREEDY_TOKENS)
    assert whole.status == "incomplete"  # the greedy answer is longer than GREEDY_TOKENS
    with client.responses.stream(model=server.model, input=photo_input(photo_urls[0]),
                                 temperature=0, max_output_tokens=GREEDY_TOKENS) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    # As OpenAI's stream ends an answer cut at max_output_tokens (the SDK's get_final_response
    # waits for response.completed, so the last event carries the response here).
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert "response.output_text.done" in kinds and "response.completed" not in kinds
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    # stream=True on create: the same events, without the SDK's accumulator.
    raw = list(client.responses.create(model=server.model, input=photo_input(photo_urls[0]),
                                       temperature=0, max_output_tokens=GREEDY_TOKENS, stream=True))
    assert "".join(e.delta for e in raw if e.type == "response.output_text.delta") == whole.output_text
    assert raw[-1].type == "response.incomplete" and raw[-1].response.usage.output_tokens > 0
    # An answer that ends at SkinGPT-4's ### stop ends with response.completed.
    with client.responses.stream(model=server.model, input=photo_input(photo_urls[0]),
                                 temperature=0, max_output_tokens=600) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text.startswith(whole.output_text)


def test_a_consult_with_instructions_answers_like_chat(server, photo_urls):
    """Turn 2 sends turn 1's output back as the SDK returned it; instructions play the system
    message."""
    client = server.client()
    first = client.responses.create(model=server.model, instructions="Answer briefly.",
                                    input=photo_input(photo_urls[1]), temperature=0,
                                    max_output_tokens=GREEDY_TOKENS)
    system = {"role": "system", "content": "Answer briefly."}
    chat_first = chat_answer(server, [system, image_message(photo_urls[1:2], QUESTION)])
    assert first.output_text == chat_first.choices[0].message.content
    second = client.responses.create(
        model=server.model, instructions="Answer briefly.", temperature=0,
        max_output_tokens=GREEDY_TOKENS,
        input=[*photo_input(photo_urls[1]), *first.output, {"role": "user", "content": "Is it serious?"}])
    chat_second = chat_answer(server, [system, image_message(photo_urls[1:2], QUESTION),
                                       {"role": "assistant", "content": first.output_text},
                                       {"role": "user", "content": "Is it serious?"}])
    assert second.output_text == chat_second.choices[0].message.content
    assert second.usage.input_tokens == chat_second.usage.prompt_tokens > first.usage.input_tokens


def test_a_developer_message_answers_like_a_system_message(server, photo_urls):
    """OpenAI's SDKs send the instructions as a developer message: on both routes it is the
    system message (the same greedy answer and prompt), not dropped (the default system prompt
    would give another prompt length)."""
    client = server.client()
    consult = image_message(photo_urls[:1], QUESTION)

    def chat(role):
        return chat_answer(server, [{"role": role, "content": "Answer briefly."}, consult])

    def responses(role):
        return client.responses.create(
            model=server.model, temperature=0, max_output_tokens=GREEDY_TOKENS,
            input=[{"role": role, "content": "Answer briefly."}, *photo_input(photo_urls[0])])

    system, developer = chat("system"), chat("developer")
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert system.usage.prompt_tokens != chat_answer(server, [consult]).usage.prompt_tokens
    r_system, r_developer = responses("system"), responses("developer")
    assert r_developer.output_text == r_system.output_text == system.choices[0].message.content
    assert r_developer.usage.input_tokens == r_system.usage.input_tokens == system.usage.prompt_tokens


def test_the_agents_sdk_request_shape_answers_as_without_its_empty_fields(server, photo_urls):
    """The OpenAI Agents SDK sends include: [] and tools: [] on every call (and the model
    settings it is given, here ones that ask for nothing): the same greedy answer as without."""
    client = server.client()
    kw = dict(model=server.model, instructions="Answer briefly.", input=photo_input(photo_urls[0]),
              temperature=0, max_output_tokens=GREEDY_TOKENS)
    plain = client.responses.create(**kw)
    agents = client.responses.create(**kw, include=[], tools=[], tool_choice="auto",
                                     parallel_tool_calls=False, truncation="disabled", store=False,
                                     reasoning={"effort": "none"}, top_logprobs=0)
    assert agents.output_text == plain.output_text
    assert agents.usage.input_tokens == plain.usage.input_tokens
    assert agents.usage.output_tokens == plain.usage.output_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**kw, include=["message.output_text.logprobs"])
    assert info.value.body["param"] == "include"


def test_usage_reports_cached_tokens(server, photo_urls):
    client = server.client()
    kw = dict(model=server.model, input=photo_input(photo_urls[2], "Is this a mole?"),
              temperature=0, max_output_tokens=4)
    client.responses.create(**kw)
    again = client.responses.create(**kw)
    cached = again.usage.input_tokens_details.cached_tokens
    assert 32 <= cached < again.usage.input_tokens  # the photo's KV blocks were reused
    # The same token ids as chat: chat reuses the blocks the Responses request cached.
    chat = chat_answer(server, [image_message(photo_urls[2:3], "Is this a mole?")])
    assert chat.usage.prompt_tokens_details.cached_tokens == cached


@pytest.mark.parametrize("photo_index", [0, 1])
def test_dermatology_report(server, photo_urls, photo_index):
    r = server.client(timeout=300).responses.create(
        model=server.model, temperature=0, max_output_tokens=900,
        input=photo_input(photo_urls[photo_index], "Write a dermatology report as JSON."),
        text={"format": {"type": "json_schema", "name": "dermatology_report"}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), report_schema())


def test_refusals_through_the_sdk(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input="Hi", previous_response_id="resp_1")
    assert "send the whole conversation in input" in info.value.body["message"]
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input="Hi", store=True)
    assert info.value.body["param"] == "store"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input="Hi", extra_body={"top_k": 5})
    assert "'top_k'" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,@@"}]}])
    assert info.value.body["code"] == "invalid_image"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="another-model", input="Hi")


def test_nothing_is_stored(server):
    client = server.client()
    r = client.responses.create(model=server.model, input="Hi", max_output_tokens=2)
    assert r.id.startswith("resp_")
    for method, path in (("GET", f"/v1/responses/{r.id}"), ("POST", f"/v1/responses/{r.id}/cancel")):
        answer = httpx.request(method, server.base_url + path, headers=server.headers())
        assert answer.status_code == 404, path


def test_route_needs_the_key(server):
    answer = httpx.post(server.base_url + RESPONSES, json=body_with())
    assert answer.status_code == 401
