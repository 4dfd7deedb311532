"""``skingpt4 generate``'s engine, without starting one: ``vllm.LLM`` gets ``skingpt4 serve``'s
engine options and environment (the real answer: test_cli_errors.py, marked engine)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from serving import settings
from serving.engine.offline import generate_engine_kwargs
from serving.engine.server import EngineConfig
from serving.settings import LOGGING_LEVEL_ENV, LOGGING_STREAM_ENV
from tests.serving.engine.test_server_config import FRONTEND_ONLY


def serve_engine_args(config: EngineConfig, on_gpu: bool) -> dict:
    """What ``skingpt4 serve`` gives its engine, less the frontend's options."""
    options = config.engine_options(on_gpu=on_gpu)
    return {"model": config.model, **{k: v for k, v in options.items() if k not in FRONTEND_ONLY}}


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_generate_engine_kwargs_are_serves_engine_options(on_gpu):
    config = EngineConfig(model="m", dtype="float16", quantization="fp8",
                                  gpu_memory_utilization=0.8)
    assert generate_engine_kwargs(config, 2, on_gpu) == serve_engine_args(config, on_gpu)


def test_generate_engine_kwargs_fit_every_photo_given():
    """A local run is not held to serve's per-request photo limit (4); a seed is passed on."""
    config = EngineConfig(model="m")
    kwargs = generate_engine_kwargs(config, 6, on_gpu=False, seed=3)
    assert kwargs == serve_engine_args(config, False) | {
        "limit_mm_per_prompt": {"image": 6}, "seed": 3}


class RecordingLLM:
    """Stands in for ``vllm.LLM``: records its arguments and the request, answers at once."""

    calls: list[dict] = []

    def __init__(self, **kwargs) -> None:
        RecordingLLM.calls.append({"kwargs": kwargs})

    def get_default_sampling_params(self):
        from vllm import SamplingParams

        return SamplingParams()

    def generate(self, requests, params, use_tqdm=True):
        RecordingLLM.calls[-1].update(requests=requests, params=params)
        return [SimpleNamespace(outputs=[SimpleNamespace(text="  a ring-shaped rash \n")])]


@pytest.fixture
def saved_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_generate_command_runs_serves_engine(monkeypatch, saved_environ, tiny_checkpoints,
                                             tmp_path, capsys):
    """``skingpt4 generate MODEL``: the LLM of ``skingpt4 serve MODEL``'s defaults, in its
    environment with vLLM's logs on stderr; stdout holds the answer only."""
    from encoders.samples import synthetic_skin_photo
    from serving.cli import main

    monkeypatch.setattr("vllm.LLM", RecordingLLM)
    monkeypatch.setattr("serving.engine.offline.cuda_available", lambda: False)
    for name in (LOGGING_LEVEL_ENV, settings.POLICY_ENV):
        monkeypatch.delenv(name, raising=False)
    RecordingLLM.calls.clear()
    folder, photo = tiny_checkpoints["llama"], tmp_path / "photo.png"
    synthetic_skin_photo(seed=0).save(photo)
    assert main(["generate", str(folder), "--image", str(photo), "--image", str(photo),
                 "--seed", "5", "--max-tokens", "7", "--verbose"]) == 0
    assert capsys.readouterr().out == "a ring-shaped rash\n"
    (call,) = RecordingLLM.calls
    serve = EngineConfig(model=str(folder))
    assert call["kwargs"] == serve_engine_args(serve, on_gpu=False) | {"seed": 5}
    assert call["params"].stop == [settings.SEP] and call["params"].max_tokens == 7
    assert len(call["requests"][0]["multi_modal_data"]["image"]) == 2
    assert os.environ[LOGGING_STREAM_ENV] == "ext://sys.stderr"
    assert os.environ[LOGGING_LEVEL_ENV] == "INFO"
    assert settings.POLICY_ENV not in os.environ  # no middleware, no API key in the environment
    expected = serve.environment(on_gpu=False, policy=False, logs="stderr", verbose=True,
                                 loopback=True)
    assert {k: os.environ[k] for k in expected} == expected
