"""Ray Serve mode: SkinGPT-4 replicas on ``ray.serve.llm``, behind the same request policy as embedded.

``skingpt4 serve MODEL --ray`` (:func:`serving.cli.serve_ray.run_ray`) and
``serve run/deploy serving/ray/skingpt4-serve.yaml`` (:func:`build_app`) both build
``ray.serve.llm.build_openai_app`` over one :class:`LLMConfig` whose ``engine_kwargs`` are the
embedded server's engine options, the same dict
(:meth:`EngineConfig.engine_options`): the plugin model folder, prefix caching,
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
:class:`serving.cluster.routers.SessionAffinityRouter`, so every turn of a consult sent with an
``x-session-id`` header reaches the replica holding its prefix (Ray's proxy and ``OpenAiIngress``
pass the header on as the request's session id), and a request without one follows prefix
affinity. vLLM's engine metrics go out per replica through each node's Ray metrics export port
(``log_engine_metrics``).

Engine failure: the LLM deployment is :class:`SkinGPT4Server` (``LLMConfig.server_cls``), Ray Serve
LLM's ``LLMServer`` that leaves as soon as its vLLM engine dies (as vLLM's own server does): the
requests in flight on it fail (JSON 500), a request that reaches it after the death is refused
before anything of it runs (:class:`serving.cluster.replica.EngineUnavailable`), and the replica
stops itself as Serve's controller would (drain, then reject new requests, which Serve's routers
retry on another replica), then kills its own actor. Routers drop a dead actor at once and the
controller replaces it at its next health check, instead of after three failed ones while routers
keep feeding it. The ingress sends a refused request again (at most twice, a second and then two
apart); a request that had already received output is never sent again.

The modules by Ray role: :mod:`serving.cluster.routers` (the request routers),
:mod:`serving.cluster.replica` (the LLM deployment's replica), :mod:`serving.cluster.ingress` (the
ingress), and this one, the app builder (:func:`build_serve_app`, :func:`build_app` for Serve
config files). ``serving.cli.serve`` imports it (through ``serving.cli.serve_ray``) only in Ray
mode, and ``serving.batch.ray_serve`` only for ``batch --ray`` (importing Ray Serve LLM imports
vLLM: several seconds); Ray Serve imports them too, by path, for the router and server classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment, build_openai_app

from serving import settings
from serving.cluster.ingress import SkinGPT4Ingress
from serving.cluster.replica import DRAIN_POLL_S, SkinGPT4Server
from serving.cluster.replica_ingress import SkinGPT4HttpServer
from serving.cluster.routers import ROUTERS
from serving.engine.server import EngineConfig


# The names of Ray's own (ray 2.60.0) that serving/cluster's modules (routers, replica, ingress)
# use although Ray does not document them, and why no public API does the job.
# tests/serving/cluster/test_private_ray_names.py holds this table equal to what the modules use
# and checks each name still exists in the installed Ray; docs/ray-cluster.md lists them.
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
    "DEFAULT_LLM_ROUTER_HTTP_TIMEOUT": "Ray Serve LLM's bound on the wait for a chat answer's "
    "first output (RAY_SERVE_LLM_ROUTER_HTTP_TIMEOUT), read from its ingress module so that "
    "/v1/responses waits exactly as long.",
    "OpenAIHTTPException": "the exception Ray's ingress raises when that bound passes (a 408): "
    "caught so that every route answers the same 408 in the project's shape.",
    "VLLMEngine": "Ray Serve LLM's vLLM engine class, which LLMServer takes as its engine_cls "
    "(a documented constructor argument): subclassed so that a CPU replica's model runs in its "
    "engine core's process as the embedded server's does (serving.engine.cpu_executor).",
    "_start_async_llm_engine": "VLLMEngine's step from vLLM's config to its engine client, the "
    "one point after Ray Serve LLM has set a CPU replica's executor to vLLM's two-process 'mp' "
    "and before the executor class is looked up; no setting of Ray's chooses the executor on a "
    "CPU.",
    "perform_graceful_shutdown": "the replica actor's stop method (Serve's controller calls "
    "it): a replica whose engine died drains and leaves at once, instead of after three failed "
    "health checks. Without it the replica is killed (ray.kill).",
}

APP_NAME = "skingpt4"


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

    ingress: Literal[settings.RAY_INGRESSES] = Field(  # the names once: serving.settings
        default="deployment",
        description="deployment: Serve's proxy sends each request to an ingress deployment "
        "(the request policy), which calls an LLM replica; replica: Serve's proxy sends it "
        "straight to an LLM replica, which runs the request policy itself (one actor hop fewer "
        "per streamed message; no prefix routing, and the Batch API needs exactly one replica: "
        "serving.cluster.replica_ingress).",
    )

    @model_validator(mode="after")
    def _routing_the_proxy_can_do(self) -> ReplicaSettings:
        if self.ingress == "replica" and self.routing == "prefix":
            raise ValueError("routing 'prefix' reads the request body, and with ingress 'replica' "
                             "Serve's proxy picks the replica before the body is read; use "
                             "routing 'session' (x-session-id) or 'pow2', or ingress 'deployment'")
        return self

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

    server: EngineConfig = Field(
        description="Model and engine options, as for the embedded server (host and port are "
        "ignored here: Ray Serve's http_options decide them)."
    )
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)

    @model_validator(mode="after")
    def _one_batch_api_store(self) -> RayAppArgs:
        if (self.replicas.ingress == "replica" and self.server.policy.data_dir
                and self.replicas.bounds != (1, 1)):
            raise ValueError("with ingress 'replica' the Batch API (a data folder) runs inside the "
                             "LLM replica and needs exactly one; give one replica, or ingress "
                             "'deployment', whose ingress keeps the Batch API for every replica")
        return self


def engine_environment(config: EngineConfig, accelerator: str) -> dict[str, str]:
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
    """The Ray Serve application: ``build_openai_app`` with the policy-enforcing ingress, or
    with ``ingress: replica`` LLM replicas that are their own ingress
    (:mod:`serving.cluster.replica_ingress`)."""
    policy = args.server.served_policy()
    if args.replicas.ingress == "replica":
        return build_llm_deployment(
            llm_config(args), name_prefix=f"{SkinGPT4HttpServer.__name__}:",
            deployment_cls=serve.ingress()(SkinGPT4HttpServer),  # Serve's late-bound ingress
            bind_kwargs={"policy": policy.model_dump(mode="json")})
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

