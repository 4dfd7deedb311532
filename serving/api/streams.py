"""Event streams that end as OpenAI's do: errors inside a stream in the project's shape, and
every stream closed by its terminal event, even when the engine under it dies.

The app streams answers as server-sent events (``stream: true``). vLLM writes an error inside a
chat or completions stream as ``data: {"error": {..., "code": 500}}`` (an integer ``code``, its
own ``type``), and a Responses stream whose generator raises simply stops: the connection drops
after an ordinary ``response.output_text.delta``. It also ends an incomplete response
(``max_output_tokens`` reached) with ``response.completed``. :class:`EventStream` rewrites the
stream on its way out:

- chat and completions: an error event gets the project's shape (string ``code``, the project's
  ``type``: :func:`serving.api.errors.error_for_status`); a stream that fails after it started
  ends with such an event and ``data: [DONE]``;
- Responses: an error inside the stream, or a failure after it started, ends it with an
  ``error`` event (the project's code, message and param) and ``response.failed`` (the response
  of ``response.created`` with ``status: failed`` and its ``error``); a stream that ends with no
  terminal event gets the same; ``response.completed`` of an incomplete response becomes
  ``response.incomplete``.

Token events pass through untouched: a chunk is parsed only when a cheap byte search says it may
hold one of the events above.
"""

from __future__ import annotations

import json
import time
import uuid

from serving.api.errors import InternalError, ServingError, error_for_status

RESPONSES_TERMINAL = (b"response.completed", b"response.failed", b"response.incomplete")
# Events of a Responses stream that are parsed; any other event is passed on as it is.
RESPONSES_WATCHED = (b"event: response.created", *(b"event: " + t for t in RESPONSES_TERMINAL),
                     b"event: error", b'"error"')
CHAT_WATCHED = (b'"error"', b"[DONE]")


def is_event_stream(start: dict) -> bool:
    """An ``http.response.start`` message of a 2xx server-sent event stream."""
    if not 200 <= start.get("status", 0) < 300:
        return False
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


class EventStream:
    """The events of one streamed answer on their way to the client (see the module's text).
    ``responses``: the stream is a Responses one (``event:`` names, a terminal event)."""

    def __init__(self, responses: bool) -> None:
        self.responses = responses
        self.pending = b""  # an event not yet ended by its blank line
        self.events = 0  # events sent: the next sequence_number of a Responses stream
        self.created: dict | None = None  # the response of response.created
        self.ended = False  # a terminal event went out ([DONE], or a Responses terminal event)
        self.error_sent = False

    def feed(self, chunk: bytes) -> bytes:
        """What to send for ``chunk``, the next bytes of the app's stream."""
        data = self.pending + chunk if self.pending else chunk
        watched = RESPONSES_WATCHED if self.responses else CHAT_WATCHED
        if data.endswith(b"\n\n") and not any(w in data for w in watched):
            self.pending = b""
            self.events += data.count(b"\n\n")
            return data
        *events, self.pending = data.split(b"\n\n")
        return b"".join(self._event(e) + b"\n\n" for e in events if e.strip())

    def close(self, failure: ServingError | None = None) -> bytes:
        """The stream's last bytes: what it still owes the client once the app has stopped
        (``failure``: the app raised, after the stream started)."""
        tail, self.pending = self.pending, b""
        out = self._event(tail) + b"\n\n" if tail.strip() else b""
        if self.ended:
            return out
        if failure is None and not self.responses and not self.error_sent:
            return out  # a chat stream that ended without [DONE] and without an error: as sent
        failure = failure or InternalError("the answer stopped before it was complete; send "
                                           "the request again")
        if self.responses:
            return out + self._failed(failure)
        if not self.error_sent:
            out += b"data: " + failure.body() + b"\n\n"
        self.ended = True
        return out + b"data: [DONE]\n\n"

    # -- events ------------------------------------------------------------------------------

    def _event(self, raw: bytes) -> bytes:
        self.events += 1
        name, data = _fields(raw)
        if not self.responses:
            if data == b"[DONE]":
                self.ended = True
            elif data.startswith(b'{"error"'):
                error = _error_of(data)
                if error is not None:
                    self.error_sent = True
                    return b"data: " + error.body()
            return raw
        if name == b"response.created":
            self.created = _json(data).get("response")
            return raw
        if name == b"response.completed":
            event = _json(data)
            self.ended = True
            response = event.get("response")
            if isinstance(response, dict) and response.get("status") == "incomplete":
                event["type"] = "response.incomplete"
                return _encode(b"response.incomplete", event)
            return raw
        if name in RESPONSES_TERMINAL:
            self.ended = True
            return raw
        if name == b"error":
            self.error_sent = True
            return raw
        if b'"error"' in data:
            error = _error_of(data)
            if error is not None:  # vLLM's ErrorResponse, or a failed replica's error, as an event
                self.events -= 1
                return self._failed(error).removesuffix(b"\n\n")
        return raw

    def _failed(self, error: ServingError) -> bytes:
        """An ``error`` event and ``response.failed``: the end of a Responses stream that failed."""
        out = b""
        if not self.error_sent:
            out += _encode(b"error", {"type": "error", "sequence_number": self.events,
                                      "code": error.code, "message": error.message,
                                      "param": error.param}) + b"\n\n"
            self.events += 1
            self.error_sent = True
        response = dict(self.created or {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
                                         "created_at": int(time.time()), "output": []})
        response["status"] = "failed"
        response["error"] = {"code": "server_error" if error.status >= 500 else error.code,
                             "message": error.message}
        out += _encode(b"response.failed", {"type": "response.failed",
                                            "sequence_number": self.events,
                                            "response": response}) + b"\n\n"
        self.events += 1
        self.ended = True
        return out


def _fields(raw: bytes) -> tuple[bytes, bytes]:
    """An event's name and data (one ``data:`` line, as vLLM and Ray write them)."""
    name, data = b"", b""
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    return name, data


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_of(data: bytes) -> ServingError | None:
    """The project's error for a ``{"error": {...}}`` event, in whatever shape it came."""
    error = _json(data).get("error")
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    param = error.get("param")
    shaped = error_for_status(status, str(error.get("message") or "the answer failed")[:2000],
                              param if isinstance(param, str) else None)
    if isinstance(code, str) and code:  # already the project's shape (a Ray replica's failure)
        shaped.code = code
    return shaped


def _encode(name: bytes, event: dict) -> bytes:
    return b"event: " + name + b"\ndata: " + json.dumps(event, ensure_ascii=False).encode()
