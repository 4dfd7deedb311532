"""ASGI middleware in front of vLLM's OpenAI server (``--middleware``): access and request policy.

1. API key: with a key set, every route but ``/health`` (and CORS preflights) needs
   ``Authorization: Bearer <key>`` (or ``x-api-key``), compared in constant time; otherwise 401
   (websockets: closed with 1008).
2. Sizes: headers over ``max_header_bytes`` -> 431; a body over ``max_body_bytes`` -> 413,
   without reading the rest.
3. Routes: only those of the product (chat, completions, models, health, metrics, version);
   others get 404, so no vLLM route takes input past these checks.
4. ``/v1/chat/completions``: :func:`serving.chat.prepare_chat_request` (image checks, limits,
   SkinGPT-4 stop and schema defaults); ``/v1/completions``: text prompts only, no reserved
   tokens. The checked body goes on to vLLM.

Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses pass through untouched. Request
bodies are never logged.
"""

from __future__ import annotations

import hmac
import json

from serving.chat import prepare_chat_request, prepare_completion_request
from serving.errors import (
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RouteNotFound,
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
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
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
        raise RouteNotFound(f"{method} {path} is not served here; see /v1/chat/completions")


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


async def read_body(receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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
            body = await read_body(receive, self.policy.max_body_bytes, _content_length(scope))
            body = await self._prepare(scope["path"], body)
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

    async def _prepare(self, path: str, raw: bytes) -> bytes:
        try:
            parsed = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise InvalidRequest(f"the request body is not valid JSON ({detail})") from None
        except RecursionError:
            raise InvalidRequest("the request body is nested too deeply") from None
        if path == "/v1/completions":
            return json.dumps(prepare_completion_request(parsed, self.policy)).encode()
        return json.dumps(await prepare_chat_request(parsed, self.policy)).encode()
