"""The pinned layout of ``--pin-engine``: vLLM's engine processes on their own CPUs, the rest of
the server's tree and the load generator on the others."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest

from benchmarks.pinning import Layout, pin_tree


def test_the_last_cpus_go_to_the_engine():
    layout = Layout.split(1, {0, 1, 2, 3})
    assert layout == Layout(frozenset({3}), frozenset({0, 1, 2}))
    assert Layout.split(2, {4, 5, 6}) == Layout(frozenset({5, 6}), frozenset({4}))
    assert layout.target_env() == {"VLLM_CPU_OMP_THREADS_BIND": "3"}
    assert Layout.split(2, {0, 1, 2, 3}).target_env() == {"VLLM_CPU_OMP_THREADS_BIND": "2,3"}
    with pytest.raises(ValueError, match="needs more than 1 CPU"):
        Layout.split(1, {0})
    with pytest.raises(ValueError):
        Layout.split(0, {0, 1})


def test_engine_processes_and_the_rest_of_the_tree_are_pinned_apart():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("the pinned layout needs two CPUs")
    layout = Layout.split(1, set(cpus))
    # A tree like a server's: a leader, an engine process (its title as vLLM sets it), and a
    # photo worker.
    tree = subprocess.Popen(["bash", "-c", "(exec -a VLLM::Worker sleep 60) & "
                             "(exec -a photo-worker sleep 60) & wait"])
    try:
        def titles() -> set[str]:  # a child is bash until its exec has run
            found = set()
            for child in psutil.Process(tree.pid).children():
                try:
                    found.add(child.cmdline()[0])
                except (psutil.NoSuchProcess, IndexError):
                    pass
            return found

        deadline = time.monotonic() + 10
        while titles() != {"VLLM::Worker", "photo-worker"}:
            assert time.monotonic() < deadline, titles()
            time.sleep(0.05)
        assert pin_tree(tree.pid, layout) == {"engine": 1, "front": 2}
        seen = {}
        for child in psutil.Process(tree.pid).children():
            seen[child.cmdline()[0]] = os.sched_getaffinity(child.pid)
        assert seen == {"VLLM::Worker": set(layout.engine), "photo-worker": set(layout.front)}
        assert os.sched_getaffinity(tree.pid) == set(layout.front)
        assert pin_tree(2**22 + 12345, layout) == {"engine": 0, "front": 0}  # no such process
    finally:
        for child in psutil.Process(tree.pid).children():
            child.kill()
        tree.kill()
        tree.wait()
