"""ASGI middleware in front of vLLM's OpenAI server (``--middleware``): access and request policy.

1. API key: with a key set, every route but ``/health`` (and CORS preflights) needs
   ``Authorization: Bearer <key>`` (or ``x-api-key``), compared in constant time; otherwise 401
   (websockets: closed with 1008).
2. Sizes: headers over ``max_header_bytes`` -> 431; a body over ``max_body_bytes`` -> 413,
   without reading the rest.
3. Routes: only those of the product (chat, completions, models, health, metrics, version);
   others get 404, so no vLLM route takes input past these checks.
4. Admission (:mod:`serving.admission`): a POST body is read only once its memory is reserved
   from the server's byte budget; photos are decoded in a bounded pool; work that does not fit
   in time gets a 503 with ``Retry-After``.
5. Strict JSON (no ``NaN``, valid Unicode), then the route's contract and checks:
   :func:`serving.chat.prepare_chat_request` (fields, messages, photos decoded once and
   forwarded small, SkinGPT-4 stop and schema defaults) or
   :func:`serving.chat.prepare_completion_request`. The checked body goes on to vLLM, and the
   large buffers of the original are dropped before it does.

Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses pass through untouched. Request
bodies are never logged.
"""

from __future__ import annotations

import hmac
import json

from serving.admission import Admission
from serving.chat import prepare_chat_request, prepare_completion_request
from serving.errors import (
    HeadersTooLarge,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)
from serving.policy import ServePolicy, policy_from_env

OPEN_PATHS = ("/health",)
GET_ROUTES = ("/health", "/ping", "/v1/models", "/metrics", "/version")
POST_ROUTES = ("/v1/chat/completions", "/v1/completions")


async def send_error(send, error: ServingError) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += error.headers()
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def check_api_key(scope, key: str | None) -> None:
    preflight = scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method")
    if key is None or scope.get("path") in OPEN_PATHS or preflight:
        return
    given = _header(scope, b"authorization") or ""
    token = given[7:].strip() if given[:7].lower() == "bearer " else (_header(scope, b"x-api-key") or "")
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise Unauthorized("missing or invalid API key; send Authorization: Bearer <key>")


def check_route(scope) -> None:
    """Only the routes this product serves; vLLM's other routes (responses, messages, render,
    tokenize...) would take images and text past the checks below."""
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


async def read_body(receive, limit: int, declared: int | None) -> bytearray:
    """The whole body in one buffer (no list of chunks joined into a second copy)."""
    check_declared_size(declared, limit)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client disconnected before sending the whole body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if not message.get("more_body", False):
            return body


def _refuse_constant(name: str):
    raise InvalidRequest(f"the request body is not valid JSON ({name} is not a JSON number)")


def parse_json(raw: bytearray) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting and integer size."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid JSON (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. integers beyond Python's digit limit
        raise InvalidRequest(f"the request body is not valid JSON ({str(exc)[:120]})") from None


def dump_json(body: dict) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request holds a string that is not valid Unicode (a lone UTF-16 surrogate)"
        ) from None


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


class RequestPolicyMiddleware:
    def __init__(self, app, policy: ServePolicy | None = None) -> None:
        self.app = app
        self.policy = policy or policy_from_env()
        self.admission = Admission.from_policy(self.policy)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_header_size(scope, self.policy.max_header_bytes)
            check_api_key(scope, self.policy.api_key)
            check_route(scope)
            if scope.get("method") != "POST":
                return await self.app(scope, receive, send)
            body = await self._admit(scope, receive)
        except ServingError as error:
            return await send_error(send, error)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        return await self.app(scope, _replay(body, receive), send)

    async def _websocket(self, scope, receive, send):
        try:
            check_api_key(scope, self.policy.api_key)
        except Unauthorized:
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008})
        return await self.app(scope, receive, send)

    async def _admit(self, scope, receive) -> bytes:
        """Reserve the body's memory, read it, check it; return the small body vLLM gets."""
        declared = _content_length(scope)
        check_declared_size(declared, self.policy.max_body_bytes)
        cost = Admission.body_cost(declared, self.policy.max_body_bytes)
        async with self.admission.bytes(cost, self.admission.deadline()):
            raw = await read_body(receive, self.policy.max_body_bytes, declared)
            parsed = parse_json(raw)
            del raw
            if scope["path"] == "/v1/completions":
                checked = prepare_completion_request(parsed, self.policy)
            else:
                checked = await prepare_chat_request(parsed, self.policy, self.admission)
            return dump_json(checked)
