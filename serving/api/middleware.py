"""ASGI middleware in front of vLLM's OpenAI server (``--middleware``): access and request policy.

1. API key: with a key set, every route but ``/health`` (and CORS preflights) needs
   ``Authorization: Bearer <key>`` (or ``x-api-key``), compared in constant time; otherwise 401
   (websockets: closed with 1008).
2. Sizes: headers over ``max_header_bytes`` -> 431; a body over ``max_body_bytes`` -> 413,
   without reading the rest.
3. Routes: only those of the product (chat, completions, responses, models, health, metrics,
   version); others get 404, so no vLLM route takes input past these checks. A POST body must
   be declared JSON (``Content-Type: application/json``), or 415 before it is read. With a data
   folder, ``/v1/files`` and ``/v1/batches`` go to the Batch API
   (:class:`serving.api.jobs.service.BatchService`), whose tenant is the key the request
   carries; live requests there take precedence over batch lines
   (:class:`serving.api.admission.LiveTraffic`).
4. Upload time (:class:`UploadClock`): a body must arrive within ``upload_timeout_s`` and, after
   its first ``upload_idle_timeout_s``, at ``min_upload_rate`` on average, or 408; a body that
   stops short of its ``Content-Length`` for ``upload_idle_timeout_s`` is a 400.
5. Admission (:mod:`serving.api.admission`): a body's memory is reserved from the server's byte
   budget as its bytes arrive; photos are decoded in bounded worker processes; work that does
   not fit in time gets a 503 with ``Retry-After``.
6. Strict JSON (no ``NaN``, valid Unicode, at most :data:`MAX_JSON_DEPTH` levels), then the
   route's contract and checks, :func:`serving.api.pipeline.prepare_request` (fields, messages,
   photos decoded once and forwarded small, SkinGPT-4 stop and schema defaults; the same
   pipeline as ``skingpt4 batch``); ``max_tokens`` must fit the context
   (:class:`ContextCheck`). The checked body goes on to vLLM, and the large buffers of the
   original are dropped before it does.
7. One error shape: every error response, vLLM's and Starlette's included, leaves with OpenAI's
   shape, a string ``code`` and the project's ``type`` (:func:`serving.api.errors.error_for_status`);
   so do errors inside event streams, and a stream that fails after it started ends with its
   error events instead of a dropped connection (:mod:`serving.api.streams`).

Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses pass through as they are written
(only the events named in :mod:`serving.api.streams` are rewritten). Request
bodies are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from http import HTTPStatus

from serving.api.admission import Admission, BodyReservation, LiveTraffic
from serving.api.errors import (
    ContextLengthExceeded,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    Unauthorized,
    UnsupportedMediaType,
    error_for_status,
)
from serving.api.jobs import is_jobs_path
from serving.api.policy import ServePolicy, policy_from_env
from serving.api.pipeline import ROUTES, prepare_request
from serving.api.streams import EventStream, is_event_stream

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)
GET_ROUTES = ("/health", "/ping", "/v1/models", "/metrics", "/version")
POST_ROUTES = ROUTES
# Nesting beyond this is refused by the strict parser: far below Python's recursion limit, so
# nothing accepted can overflow it later (re-encoding, vLLM's own parser, schema compilers).
MAX_JSON_DEPTH = 64
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


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def check_api_key(scope, keys: tuple[str, ...]) -> str | None:
    """The key the request carries, one of ``keys`` (each compared in constant time), or None
    where no key is needed; otherwise :class:`Unauthorized`."""
    preflight = scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method")
    if not keys or scope.get("path") in OPEN_PATHS or preflight:
        return None
    given = _header(scope, b"authorization") or ""
    token = given[7:].strip() if given[:7].lower() == "bearer " else (_header(scope, b"x-api-key") or "")
    matched = None
    for key in keys:  # every key is compared, so the time does not tell which one came close
        if hmac.compare_digest(token.encode(), key.encode()):
            matched = key
    if matched is None:
        raise Unauthorized("missing or invalid API key; send Authorization: Bearer <key>")
    return matched


def check_route(scope) -> None:
    """Only the routes this product serves; vLLM's other routes (messages, render, tokenize...)
    would take images and text past the checks below."""
    method, path = scope.get("method"), scope.get("path")
    allowed = POST_ROUTES if method == "POST" else GET_ROUTES if method in ("GET", "HEAD") else ()
    if path not in allowed:
        raise NotFound(f"{method} {path} is not served here; see /v1/chat/completions")


def _content_length(scope) -> int | None:
    declared = _header(scope, b"content-length")
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
    kind = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
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
            return InvalidRequest(
                f"the request body stopped after {received} of the {self.declared} bytes its "
                f"Content-Length declares (nothing more for {p.upload_idle_timeout_s:g} s)"
            )
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
    expect = (_header(scope, b"expect") or "").strip().lower()
    return expect == "100-continue" and not clock.received


def _refuse_constant(name: str):
    raise InvalidRequest(f"the request body is not valid JSON ({name} is not a JSON number)")


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise InvalidRequest(
                        f"the request body is nested more than {limit} levels deep"
                    )
                stack.append((child, depth + 1))


def parse_json(raw: bytearray) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, at most :data:`MAX_JSON_DEPTH` levels, bounded
    integer size."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid JSON (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. integers beyond Python's digit limit
        raise InvalidRequest(f"the request body is not valid JSON ({str(exc)[:120]})") from None
    check_depth(value)
    return value


def dump_json(body: dict) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request holds a string that is not valid Unicode (a lone UTF-16 surrogate)"
        ) from None
    except RecursionError:  # not after parse_json's depth bound; kept for other callers
        raise InvalidRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None


def _replay(body: bytes, receive):
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
    shaped = ShapedSend(send, responses=scope.get("path") == "/v1/responses")
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


def responses_as_chat(body: dict) -> list[dict]:
    """A checked Responses body's conversation as chat messages (vLLM renders both alike):
    ``instructions`` first as the system message, ``input_text``/``input_image`` parts as
    ``text``/``image_url`` parts."""
    messages = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": body["instructions"]})
    given = body["input"]
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    for item in given:
        content = item["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": p["image_url"]}}
                       if p.get("type") == "input_image" else {"type": "text", "text": p.get("text", "")}
                       for p in content]
        messages.append({"role": item["role"], "content": content})
    return messages


class ContextCheck:
    """``max_tokens`` must fit beside the prompt in the model's context (vLLM would shorten it
    silently): a 400 that says how many tokens are left, as OpenAI answers. The prompt is
    counted by the app's own ``/tokenize`` (the same template, photos as their image positions),
    only when a cheap upper bound on the prompt (one token per byte of text, a bound per photo
    and per message) does not already show that it fits."""

    PER_PHOTO = 64  # image positions and their text markers (SkinGPT-4: 32 query tokens)
    PER_PART = 16
    TEMPLATE = 1024  # the template's own text: the system prompt, separators, BOS

    def __init__(self, app=None, counter=None) -> None:
        """``app``: the app whose ``/tokenize`` counts a prompt; or ``counter``, an async
        function from a ``/tokenize`` request body to ``(count, max_model_len)`` or None
        (``skingpt4 batch``, which has vLLM's serving objects but no app, and a Ray LLM
        replica, ``SkinGPT4Server``, which has its engine's: :mod:`serving.engine.tokens`)."""
        self.app = app
        self.counter = counter
        self.max_model_len: int | None = None  # learned from the first count

    FIELDS = {"/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
              "/v1/completions": ("max_tokens",), "/v1/responses": ("max_output_tokens",)}

    async def check(self, scope, route: str, body: dict) -> None:
        field = next((f for f in self.FIELDS.get(route, ()) if body.get(f) is not None), None)
        if field is None:
            return
        wanted = body[field]
        if route == "/v1/responses":  # counted as the chat conversation it renders to
            route, body = "/v1/chat/completions", {"model": body.get("model"),
                                                   "messages": responses_as_chat(body)}
        if self.max_model_len is not None and wanted + self._bound(route, body) <= self.max_model_len:
            return
        counts = [await self._count(scope, req) for req in self._tokenize_requests(route, body)]
        if not counts or None in counts:
            return  # the app could not count it: it answers the request itself
        prompt = max(c for c, _ in counts)
        context = counts[0][1]
        self.max_model_len = context
        if prompt + wanted > context:
            left = max(context - prompt, 0)
            where = {"/v1/completions": "prompt"}.get(route, "messages")
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt + wanted} tokens ({prompt} in the {where}, {wanted} in the "
                f"completion): at most {left} tokens are left for the completion. Lower "
                f"{field} or shorten the {where}.",
                param=field,
            )

    def _bound(self, route: str, body: dict) -> int:
        if route == "/v1/completions":
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            return self.TEMPLATE + max(len(p.encode("utf-8")) + self.PER_PART for p in prompts)
        total = self.TEMPLATE
        for message in body["messages"]:
            content = message.get("content")
            parts = [content] if isinstance(content, str) else content or []
            for part in parts:
                total += self.PER_PART
                if isinstance(part, str):
                    total += len(part.encode("utf-8"))
                elif part.get("type") == "text":
                    total += len(part.get("text", "").encode("utf-8"))
                else:
                    total += self.PER_PHOTO
        return total

    @staticmethod
    def _tokenize_requests(route: str, body: dict) -> list[dict]:
        model = {"model": body["model"]} if body.get("model") else {}
        if route == "/v1/chat/completions":
            return [model | {"messages": body["messages"]}]
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return [model | {"prompt": p} for p in prompts]

    async def _count(self, scope, request: dict) -> tuple[int, int] | None:
        if self.counter is not None:
            try:
                return await self.counter(request)
            except Exception:  # it could not count (a replica gone...): the app decides alone
                return None
        raw = json.dumps(request, ensure_ascii=False).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        sub = dict(scope, path="/tokenize", raw_path=b"/tokenize", query_string=b"", headers=headers)
        try:
            status, out = await call_app(self.app, sub, raw)
            data = json.loads(out) if status == 200 else None
            return (int(data["count"]), int(data["max_model_len"])) if data else None
        except Exception:  # no /tokenize here (or an odd answer): the app decides alone
            return None


class RequestPolicyMiddleware:
    def __init__(self, app, policy: ServePolicy | None = None, count_prompts: bool = True) -> None:
        """``count_prompts``: False where the app's model replicas run the ``max_tokens`` check
        (:class:`ContextCheck`) themselves, each with its own tokenizer (Ray mode)."""
        self.app = app
        self.policy = policy or policy_from_env()
        self.admission = Admission.from_policy(self.policy)
        self.context = ContextCheck(app) if count_prompts else None
        self.live = LiveTraffic(self.policy.batch_max_inflight)
        self.jobs = None
        if self.policy.data_dir:
            from serving.api.jobs.service import BatchService

            self.jobs = BatchService(self.policy, app, self.admission, self.context, self.live)
        self._started = False

    async def __call__(self, scope, receive, send):
        if not self._started:  # the photo workers start with the first request's loop
            self._started = True
            self.admission.photo_workers.prestart()
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] == "lifespan" and self.jobs is not None:
            return await self.jobs.lifespan(scope, receive, send, self.app)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        clock = None
        try:
            if scope.get("method") == "POST":
                clock = UploadClock(self.policy, _content_length(scope))
            check_header_size(scope, self.policy.max_header_bytes)
            key = check_api_key(scope, self.policy.api_keys)
            if is_jobs_path(scope.get("path", "")):
                if self.jobs is None:
                    raise NotFound("the Files and Batch API is off on this server; it is served "
                                   "when the server is started with --data-dir")
                return await self.jobs.handle(scope, receive, send, key, clock)
            check_route(scope)
            if clock is None:
                return await call_shaped(self.app, scope, receive, send)
            check_content_type(scope)
        except ServingError as error:
            return await self._refuse(scope, receive, send, error, clock)
        self.live.live_started()  # Batch API requests yield to this one until it ends
        try:
            try:
                body = await self._admit(scope, receive, clock)
            except ServingError as error:
                return await self._refuse(scope, receive, send, error, clock)
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
            return await call_shaped(self.app, scope, _replay(body, receive), send)
        finally:
            self.live.live_ended()

    async def _refuse(self, scope, receive, send, error: ServingError, clock) -> None:
        if clock is None and scope.get("method") == "POST":  # no clock: the length was unreadable
            return await send_error(send, error, close=True)
        await refuse(scope, receive, send, error, clock, 2 * self.policy.max_body_bytes)

    async def _websocket(self, scope, receive, send):
        try:
            check_api_key(scope, self.policy.api_keys)
        except Unauthorized:
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008})
        return await self.app(scope, receive, send)

    async def _admit(self, scope, receive, clock: UploadClock) -> bytes:
        """Read the body as it arrives (its memory reserved as it comes, within the upload
        deadlines), check it; return the small body vLLM gets."""
        reservation = self.admission.body(clock.declared, self.policy.max_body_bytes)
        try:
            raw = await read_body(receive, self.policy.max_body_bytes, clock, reservation)
            parsed = parse_json(raw)
            del raw
            route = scope["path"]
            checked = await prepare_request(route, parsed, self.policy, self.admission)
            if self.context is not None:
                await self.context.check(scope, route, checked)
            return dump_json(checked)
        finally:
            reservation.release()
