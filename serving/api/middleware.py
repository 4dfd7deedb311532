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
   (:class:`serving.api.batch_api.service.BatchService`), whose tenant is the key the request
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
   (:class:`serving.api.max_tokens.MaxTokensCheck`). The checked body goes on to vLLM, and the large buffers of the
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
import contextvars
import hmac
import logging

from serving.api.admission import Admission, LiveTraffic
from serving.api.errors import NotFound, ServingError, Unauthorized
from serving.api.http import (
    UploadClock,
    call_shaped,
    check_content_type,
    check_header_size,
    content_length,
    header,
    read_body,
    refuse,
    replay,
    send_error,
)
from serving.api.batch_api.service import BatchService
from serving.api.max_tokens import MaxTokensCheck
from serving.api.metrics import metrics
from serving.api.observe import (
    Exchange,
    ObservedSend,
    current,
    enable_access_log,
    with_request_id,
)
from serving.api.pipeline import prepare_request
from serving.api.policy import ServePolicy, policy_from_env
from serving.api.routes import ANSWER_ROUTES, GET_ROUTES, OPEN_PATHS, is_batch_api_path
from serving.api.strict_json import dump_json, parse_json
from serving.api.ui import is_page_path, serve_page

logger = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0  # the policy layer's gauges


def check_api_key(scope, keys: tuple[str, ...]) -> str | None:
    """The key the request carries, one of ``keys`` (each compared in constant time), or None
    where no key is needed; otherwise :class:`Unauthorized`."""
    preflight = scope.get("method") == "OPTIONS" and header(scope, b"access-control-request-method")
    if not keys or scope.get("path") in OPEN_PATHS or preflight:
        return None
    given = header(scope, b"authorization") or ""
    token = given[7:].strip() if given[:7].lower() == "bearer " else (header(scope, b"x-api-key") or "")
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
    allowed = ANSWER_ROUTES if method == "POST" else GET_ROUTES if method in ("GET", "HEAD") else ()
    if path not in allowed:
        raise NotFound(f"{method} {path} is not served here; see /v1/chat/completions")


class RequestPolicyMiddleware:
    def __init__(self, app, policy: ServePolicy | None = None, count_prompts: bool = True,
                 proxied_ids: bool = False) -> None:
        """``count_prompts``: False where the app's model replicas run the ``max_tokens`` check
        (:class:`serving.api.max_tokens.MaxTokensCheck`) themselves, each with its own tokenizer (Ray mode).
        ``proxied_ids``: a proxy in front (Ray Serve's) gave the request its ``X-Request-Id``
        (the client's, or one of its own) and returns it on the response itself: that id is the
        request's (Ray mode)."""
        self.app = app
        self.proxied_ids = proxied_ids
        self.policy = policy or policy_from_env()
        self.admission = Admission.from_policy(self.policy)
        self.max_tokens = MaxTokensCheck(app) if count_prompts else None
        self.live = LiveTraffic(self.policy.batch_max_inflight)
        if self.policy.access_log:
            enable_access_log()
        self.batch_api = None
        if self.policy.data_dir:
            self.batch_api = BatchService(self.policy, app, self.admission, self.max_tokens, self.live)
        self._started = False

    async def __call__(self, scope, receive, send):
        if not self._started:  # the photo workers start with the first request's loop
            self._started = True
            self.admission.photo_workers.prestart()
            # outside any request's context (a task copies the context it is made in)
            asyncio.get_running_loop().create_task(self._sample(), name="policy-metrics",
                                                   context=contextvars.Context())
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] == "lifespan" and self.batch_api is not None:
            return await self.batch_api.lifespan(scope, receive, send, self.app)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = Exchange.begin(scope, trust_header=self.proxied_ids)
        token = current.set(exchange)
        try:
            await self._http(with_request_id(scope, exchange.request_id), receive,
                             ObservedSend(send, exchange, header=not self.proxied_ids), exchange)
        except asyncio.CancelledError:
            exchange.failed(499)  # the client left before an answer started
            raise
        except BaseException:
            exchange.failed(500)
            raise
        finally:
            current.reset(token)
            exchange.finish(self.policy.access_log)

    async def _http(self, scope, receive, send, exchange: Exchange) -> None:
        if self.policy.ui and scope.get("method") in ("GET", "HEAD") and is_page_path(
                scope.get("path", "")):
            return await serve_page(scope, send)  # public: the page holds no data
        clock = None
        try:
            if scope.get("method") == "POST":
                clock = UploadClock(self.policy, content_length(scope))
            check_header_size(scope, self.policy.max_header_bytes)
            key = check_api_key(scope, self.policy.api_keys)
            exchange.key(key)
            if is_batch_api_path(scope.get("path", "")):
                if self.batch_api is None:
                    raise NotFound("the Files and Batch API is off on this server; it is served "
                                   "when the server is started with --data-dir")
                return await self.batch_api.handle(scope, receive, send, key, clock)
            check_route(scope)
            if clock is None:
                return await call_shaped(self.app, scope, receive, send)
            check_content_type(scope)
        except ServingError as error:
            return await self._refuse(scope, receive, send, error, clock)
        self.live.live_started()  # Batch API requests yield to this one until it ends
        try:
            try:
                body = await self._admit(scope, receive, clock, exchange)
            except ServingError as error:
                return await self._refuse(scope, receive, send, error, clock)
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
            return await call_shaped(self.app, scope, replay(body, receive), send)
        finally:
            self.live.live_ended()

    async def _sample(self) -> None:
        """The gauges of the policy layer, once a second (the counters move as things happen)."""
        m = metrics()
        m.admission_budget.set(self.admission.max_bytes)
        while True:
            try:
                m.admission_reserved.set(self.admission.max_bytes - self.admission.free_bytes)
                m.admission_waiting.set(self.admission.waiting)
                if self.batch_api is not None:
                    await self.batch_api.sample(m)
            except Exception:  # a gauge left as it was is better than none at all
                logger.exception("the policy's gauges could not be sampled")
            await asyncio.sleep(SAMPLE_EVERY_S)

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

    async def _admit(self, scope, receive, clock: UploadClock, exchange: Exchange) -> bytes:
        """Read the body as it arrives (its memory reserved as it comes, within the upload
        deadlines), check it; return the small body vLLM gets."""
        reservation = self.admission.body(clock.declared, self.policy.max_body_bytes)
        try:
            raw = await read_body(receive, self.policy.max_body_bytes, clock, reservation)
            parsed = parse_json(raw)
            del raw
            route = scope["path"]
            checked = await prepare_request(route, parsed, self.policy, self.admission)
            if self.max_tokens is not None:
                await self.max_tokens.check(scope, route, checked)
            return dump_json(checked)
        finally:
            exchange.admission_wait_s = reservation.waited_s
            metrics().admission_wait.observe(reservation.waited_s)
            reservation.release()
