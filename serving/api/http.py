"""ASGI plumbing shared by the request policy (:mod:`serving.api.middleware`) and the Files and
Batch API (:mod:`serving.api.batch_api.service`): error and JSON answers, headers, the upload clock
and the one read loop behind JSON bodies and multipart uploads, readable refusals, the checked
body replayed to the app, the app's answers shaped (errors, event streams), and a request run
through an app in-process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import Any

from serving.api.admission import BodyReservation
from serving.api.errors import (
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    UnsupportedMediaType,
    error_for_status,
)
from serving.api.metrics import metrics
from serving.api.policy import ServePolicy
from serving.api.routes import RESPONSES
from serving.api.streams import EventStream, is_event_stream

logger = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024  # error bodies from the app are rewritten up to this size


async def send_error(send, error: ServingError, close: bool = False) -> None:
    """The error response; ``close``: the request's body was not read to its end, so the
    connection cannot carry another request."""
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += error.headers()
    if close and (b"connection", b"close") not in headers:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_json(send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def content_length(scope) -> int | None:
    declared = header(scope, b"content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        raise InvalidRequest("the Content-Length header is not a number")
    return int(declared)


def check_header_size(scope, limit: int) -> None:
    size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
    if size > limit:
        raise HeadersTooLarge(f"request headers are {size} bytes; the limit is {limit} bytes")


def check_declared_size(declared: int | None, limit: int) -> None:
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")


def check_content_type(scope) -> None:
    kind = (header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise UnsupportedMediaType(
            f"the request body must be JSON, sent with Content-Type: application/json (got "
            f"{kind[:64] or 'no Content-Type'!r})"
        )


class UploadClock:
    """When a body's next bytes must have arrived: within ``upload_timeout_s`` in all, no pause
    longer than ``upload_idle_timeout_s``, and after that first grace, ``min_upload_rate``
    bytes per second on average (a client on a slow uplink keeps going; one that trickles or
    stalls is cut off)."""

    def __init__(self, policy: ServePolicy, declared: int | None) -> None:
        self.policy = policy
        self.declared = declared
        self.start = self.last = time.monotonic()
        self.received = 0
        self.complete = False  # the last byte is in
        self.stopped = False  # the client stopped sending (or left) before the last byte

    def wait_s(self, received: int) -> float:
        now = time.monotonic()
        p = self.policy
        by_rate = self.start + p.upload_idle_timeout_s + received / p.min_upload_rate
        until = min(self.start + p.upload_timeout_s, by_rate, self.last + p.upload_idle_timeout_s)
        return max(0.0, until - now)

    def arrived(self) -> None:
        self.last = time.monotonic()

    def pause(self, seconds: float) -> None:
        """The server held the body ``seconds`` (waiting for memory): shift every deadline."""
        self.start += seconds
        self.last += seconds

    def late(self, received: int) -> ServingError:
        p, now = self.policy, time.monotonic()
        # Silent for most of the idle timeout: the client stopped (its rate deadline may fall a
        # moment earlier). Bytes still coming, only too few: too slow.
        if now - self.last >= p.upload_idle_timeout_s / 2 and received and self.declared:
            metrics().upload_timeouts.inc(("stalled",))
            return InvalidRequest(
                f"the request body stopped after {received} of the {self.declared} bytes its "
                f"Content-Length declares (nothing more for {p.upload_idle_timeout_s:g} s)"
            )
        kind = "deadline" if now - self.start >= p.upload_timeout_s else "slow"
        metrics().upload_timeouts.inc((kind,))
        return RequestTimeout(
            f"the request body arrived too slowly ({received} bytes in {now - self.start:.0f} s): "
            f"a body must arrive within {p.upload_timeout_s:g} s, with no pause over "
            f"{p.upload_idle_timeout_s:g} s and at {p.min_upload_rate // 1024} KiB/s or more"
        )


async def read_body(receive, limit: int, clock: UploadClock,
                    reservation: BodyReservation) -> bytearray:
    """The whole body in one buffer (no list of chunks joined into a second copy), within the
    ``clock``'s deadlines and with its memory reserved as it arrives. The clock's
    ``received`` counts the bytes in; ``complete`` is set once the last one is."""
    declared = clock.declared
    check_declared_size(declared, limit)
    body = bytearray()
    while True:
        message = await next_message(receive, clock)
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        waited = time.monotonic()
        try:
            await reservation.cover(len(body) + len(chunk))
        finally:
            clock.pause(time.monotonic() - waited)  # time the server made the client wait
        body += chunk
        clock.received = len(body)
        if not message.get("more_body", False):
            clock.complete = True
            if declared is not None and len(body) != declared:
                raise InvalidRequest(
                    f"the request body has {len(body)} bytes; its Content-Length declares {declared}"
                )
            return body


async def next_message(receive, clock: UploadClock) -> dict:
    """The body's next ``http.request`` message, within the clock's deadlines."""
    try:
        async with asyncio.timeout(clock.wait_s(clock.received)):
            message = await receive()
    except TimeoutError:
        clock.stopped = True
        raise clock.late(clock.received) from None
    clock.arrived()
    if message["type"] == "http.disconnect":
        clock.stopped = True
        raise InvalidRequest("client disconnected before sending the whole body")
    return message


async def drain(receive, clock: UploadClock, limit: int) -> bool:
    """Read the rest of a refused request's body and drop it (at most ``limit`` more bytes,
    within the clock's deadlines, none of it kept); True once the body has ended."""
    if clock.declared is not None and clock.declared - clock.received > limit:
        return False
    left = limit
    while left >= 0:
        try:
            message = await next_message(receive, clock)
        except ServingError:
            return False
        size = len(message.get("body", b""))
        clock.received += size
        left -= size
        if not message.get("more_body", False):
            clock.complete = True
            return True
    return False


async def refuse(scope, receive, send, error: ServingError, clock: UploadClock | None,
                 drain_limit: int) -> None:
    """Answer ``error`` so that the client can read it, whatever became of its body.

    A client still sending its body reads no answer until it has sent it: closing the connection
    under it resets it, and its library reports a connection error instead of the status (a 503
    it would have retried). So the rest of the body is read and dropped first, up to
    ``drain_limit`` bytes and within the upload clock, as web servers do for an early response;
    past those bounds, or once the client stopped sending, the answer goes out at once and the
    connection is closed after it."""
    complete = clock is None or clock.complete
    if not complete and not clock.stopped and not expects_continue(scope, clock):
        complete = await drain(receive, clock, drain_limit)
    await send_error(send, error, close=not complete)


def expects_continue(scope, clock: UploadClock) -> bool:
    """The client waits for ``100 Continue`` before it sends the body: asking for the body
    only to drop it would send that."""
    expect = (header(scope, b"expect") or "").strip().lower()
    return expect == "100-continue" and not clock.received


def replay(body: bytes, receive):
    """Hand the (checked) body to the app once, then pass on the client's own events, so
    vLLM's disconnect watch sees a real disconnect, not an invented one."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def error_message(status: int, body: bytes) -> tuple[str, str | None]:
    """The message and param of an error body in any of the shapes the app sends: OpenAI's
    (vLLM's, with an integer code), FastAPI's ``detail`` (a string or a list of field errors),
    or plain text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        param = err.get("param")
        return str(err.get("message") or "")[:2000], param if isinstance(param, str) else None
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            where = ".".join(str(p) for p in detail[0].get("loc", ()) if p != "body")
            return f"{where}: {detail[0].get('msg', 'invalid value')}"[:2000], where or None
        return str(detail)[:2000], None
    text = body.decode("utf-8", "replace").strip()
    try:
        fallback = HTTPStatus(status).phrase
    except ValueError:
        fallback = "error"
    return (text[:2000] if text and data is None else fallback), None


class ShapedSend:
    """``send`` for the app: every error response (status >= 400) rewritten to the project's
    error shape, and an event stream's errors and end as OpenAI's (:mod:`serving.api.streams`);
    other responses pass through untouched. ``responses``: the request is a Responses one."""

    def __init__(self, send, responses: bool = False) -> None:
        self.send = send
        self.responses = responses
        self.error_start: dict | None = None
        self.error_body = bytearray()
        self.error_done = False
        self.stream: EventStream | None = None
        self.stream_done = False

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            if message["status"] >= 400:
                self.error_start = message
                return None
            if is_event_stream(message):
                self.stream = EventStream(self.responses)
            return await self.send(message)
        if kind != "http.response.body":
            return await self.send(message)
        if self.error_start is not None:
            return await self._error_body(message)
        if self.stream is None or self.stream_done:
            return await self.send(message)
        more = message.get("more_body", False)
        out = self.stream.feed(message.get("body", b""))
        if not more:
            out += self.stream.close()
            self.stream_done = True
        if out or not more:
            return await self.send({"type": "http.response.body", "body": out, "more_body": more})
        return None

    async def fail(self, exc: BaseException) -> bool:
        """The app raised after its event stream started: end the stream with its error events
        (True), so that the client reads what happened instead of a dropped connection. False
        where no stream is open (the caller re-raises)."""
        if self.stream is None or self.stream_done:
            return False
        self.stream_done = True
        failure = exc if isinstance(exc, ServingError) else InternalError(
            "the answer failed while it was being written; send the request again")
        logger.warning("a streamed answer failed: %s", type(exc).__name__)
        try:
            await self.send({"type": "http.response.body", "body": self.stream.close(failure),
                             "more_body": False})
        except OSError:
            pass  # the client has gone
        return True

    async def _error_body(self, message):
        if self.error_done:
            return None  # the rest of an oversized error body
        self.error_body.extend(message.get("body", b"")[:MAX_ERROR_BODY])
        if message.get("more_body", False) and len(self.error_body) < MAX_ERROR_BODY:
            return None
        self.error_done = True
        status = self.error_start["status"]
        error = error_for_status(status, *error_message(status, bytes(self.error_body)))
        payload = error.body()
        drop = {b"content-length", b"content-type"} | {k for k, _ in error.headers()}
        headers = [(k, v) for k, v in self.error_start.get("headers", []) if k.lower() not in drop]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *error.headers()]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        return await self.send({"type": "http.response.body", "body": payload})


async def call_shaped(app, scope, receive, send) -> None:
    """``app`` with its answer shaped by :class:`ShapedSend`; a failure after an event stream
    started ends that stream with its error events instead of dropping the connection."""
    shaped = ShapedSend(send, responses=scope.get("path") == RESPONSES)
    try:
        await app(scope, receive, shaped)
    except Exception as exc:
        if not await shaped.fail(exc):
            raise


async def call_app(app, scope, body: bytes) -> tuple[int, bytes]:
    """Run one request through ``app`` in this process (no socket): its status and body."""
    sent = False
    status, out = 500, bytearray()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the caller is still here

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(out)
