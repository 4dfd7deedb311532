"""``skingpt4 batch --ray``: the accepted lines of a batch file answered by the LLM replicas of
``serve --ray``.

:mod:`serving.api.batch_api.runner` reads, checks, refuses and records every line, and resumes, exactly
as without ``--ray``; this module answers the requests that passed the checks. It deploys the
Ray Serve application of ``skingpt4 serve --ray`` (:func:`serving.cluster.app.build_serve_app`:
the same engine options, environment and replica placement) under an application name of its
own and without an HTTP route, and sends each checked request to its LLM deployment through a
deployment handle (``SkinGPT4Server.chat`` / ``completions``, Ray Serve LLM's ``LLMServer`` over
vLLM's ``OpenAIServingChat`` / ``OpenAIServingCompletion``). So a line's answer is the body the
server sends for it, ``finish_reason``, ``cached_tokens``, ``n`` above 1 and ``logprobs``
included, after the server's ``max_tokens`` check (which the replica runs with its own
tokenizer, as for ``serve --ray``); records are written as lines finish; Ray Serve's router
spreads the lines over the replicas (at most ``--max-concurrency`` in flight). The application
is deleted when the run ends.

Photos travel from the driver to the replicas inside the requests (Ray's object store, in
memory), never through a file of this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from serving.api.routes import CHAT, COMPLETIONS
from serving.api.policy import ServePolicy
from serving.batch.run import BatchEngine, request_models
from serving.engine.server import EngineConfig


@dataclass(frozen=True)
class RayBatchSettings:
    """Where and how many engines run."""

    replicas: int = 1  # LLM replicas of the batch's Serve application
    accelerator: Literal["cpu", "gpu"] | None = None  # None: gpu when the cluster has GPUs
    accelerator_type: str | None = None  # GPU kind (A100, H100...) when the cluster mixes kinds
    verbose: bool = False  # the replicas' logs on the driver's stderr


class ServeEngine(BatchEngine):
    """:class:`serving.batch.run.BatchEngine` over the LLM deployment's handle: the same
    request models and answer bodies, with each checked request sent to a replica's ``chat`` /
    ``completions``, which runs the server's ``max_tokens`` check first."""

    dead = False  # Serve replaces a replica whose engine died; the run goes on

    def __init__(self, handle, policy: ServePolicy) -> None:
        from serving.cluster.replica import replica_answer

        stream = handle.options(stream=True)
        # No max_tokens check here: the replica runs it with its own tokenizer, and its refusal
        # (vLLM's ErrorResponse) becomes the record that `batch` writes (answer_of).
        super().__init__(
            None,
            handlers={CHAT: partial(replica_answer, stream.chat),
                      COMPLETIONS: partial(replica_answer, stream.completions)},
            request_models=request_models(),
            policy=policy,
        )


ROUTER_THREAD_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"


@contextlib.asynccontextmanager
async def open_ray_engine(config: EngineConfig,
                          ray_settings: RayBatchSettings) -> AsyncIterator[ServeEngine]:
    """Join the cluster in ``RAY_ADDRESS`` (or start a local Ray instance), deploy the batch's
    Serve application, and on exit delete it (and stop a local instance). The accelerator, when
    not given, is gpu if the cluster has GPUs."""
    # This driver's handle router on a thread of its own (Ray Serve's default, which the
    # throughput-optimized mode of a cluster's environment turns off): on this driver's event
    # loop, its polling of Serve's controller would outlive the Ray connection closed below and
    # reconnect to log a traceback. Read by Ray Serve on import: set first.
    os.environ[ROUTER_THREAD_ENV] = "1"
    from ray import serve

    from serving.cluster.app import RayAppArgs, ReplicaSettings, build_serve_app
    from serving.cluster.session import cluster_has_gpus, local_num_cpus, ray_session

    num_cpus = local_num_cpus(config.tensor_parallel_size, ray_settings.replicas)
    with ray_session(num_cpus, log_to_driver=ray_settings.verbose) as joined:
        if ray_settings.accelerator is None:
            kind = "gpu" if cluster_has_gpus() else "cpu"
            ray_settings = dataclasses.replace(ray_settings, accelerator=kind)
        replicas = ReplicaSettings(accelerator=ray_settings.accelerator,
                                   accelerator_type=ray_settings.accelerator_type,
                                   num_replicas=ray_settings.replicas, routing="pow2")
        app_name = f"skingpt4-batch-{os.getpid()}"
        # No HTTP: the requests go through a handle. Serve keeps the options it started with
        # when a `serve --ray` already runs on the cluster.
        serve.start(proxy_location="Disabled")
        try:
            serve.run(build_serve_app(RayAppArgs(server=config, replicas=replicas)),
                      name=app_name, route_prefix=None)
            handle = serve.get_deployment_handle(f"SkinGPT4Server:{config.model_name}",
                                                 app_name=app_name)
            yield ServeEngine(handle, config.served_policy())
        finally:
            serve.delete(app_name)
            if not joined:
                serve.shutdown()
