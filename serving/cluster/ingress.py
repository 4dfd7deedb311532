"""Ray Serve: the ingress, :class:`SkinGPT4Ingress` (``build_openai_app``'s ``ingress_cls``).

Ray Serve LLM's ``OpenAiIngress`` with the request policy's middleware in front of every route,
a ``/health`` route, a ``/v1/responses`` route answered by an LLM replica, and requests refused by
a replica whose engine died (:class:`serving.cluster.replica.EngineUnavailable`) sent again.
"""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayActorError
from ray.serve.llm.ingress import OpenAiIngress
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving import settings
from serving.api.errors import (
    InternalError,
    InvalidRequest,
    ServerBusy,
    ServingError,
    error_for_status,
)
from serving.api.metrics import metrics
from serving.api.policy import ServePolicy
from serving.api.routes import HEALTH, RESPONSES
from serving.cluster.metrics import use_ray_metrics
from serving.cluster.replica import EngineUnavailable

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
# The ingress sends a refused request again after each of these pauses: by then the refusing
# replica has drained, and Ray Serve's routers send the request to another replica.
REFUSED_RETRY_DELAYS_S = (1.0, 2.0)


def with_key_from_env(policy: ServePolicy) -> ServePolicy:
    """A policy without keys takes those of ``SKINGPT4_API_KEY`` from the ingress replica's environment:
    on a cluster that is the environment ``ray start`` ran in on the replica's node, so the key
    can come from a secret store without being written into a Serve config file."""
    keys = settings.api_keys()
    return policy.model_copy(update={"api_keys": keys}) if not policy.api_keys and keys else policy


def _causes(exc: BaseException | None, depth: int = 8):
    """The exception and what it wraps: Ray's ``RayTaskError.cause``, then ``__cause__``."""
    while exc is not None and depth > 0:
        yield exc
        exc, depth = getattr(exc, "cause", None) or exc.__cause__, depth - 1


def refused(exc: BaseException) -> bool:
    """Whether a replica refused the request before running any of it (its engine had died)."""
    return any(isinstance(e, EngineUnavailable) for e in _causes(exc))


def replica_failure(exc: BaseException) -> ServingError | None:
    """The client's error for a request whose replica failed under it (its engine died, or its
    actor); None for other errors, which Ray Serve LLM reports as before."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if any(isinstance(e, (EngineDeadError, RayActorError)) for e in _causes(exc)):
        return InternalError("the model replica answering this request failed before the answer "
                             "was complete; send the request again")
    return None


def first_output_timeout_s() -> float:
    """How long a request waits for its answer's first output (Ray Serve LLM's bound on its chat
    and completions routes, ``RAY_SERVE_LLM_ROUTER_HTTP_TIMEOUT``, 600 s unless set), after which
    it gets a 408 (:func:`first_output_timeout`). ``/v1/responses`` waits as long."""
    from ray.llm._internal.serve.core.ingress import ingress as ray_ingress

    return ray_ingress.DEFAULT_LLM_ROUTER_HTTP_TIMEOUT


def first_output_timeout() -> ServingError:
    """The client's error for a request with no first output within :func:`first_output_timeout_s`
    (every route the same: Ray's own is ``"Request server side timeout"``)."""
    return error_for_status(408, f"the model gave no first output within "
                                 f"{first_output_timeout_s():g} s; send the request again later")


def error_response(error: ServingError) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in error.headers()})



def with_image_input(model_cards: dict) -> dict:
    """The model cards (``GET /v1/models``) saying ``"input_modality": "image"``: Ray says so
    only for configs it has read a ``vision_config`` from, which happens in the replicas, after
    the ingress's cards were made. SkinGPT-4 always takes a photo."""
    return {model: card.model_copy(update={"metadata": {**card.metadata, "input_modality": "image"}})
            for model, card in model_cards.items()}


class SkinGPT4Ingress(OpenAiIngress):
    """``OpenAiIngress`` with :class:`RequestPolicyMiddleware` in front of every route, a
    ``/health`` route that answers 200 once every LLM deployment passes its health check, a
    ``/v1/responses`` route (:meth:`responses`), requests refused by a replica whose engine
    died sent again (:meth:`_get_response`), and one first-output timeout on every route
    (:func:`first_output_timeout_s`)."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, policy: dict | None = None):
        super().__init__(llm_deployments, with_image_input(model_cards), lora_paths=lora_paths)
        self._llm_handles = dict(llm_deployments)
        self._policy = with_key_from_env(ServePolicy.model_validate(policy or {}))
        self._policy_installed = False

    def _set_asgi_app(self, app) -> None:
        # Ray Serve hands every ingress replica its ASGI app through this method, after __init__
        # and before the app's lifespan or first request: the last point where FastAPI still
        # accepts middleware. If a Ray upgrade stops calling it, check_health fails the replica
        # rather than serving without the policy.
        from serving.api.middleware import RequestPolicyMiddleware

        # The max_tokens check runs on the LLM replicas (SkinGPT4Server._over_context).
        use_ray_metrics()  # the policy's metrics on this node's Ray metrics export port
        app.add_middleware(RequestPolicyMiddleware, policy=self._policy, count_prompts=False,
                           proxied_ids=True)
        app.add_api_route(HEALTH, self.health, methods=["GET"], include_in_schema=False)
        app.add_api_route(RESPONSES, self.responses, methods=["POST"])
        self._policy_installed = True
        super()._set_asgi_app(app)

    async def _get_response(self, *, body, call_method: str, raw_request=None):
        """The LLM deployment's answer stream, as ``OpenAiIngress`` gets it, except that a request
        refused by a replica (:class:`EngineUnavailable`, nothing of it ran) is sent again after
        each pause of ``REFUSED_RETRY_DELAYS_S``, and a replica failure is reported as a JSON error
        without Ray's traceback: before the first output as a :class:`ServingError` (an HTTP
        error, :meth:`_process_llm_request`), after it as the stream's last event. Nothing is sent
        again once output has arrived. A replica's error response (vLLM's ``ErrorResponse``, the
        ``max_tokens`` check's among them) becomes the same :class:`ServingError` with its
        ``param``, which Ray's own conversion drops."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        delays = iter(REFUSED_RETRY_DELAYS_S)
        while True:
            stream = super()._get_response(body=body, call_method=call_method, raw_request=raw_request)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except Exception as exc:
                if not refused(exc):
                    failure = replica_failure(exc)
                    if failure is None:
                        raise
                    logger.warning("a request failed with its replica: %s", type(exc).__name__)
                    raise failure from exc
                delay = next(delays, None)
                if delay is None:
                    raise ServerBusy("no model replica with a running engine took the request; "
                                     "send it again in a few seconds", retry_after_s=5) from exc
                logger.warning("a replica whose engine died refused a request; sending it again "
                               "in %.1f s", delay)
                metrics().ingress_retries.inc()
                await asyncio.sleep(delay)
                continue
            break
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse):  # the replica's 400s with their param (Ray drops it)
            raise error_for_status(head.error.code, head.error.message, head.error.param)
        yield first
        try:
            async for item in stream:
                yield item
        except Exception as exc:
            failure = replica_failure(exc)
            if failure is None:
                raise
            logger.warning("a streamed answer failed with its replica: %s", type(exc).__name__)
            yield f"data: {failure.body().decode()}\n\n"

    async def _process_llm_request(self, body, call_method: str, raw_request=None) -> Response:
        from ray.llm._internal.serve.core.configs.openai_api_models import (
            OpenAIHTTPException,
        )

        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except ServingError as error:
            return error_response(error)
        except OpenAIHTTPException as exc:
            if exc.status_code != 408:  # Ray's own errors otherwise, as Ray answers them
                raise
            return error_response(first_output_timeout())

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses``, as vLLM's server answers it: the body (checked by the policy
        middleware) as vLLM's ``ResponsesRequest`` goes to an LLM replica
        (:meth:`serving.cluster.replica.SkinGPT4Server.responses`, sent again on refusal as chat
        is), and its answer comes back as JSON (the whole response, or an error with its status)
        or as vLLM's event stream."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        try:
            body = ResponsesRequest.model_validate_json(await request.body())
        except ValidationError as exc:  # the middleware checked the body against the same model
            where = ".".join(str(p) for p in exc.errors()[0]["loc"])
            return error_response(InvalidRequest(f"{where}: {exc.errors()[0]['msg']}", param=where))
        stream = self._get_response(body=body, call_method="responses", raw_request=request)
        try:
            async with asyncio.timeout(first_output_timeout_s()):  # as Ray's chat route
                first = await anext(stream)
        except ServingError as error:  # the replica's error responses included
            return error_response(error)
        except TimeoutError:
            return error_response(first_output_timeout())
        if isinstance(first, dict):
            return JSONResponse(first)

        async def events():
            yield first
            async for more in stream:
                yield more

        return StreamingResponse(events(), media_type="text/event-stream")

    async def check_health(self) -> None:
        if not self._policy_installed:
            raise RuntimeError("the request policy middleware was not installed on the ingress app")

    async def health(self) -> Response:
        checks = [asyncio.ensure_future(h.check_health.remote()) for h in self._llm_handles.values()]
        done, late = await asyncio.wait(checks, timeout=HEALTH_TIMEOUT_S)
        for check in late:
            check.cancel()  # no replica yet: the check is dropped, not left to fail unread
        failures = [c.exception() for c in done if c.exception() is not None]
        if late or failures:  # no replica yet, or one whose engine died
            detail = "no model replica answered in time" if late else str(failures[0])
            # /health is open: the detail (node addresses, tracebacks) goes to the log only.
            logger.warning("health check failed: %s", detail)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return Response(status_code=200)

