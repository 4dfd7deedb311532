"""Ray Serve: LLM replicas that are their own HTTP ingress (``ReplicaSettings.ingress``
``"replica"``), :class:`SkinGPT4HttpServer`.

In the default layout (``"deployment"``) Serve's proxy sends each request to an ingress replica
(:class:`serving.cluster.ingress.SkinGPT4Ingress`, the request policy), which calls an LLM
replica, and every batch of streamed tokens crosses both actor boundaries back. Here Serve's
proxy sends the HTTP request straight to an LLM replica, which answers it with the embedded
server's app: vLLM's own FastAPI app over the replica's engine (Ray Serve LLM's
``LLMServer.__serve_build_asgi_app__``, the app of Ray's "direct streaming") with
:class:`serving.api.middleware.RequestPolicyMiddleware` in front, as ``skingpt4 serve`` runs it.
A token crosses one actor boundary, replica to proxy. The deployment is built by Ray Serve LLM's
public ``build_llm_deployment`` with Serve's public late-bound ingress (``serve.ingress()``), as
Ray builds its direct-streaming deployment, without the HAProxy request router Ray pairs it with
(docs/benchmarks.md says why HAProxy is not used).

What changes against the default layout (docs/ray-cluster.md, "Replicas as their own ingress"):
Serve's proxy picks the replica before anything reads the body, so a request without an
``x-session-id`` header goes to the less loaded of two random replicas instead of following
prefix affinity (``routing: prefix`` is refused); the Batch API runs inside the replica, so it
needs exactly one replica; a request that reaches a replica whose engine has just died gets
that replica's 500 instead of being sent to another one.
"""

from __future__ import annotations

from serving.api.policy import ServePolicy
from serving.api.routes import METRICS
from serving.cluster.ingress import with_key_from_env
from serving.cluster.metrics import use_ray_metrics
from serving.cluster.replica import SkinGPT4Server


class SkinGPT4HttpServer(SkinGPT4Server):
    """The LLM replica (:class:`SkinGPT4Server`: its engine, the Responses route, the fast
    leave of a replica whose engine died) that also serves HTTP: vLLM's app over its engine,
    behind the request policy given to the constructor (``policy``: a :class:`ServePolicy` as a
    dict; without keys in it, those of ``SKINGPT4_API_KEY`` in the replica's environment)."""

    async def __init__(self, llm_config, *, policy: dict | None = None, engine_cls=None,
                       model_downloader=None):
        self._policy = with_key_from_env(ServePolicy.model_validate(policy or {}))
        await super().__init__(llm_config, engine_cls=engine_cls, model_downloader=model_downloader)

    async def __serve_build_asgi_app__(self):
        # Serve's late-bound ingress calls this once the constructor (and the engine) is ready.
        from serving.api.middleware import RequestPolicyMiddleware

        app = await super().__serve_build_asgi_app__()
        use_ray_metrics()  # the policy's metrics on this node's Ray metrics export port
        # No /metrics on the Serve port, as in the default layout: the proxy would answer one
        # random replica's registry as if it were the app's. Metrics go out per replica through
        # each node's Ray metrics export port (docs/ray-cluster.md, "Metrics").
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") != METRICS]
        # vLLM's build_app has built the app's middleware stack; Starlette builds it again, with
        # the policy outermost, on the first request (as Ray adds its own LoRA middleware).
        app.middleware_stack = None
        app.add_middleware(RequestPolicyMiddleware, policy=self._policy, proxied_ids=True)
        return app
