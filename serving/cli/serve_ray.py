"""``skingpt4 serve MODEL --ray``: the Ray Serve app of :mod:`serving.cluster.app`, from the
command line's flags. ``serving.cli.serve`` imports this module only in Ray mode (importing Ray
Serve LLM imports vLLM: several seconds)."""

from __future__ import annotations

import signal
import sys
from typing import Any

from pydantic import ValidationError
from ray import serve

from serving.cluster.app import APP_NAME, RayAppArgs, ReplicaSettings, build_serve_app
from serving.cluster.session import cluster_has_gpus, local_num_cpus, ray_session
from serving.engine.flags import config_error
from serving.engine.server import EngineConfig
from serving.usage import USAGE


def replica_settings_from_cli(args: Any, accelerator: str) -> ReplicaSettings:
    """``--replicas`` / ``--min-replicas`` / ``--max-replicas`` / ``--routing`` / ``--ingress``
    of ``skingpt4 serve --ray``."""
    return ReplicaSettings(
        accelerator=accelerator,
        num_replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        routing=args.routing,
        ingress=args.ingress,
    )


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_ray(config: EngineConfig, args: Any) -> int:
    """``skingpt4 serve MODEL --ray``: serve on Ray until SIGTERM/SIGINT, then clean up; 0
    (:data:`USAGE` for flags that do not go together, before Ray starts).

    Joins the cluster in ``RAY_ADDRESS`` if set (and on leaving deletes only this app), else
    starts a local instance (and shuts it down on leaving). HTTP listens on ``config.host:port``
    on the head node only, the single address the command was given.
    """
    # Validated before Ray starts, so that bad flags fail fast; the accelerator may follow later.
    try:
        replicas = replica_settings_from_cli(args, args.accelerator or "cpu")
        app_args = RayAppArgs(server=config, replicas=replicas)
    except ValidationError as exc:
        print(f"skingpt4 serve: {config_error(exc)}", file=sys.stderr)
        return USAGE
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
