"""Shared fixtures: tiny checkpoints are built once per test session (seconds each)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# Engines and Ray nodes started by tests (and their children) talk over loopback only.
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Fixtures that start an engine, a model server or a Ray cluster, and the markers of every test
# that uses one (directly or through another fixture), so that
# `pytest -m "not engine and not ray and not slow" tests` leaves only logic tests. Tests that start
# an engine without one of these fixtures carry the marker themselves.
MARKERS_BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "server": ("engine",),  # tests/serving/conftest.py: the shared embedded server
    "batch_server": ("engine",),  # tests/serving/api/batch_api/test_batches_server.py: one with a data folder
    "observed_server": ("engine",),  # tests/serving/api/test_observability_server.py: another
    "clients_server": ("engine",),  # tests/serving/clients/conftest.py: the real clients' server
    "engines": ("engine",),  # tests/plugins/test_vllm_parity.py: vLLM LLM + HF reference
    "vllm_engine": ("engine",),  # tests/plugins/test_convert.py: vLLM LLM on a converted release
    "reference_server": ("engine",),  # tests/benchmarks/conftest.py: the HF reference target
    "cluster": ("ray", "engine"),  # tests/serving/cluster/test_ray.py: a Ray cluster serving vLLM replicas
}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, markers in MARKERS_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                for marker in markers:
                    item.add_marker(marker)
    # A test that stops a shared server runs after the other tests of its module, whatever order
    # they were collected or named in (a stable sort: everything else keeps its order).
    first_of_module: dict[str, int] = {}
    for i, item in enumerate(items):
        first_of_module.setdefault(item.nodeid.split("::")[0], i)
    items.sort(key=lambda item: (first_of_module[item.nodeid.split("::")[0]],
                                 item.get_closest_marker("stops_shared_server") is not None))


@pytest.fixture(scope="session", autouse=True)
def _skingpt4_config_registered():
    """Tokenizers and configs of model folders resolve ``model_type: skingpt4`` in this process."""
    from plugins.skingpt4.config import register_config

    register_config()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{family: folder} of tiny random SkinGPT-4 checkpoints (Falcon and Llama)."""
    from plugins.skingpt4.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {f: write_tiny_checkpoint(root / f"tiny-{f}", preset="tiny", family=f) for f in ("llama", "falcon")}


@pytest.fixture(scope="session")
def photos():
    from encoders.samples import synthetic_skin_photo

    return [synthetic_skin_photo(seed=s, size=size) for s, size in ((0, (512, 384)), (1, (300, 420)), (2, (224, 224)))]
