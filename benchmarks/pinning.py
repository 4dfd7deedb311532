"""The pinned layout (``--pin-engine``): vLLM's engine on cores of its own, everything else on the rest.

This is how an operator sizes a GPU node, where the engine has its own device and the front end
(the API server or Ray's proxy, ingress and replica actors, Ray's daemons, the photo workers)
has the host's cores. On a CPU machine it separates the two: with the engine alone on its
cores, a front end that needs more CPU per request shows as fewer answers, not as an engine
that looks slow.

- The engine: every thread of each ``VLLM::EngineCore`` and ``VLLM::Worker`` process of the
  target's tree, on the last ``engine_cpus`` CPUs of this process's affinity. The target also
  gets ``VLLM_CPU_OMP_THREADS_BIND`` set to those CPUs, so vLLM binds its OpenMP threads there
  and not to the front end's cores.
- Everything else of the tree, and the load generator itself, on the other CPUs.

Threads and processes started later inherit their creator's affinity, so a photo worker the API
server restarts stays on the front end's cores; :func:`pin_tree` runs again before every
measured run for the processes Ray starts later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from serving import settings
from serving.engine.front_cpus import bind_threads, is_engine
from serving.engine.process import process_label


@dataclass(frozen=True)
class Layout:
    engine: frozenset[int]
    front: frozenset[int]

    @classmethod
    def split(cls, engine_cpus: int = 1, cpus: set[int] | None = None) -> Layout:
        """The last ``engine_cpus`` of ``cpus`` (default: this process's affinity) for the
        engine, the others for everything else; ValueError if nothing would be left."""
        cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
        if engine_cpus < 1 or len(cpus) <= engine_cpus:
            raise ValueError(f"--pin-engine needs more than {engine_cpus} CPU(s) for the engine; "
                             f"this process may use {len(cpus)}")
        return cls(frozenset(cpus[-engine_cpus:]), frozenset(cpus[:-engine_cpus]))

    def target_env(self) -> dict[str, str]:
        """The engine's OpenMP threads bound to its CPUs (vLLM's ``a,b,c`` list syntax)."""
        return {settings.CPU_THREADS_BIND_ENV: ",".join(map(str, sorted(self.engine)))}

    def pin_self(self) -> None:
        """The load generator (this process's threads, and those it starts) on the front's CPUs."""
        bind_threads(psutil.Process(), self.front)


def pin_tree(root: int, layout: Layout) -> dict[str, int]:
    """Pin every thread of ``root`` and its descendants: engine processes to ``layout.engine``,
    the others to ``layout.front``. Returns how many processes went where."""
    counts = {"engine": 0, "front": 0}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return counts
    for proc in procs:
        side = "engine" if is_engine(process_label(proc)) else "front"
        if bind_threads(proc, layout.engine if side == "engine" else layout.front):
            counts[side] += 1
    return counts
