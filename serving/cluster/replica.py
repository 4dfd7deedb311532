"""Ray Serve: the LLM deployment's replica, :class:`SkinGPT4Server` (``LLMConfig.server_cls``).

Ray Serve LLM's ``LLMServer`` that also answers Responses requests with its vLLM engine's own
serving object, runs the request policy's ``max_tokens`` check with its engine's tokenizer, and
leaves as soon as its vLLM engine dies (as vLLM's own server does): a request that reaches it after
the death is refused before anything of it runs (:class:`EngineUnavailable`, which the ingress
sends again), and the replica drains, stops and kills its own actor so that Ray Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cached_property, partial
from typing import Any

import ray
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm.deployment import LLMServer

from serving.api.errors import ServingError
from serving.api.routes import ANSWER_ROUTES, CHAT, COMPLETIONS, RESPONSES
from serving.engine.server import INLINE_CPU_EXECUTOR

logger = logging.getLogger(__name__)

# A replica looks at its engine this often; once it is dead, the replica drains (Serve's graceful
# stop, checking every DRAIN_POLL_S for requests still in flight) and leaves, or leaves anyway
# after LEAVE_TIMEOUT_S.
ENGINE_WATCH_PERIOD_S = 0.25
DRAIN_POLL_S = 0.5
LEAVE_TIMEOUT_S = 60.0


class EngineUnavailable(RuntimeError):
    """Raised by an LLM replica for a request that reached it after its engine died: nothing of
    the request ran, so the ingress may send it again."""


class SkinGPT4Engine(VLLMEngine):
    """Ray Serve LLM's vLLM engine, whose model runs inside its engine core's process on a CPU
    when the ``LLMConfig``'s ``engine_kwargs`` ask for it
    (:data:`serving.engine.server.INLINE_CPU_EXECUTOR`, as ``serve`` does embedded): Ray Serve LLM
    sets every CPU replica's executor to vLLM's two-process ``mp`` when it turns the
    ``engine_kwargs`` into vLLM's arguments, so the choice is made again here, on vLLM's config,
    just before the executor class is looked up. One rank only; anything else is left as Ray set
    it."""

    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        wanted = self.llm_config.engine_kwargs.get("distributed_executor_backend")
        parallel = vllm_engine_config.parallel_config
        if (wanted == INLINE_CPU_EXECUTOR and parallel.world_size == 1
                and parallel.distributed_executor_backend == "mp"):
            parallel.distributed_executor_backend = wanted
        return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)


class SkinGPT4Server(LLMServer):
    """The LLM deployment: Ray Serve LLM's ``LLMServer``, which also answers Responses requests
    (:meth:`responses`), runs the request policy's ``max_tokens`` check with its engine's own
    tokenizer before the engine sees a request (:meth:`_over_context`: the ingress has no
    tokenizer), and leaves as soon as its vLLM engine dies instead of waiting for three failed
    health checks.

    A dead engine answers every new request with an error at once, and Ray Serve's routers keep
    sending requests to a replica until the controller marks it unhealthy (three failed checks,
    30 s at the default period). So the replica watches its engine (the check Serve's health check
    runs: a flag in vLLM's client), refuses requests once it is dead (:class:`EngineUnavailable`,
    before anything of them runs), and stops itself the way Serve's controller stops a replica
    (``perform_graceful_shutdown`` of its actor): it waits until no request is in flight (those on
    the dead engine end with their errors at once), then rejects new requests, which Serve's
    routers send to another replica, and shuts the engine down. Then it kills its own actor, which
    routers drop at once and the controller replaces at its next health check. No request is cut
    off by the kill: by then the replica accepts none.
    """

    async def __init__(self, llm_config, *, engine_cls=None, model_downloader=None):
        await super().__init__(llm_config, engine_cls=engine_cls or SkinGPT4Engine,
                               model_downloader=model_downloader)

    async def start(self) -> None:
        self._engine_dead = False
        await super().start()
        self._engine_watch = asyncio.get_running_loop().create_task(self._leave_when_engine_dies())

    async def _engine_alive(self) -> bool:
        if self.engine is not None and not self._engine_dead:
            try:
                await self.engine.check_health()
            except Exception:
                self._engine_dead = True
        return not self._engine_dead

    async def _leave_when_engine_dies(self) -> None:
        while await self._engine_alive():
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
        logger.error("the vLLM engine of this replica died: the replica drains and leaves, and Ray "
                     "Serve replaces it")
        actor = ray.get_runtime_context().current_actor
        try:
            # The replica actor's stop method, the one Serve's controller calls (not a public API:
            # should a Ray upgrade drop it, the replica leaves at once, cutting off what is left).
            drained = actor.perform_graceful_shutdown.remote().future()
            await asyncio.wait_for(asyncio.wrap_future(drained), LEAVE_TIMEOUT_S)
        except Exception:
            logger.exception("the replica did not drain; it leaves now")
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            logger.exception("the replica could not leave; Serve replaces it after 3 failed checks")

    async def _refuse_when_engine_dead(self) -> None:
        if not await self._engine_alive():
            raise EngineUnavailable("the vLLM engine of this replica has died; the replica is leaving")

    @cached_property
    def _context(self):
        """The policy's ``max_tokens`` check, run on the replica: prompts are counted by this
        engine's own tokenizer, with no call through a router (the ingress cannot count them)."""
        from serving.api.max_tokens import MaxTokensCheck
        from serving.engine.tokens import count_prompt

        return MaxTokensCheck(counter=partial(count_prompt, self._tokenize_answer))

    async def _over_context(self, route: str, request):
        """The policy's ``max_tokens`` check (:class:`MaxTokensCheck`) of a request to ``route``:
        None if it fits, else an answer stream holding vLLM's ``ErrorResponse`` with the
        embedded server's message and param, which the ingress turns into its 400
        (:meth:`serving.cluster.ingress.SkinGPT4Ingress._get_response`)."""
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

        if not request.model_fields_set.intersection(ANSWER_ROUTES[route].max_tokens_fields):
            return None  # no max_tokens: nothing to check
        try:
            await self._context.check(None, route, request.model_dump(exclude_unset=True))
        except ServingError as error:
            return one_answer(ErrorResponse(error=ErrorInfo(
                message=error.message, type=error.type, param=error.param, code=error.status)))
        return None

    # Each route runs the max_tokens check first, then refuses the request if the engine has
    # died meanwhile: a request counted while its engine died is sent again, not failed.

    async def chat(self, request, raw_request_info=None):
        if refusal := await self._over_context(CHAT, request):
            return refusal
        await self._refuse_when_engine_dead()
        return await super().chat(request, raw_request_info)

    async def completions(self, request, raw_request_info=None):
        if refusal := await self._over_context(COMPLETIONS, request):
            return refusal
        await self._refuse_when_engine_dead()
        return await super().completions(request, raw_request_info)

    async def responses(self, request, raw_request_info=None):
        """``POST /v1/responses`` (vLLM's ``ResponsesRequest``), which Ray Serve LLM's
        ``LLMServer`` does not serve, answered by the engine's own ``OpenAIServingResponses``
        (:func:`responses_serving`), the object vLLM's server answers the route with in embedded
        mode. The stream holds vLLM's ``ErrorResponse``, or the whole response as a JSON dict, or
        for ``stream: true`` vLLM's server-sent events (``event: TYPE\\ndata: JSON\\n\\n``), those
        of each batching interval in one string, as chat's stream is batched."""
        if refusal := await self._over_context(RESPONSES, request):
            return refusal
        await self._refuse_when_engine_dead()
        return self._responses(request, raw_request_info)

    async def _tokenize_answer(self, request):
        """vLLM's ``/tokenize`` answer to vLLM's ``TokenizeRequest`` (the prompt's token count and
        the context length, as the embedded server's route gives them), from the engine's own
        ``ServingTokenization``: Ray Serve LLM 2.60 looks that object up under a name vLLM 0.32
        no longer gives it. vLLM's ``TokenizeResponse`` or ``ErrorResponse``."""
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

        serving = vllm_serving(self.engine, "serving_tokenization")
        if serving is None:
            return ErrorResponse(error=ErrorInfo(message="tokenization is not available here",
                                                 type="NotImplementedError", code=501))
        try:
            return await serving.create_tokenize(request, None)
        except ValueError as exc:  # as vLLM's route: a request it cannot render
            return serving.create_error_response(exc)

    async def _responses(self, request, raw_request_info):
        from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse
        from vllm.exceptions import VLLMClientError

        serving = responses_serving(self.engine)
        if serving is None:
            logger.error("the vLLM engine of this replica has no Responses API serving object")
            yield ErrorResponse(error=ErrorInfo(
                message="the Responses API is not available here; use /v1/chat/completions",
                type="NotImplementedError", code=501))
            return
        raw_request = None if raw_request_info is None else raw_request_info.to_starlette_request()
        try:
            result = await serving.create_responses(request, raw_request=raw_request)
        except (ValueError, VLLMClientError) as exc:  # as Ray's chat: vLLM's 400s and 404s
            result = serving.create_error_response(exc)
        if isinstance(result, ErrorResponse):
            yield result
        elif isinstance(result, ResponsesResponse):
            yield result.model_dump(mode="json", by_alias=True)
        else:
            async for events in self._batch_output_stream(server_sent_events(result)):
                yield "".join(events)


async def one_answer(answer):
    """A replica's answer stream of one item."""
    yield answer


def vllm_serving(engine: Any, name: str):
    """A replica engine's vLLM serving object of that name (vLLM's ``init_app_state`` names), or
    None.

    Ray Serve LLM's ``VLLMEngine`` runs vLLM's ``init_app_state``, which builds the serving object
    of every route from the engine's own arguments, model registry and renderer, as vLLM's server
    does in embedded mode; Ray keeps them in the engine's private ``_app_state`` and reaches its
    own routes through methods, with no public accessor. Building a second one would take the
    engine client, the registry, the renderer and the arguments, private attributes as well, and
    could drift from vLLM's wiring. Should a Ray upgrade rename ``_app_state``, the routes that
    use it answer 501 (and Ray mode's tests of them fail) while chat keeps working."""
    return getattr(getattr(engine, "_app_state", None), name, None)


def responses_serving(engine: Any):
    """A replica engine's vLLM ``OpenAIServingResponses``, or None."""
    return vllm_serving(engine, "openai_serving_responses")


async def server_sent_events(events):
    """vLLM's Responses stream events as its server writes them (``responses/api_router.py``)."""
    async for event in events:
        yield f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


async def replica_answer(method, request):
    """An LLM replica's whole answer to ``request`` through a streaming handle method: the
    stream's first item (Ray Serve LLM sends a whole answer as its only item, in a list when
    batched). RuntimeError when the stream holds none."""
    async for first in method.remote(request, None):
        if isinstance(first, list):
            first = first[0] if first else None
        if first is not None:
            return first
        break
    raise RuntimeError("the replica returned no answer")

