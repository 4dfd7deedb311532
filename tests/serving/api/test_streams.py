"""Event streams end as OpenAI's do (serving/api/streams.py and the middleware's ShapedSend):
errors inside chat and Responses streams in the project's shape, a failure after the stream
started ends it with its error events, and an incomplete response ends with
``response.incomplete``. The same against a real engine killed mid-stream:
tests/serving/engine/test_engine_death.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.api.http import call_shaped
from serving.api.streams import EventStream

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def events(raw: bytes) -> list[tuple[str | None, object]]:
    """(event name, parsed data) of each event of a stream."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                text = line[6:].decode()
                data = text if text == "[DONE]" else json.loads(text)
        out.append((name, data))
    return out


def chunk(i: int) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": f"w{i}"}}]}).encode() + b"\n\n"


def responses_event(name: str, seq: int, **fields) -> bytes:
    payload = {"type": name, "sequence_number": seq, **fields}
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


CREATED = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress",
           "output": [], "model": "skingpt4"}


def stream_app(parts: list[bytes], fail_with: Exception | None = None):
    """An app that streams ``parts`` as server-sent events, then raises ``fail_with``."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        if fail_with is not None:
            raise fail_with
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def run_app(app, path: str) -> bytes:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.Event().wait()

    asyncio.run(call_shaped(app, {"type": "http", "method": "POST", "path": path}, receive, send))
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_tokens_pass_through_untouched():
    parts = [chunk(i) for i in range(5)] + [b"data: [DONE]\n\n"]
    assert run_app(stream_app(parts), "/v1/chat/completions") == b"".join(parts)


def test_a_chat_stream_error_event_gets_the_project_shape():
    vllm_error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                            "param": None, "code": 500}}
    parts = [chunk(0), b"data: " + json.dumps(vllm_error).encode() + b"\n\n", b"data: [DONE]\n\n"]
    out = events(run_app(stream_app(parts), "/v1/chat/completions"))
    assert out[-1] == (None, "[DONE]")
    error = out[-2][1]["error"]
    assert error["code"] == "internal_error" and error["type"] == "InternalServerError"
    assert "EngineCore" in error["message"] and len(out) == 3


def test_a_chat_stream_that_fails_after_it_started_ends_with_an_error_event_and_done():
    out = events(run_app(stream_app([chunk(0), chunk(1)], RuntimeError("engine gone")),
                         "/v1/chat/completions"))
    assert [name for name, _ in out] == [None] * 4
    assert out[2][1]["error"]["code"] == "internal_error" and out[3][1] == "[DONE]"
    assert "engine gone" not in json.dumps(out)  # no internal detail leaks


def test_a_failure_before_the_stream_starts_is_raised_for_the_server_to_answer():
    async def app(scope, receive, send):
        raise RuntimeError("before")

    with pytest.raises(RuntimeError):
        run_app(app, "/v1/chat/completions")


def test_a_responses_stream_that_fails_ends_with_error_and_response_failed():
    parts = [responses_event("response.created", 0, response=CREATED),
             responses_event("response.output_text.delta", 1, delta="It"),
             # an event split across two writes is still seen whole
             responses_event("response.output_text.delta", 2, delta=" is")[:20],
             responses_event("response.output_text.delta", 2, delta=" is")[20:]]
    out = events(run_app(stream_app(parts, RuntimeError("dead")), "/v1/responses"))
    names = [name for name, _ in out]
    assert names == ["response.created", "response.output_text.delta",
                     "response.output_text.delta", "error", "response.failed"]
    error, failed = out[3][1], out[4][1]
    assert error["code"] == "internal_error" and error["sequence_number"] == 3
    assert failed["sequence_number"] == 4 and failed["response"]["id"] == "resp_1"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"


def test_an_error_object_inside_a_responses_stream_becomes_response_failed():
    vllm_error = {"error": {"message": "Internal server error", "type": "InternalServerError",
                            "param": None, "code": 500}}
    parts = [responses_event("response.created", 0, response=CREATED),
             b"event: unknown\ndata: " + json.dumps(vllm_error).encode() + b"\n\n"]
    out = events(run_app(stream_app(parts), "/v1/responses"))
    assert [name for name, _ in out] == ["response.created", "error", "response.failed"]
    assert [data["sequence_number"] for _, data in out] == [0, 1, 2]


def test_a_responses_stream_that_ends_without_its_terminal_event_is_failed():
    parts = [responses_event("response.created", 0, response=CREATED)]
    out = events(run_app(stream_app(parts), "/v1/responses"))
    assert [name for name, _ in out][-1] == "response.failed"


def test_an_incomplete_response_ends_with_response_incomplete():
    incomplete = dict(CREATED, status="incomplete",
                      incomplete_details={"reason": "max_output_tokens"})
    parts = [responses_event("response.created", 0, response=CREATED),
             responses_event("response.completed", 1, response=incomplete)]
    out = events(run_app(stream_app(parts), "/v1/responses"))
    assert out[-1][0] == "response.incomplete" and out[-1][1]["type"] == "response.incomplete"
    assert out[-1][1]["response"]["incomplete_details"]["reason"] == "max_output_tokens"
    complete = dict(CREATED, status="completed")
    parts[-1] = responses_event("response.completed", 1, response=complete)
    assert events(run_app(stream_app(parts), "/v1/responses"))[-1][0] == "response.completed"


def test_a_delta_that_says_error_is_text_not_an_error():
    parts = [responses_event("response.created", 0, response=CREATED),
             responses_event("response.output_text.delta", 1, delta="error"),
             responses_event("response.completed", 2, response=dict(CREATED, status="completed"))]
    assert run_app(stream_app(parts), "/v1/responses") == b"".join(parts)
    stream = EventStream(responses=False)
    text = b"data: " + json.dumps({"choices": [{"delta": {"content": '"error"'}}]}).encode() + b"\n\n"
    assert stream.feed(text) == text


def test_a_ray_replica_failure_mid_stream_ends_both_kinds_of_stream_in_shape():
    """The Ray ingress reports a replica that failed after output as one event in the project's
    shape (``serving.cluster.ingress.replica_failure``), with no [DONE] and no event name: a chat
    stream gets its [DONE], a Responses stream its error and response.failed."""
    from serving.api.errors import InternalError

    failure = b"data: " + InternalError("the model replica answering this request failed "
                                        "before the answer was complete; send the request "
                                        "again").body() + b"\n\n"
    chat = events(run_app(stream_app([chunk(0), failure]), "/v1/chat/completions"))
    assert chat[-1] == (None, "[DONE]") and chat[-2][1]["error"]["code"] == "internal_error"
    assert "send the request again" in chat[-2][1]["error"]["message"]
    parts = [responses_event("response.created", 0, response=CREATED),
             responses_event("response.output_text.delta", 1, delta="It"), failure]
    out = events(run_app(stream_app(parts), "/v1/responses"))
    assert [name for name, _ in out] == ["response.created", "response.output_text.delta",
                                         "error", "response.failed"]
    assert out[2][1]["code"] == "internal_error" and "send the request again" in out[2][1]["message"]
    assert out[3][1]["response"]["error"]["code"] == "server_error"
