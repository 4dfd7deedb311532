"""vLLM's model worker inside the engine core's process, on a CPU.

vLLM runs a CPU engine as two processes even with one rank: ``VLLM::EngineCore`` (scheduler,
inputs, outputs) and ``VLLM::Worker`` (the model), joined by a shared-memory queue that each side
polls. vLLM's CPU platform turns its one-process executor (``uni``) into ``mp`` because the
worker's OpenMP threads must be sized and bound before torch starts, which it does through the
worker process's environment. On a small machine the hand-off is the largest cost after the
model itself: measured on 2 CPUs (docs/benchmarks.md, "The engine's own speed"), the worker spent
a quarter of its CPU polling for the next step and the engine core most of its own on the other
side of the queue.

:class:`InlineCPUExecutor` is vLLM's ``UniProcExecutor`` with that thread setup done in process:
the engine core's thread is bound to the CPUs vLLM would give its worker
(``vllm.utils.ompmultiprocessing.OMPProcessManager``: ``VLLM_CPU_OMP_THREADS_BIND``, and
``VLLM_CPU_NUM_OF_RESERVED_CPU`` CPUs left to the rest) before torch's thread pool starts, with
one torch thread per CPU; the thread pool and the engine core's I/O threads, started after it,
inherit the binding. ``VLLM_CPU_OMP_THREADS_BIND=nobind`` leaves threads as torch sets them.
:meth:`serving.engine.server.EngineConfig.engine_options` names it as vLLM's
``distributed_executor_backend`` (by its import path, which vLLM's platform check leaves as it
is) for a CPU engine of one rank; ``--cpu-worker-process`` keeps vLLM's two processes.
"""

from __future__ import annotations

import os

from vllm.v1.executor.uniproc_executor import UniProcExecutor


class InlineCPUExecutor(UniProcExecutor):
    """vLLM's one-process executor with the CPU worker's thread count and binding."""

    def _init_executor(self) -> None:
        import torch
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        manager = OMPProcessManager(self.vllm_config)
        if not manager.skip_setup and manager.cpu_lists:
            cpus = manager.cpu_lists[0]
            # This thread only (Linux): the engine core's loop, which runs the model, and every
            # thread it starts from here on.
            os.sched_setaffinity(0, cpus)
            torch.set_num_threads(len(cpus))
        super()._init_executor()
