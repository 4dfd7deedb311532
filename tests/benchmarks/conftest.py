"""Fixtures of the benchmark tests: the session's tiny Llama checkpoint, one reference server per module."""

from __future__ import annotations

import pytest

from benchmarks.targets import LaunchedTarget, Target


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def reference_server(tiny_model, tmp_path_factory):
    """``benchmarks.hf_server --mode reference`` on the tiny checkpoint, started by the harness's launcher."""
    log = tmp_path_factory.mktemp("logs") / "reference.log"
    with LaunchedTarget(Target.named("reference", tiny_model), log, startup_timeout_s=120) as server:
        yield server
