"""One Ray session helper for ``serve --ray`` (Ray Serve) and ``batch --ray`` (Ray Data): join
the cluster in ``RAY_ADDRESS`` or start a local instance sized for the engines, tell whether the
cluster has GPUs, and leave it on exit (a local instance stops; a joined cluster runs on)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from serving import settings

# Logical CPUs a local instance has at least: an ingress, a proxy and Ray Data's own tasks need
# slots besides the engines', whatever the physical core count (vLLM-CPU threads share it).
MIN_LOCAL_CPUS = 8


def local_num_cpus(tensor_parallel_size: int, engines: int, extra: int = 2) -> int:
    """Logical CPUs of a local instance for ``engines`` CPU engines: each takes one for its actor
    and one per tensor-parallel rank, plus ``extra`` for the rest."""
    per_engine = 1 + tensor_parallel_size
    return max(os.cpu_count() or 1, MIN_LOCAL_CPUS, per_engine * engines + extra)


@contextlib.contextmanager
def ray_session(local_num_cpus: int, log_to_driver: bool = True) -> Iterator[bool]:
    """Ray initialised for the block: the cluster in ``RAY_ADDRESS`` if set, else a local
    instance with ``local_num_cpus`` logical CPUs. Yields True when it joined a cluster."""
    import ray

    address = settings.ray_address()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", num_cpus=local_num_cpus, log_to_driver=log_to_driver)
    try:
        yield bool(address)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
