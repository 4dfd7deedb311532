"""Ray Serve mode: SkinGPT-4 replicas on ``ray.serve.llm``, behind the same request policy as embedded.

``skingpt4 serve MODEL --ray`` (:func:`run_ray`) and ``serve run/deploy serving/ray/skingpt4-serve.yaml``
(:func:`build_app`) both build ``ray.serve.llm.build_openai_app`` over one :class:`LLMConfig` whose
``engine_kwargs`` are the embedded server's engine options, the same dict
(:meth:`EmbeddedServerConfig.engine_options`): the plugin model folder, prefix caching,
``limit_mm_per_prompt``, the folder's generation config, xgrammar without free whitespace, no
request logging; on GPU replicas CUDA graphs, ``gpu_memory_utilization`` and ``quantization``.
Replicas are a fixed number or autoscaled between bounds. A CPU replica
(``accelerator_config={"kind": "cpu"}``) takes one logical CPU for its actor and one per
tensor-parallel rank; a GPU replica takes one GPU per rank, all on one node.

The request policy (API key on every route but ``/health``, body limit, image checks, the ``###``
stop) is :class:`serving.api.middleware.RequestPolicyMiddleware`, as in embedded mode. Ray Serve has no
middleware option any more (``HTTPOptions.middlewares`` is refused since Ray 2.x) and
``build_openai_app`` builds its FastAPI app itself, so the middleware goes in through the extension
point ``build_openai_app`` documents, a custom ingress class (``ingress_cls_config``):
:class:`SkinGPT4Ingress` takes the policy as a constructor argument and adds the middleware (and a
``/health`` route) to its FastAPI app when Ray Serve installs that app in the replica, before the
app's lifespan and first request. The policy never goes into a ``runtime_env`` (the Ray dashboard
shows those); without a key in it, the ingress takes ``SKINGPT4_API_KEY`` from its environment.

Routes: Ray's ingress serves chat and completions; :class:`SkinGPT4Ingress` adds
``/v1/responses``, which the middleware checks as in embedded mode
(:func:`serving.api.responses.prepare_responses_request`) and an LLM replica answers with its vLLM
engine's own Responses serving object (:meth:`SkinGPT4Server.responses`): the same prompt, the
same greedy answer and the same event stream as vLLM's server in embedded mode.

Routing (``ReplicaSettings.routing``, default ``session``): the LLM deployment's request router is
:class:`SessionAffinityRouter`, so every turn of a consult sent with an ``x-session-id`` header
reaches the replica holding its prefix (Ray's proxy and ``OpenAiIngress`` pass the header on as the
request's session id), and a request without one follows prefix affinity. vLLM's engine metrics
go out per replica through each node's Ray metrics export port (``log_engine_metrics``).

Engine failure: the LLM deployment is :class:`SkinGPT4Server` (``LLMConfig.server_cls``), Ray Serve
LLM's ``LLMServer`` that leaves as soon as its vLLM engine dies (as vLLM's own server does): the
requests in flight on it fail (JSON 500), a request that reaches it after the death is refused
before anything of it runs (:class:`EngineUnavailable`), and the replica stops itself as Serve's
controller would (drain, then reject new requests, which Serve's routers retry on another
replica), then kills its own actor. Routers drop a dead actor at once and the controller replaces
it at its next health check, instead of after three failed ones while routers keep feeding it. The
ingress sends a refused request again (at most twice, a second and then two apart); a request that
had already received output is never sent again.

``serving.cli.serve`` imports this module only in Ray mode, and ``serving.batch.ray_serve`` only for
``batch --ray`` (importing Ray Serve LLM imports vLLM: several seconds); Ray Serve imports it
too, by path, for the router and server classes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_openai_app
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.request_router import PrefixCacheAffinityRouter
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
from serving.api.policy import ServePolicy
from serving.cluster.routing import ConsultRing
from serving.cluster.session import cluster_has_gpus, local_num_cpus, ray_session
from serving.engine.server import EmbeddedServerConfig

logger = logging.getLogger(__name__)

# The names of Ray's own (ray 2.60.0) that this module uses although Ray does not document them,
# and why no public API does the job. tests/serving/cluster/test_private_ray_names.py holds this
# table equal to what the module uses and checks each name still exists in the installed Ray;
# docs/ray-cluster.md lists them.
RAY_VERSION_CHECKED = "2.60.0"
PRIVATE_RAY_NAMES = {
    "_set_asgi_app": "OpenAiIngress receives its FastAPI app here, after __init__ and before the "
    "lifespan: the last point where the app still accepts middleware (the policy middleware and "
    "the /health and /v1/responses routes). The documented __serve_build_asgi_app__ hook is for "
    "ingresses built without an app.",
    "_get_response": "OpenAiIngress's one call to the LLM deployment: overridden to send a "
    "request a dying replica refused to another replica, and to turn replica failures into "
    "JSON errors before and after the first output.",
    "_process_llm_request": "OpenAiIngress's response builder: overridden so a ServingError "
    "raised by _get_response becomes the project's error response.",
    "_extract_text_from_request": "PrefixCacheAffinityRouter's text of a request: overridden "
    "to read a Responses request (Ray's raises on one).",
    "_normalize_prompt_to_string": "PrefixCacheAffinityRouter's flattening of messages to text: "
    "a Responses request's input is flattened as chat's messages are, so both reach the replica "
    "that holds the same prefix.",
    "_coerce_to_text": "PrefixCacheAffinityRouter's text of one message part: a photo part "
    "adds a digest of the photo (Ray's adds nothing), so consults that share a first question "
    "but not their photo are told apart, as vLLM's prefix cache tells them apart.",
    "_batch_output_stream": "LLMServer's batching of stream events by time: Responses events "
    "are batched as chat's are (one actor message per interval, not per token).",
    "_app_state": "VLLMEngine keeps vLLM's serving objects (OpenAIServingResponses among them) "
    "here; Ray wraps chat and completions, not the Responses API, and looks the tokenize object "
    "(which counts prompts for the replica's max_tokens check) up under a name vLLM 0.32 no "
    "longer gives it.",
    "perform_graceful_shutdown": "the replica actor's stop method (Serve's controller calls "
    "it): a replica whose engine died drains and leaves at once, instead of after three failed "
    "health checks. Without it the replica is killed (ray.kill).",
}

APP_NAME = "skingpt4"
HEALTH_TIMEOUT_S = 5.0
# The consult header (Ray Serve's RAY_SERVE_SESSION_ID_HEADER_KEY, default x-session-id): the proxy
# and OpenAiIngress read it and hand it to the LLM deployment's router as the request's session_id.
SESSION_HEADER = "x-session-id"
# A replica looks at its engine this often; once it is dead, the replica drains (Serve's graceful
# stop, checking every DRAIN_POLL_S for requests still in flight) and leaves, or leaves anyway
# after LEAVE_TIMEOUT_S.
ENGINE_WATCH_PERIOD_S = 0.25
DRAIN_POLL_S = 0.5
LEAVE_TIMEOUT_S = 60.0
# The ingress sends a refused request again after each of these pauses: by then the refusing
# replica has drained, and Ray Serve's routers send the request to another replica.
REFUSED_RETRY_DELAYS_S = (1.0, 2.0)


def photo_marker(url: str) -> str:
    """A photo's place in the prefix router's text of a request: a digest of its URL (for a data
    URL, of the photo's bytes), where the photo stands in the conversation."""
    return f"<img {hashlib.blake2b(url.encode(), digest_size=12).hexdigest()}>"


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    """Ray Serve LLM's :class:`PrefixCacheAffinityRouter` (the replica that already saw the
    longest prefix of a request's text, else the least loaded), which also reads Responses
    requests and sees photos.

    Ray's text of a request holds only its text parts, so consults that open with the same
    question (an app's canned first question) look alike whatever their photos, while vLLM's
    prefix cache holds a consult's photo as image positions keyed by the photo's hash: a
    follow-up turn could be sent to a replica that holds another consult. Here each photo adds
    :func:`photo_marker` to the text where it stands, so the longest prefix is that of the same
    photo and the same conversation."""

    def _coerce_to_text(self, value) -> str:
        # A message part's text for the prefix router (a private hook of
        # PrefixCacheAffinityRouter; PRIVATE_RAY_NAMES says why): Ray's gives photos none.
        if isinstance(value, dict) and value.get("type") in ("image_url", "input_image"):
            url = value.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str):
                return photo_marker(url)
        return super()._coerce_to_text(value)

    def _extract_text_from_request(self, pending_request) -> str:
        # The prefix router's text of a request (a private hook of PrefixCacheAffinityRouter:
        # PRIVATE_RAY_NAMES says why it is overridden). Ray's reads `messages`
        # (chat) or `prompt` (completions); vLLM's ResponsesRequest has no messages, and its
        # `prompt` is a stored-prompt reference (always None here), on which Ray's raises. Its
        # text is what chat's would be for the same conversation: the system message
        # (`instructions`), then the messages' text.
        for arg in pending_request.args:
            if hasattr(arg, "input") and hasattr(arg, "instructions"):
                return (arg.instructions or "") + self._normalize_prompt_to_string(arg.input)
        return super()._extract_text_from_request(pending_request)


class SessionAffinityRouter(PrefixAffinityRouter):
    """Request router of the LLM deployment: a request with a session id (header
    ``x-session-id``) goes to the replica a consistent hash of that id picks
    (:class:`serving.cluster.routing.ConsultRing`: the same replica for every turn of a consult,
    up to ``num_fallback_replicas`` successors when it refuses under back-pressure); a request without
    one follows :class:`PrefixAffinityRouter` (the replica that already saw the longest prefix
    of its prompt, else the least loaded). Both keep a consult's photo and history in one
    replica's prefix cache. ``request_router_kwargs``: ``num_virtual_nodes``,
    ``num_fallback_replicas``, and the prefix router's own."""

    def __init__(self, *args, **kwargs):
        self.ring = ConsultRing()
        super().__init__(*args, **kwargs)

    def initialize_state(self, num_virtual_nodes: int = 100, num_fallback_replicas: int = 2,
                         **prefix_kwargs) -> None:
        self.ring = ConsultRing(num_virtual_nodes, num_fallback_replicas)
        super().initialize_state(**prefix_kwargs)

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self.ring.update(r.replica_id for r in replicas)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in candidate_replicas}
        return [[by_id[r]] for r in self.ring.ranked(session) if r in by_id]


class EngineUnavailable(RuntimeError):
    """Raised by an LLM replica for a request that reached it after its engine died: nothing of
    the request ran, so the ingress may send it again."""


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
        (:meth:`SkinGPT4Ingress._get_response`)."""
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

        if not request.model_fields_set.intersection(self._context.FIELDS[route]):
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
        if refusal := await self._over_context("/v1/chat/completions", request):
            return refusal
        await self._refuse_when_engine_dead()
        return await super().chat(request, raw_request_info)

    async def completions(self, request, raw_request_info=None):
        if refusal := await self._over_context("/v1/completions", request):
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
        if refusal := await self._over_context("/v1/responses", request):
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


ROUTERS = {
    "session": f"{__name__}.SessionAffinityRouter",
    "prefix": f"{__name__}.PrefixAffinityRouter",
    "pow2": None,  # Ray Serve's default: the less loaded of two random replicas
}


class ReplicaSettings(BaseModel):
    """How many LLM replicas run, and on what."""

    model_config = ConfigDict(extra="forbid")

    accelerator: Literal["cpu", "gpu"] = Field(
        default="gpu",
        description="cpu: one logical CPU per tensor-parallel rank (vLLM-CPU); "
        "gpu: one GPU per tensor-parallel rank.",
    )
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type for GPU replicas, e.g. A100 or H100."
    )
    num_replicas: int | None = Field(default=None, ge=1, description="Fixed replica count.")
    min_replicas: int | None = Field(default=None, ge=0, description="Autoscaling lower bound.")
    max_replicas: int | None = Field(default=None, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        default=16, gt=0,
        description="Autoscaling aims at this many in-flight requests per replica.",
    )
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="Requests one replica accepts at once; None: Ray Serve LLM's default (no cap).",
    )
    health_check_period_s: float | None = Field(
        default=None, gt=0,
        description="How often Serve checks each LLM replica: a replica whose engine died leaves "
        "by itself and is replaced at the next check; one that fails 3 checks in a row "
        "(e.g. a hung engine) is replaced. None: Ray Serve LLM's default (10 s).",
    )
    routing: Literal[settings.RAY_ROUTINGS] = Field(  # the names once: serving.settings
        default="session",
        description="session: a request with an x-session-id header goes to the replica that "
        "header hashes to, one without follows prefix affinity; prefix: prefix affinity only; "
        "pow2: Ray Serve's default (the less loaded of two random replicas).",
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> ReplicaSettings:
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if autoscaled and self.num_replicas is not None:
            raise ValueError("give either num_replicas or min_replicas/max_replicas, not both")
        if autoscaled and self.bounds[0] > self.bounds[1]:
            raise ValueError(f"min_replicas {self.bounds[0]} exceeds max_replicas {self.bounds[1]}")
        return self

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas; a fixed count is both bounds."""
        if not self.autoscaled:
            n = self.num_replicas or 1
            return n, n
        low = self.min_replicas if self.min_replicas is not None else 1
        return low, self.max_replicas if self.max_replicas is not None else max(low, 1)

    def deployment_config(self, graceful_shutdown_timeout_s: float) -> dict[str, Any]:
        config: dict[str, Any] = {
            "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
            # How often a draining replica looks for requests still in flight (Serve's default,
            # 2 s, would hold a replica whose engine died, refusing requests, that much longer).
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        }
        if self.autoscaled:
            low, high = self.bounds
            config["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            config["num_replicas"] = self.bounds[0]
        if self.max_ongoing_requests is not None:
            config["max_ongoing_requests"] = self.max_ongoing_requests
        if self.health_check_period_s is not None:
            config["health_check_period_s"] = self.health_check_period_s
        if ROUTERS[self.routing]:
            config["request_router_config"] = {"request_router_class": ROUTERS[self.routing]}
        return config


class RayAppArgs(BaseModel):
    """What ``build_app`` takes: the ``args:`` of a Ray Serve config file."""

    model_config = ConfigDict(extra="forbid")

    server: EmbeddedServerConfig = Field(
        description="Model and engine options, as for the embedded server (host and port are "
        "ignored here: Ray Serve's http_options decide them)."
    )
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)


def engine_environment(config: EmbeddedServerConfig, accelerator: str) -> dict[str, str]:
    """Environment of the LLM replicas: vLLM's image limits and, on CPUs, the KV cache size.
    The policy itself (with its API key) goes to the ingress only. A CPU thread binding computed
    here would not fit another node's CPUs: CPU replicas with tensor parallel take
    ``VLLM_CPU_OMP_THREADS_BIND`` from their node's environment (docs/ray-cluster.md)."""
    return config.environment(on_gpu=accelerator == "gpu", bind_threads=False, policy=False)


def model_path(model: str) -> str:
    """The model as replicas name it."""
    # Replicas run in other working directories (and on other nodes): a folder that exists here
    # goes out as an absolute path; any other path is taken to exist on the replicas' nodes.
    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else model


def llm_config(args: RayAppArgs) -> LLMConfig:
    """The one :class:`ray.serve.llm.LLMConfig` of the app."""
    server, replicas = args.server, args.replicas
    options: dict[str, Any] = {}
    if replicas.accelerator == "cpu":
        options["accelerator_config"] = {"kind": "cpu"}
    else:
        if replicas.accelerator_type:
            options["accelerator_type"] = replicas.accelerator_type
        if server.tensor_parallel_size > 1:
            # Tensor-parallel ranks exchange activations every layer: keep them on one node.
            options["placement_group_config"] = {
                "bundles": [{"GPU": 1}] * server.tensor_parallel_size,
                "strategy": "STRICT_PACK",
            }
    config = LLMConfig(
        model_loading_config={"model_id": server.model_name, "model_source": model_path(server.model)},
        engine_kwargs=server.engine_options(on_gpu=replicas.accelerator == "gpu"),
        deployment_config=replicas.deployment_config(server.shutdown_timeout_s),
        runtime_env={"env_vars": engine_environment(server, replicas.accelerator)},
        # vLLM's engine metrics (TTFT, throughput, KV-cache use, prefix-cache hits) per replica,
        # through each node's Ray metrics export port (docs/ray-cluster.md, "Metrics").
        log_engine_metrics=True,
        server_cls=SkinGPT4Server,
        **options,
    )
    return config


def build_serve_app(args: RayAppArgs) -> Application:
    """The Ray Serve application: ``build_openai_app`` with the policy-enforcing ingress."""
    policy = args.server.served_policy()
    config: dict[str, Any] = {
        "llm_configs": [llm_config(args)],
        "ingress_cls_config": {
            "ingress_cls": SkinGPT4Ingress,
            "ingress_extra_kwargs": {"policy": policy.model_dump(mode="json")},
        },
    }
    if policy.data_dir:
        config["ingress_deployment_config"] = BATCH_API_INGRESS
    return build_openai_app(config)


# With the Batch API on (a data folder), the ingress keeps the store and runs the batches: one
# replica, on the head node, where the data folder is (docs/ray-cluster.md: a persistent
# volume). Ray gives the head node this resource (Ray's docs, "Resources").
HEAD_NODE_RESOURCE = "node:__internal_head__"
BATCH_API_INGRESS = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    "ray_actor_options": {"resources": {HEAD_NODE_RESOURCE: 0.001}},
}


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Ray Serve config files (``import_path: serving.cluster.app:build_app``);
    ``args`` follows :class:`RayAppArgs`."""
    return build_serve_app(RayAppArgs.model_validate(args))


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


def error_response(error: ServingError) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in error.headers()})


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


def with_image_input(model_cards: dict) -> dict:
    """The model cards (``GET /v1/models``) saying ``"input_modality": "image"``: Ray says so
    only for configs it has read a ``vision_config`` from, which happens in the replicas, after
    the ingress's cards were made. SkinGPT-4 always takes a photo."""
    return {model: card.model_copy(update={"metadata": {**card.metadata, "input_modality": "image"}})
            for model, card in model_cards.items()}


class SkinGPT4Ingress(OpenAiIngress):
    """``OpenAiIngress`` with :class:`RequestPolicyMiddleware` in front of every route, a
    ``/health`` route that answers 200 once every LLM deployment passes its health check, a
    ``/v1/responses`` route (:meth:`responses`), and requests refused by a replica whose engine
    died sent again (:meth:`_get_response`)."""

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
        app.add_middleware(RequestPolicyMiddleware, policy=self._policy, count_prompts=False)
        app.add_api_route("/health", self.health, methods=["GET"], include_in_schema=False)
        app.add_api_route("/v1/responses", self.responses, methods=["POST"])
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
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except ServingError as error:
            return error_response(error)

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses``, as vLLM's server answers it: the body (checked by the policy
        middleware) as vLLM's ``ResponsesRequest`` goes to an LLM replica
        (:meth:`SkinGPT4Server.responses`, sent again on refusal as chat is), and its answer comes
        back as JSON (the whole response, or an error with its status) or as vLLM's event
        stream."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        try:
            body = ResponsesRequest.model_validate_json(await request.body())
        except ValidationError as exc:  # the middleware checked the body against the same model
            where = ".".join(str(p) for p in exc.errors()[0]["loc"])
            return error_response(InvalidRequest(f"{where}: {exc.errors()[0]['msg']}", param=where))
        stream = self._get_response(body=body, call_method="responses", raw_request=request)
        try:
            first = await anext(stream)
        except ServingError as error:  # the replica's error responses included
            return error_response(error)
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


def replica_settings_from_cli(args: Any, accelerator: str) -> ReplicaSettings:
    """``--replicas`` / ``--min-replicas`` / ``--max-replicas`` / ``--routing`` of
    ``skingpt4 serve --ray``."""
    return ReplicaSettings(
        accelerator=accelerator,
        num_replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        routing=args.routing,
    )


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_ray(config: EmbeddedServerConfig, args: Any) -> int:
    """``skingpt4 serve MODEL --ray``: serve on Ray until SIGTERM/SIGINT, then clean up; 0.

    Joins the cluster in ``RAY_ADDRESS`` if set (and on leaving deletes only this app), else
    starts a local instance (and shuts it down on leaving). HTTP listens on ``config.host:port``
    on the head node only, the single address the command was given.
    """
    # Validated before Ray starts, so that bad flags fail fast; the accelerator may follow later.
    replicas = replica_settings_from_cli(args, args.accelerator or "cpu")
    app_args = RayAppArgs(server=config, replicas=replicas)
    num_cpus = local_num_cpus(config.tensor_parallel_size, replicas.bounds[1])
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with ray_session(num_cpus) as joined:
            signal.signal(signal.SIGTERM, _raise_interrupt)  # ray.init installed its own (exit 15)
            try:
                if args.accelerator is None and cluster_has_gpus():
                    app_args.replicas.accelerator = "gpu"
                serve.start(http_options={"host": config.host, "port": config.port},
                            proxy_location="HeadOnly")
                serve.run(build_serve_app(app_args), name=APP_NAME, route_prefix="/", blocking=True)
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if joined:
                    serve.delete(APP_NAME)
                else:
                    serve.shutdown()
    except KeyboardInterrupt:
        pass
    return 0
