"""What an operator sees of each request (docs/observability.md): its request id, its line in
the access log, and the request metrics (:mod:`serving.api.metrics`).

- **Request id.** An incoming ``X-Request-Id`` (at most :data:`MAX_REQUEST_ID` characters of
  :data:`REQUEST_ID_CHARS`) is kept; otherwise one is made. It goes back on every response as
  ``x-request-id`` (the ``openai`` SDKs show it as an exception's ``request_id``), into every
  JSON error body as ``error.request_id``, and on to vLLM as its request's id.
- **Access log.** One JSON line per request on the ``skingpt4.access`` logger: time, request
  id, tenant (:func:`serving.api.metrics.key_id`), method, route template, status, error code,
  photos, prompt and output tokens, admission wait, latency. Never a question, an answer, a
  photo, a file name, an id of the client's (``custom_id``, a file's id) or a body.
- **Metrics.** Requests by route template, method, status and code; their duration; photos;
  tokens by tenant.

:class:`Exchange` holds one request's facts; the middleware makes it and sets it as
:data:`current` for the code below it (admission, the request pipeline) to add to.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass

from serving.api.metrics import key_id, metrics
from serving.api.routes import ANSWER_ROUTES, PROBES, route_template
from serving.api.ui import PAGE

access_logger = logging.getLogger("skingpt4.access")

MAX_REQUEST_ID = 128
REQUEST_ID_CHARS = re.compile(r"[A-Za-z0-9._:/+=@-]+")
MAX_ERROR_BODY = 64 * 1024  # error bodies read for their code and given the request id
# Methods named in metrics and the log as they are; any other token a client sends is "other".
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# "usage" fields of chat/completions (prompt/completion) and of responses (input/output).
_PROMPT = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')

current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "skingpt4_exchange", default=None)


def enable_access_log() -> None:
    """The access log's lines go to standard error, one JSON object each (once per process;
    a deployment may instead attach its own handler to ``skingpt4.access``)."""
    if not access_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False


def request_id_from(scope, trust: bool = False) -> str:
    """The client's ``X-Request-Id`` when it is a sane one (``trust``: any, as a proxy in front
    set it), else a new id."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            given = value.decode("latin-1").strip()
            if trust and given:
                return given
            if len(given) <= MAX_REQUEST_ID and REQUEST_ID_CHARS.fullmatch(given):
                return given
            break
    return "req_" + uuid.uuid4().hex


def with_request_id(scope, request_id: str) -> dict:
    """``scope`` with ``request_id`` as its only ``X-Request-Id`` (vLLM takes it as its
    request's id, and adds a suffix of its own to keep ids in flight distinct)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-request-id"]
    return dict(scope, headers=[*headers, (b"x-request-id", request_id.encode())])


@dataclass
class Exchange:
    """One request as the operator sees it; filled in as it goes (:meth:`finish` reports it)."""

    request_id: str
    method: str
    route: str
    start: float
    tenant: str | None = None  # a key id, once the key is checked
    status: int = 0
    code: str | None = None  # the error's code
    photos: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    admission_wait_s: float | None = None

    @classmethod
    def begin(cls, scope, trust_header: bool = False) -> Exchange:
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        return cls(request_id_from(scope, trust_header), method,
                   route_template(scope.get("path", ""), tuple(PAGE)), time.monotonic())

    def key(self, key: str | None) -> None:
        self.tenant = key_id(key)

    def failed(self, status: int) -> None:
        """The app raised (500) or the client left (499) before an answer started."""
        if not self.status:
            self.status = status
            self.code = "internal_error" if status == 500 else "client_closed_request"

    def finish(self, log: bool) -> None:
        latency = time.monotonic() - self.start
        m = metrics()
        m.requests.inc((self.route, self.method, str(self.status), self.code or ""))
        m.request_seconds.observe(latency, (self.route,))
        if self.photos:
            m.photos.inc((self.route,), self.photos)
        tenant = self.tenant or key_id(None)
        if self.prompt_tokens:
            m.tokens.inc((tenant, "prompt"), self.prompt_tokens)
        if self.output_tokens:
            m.tokens.inc((tenant, "output"), self.output_tokens)
        if log and (self.status >= 400 or self.route not in PROBES):
            access_logger.info(json.dumps({
                "time": round(time.time(), 3), "request_id": self.request_id,
                "tenant": self.tenant, "method": self.method, "route": self.route,
                "status": self.status, "code": self.code, "photos": self.photos,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "admission_wait_s": None if self.admission_wait_s is None
                else round(self.admission_wait_s, 4),
                "latency_s": round(latency, 4)}, separators=(",", ":")))


def note_photos(count: int) -> None:
    """The request being served has ``count`` photos (for its access-log line and metrics)."""
    exchange = current.get()
    if exchange is not None:
        exchange.photos = count


class ObservedSend:
    """``send`` for the whole request: adds ``x-request-id`` to the response (``header``: False
    where a proxy in front adds it), notes its status, puts the request id and reads the code in
    a JSON error body, and reads the token counts of an answer's ``usage``."""

    def __init__(self, send, exchange: Exchange, header: bool = True) -> None:
        self.send, self.exchange = send, exchange
        self.header = [(b"x-request-id", exchange.request_id.encode())] if header else []
        self.error_start: dict | None = None
        self.error_body = bytearray()
        self.count_tokens = exchange.route in ANSWER_ROUTES

    async def __call__(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.exchange.status = message["status"]
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
            message = dict(message, headers=[*headers, *self.header])
            if message["status"] >= 400 and _is_json(headers):
                self.error_start, self.count_tokens = message, False
                return None
            self.count_tokens = self.count_tokens and message["status"] == 200
            return await self.send(message)
        if kind == "http.response.body":
            if self.error_start is not None:
                return await self._error_body(message)
            if self.count_tokens:
                self._read_usage(message.get("body", b""))
        return await self.send(message)

    def _read_usage(self, chunk: bytes) -> None:
        if b"_tokens" not in chunk:
            return
        prompt, output = _PROMPT.findall(chunk), _OUTPUT.findall(chunk)
        if prompt:
            self.exchange.prompt_tokens = int(prompt[-1])
        if output:
            self.exchange.output_tokens = int(output[-1])

    async def _error_body(self, message) -> None:
        self.error_body += message.get("body", b"")
        if message.get("more_body", False) and len(self.error_body) <= MAX_ERROR_BODY:
            return None
        start, body, self.error_start = self.error_start, bytes(self.error_body), None
        more = message.get("more_body", False)
        try:
            payload = json.loads(body) if not more else None
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            self.exchange.code = str(code)[:64] if code is not None else None
            error.setdefault("request_id", self.exchange.request_id)
            body = json.dumps(payload).encode()
            start = dict(start, headers=[
                *(h for h in start["headers"] if h[0].lower() != b"content-length"),
                (b"content-length", str(len(body)).encode())])
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body, "more_body": more})


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.split(b";")[0].strip() == b"application/json"
               for k, v in headers)
