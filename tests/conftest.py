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
