"""One Ray session helper for ``serve --ray`` and ``batch --ray`` (both on Ray Serve): join
the cluster in ``RAY_ADDRESS`` or start a local instance sized for the engines, tell whether the
cluster has GPUs, and leave it on exit (a local instance stops; a joined cluster runs on)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from serving import settings

# Ray Serve's throughput-optimized mode (Ray's docs: "Enable High Throughput on Ray Serve"): gRPC
# between the proxy and the replicas and between deployments, user code and routers on each
# replica's own event loop instead of threads of their own, access logs buffered and kept out of
# stderr (they stay in Ray's log files). Its direct ingress stays off: it would have each ingress
# replica listen on a port of its own, and clients keep the one address of Serve's proxy.
# docs/benchmarks.md measures it; on a cluster, `ray start` runs with these on every node.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
# A local instance also sends no usage reports to Ray's stats server: the server connects to
# nothing but its clients (a cluster's nodes take it from `ray start`, docs/ray-cluster.md).
LOCAL_ENV = {**SERVE_ENV, "RAY_USAGE_STATS_ENABLED": "0"}

# Logical CPUs a local instance has at least: an ingress, a proxy and a batch run's driver tasks
# need slots besides the engines', whatever the physical core count (vLLM-CPU threads share it).
MIN_LOCAL_CPUS = 8


def local_num_cpus(tensor_parallel_size: int, engines: int, extra: int = 2) -> int:
    """Logical CPUs of a local instance for ``engines`` CPU engines: each takes one for its actor
    and one per tensor-parallel rank, plus ``extra`` for the rest."""
    per_engine = 1 + tensor_parallel_size
    return max(os.cpu_count() or 1, MIN_LOCAL_CPUS, per_engine * engines + extra)


def local_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The settings of :data:`LOCAL_ENV` that ``environ`` does not set itself: a user's own
    value wins."""
    return {k: v for k, v in LOCAL_ENV.items() if k not in environ}


@contextlib.contextmanager
def ray_session(local_num_cpus: int, log_to_driver: bool = True) -> Iterator[bool]:
    """Ray initialised for the block: the cluster in ``RAY_ADDRESS`` if set (started with its
    own settings), else a local instance with ``local_num_cpus`` logical CPUs whose processes
    start with :func:`local_environment`. Yields True when it joined a cluster."""
    import ray

    address = settings.ray_address()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        os.environ.update(local_environment())  # inherited by the instance's processes
        ray.init(address="local", num_cpus=local_num_cpus, log_to_driver=log_to_driver)
    try:
        yield bool(address)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
