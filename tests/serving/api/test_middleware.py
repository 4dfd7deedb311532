"""The request policy at the ASGI level, without an engine: a recording app stands in for vLLM."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from encoders import ImagePreprocessor
from encoders.samples import synthetic_skin_photo
from serving.api.middleware import RequestPolicyMiddleware
from serving.api.policy import ServePolicy

KEY = "unit-key-0123456789"


class RecordingApp:
    """Answers 200 with ``{}`` and keeps each body it was handed; ``/tokenize`` (the middleware's
    prompt count) answers that every prompt has ``PROMPT_TOKENS`` of ``CONTEXT`` tokens."""

    PROMPT_TOKENS, CONTEXT = 100, 1024

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.counted: list[dict] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        body = json.loads(message["body"]) if message["body"] else {}
        answer = b"{}"
        if scope["path"] == "/tokenize":
            self.counted.append(body)
            answer = json.dumps({"count": self.PROMPT_TOKENS, "max_model_len": self.CONTEXT,
                                 "tokens": []}).encode()
        else:
            self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


def make(**policy):
    app = RecordingApp()
    policy = ServePolicy(api_key=KEY, **policy)
    middleware = RequestPolicyMiddleware(app, policy)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware),
                               base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {KEY}"})
    return app, client


def post(body, path="/v1/chat/completions", raw: bytes | None = None, **policy):
    async def go():
        app, client = make(**policy)
        async with client:
            if raw is not None:
                r = await client.post(path, content=raw, headers={"content-type": "application/json"})
            else:  # ASCII JSON: lone surrogates travel as \ud800 escapes, as clients send them
                r = await client.post(path, content=json.dumps(body).encode(),
                                      headers={"content-type": "application/json"})
        return app, r

    return asyncio.run(go())


def photo_url(image: Image.Image, fmt: str = "JPEG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def chat(*parts, **fields):
    content = [p if isinstance(p, dict) else {"type": "image_url", "image_url": {"url": p}} for p in parts]
    return {"model": "skingpt4", "messages": [{"role": "user", "content": content}], **fields}


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["message"]
    return error


def test_a_good_request_reaches_the_app_with_the_photo_made_small():
    photo = synthetic_skin_photo(seed=3, size=(1200, 900))
    app, r = post(chat(photo_url(photo), {"type": "text", "text": "What is it?"}))
    assert r.status_code == 200
    (body,) = app.bodies
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    forwarded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert forwarded.size == (224, 224) and forwarded.mode == "RGB"
    decoded = Image.open(io.BytesIO(base64.b64decode(photo_url(photo).split(",", 1)[1])))
    assert forwarded.tobytes() == ImagePreprocessor().resize(decoded).tobytes()
    assert body["stop"] == ["###"]


def test_the_photo_is_turned_upright_from_its_exif_orientation():
    photo = synthetic_skin_photo(seed=4, size=(640, 320))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    app, r = post(chat(photo_url(photo, exif=exif.tobytes())))
    assert r.status_code == 200
    url = app.bodies[0]["messages"][0]["content"][0]["image_url"]["url"]
    forwarded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    stored = Image.open(io.BytesIO(base64.b64decode(photo_url(photo).split(",", 1)[1])))
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert forwarded.tobytes() == ImagePreprocessor().resize(upright).tobytes()
    assert forwarded.tobytes() != ImagePreprocessor().resize(stored).tobytes()


@pytest.mark.parametrize("field,value,words", [
    ("echo", True, ("'echo'", "logprobs")),
    ("prompt_logprobs", 1, ("'prompt_logprobs'",)),
    ("structured_outputs", {"regex": "a+"}, ("response_format",)),
    ("truncate_prompt_tokens", 10, ("photo",)),
    ("tools", [{"type": "function", "function": {"name": "f"}}], ("tools",)),
    ("chat_template", "{{ 1 }}", ("template",)),
    ("surprise", 1, ("'surprise'",)),
    ("temperature", "0.5", ("temperature", "valid number")),
    ("temperature", 3, ("temperature", "at most 2")),
    ("max_tokens", True, ("max_tokens", "integer")),
    ("seed", 2**64, ("seed", "at most")),
    ("top_logprobs", 5, ("top_logprobs", "logprobs")),
    ("stop", ["###"] * 9, ("stop", "at most 8")),
    ("stream_options", {"include_usage": True}, ("stream_options", "stream")),
    ("response_format", {"type": "regex"}, ("response_format.type",)),
    ("response_format", {"type": "json_schema"}, ("json_schema",)),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     ("not a valid JSON schema",)),
    ("n", 9, ("n is 9",)),
])
def test_fields_outside_the_contract_are_named(field, value, words):
    app, r = post(chat({"type": "text", "text": "hello"}, **{field: value}))
    error = error_of(r, 400)
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    assert not app.bodies


@pytest.mark.parametrize("messages,words", [
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
     ("role 'system'", "user message")),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
     ("role 'assistant'",)),
    ([{"role": "tool", "content": "x"}], ("role", "tool")),
    ([{"role": "function", "content": "x"}], ("accepted roles",)),
    ([{"role": "user", "content": None}], ("string or a list",)),
    ([{"role": "user", "content": "hi", "tool_calls": []}], ("'tool_calls'",)),
    ([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}],
     ("'cache_control'",)),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}],
     ("'input_image'",)),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}], ("object",)),
    ([{"role": "user", "content": "\ud800"}], ("not valid unicode",)),
    ([{"role": "user", "content": "<ImageHere>"}], ("reserved",)),
    ([{"role": "user", "content": "x" * 100_001}], ("characters of text",)),
])
def test_messages_outside_the_contract_are_named(messages, words):
    app, r = post({"model": "skingpt4", "messages": messages})
    error = error_of(r, 400)
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    assert not app.bodies


@pytest.mark.parametrize("raw,words", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', ("NaN",)),
    (b'{"model": "m", "max_tokens": 1' + b"0" * 5000 + b"}", ("not valid JSON",)),
    (b"[" * 100_000 + b"]" * 100_000, ("nested too deeply",)),
    (b'{"model": "\xff"}', ("UTF-8",)),
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', ("Unicode",)),
])
def test_json_that_is_not_strict_is_refused(raw, words):
    app, r = post(None, raw=raw)
    error = error_of(r, 400)
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    assert not app.bodies


def test_completions_contract():
    app, r = post({"model": "m", "prompt": "hi", "max_tokens": 3, "logprobs": 2,
                   "repetition_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}},
                  path="/v1/completions")
    assert r.status_code == 200 and app.bodies[0]["stop"] == ["###"]
    for body, words in [({"model": "m", "prompt": [1, 2]}, ("token-id",)),
                        ({"model": "m", "prompt": "hi", "echo": True}, ("'echo'",)),
                        ({"model": "m", "prompt": "hi", "suffix": "x"}, ("'suffix'",)),
                        ({"model": "m", "prompt": ["a"] * 9}, ("1 to 8",))]:
        _, r = post(body, path="/v1/completions")
        error = error_of(r, 400)
        assert all(w.lower() in error["message"].lower() for w in words), error["message"]


def test_vllm_bench_serve_bodies_are_accepted():
    """What ``vllm bench serve --backend openai-chat --ignore-eos --top-k 5`` sends."""
    photo = photo_url(synthetic_skin_photo(seed=1))
    body = chat(photo, {"type": "text", "text": "x"}, max_completion_tokens=8, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True, top_k=5, top_p=0.9,
                min_p=0.0, temperature=0.0, frequency_penalty=0.0, presence_penalty=0.0,
                repetition_penalty=1.0)
    app, r = post(body)
    assert r.status_code == 200, r.text
    assert app.bodies[0]["ignore_eos"] is True


def test_key_and_routes_come_first():
    async def go():
        app, client = make()
        async with client:
            no_key = await client.post("/v1/chat/completions", json={}, headers={"Authorization": ""})
            other = await client.post("/v1/messages", json={})
            health = await client.get("/health", headers={"Authorization": ""})
        return no_key, other, health

    no_key, other, health = asyncio.run(go())
    assert error_of(no_key, 401)["code"] == "invalid_api_key"
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert error_of(other, 404)["code"] == "not_found"
    assert health.status_code == 200


def test_requests_beyond_the_memory_budget_wait_then_get_503():
    """Bodies that do not fit the byte budget wait for it; past the admission timeout they get a
    503 with Retry-After while the request holding the budget (its first half sent, the rest
    still uploading) completes."""
    body = json.dumps(chat({"type": "text", "text": "x" * 1000})).encode()
    policy = ServePolicy(max_body_bytes=len(body), max_inflight_bytes=3 * len(body),
                         admission_timeout_s=0.2)
    app = RecordingApp()
    middleware = RequestPolicyMiddleware(app, policy)
    release = asyncio.Event()

    async def call(slow: bool):
        sent = []
        first = True

        async def receive():
            nonlocal first
            if slow and first:
                first = False
                return {"type": "http.request", "body": body[:100], "more_body": True}
            if slow:
                await release.wait()  # the client is still uploading
                return {"type": "http.request", "body": body[100:], "more_body": False}
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-length", str(len(body)).encode()),
                             (b"content-type", b"application/json")]}
        await middleware(scope, receive, send)
        start = sent[0]
        return start["status"], dict(start["headers"]), json.loads(sent[1]["body"])

    async def scenario():
        holder = asyncio.create_task(call(slow=True))
        await asyncio.sleep(0.05)
        refused = await call(slow=False)
        release.set()
        return await holder, refused

    (ok_status, _, _), (status, headers, error) = asyncio.run(scenario())
    assert ok_status == 200
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert error["error"]["code"] == "server_busy" and "busy" in error["error"]["message"]
    assert len(app.bodies) == 1
