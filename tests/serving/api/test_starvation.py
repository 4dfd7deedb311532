"""No request may starve the others, at the ASGI level (a recording app stands in for vLLM):
upload deadlines, memory reserved as bytes arrive, JPEG scan bombs, photo decodes and schema
compiles stopped past their bound, bounded JSON nesting, 415 before the body, one error shape
for the app's own errors, and ``max_tokens`` held to the context. Each test bounds the time its
request takes. The same classes against the real server: test_starvation_server.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from serving.api.media import jpeg_scan_count
from serving.api.middleware import RequestPolicyMiddleware
from serving.api.strict_json import MAX_JSON_DEPTH
from serving.api.policy import ServePolicy
from tests.serving.helpers import jpeg_scan_bomb, schema_bomb
from tests.serving.api.test_middleware import RecordingApp, chat, error_of, post

JSON = (b"content-type", b"application/json")


def photo_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


async def drive(middleware, body_events, headers=(JSON,), path="/v1/chat/completions"):
    """One request through ``middleware``: ``body_events`` is an async iterator of
    (body bytes, more_body); after it ends, receive() blocks as a silent client does. Returns
    (status, headers, parsed body, seconds)."""
    sent = []
    events = body_events.__aiter__()

    async def receive():
        try:
            chunk, more = await events.__anext__()
        except StopAsyncIteration:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    start = time.monotonic()
    await middleware(scope, receive, send)
    took = time.monotonic() - start
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"]), took


async def trickle(data: bytes, every_s: float, size: int = 1):
    for i in range(0, len(data), size):
        await asyncio.sleep(every_s)
        yield data[i:i + size], i + size < len(data)


async def nothing():
    return
    yield


async def once(data: bytes):
    yield data, False


def fast_policy(**kw) -> ServePolicy:
    return ServePolicy(upload_idle_timeout_s=0.5, min_upload_rate=1024, upload_timeout_s=5, **kw)


# ------------------------------------------------------------------------------- uploads


def test_a_stalled_upload_gets_408_at_the_idle_timeout_and_holds_no_memory():
    async def scenario():
        app = RecordingApp()
        mw = RequestPolicyMiddleware(app, fast_policy())
        headers = (JSON, (b"content-length", b"60000000"))
        stalled = asyncio.create_task(drive(mw, nothing(), headers))
        await asyncio.sleep(0.1)
        held = mw.admission.max_bytes - mw.admission.free_bytes
        ok = await drive(mw, once(json.dumps(chat({"type": "text", "text": "hi"})).encode()))
        return await stalled, held, ok

    (status, headers, error, took), held, ok = asyncio.run(scenario())
    assert held == 0  # a declared length reserves nothing until it is sent
    assert ok[0] == 200 and ok[3] < 0.5  # the ordinary request is not held behind it
    assert status == 408 and error["error"]["code"] == "request_timeout"
    assert headers[b"connection"] == b"close"
    assert 0.4 < took < 2


def test_a_trickled_body_gets_408_once_below_the_minimum_rate():
    body = json.dumps(chat({"type": "text", "text": "x" * 4000})).encode()

    async def scenario():
        mw = RequestPolicyMiddleware(RecordingApp(), fast_policy())
        # 20 bytes every 0.05 s = 400 B/s: the policy wants 1 KiB/s after the first 0.5 s
        return await drive(mw, trickle(body, 0.05, 20),
                           (JSON, (b"content-length", str(len(body)).encode())))

    status, _, error, took = asyncio.run(scenario())
    assert status == 408 and "too slowly" in error["error"]["message"]
    assert took < 2


def test_a_slow_but_steady_upload_is_served():
    body = json.dumps(chat({"type": "text", "text": "x" * 1500})).encode()

    async def scenario():
        mw = RequestPolicyMiddleware(RecordingApp(), fast_policy())
        # 200 bytes every 0.05 s = 4 KB/s, above the 1 KiB/s minimum
        return await drive(mw, trickle(body, 0.05, 200),
                           (JSON, (b"content-length", str(len(body)).encode())))

    assert asyncio.run(scenario())[0] == 200


def test_time_spent_waiting_for_memory_is_not_counted_against_the_upload():
    """A body that waits for the byte budget longer than the idle timeout is still served once
    the budget frees: the wait was the server's, not the client's."""
    body = json.dumps(chat({"type": "text", "text": "x" * 1000})).encode()

    async def halves(first_sent: asyncio.Event):
        first_sent.set()
        yield body[:500], True  # its step is the whole body: it waits for memory here
        yield body[500:], False

    async def scenario():
        policy = fast_policy(max_body_bytes=len(body), max_inflight_bytes=3 * len(body),
                             admission_timeout_s=5)
        mw = RequestPolicyMiddleware(RecordingApp(), policy)
        await mw.admission.reserve(3 * len(body) - 2000, mw.admission.deadline())  # all but 2000
        first_sent = asyncio.Event()
        headers = (JSON, (b"content-length", str(len(body)).encode()))
        task = asyncio.create_task(drive(mw, halves(first_sent), headers))
        await first_sent.wait()
        await asyncio.sleep(1.0)  # twice the idle timeout, waiting for memory
        mw.admission.release(3 * len(body) - 2000)
        return await task

    assert asyncio.run(scenario())[0] == 200


def test_a_request_refused_while_its_body_arrives_is_answered_after_the_rest_is_dropped():
    """A 503 decided while the client is still sending: the rest of the body is read and
    dropped before the answer (closing under a sending client resets it, and it never reads the
    503), and the connection stays usable; nothing of the body stays in the budget."""
    body = json.dumps(chat({"type": "text", "text": "x" * 3000})).encode()
    read = []

    async def slowly():
        for i in range(0, len(body), 1000):
            read.append(i)
            await asyncio.sleep(0.05)
            yield body[i:i + 1000], i + 1000 < len(body)

    async def scenario():
        policy = fast_policy(max_body_bytes=len(body), max_inflight_bytes=3 * len(body),
                             admission_timeout_s=0.2)
        mw = RequestPolicyMiddleware(RecordingApp(), policy)
        await mw.admission.reserve(3 * len(body), mw.admission.deadline())  # all of it
        headers = (JSON, (b"content-length", str(len(body)).encode()))
        result = await drive(mw, slowly(), headers)
        mw.admission.release(3 * len(body))
        return result, mw.admission.free_bytes == mw.admission.max_bytes

    (status, headers, error, _), free = asyncio.run(scenario())
    assert status == 503 and headers[b"retry-after"] and error["error"]["code"] == "server_busy"
    assert len(read) == -(-len(body) // 1000)  # every chunk was read before the answer
    assert headers.get(b"connection") != b"close" and free


def test_a_refusal_for_a_client_that_stopped_sending_is_not_held_to_drain_it():
    """A client that stops mid-body gets its 400 at the idle timeout and the connection is
    closed: there is nothing to drain, so the server waits no longer."""
    body = json.dumps(chat({"type": "text", "text": "hello"})).encode()

    async def stops():
        yield body[:10], True

    async def scenario():
        mw = RequestPolicyMiddleware(RecordingApp(), fast_policy())
        return await drive(mw, stops(), (JSON, (b"content-length", str(len(body)).encode())))

    status, headers, _, took = asyncio.run(scenario())
    assert status == 400 and headers[b"connection"] == b"close" and took < 1.5


def test_a_refused_body_far_larger_than_the_drain_bound_is_closed_at_once():
    """Bounded drain: a body declared beyond twice the body limit is refused (413) without
    reading any of it, and the connection is closed."""
    read = []

    async def huge():
        read.append(True)
        yield b"x" * 1000, True

    async def scenario():
        policy = fast_policy(max_body_bytes=1000, max_inflight_bytes=3000)
        mw = RequestPolicyMiddleware(RecordingApp(), policy)
        return await drive(mw, huge(), (JSON, (b"content-length", b"5000")))

    status, headers, _, took = asyncio.run(scenario())
    assert status == 413 and headers[b"connection"] == b"close" and not read and took < 1


def test_a_body_that_stops_short_of_its_content_length_gets_400():
    body = json.dumps(chat({"type": "text", "text": "hello"})).encode()

    async def half():
        yield body[:40], True

    async def scenario():
        mw = RequestPolicyMiddleware(RecordingApp(), fast_policy())
        return await drive(mw, half(), (JSON, (b"content-length", str(len(body) + 500).encode())))

    status, headers, error, took = asyncio.run(scenario())
    assert status == 400 and "Content-Length" in error["error"]["message"]
    assert "40 of the" in error["error"]["message"] and headers[b"connection"] == b"close"
    assert took < 2


def test_a_body_that_is_not_declared_json_gets_415_before_it_is_parsed():
    """Refused on its headers; the body is then read to its end and dropped (so the client,
    still sending it, reads the 415), never parsed, held in the budget or passed on."""
    read = []

    async def watched():
        read.append(True)
        yield b"{", True
        read.append(True)
        yield b"}", False

    async def scenario():
        app = RecordingApp()
        mw = RequestPolicyMiddleware(app, ServePolicy())
        free = mw.admission.free_bytes
        result = await drive(mw, watched(), ((b"content-type", b"text/plain"),))
        return result, app, mw.admission.free_bytes == free

    (status, headers, error, _), app, budget_untouched = asyncio.run(scenario())
    assert status == 415 and error["error"]["code"] == "unsupported_media_type"
    assert "application/json" in error["error"]["message"] and not app.bodies
    assert read == [True, True] and headers.get(b"connection") != b"close" and budget_untouched


# ------------------------------------------------------------------------------- photos


def test_scan_count_walks_segments():
    photo = encode_image(synthetic_skin_photo(seed=1, size=(64, 48)))
    assert jpeg_scan_count(photo, 100) == 1  # baseline
    assert jpeg_scan_count(b"\x89PNG....", 100) == 0
    bomb = jpeg_scan_bomb(300, size=64)
    assert jpeg_scan_count(bomb, 100) == 101  # stops counting past the limit
    assert jpeg_scan_count(bomb, 10**6) > 300


def test_a_jpeg_scan_bomb_is_refused_before_decoding():
    body = chat(photo_url(jpeg_scan_bomb(20_000)), {"type": "text", "text": "hi"})
    start = time.monotonic()
    _, r = post(body)
    error = error_of(r, 400)
    assert error["code"] == "invalid_image" and "progressive scans" in error["message"]
    assert time.monotonic() - start < 5  # a decode would take about 45 s


def test_a_decode_past_its_time_is_stopped_and_the_next_photo_is_served():
    ordinary = photo_url(encode_image(synthetic_skin_photo(seed=2, size=(640, 480))))

    async def scenario():
        app = RecordingApp()
        mw = RequestPolicyMiddleware(app, ServePolicy(max_jpeg_scans=10**6, decode_timeout_s=1.0))
        bomb = json.dumps(chat(photo_url(jpeg_scan_bomb(5_000)), {"type": "text", "text": "a"}))
        good = json.dumps(chat(ordinary, {"type": "text", "text": "b"}))
        await drive(mw, once(good.encode()))  # the workers are up
        refused = await drive(mw, once(bomb.encode()))
        served = await drive(mw, once(good.encode()))
        await mw.admission.close()
        return refused, served, mw.admission.photo_workers.stopped

    (status, _, error, took), served, stopped = asyncio.run(scenario())
    assert status == 400 and "longer than 1 s" in error["error"]["message"]
    assert took < 3 and stopped == 1
    assert served[0] == 200


# ------------------------------------------------------------------------------- schemas


def test_a_schema_bomb_is_refused_within_the_compile_bound_and_remembered():
    def request(schema):
        return chat({"type": "text", "text": "hi"}, response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": schema}})

    async def scenario():
        mw = RequestPolicyMiddleware(RecordingApp(), ServePolicy(schema_compile_timeout_s=0.5))
        fine = await drive(mw, once(json.dumps(request({"type": "object"})).encode()))  # warm
        first = await drive(mw, once(json.dumps(request(schema_bomb())).encode()))
        again = await drive(mw, once(json.dumps(request(schema_bomb())).encode()))
        await mw.admission.close()
        return first, again, fine, mw.admission.schema_workers.stopped

    (status, _, error, took), again, fine, stopped = asyncio.run(scenario())
    assert status == 400 and "longer than 0.5 s" in error["error"]["message"]
    assert error["error"]["param"] == "response_format"
    assert took < 3  # compiling it whole takes about 16 s
    assert again[0] == 400 and again[3] < 0.2 and stopped == 1  # cached: not compiled again
    assert fine[0] == 200


# ------------------------------------------------------------------------------- JSON depth


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 983, 5000, 100_000])
def test_json_nested_past_the_bound_is_a_400_at_any_depth(depth):
    raw = (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": '
           + b"[" * depth + b"]" * depth + b"}")
    _, r = post(None, raw=raw)
    assert "nested" in error_of(r, 400)["message"]


def test_a_schema_nested_to_the_bound_is_accepted_and_one_deeper_refused():
    def schema(levels):
        s: dict = {"type": "string"}
        for _ in range(levels):
            s = {"type": "array", "items": s}
        return s

    # body -> response_format -> json_schema -> schema: 4 levels before the schema's own
    ok_levels = MAX_JSON_DEPTH - 4
    bodies = [chat({"type": "text", "text": "hi"}, response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": schema(levels)}})
        for levels in (ok_levels, ok_levels + 1)]
    _, accepted = post(bodies[0])
    assert accepted.status_code == 200, accepted.text
    _, refused = post(bodies[1])
    assert "nested more than 64 levels" in error_of(refused, 400)["message"]


# ------------------------------------------------------------------------------- error shape


class VllmErrors:
    """Answers every request with an error in one of the shapes vLLM and FastAPI send."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    async def __call__(self, scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"7")]})
        await send({"type": "http.response.body", "body": self.body})


@pytest.mark.parametrize("status,body,code", [
    (404, b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", '
          b'"param": "model", "code": 404}}', "model_not_found"),
    (400, b'{"error": {"message": "This model\'s maximum context length is 1024 tokens.", '
          b'"type": "BadRequestError", "param": null, "code": 400}}', "context_length_exceeded"),
    (400, b'{"detail": "There was an error parsing the body"}', "invalid_request"),
    (422, b'{"detail": [{"loc": ["body", "messages"], "msg": "Field required"}]}', "unprocessable_entity"),
    (500, b'{"error": {"message": "boom", "type": "InternalServerError", "code": 500}}', "internal_error"),
    (503, b"Service Unavailable", "server_busy"),
])
def test_every_error_the_app_sends_leaves_in_the_project_shape(status, body, code):
    async def scenario():
        mw = RequestPolicyMiddleware(VllmErrors(status, body), ServePolicy())
        return await drive(mw, once(json.dumps(chat({"type": "text", "text": "hi"})).encode()))

    got, headers, error, _ = asyncio.run(scenario())
    err = error["error"]
    # the request's own id (made here: the client sent none), not the one the app made up
    assert got == status and headers[b"x-request-id"] == err["request_id"].encode() != b"7"
    assert headers[b"content-length"] == str(len(json.dumps(error))).encode()
    assert err["code"] == code and isinstance(err["code"], str) and err["message"]
    assert err["type"].endswith("Error")
    assert set(err) == {"message", "type", "param", "code", "request_id"}


# ------------------------------------------------------------------------------- max_tokens


def test_max_tokens_beyond_the_context_is_a_400_that_says_how_many_are_left():
    left = RecordingApp.CONTEXT - RecordingApp.PROMPT_TOKENS
    app, r = post(chat({"type": "text", "text": "hi"}, max_tokens=left + 1))
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert f"at most {left} tokens are left" in error["message"]
    assert not app.bodies and app.counted[0]["messages"][0]["role"] == "user"
    app, r = post(chat({"type": "text", "text": "hi"}, max_completion_tokens=left))
    assert r.status_code == 200 and len(app.bodies) == 1
    app, r = post({"model": "m", "prompt": ["a", "b"], "max_tokens": left + 1}, path="/v1/completions")
    assert error_of(r, 400)["code"] == "context_length_exceeded" and len(app.counted) == 2


def test_requests_that_surely_fit_are_not_counted_twice():
    async def scenario():
        app = RecordingApp()
        app.CONTEXT = 100_000
        mw = RequestPolicyMiddleware(app, ServePolicy())

        async def ask(max_tokens):
            body = chat({"type": "text", "text": "hi"}, max_tokens=max_tokens)
            return (await drive(mw, once(json.dumps(body).encode())))[0]

        statuses = [await ask(5)]  # the first count teaches the context size
        counted = [len(app.counted)]
        statuses.append(await ask(5))  # surely fits: not counted
        counted.append(len(app.counted))
        statuses.append(await ask(99_000))  # might not fit: counted (and fits)
        counted.append(len(app.counted))
        return statuses, counted

    statuses, counted = asyncio.run(scenario())
    assert statuses == [200, 200, 200] and counted == [1, 1, 2]


def test_max_output_tokens_of_a_response_is_held_to_the_context_as_chat_is():
    left = RecordingApp.CONTEXT - RecordingApp.PROMPT_TOKENS
    photo = photo_url(encode_image(synthetic_skin_photo(seed=4, size=(64, 64))))
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": left + 1, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": photo},
                                     {"type": "input_text", "text": "What is it?"}]}]}
    app, r = post(body, path="/v1/responses")
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_output_tokens"
    assert f"at most {left} tokens are left" in error["message"] and not app.bodies
    counted = app.counted[0]["messages"]
    assert counted[0] == {"role": "system", "content": "Be brief."}
    parts = counted[1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png")
    assert parts[1] == {"type": "text", "text": "What is it?"}
    app, r = post(dict(body, max_output_tokens=left), path="/v1/responses")
    assert r.status_code == 200 and len(app.bodies) == 1
