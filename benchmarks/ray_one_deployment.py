"""A Ray Serve layout measured against ``serve --ray``, for the benchmarks only: one deployment
that is both the HTTP ingress and the model replica.

``serve --ray`` runs Ray Serve LLM's two deployments: Serve's proxy sends each request to an
``OpenAiIngress`` replica (the request policy), which calls an ``LLMServer`` replica (the vLLM
engine), and every batch of streamed tokens crosses both actor boundaries back. Here one replica
runs the embedded server's own app (vLLM's FastAPI app and :class:`RequestPolicyMiddleware`, the
same arguments as ``skingpt4 serve``) over its in-process vLLM engine, built through Ray Serve's
public late-bound ingress (``serve.ingress()`` with ``__serve_build_asgi_app__``): a token
crosses one actor boundary, replica to proxy.

``--direct-ingress`` (Ray's ``RAY_SERVE_ENABLE_DIRECT_INGRESS``): the replica serves HTTP on
``--port`` itself and no proxy is on the path (Serve's proxy still runs, on another port). One
replica only: with several, each listens on its own port, and Ray's answer to balancing them is
its HAProxy ingress, which listens on every interface.

    python -m benchmarks.ray_one_deployment artifacts/bench-llama --port 8000 [--direct-ingress]

What it lacks against ``serve --ray`` (why it is not the shipped layout): the proxy routes before
it has read a body, so a request without ``x-session-id`` cannot follow prefix affinity; the
Batch API would run in every replica; no fast leave of a replica whose engine died.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def _serve_app(server: dict):
    from ray import serve

    @serve.ingress()
    class SkinGPT4OneDeployment:
        async def __init__(self, server: dict) -> None:
            from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

            from serving.cluster.ingress import with_key_from_env
            from serving.engine.server import EngineConfig, parse_vllm_args

            config = EngineConfig.model_validate(server)
            config = config.model_copy(update={"policy": with_key_from_env(config.served_policy())})
            # The policy (with the API key) goes to this process's environment, not the runtime_env.
            os.environ.update(config.environment(on_gpu=False, bind_threads=False))
            self.args = parse_vllm_args(config, on_gpu=False)
            self._stack = contextlib.AsyncExitStack()
            self.engine = await self._stack.enter_async_context(build_async_engine_client(self.args))

        async def __serve_build_asgi_app__(self):
            from vllm.entrypoints.launchers.api_server.app_state import init_app_state
            from vllm.entrypoints.launchers.app import build_app

            tasks = await self.engine.get_supported_tasks()
            app = build_app(self.args, tasks, self.engine.model_config)  # with the policy middleware
            await init_app_state(self.engine, app.state, self.args, tasks)
            return app

        async def check_health(self) -> None:
            await self.engine.check_health()

    deployment = serve.deployment(SkinGPT4OneDeployment, name="SkinGPT4OneDeployment",
                                  ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1000)
    return deployment.bind(server)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_one_deployment")
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--direct-ingress", action="store_true")
    args = parser.parse_args(argv)

    from serving.engine.process import free_port

    proxy_port = args.port
    if args.direct_ingress:
        # Read by Ray Serve's processes as they import it: set before Ray starts them.
        proxy_port = free_port(args.host)
        os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(args.port),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(args.port + 1)})
    from serving.cluster.session import local_environment

    os.environ.update(local_environment())  # Ray's settings as `serve --ray` runs it
    import ray
    from ray import serve

    server = {"model": os.path.abspath(args.model), "dtype": args.dtype}
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init(address="local", num_cpus=8)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port}, proxy_location="HeadOnly")
        serve.run(_serve_app(server), name="skingpt4", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
