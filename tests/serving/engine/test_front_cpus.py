"""The embedded server's front end keeps off the CPUs its engine runs the model on
(:mod:`serving.engine.front_cpus`): first with a stand-in engine (a process titled as vLLM's,
bound to one CPU), then on the session's server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from serving.engine.process import process_label

REPO_ROOT = Path(__file__).resolve().parents[3]

two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                              reason="keeping off the engine's CPUs needs at least two")


WATCH = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from serving.engine.front_cpus import keep_front_off_engine
    cpus = sorted(os.sched_getaffinity(0))
    bound = sys.argv[1] == "bound"
    taskset = ["taskset", "-c", str(cpus[0])] if bound else []
    engine = subprocess.Popen([*taskset, "bash", "-c", "exec -a VLLM::EngineCore sleep 60"])
    other = subprocess.Popen(["sleep", "60"])
    time.sleep(0.5)
    started = time.monotonic()
    watch = keep_front_off_engine(wait_s=30, bind_wait_s=2)
    watch.join(30)
    print(json.dumps({
        "cpus": cpus,
        "self": sorted(os.sched_getaffinity(0)),
        "other": sorted(os.sched_getaffinity(other.pid)),
        "engine": sorted(os.sched_getaffinity(engine.pid)),
        "alive": watch.is_alive(),
        "took_s": time.monotonic() - started,
    }))
    engine.kill(); other.kill()
""")


def _watched(engine: str) -> dict:
    """The watch run in a process of its own (its binding would otherwise stay on the test
    run), beside a stand-in engine (a process titled as vLLM's) ``bound`` to the first CPU or
    left on all of them, and another child."""
    done = subprocess.run([sys.executable, "-c", WATCH, engine], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@two_cpus
def test_the_front_end_and_its_other_children_move_off_the_engines_cpus():
    """After the watch, every thread of the process and of its other child is on the CPUs the
    engine left, and the engine is untouched."""
    seen = _watched("bound")
    rest = seen["cpus"][1:]
    assert not seen["alive"]
    assert seen["engine"] == seen["cpus"][:1]
    assert seen["self"] == rest and seen["other"] == rest


@two_cpus
def test_an_engine_on_every_cpu_leaves_the_front_end_as_it_is():
    """An engine that stays on every CPU (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``): the watch gives
    up after its wait for the binding, and binds nothing."""
    seen = _watched("free")
    assert not seen["alive"] and seen["took_s"] < 10
    assert seen["self"] == seen["other"] == seen["engine"] == seen["cpus"]


def test_nothing_is_bound_where_the_engine_is_not():
    """vLLM's binding off (``nobind``): no watch at all."""
    script = ("import os; os.environ['VLLM_CPU_OMP_THREADS_BIND'] = 'nobind'; "
              "from serving.engine.front_cpus import keep_front_off_engine; "
              "print(keep_front_off_engine() is None)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


@two_cpus
def test_the_served_engine_has_its_cpu_to_itself(server):
    """The session's embedded server: the engine core's model thread on its CPUs, and every
    thread of the API server and of its photo workers on the others."""
    root = psutil.Process(server.process.pid)
    engines = [p for p in root.children(recursive=True)
               if process_label(p).startswith("VLLM::EngineCore")]
    assert len(engines) == 1
    engine = set(os.sched_getaffinity(engines[0].pid))
    assert engine < set(os.sched_getaffinity(0))  # bound to fewer CPUs than the machine has
    front = [root, *(p for p in root.children(recursive=True) if p not in engines)]
    assert any(process_label(p).startswith("-m serving.api.workers") for p in front)
    for proc in front:
        for thread in proc.threads():
            assert not set(os.sched_getaffinity(thread.id)) & engine, (process_label(proc), thread.id)
