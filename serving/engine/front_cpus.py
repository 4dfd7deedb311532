"""The embedded server's front end kept off the CPUs its CPU engine runs the model on.

vLLM binds a CPU engine's model threads to a set of CPUs and leaves some to the rest
(``VLLM_CPU_NUM_OF_RESERVED_CPU``, one per rank by default: ``reserved_cpus`` in its log), but
nothing keeps the API server there: its event loop, the photo workers it starts and anything else
on the machine float over every CPU, the engine's included, where each time slice they take
stalls a decode step for the whole batch. Measured on 2 CPUs (docs/benchmarks.md, "The front end
off the engine's CPU"), binding them to the other CPUs gave more answers per second at
concurrency 32 and shorter steps at concurrency 1.

:func:`keep_front_off_engine` runs in the API server's process before vLLM starts its engine: a
daemon thread waits until an engine process (``VLLM::EngineCore``, or vLLM's ``VLLM::Worker``
with ``--cpu-worker-process``) has its model thread bound to fewer CPUs than this process may use,
then binds every thread of this process, and of its other child processes, to the CPUs left;
processes and threads started after (the photo workers) inherit that. Nothing is bound when the
engine takes every CPU (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) or is not bound at all
(``VLLM_CPU_OMP_THREADS_BIND=nobind``).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

from serving.engine.process import process_label

logger = logging.getLogger(__name__)

ENGINE_LABELS = ("VLLM::EngineCore", "VLLM::Worker")
POLL_S = 0.5
# How long the watch waits for an engine process to appear (vLLM starts it within seconds), and
# then for its model thread to be bound (vLLM binds it before it loads the model): an engine
# still on every CPU after that keeps them all, and there is nothing to keep the front end off.
WAIT_S = 1800.0
BIND_WAIT_S = 120.0


def is_engine(label: str) -> bool:
    """Whether a process of this kind (``serving.engine.process.process_label``) is vLLM's
    engine."""
    return label.startswith(ENGINE_LABELS)


def bind_threads(proc: psutil.Process, cpus: set[int] | frozenset[int]) -> int:
    """Every thread of ``proc`` bound to ``cpus`` (threads it starts later inherit that); how
    many were bound: 0 when the process has ended."""
    try:
        threads = proc.threads()
    except psutil.Error:
        return 0
    bound = 0
    for thread in threads:
        try:
            os.sched_setaffinity(thread.id, cpus)
            bound += 1
        except (ProcessLookupError, PermissionError):
            pass  # the thread ended meanwhile
    return bound


def engine_cpus(root: psutil.Process, allowed: set[int]) -> tuple[bool, set[int]]:
    """Whether ``root`` has an engine process yet, and the CPUs those processes run their model
    on: the affinity of each one's main thread where it is narrower than ``allowed``."""
    seen, found = False, set()
    for proc in root.children(recursive=True):
        if not is_engine(process_label(proc)):
            continue
        seen = True
        try:
            cpus = os.sched_getaffinity(proc.pid)  # its main thread's
        except (ProcessLookupError, PermissionError):
            continue
        if cpus < allowed:
            found |= cpus
    return seen, found


def bind_front(root: psutil.Process, cpus: set[int]) -> int:
    """Every thread of ``root`` and of its child processes that are not the engine's, bound to
    ``cpus``; how many threads were bound."""
    return sum(bind_threads(proc, cpus) for proc in (root, *root.children(recursive=True))
               if proc.pid == root.pid or not is_engine(process_label(proc)))


def _watch(root: psutil.Process, allowed: set[int], wait_s: float, bind_wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        seen, engine = engine_cpus(root, allowed)
        if seen and not engine:
            deadline = min(deadline, time.monotonic() + bind_wait_s)
        if engine:
            front = allowed - engine
            if not front:
                return  # its ranks have every CPU: nothing to keep the front end off
            bind_front(root, front)
            time.sleep(POLL_S)
            bind_front(root, front)  # threads a thread started while the first pass ran
            logger.info("the API server and its workers keep to CPUs %s; the engine runs its "
                        "model on CPUs %s", sorted(front), sorted(engine))
            return
        time.sleep(POLL_S)


def keep_front_off_engine(wait_s: float = WAIT_S,
                          bind_wait_s: float = BIND_WAIT_S) -> threading.Thread | None:
    """Start the watch (see the module's text) for this process's engine; None where there is
    nothing to bind (a single CPU, or vLLM's binding turned off)."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
        return None
    watch = threading.Thread(target=_watch, args=(psutil.Process(), set(allowed), wait_s,
                                                  bind_wait_s), name="front-cpus", daemon=True)
    watch.start()
    return watch
