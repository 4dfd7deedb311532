"""The server's configuration, without an engine: the one definition of the engine options and
its two renderings, GPU and CPU defaults (CUDA faked), the CPU thread binding of tensor parallel,
the CLI flags, and the settings shared across packages."""

from __future__ import annotations

import dataclasses

import pytest

from serving import settings
from serving.settings import LOGGING_LEVEL_ENV, LOGGING_STREAM_ENV
from serving.engine.server import (
    EngineConfig,
    cli_args,
    cpu_thread_binding,
    cpu_thread_binding_env,
    engine_arguments,
    numa_nodes_with,
    parse_vllm_args,
)

GPU_CONFIG = dict(model="m", gpu_memory_utilization=0.85, quantization="fp8", max_num_seqs=8,
                  tensor_parallel_size=2)
# Engine options of the server's frontend, not vllm.EngineArgs fields: vllm.LLM (generate) and
# Ray Data's stage do not take them.
FRONTEND_ONLY = {"enable_force_include_usage", "enable_prompt_tokens_details",
                 "enable_log_requests"}


def parsed_value(parsed, name, expected):
    value = getattr(parsed, name)
    if dataclasses.is_dataclass(value):  # JSON options parse into vLLM config objects
        return {k: getattr(value, k) for k in expected}
    return value


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_cli_args_parse_back_to_the_engine_options(on_gpu):
    """The embedded server's command line, read and checked by vLLM's own parser as serve and
    batch read it (parse_vllm_args), gives every engine option its value in the dict Ray
    receives as engine_kwargs."""
    config = EngineConfig(**GPU_CONFIG, dtype="float16", block_size=16)
    options = config.engine_options(on_gpu=on_gpu)
    assert options["mm_encoder_tp_mode"] == "data"  # ranks share the photos, not encode them all
    parsed = parse_vllm_args(config, on_gpu=on_gpu)
    for name, value in options.items():
        assert parsed_value(parsed, name, value) == value, name
    server = config.server_options()
    assert parsed.model == server["model"]
    assert parsed.served_model_name == [server["served_model_name"]]
    assert parsed.middleware == [server["middleware"]]
    for name in ("host", "port", "shutdown_timeout", "h11_max_incomplete_event_size"):
        assert getattr(parsed, name) == server[name], name


def test_engine_arguments_drop_only_the_frontend_options():
    options = EngineConfig(**GPU_CONFIG).engine_options(on_gpu=False)
    kept = engine_arguments(options)
    assert options.keys() - kept.keys() == FRONTEND_ONLY
    assert kept == {k: v for k, v in options.items() if k not in FRONTEND_ONLY}


def test_one_environment_for_every_engine():
    """serve's environment is the default; generate and batch move vLLM's logs to stderr, drop
    the policy (no middleware) and keep engine traffic on loopback; the user's settings win."""
    config = EngineConfig(model="m")
    served = config.environment(on_gpu=False, environ={})
    assert settings.POLICY_ENV in served and served[settings.KVCACHE_ENV] == "1"
    assert served["VLLM_MAX_IMAGE_PIXELS"] == str(config.policy.max_image_pixels)
    assert {LOGGING_STREAM_ENV, LOGGING_LEVEL_ENV, settings.HOST_IP_ENV}.isdisjoint(served)
    local = {k: v for k, v in served.items() if k != settings.POLICY_ENV}
    quiet = config.environment(on_gpu=False, environ={}, policy=False, logs="stderr",
                               loopback=True)
    assert quiet == local | {LOGGING_STREAM_ENV: "ext://sys.stderr", LOGGING_LEVEL_ENV: "ERROR",
                             settings.HOST_IP_ENV: "127.0.0.1"}
    verbose = config.environment(on_gpu=False, environ={}, logs="stderr", verbose=True)
    assert verbose[LOGGING_LEVEL_ENV] == "INFO"
    user = {LOGGING_LEVEL_ENV: "DEBUG", settings.HOST_IP_ENV: "10.0.0.5",
            settings.KVCACHE_ENV: "4"}
    mine = config.environment(on_gpu=False, environ=user, logs="stderr", loopback=True)
    assert mine[LOGGING_LEVEL_ENV] == "DEBUG" and mine[settings.KVCACHE_ENV] == "4"
    assert settings.HOST_IP_ENV not in mine  # set by the user: the engine inherits it
    # Ray replicas (serving.cluster.app.engine_environment): no thread binding, no loopback.
    replica = config.environment(on_gpu=True, environ={}, bind_threads=False, policy=False)
    assert set(replica) == {"VLLM_MAX_IMAGE_PIXELS", "VLLM_MEDIA_URL_ALLOW_REDIRECTS",
                            "VLLM_MEDIA_CACHE", "VLLM_NO_USAGE_STATS"}
    # No engine sends usage reports, unless its user asks for them.
    assert served["VLLM_NO_USAGE_STATS"] == replica["VLLM_NO_USAGE_STATS"] == "1"
    assert "VLLM_NO_USAGE_STATS" not in config.environment(environ={"VLLM_NO_USAGE_STATS": "0"})


def test_cli_args_forms():
    assert cli_args({"foo_bar": True, "no_thing": False}) == ["--foo-bar", "--no-no-thing"]
    assert cli_args({"d": {"a": 1}, "xs": ["p", "q"], "n": 3}) == [
        "--d", '{"a": 1}', "--xs", "p", "q", "--n", "3"]
    with pytest.raises(ValueError, match="empty list"):
        cli_args({"xs": []})


def test_gpu_defaults(monkeypatch):
    """With CUDA present: CUDA graphs, the memory share and quantization passed on, vLLM's own
    block size."""
    monkeypatch.setattr("serving.engine.server.cuda_available", lambda: True)
    config = EngineConfig(**GPU_CONFIG)
    options = config.engine_options(on_gpu=True)
    assert "enforce_eager" not in options
    assert options["gpu_memory_utilization"] == 0.85
    assert options["quantization"] == "fp8"
    assert options["dtype"] == "auto"
    assert "block_size" not in options
    argv = config.vllm_args()  # CUDA found by the (faked) check
    assert "--enforce-eager" not in argv and "--block-size" not in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.85"
    assert argv[argv.index("--quantization") + 1] == "fp8"
    env = config.environment(environ={})
    assert settings.KVCACHE_ENV not in env and settings.CPU_THREADS_BIND_ENV not in env
    # CUDA graphs off on request.
    eager = EngineConfig(**GPU_CONFIG, enforce_eager=True).engine_options(on_gpu=True)
    assert eager["enforce_eager"] is True


def test_cpu_defaults(monkeypatch):
    monkeypatch.setattr("serving.engine.server.cuda_available", lambda: False)
    config = EngineConfig(**GPU_CONFIG)
    options = config.engine_options(on_gpu=False)
    assert options["enforce_eager"] is True
    assert options["block_size"] == 32
    assert "gpu_memory_utilization" not in options
    argv = config.vllm_args()
    assert "--enforce-eager" in argv
    assert argv[argv.index("--block-size") + 1] == "32"
    assert config.environment(environ={})[settings.KVCACHE_ENV] == "1"
    assert config.environment(environ={settings.KVCACHE_ENV: "4"})[settings.KVCACHE_ENV] == "4"
    # Compiled on request: no enforce_eager, so vLLM's CPU platform picks its compile mode.
    compiled = EngineConfig(**GPU_CONFIG, cpu_compile=True)
    assert "enforce_eager" not in compiled.engine_options(on_gpu=False)
    assert "--enforce-eager" not in compiled.vllm_args()
    # enforce_eager wins over it, and on a GPU it changes nothing.
    assert EngineConfig(**GPU_CONFIG, cpu_compile=True, enforce_eager=True).engine_options(
        on_gpu=False)["enforce_eager"] is True
    assert compiled.engine_options(on_gpu=True) == EngineConfig(**GPU_CONFIG).engine_options(on_gpu=True)


def test_a_cpu_engine_of_one_rank_runs_its_model_in_the_engine_core_process():
    """vLLM's worker inside the engine core (serving.engine.cpu_executor) for one rank on a CPU;
    vLLM's own executors for tensor parallel, on a GPU, and with --cpu-worker-process."""
    from serving.engine.server import INLINE_CPU_EXECUTOR

    one = EngineConfig(model="m").engine_options(on_gpu=False)
    assert one["distributed_executor_backend"] == INLINE_CPU_EXECUTOR
    argv = EngineConfig(model="m").vllm_args(on_gpu=False)
    assert argv[argv.index("--distributed-executor-backend") + 1] == INLINE_CPU_EXECUTOR
    for config, on_gpu in ((EngineConfig(model="m"), True),
                           (EngineConfig(model="m", tensor_parallel_size=2), False),
                           (EngineConfig(model="m", cpu_worker_process=True), False)):
        assert "distributed_executor_backend" not in config.engine_options(on_gpu=on_gpu)
    # The name vLLM resolves is the class (importing it imports vLLM, so only here).
    from serving.engine.cpu_executor import InlineCPUExecutor

    assert f"{InlineCPUExecutor.__module__}.{InlineCPUExecutor.__qualname__}" == INLINE_CPU_EXECUTOR


@pytest.mark.parametrize("ranks, cpus, binding", [
    (2, {0, 1}, "0|1"),
    (2, range(8), "0-3|4-7"),
    (3, range(8), "0-2|3-5|6-7"),
    (2, {0, 2, 4, 6}, "0,2|4,6"),
    (2, {4, 5, 6, 9}, "4-5|6,9"),
    (1, {0, 1}, "0-1"),
])
def test_cpu_thread_binding(ranks, cpus, binding):
    assert cpu_thread_binding(ranks, cpus) == binding


def test_cpu_thread_binding_needs_a_cpu_per_rank():
    with pytest.raises(ValueError, match="at least 4 CPUs"):
        cpu_thread_binding(4, {0, 1})


def test_cpu_thread_binding_env(monkeypatch, tmp_path):
    """Set for tensor parallel unless the user set one, or vLLM's NUMA binding works."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("serving.engine.server.numa_nodes_with", lambda cpus: 1)
    assert cpu_thread_binding_env(2, {}) == {settings.CPU_THREADS_BIND_ENV: "0|1"}
    assert cpu_thread_binding_env(1, {}) == {}
    assert cpu_thread_binding_env(2, {settings.CPU_THREADS_BIND_ENV: "nobind"}) == {}
    monkeypatch.setattr("serving.engine.server.numa_nodes_with", lambda cpus: 2)
    assert cpu_thread_binding_env(2, {}) == {}
    # Through the config: CPU engines only; Ray replicas bind on their own nodes.
    monkeypatch.setattr("serving.engine.server.numa_nodes_with", lambda cpus: 1)
    config = EngineConfig(model="m", tensor_parallel_size=2)
    assert config.environment(on_gpu=False, environ={})[settings.CPU_THREADS_BIND_ENV] == "0|1"
    assert settings.CPU_THREADS_BIND_ENV not in config.environment(on_gpu=True, environ={})
    unbound = config.environment(on_gpu=False, environ={}, bind_threads=False)
    assert settings.CPU_THREADS_BIND_ENV not in unbound
    with pytest.raises(ValueError, match="at least 4 CPUs"):
        EngineConfig(model="m", tensor_parallel_size=4).environment(on_gpu=False, environ={})


def test_numa_nodes_with(tmp_path):
    for node, cpulist in enumerate(("0-3,8-11", "4-7,12-15")):
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpulist + "\n")
    assert numa_nodes_with({0, 1}, tmp_path) == 1
    assert numa_nodes_with({3, 12}, tmp_path) == 2
    assert numa_nodes_with({0}, tmp_path / "absent") == 1


def test_serve_flags_reach_the_config(monkeypatch, tiny_checkpoints):
    import serving.engine.server
    from serving.cli import main

    seen = {}

    def run_embedded(config):
        seen["c"] = config
        return 0

    monkeypatch.setattr(serving.engine.server, "run_embedded", run_embedded)
    model = str(tiny_checkpoints["llama"])
    assert main(["serve", model, "--port", "0", "--enforce-eager", "--gpu-memory-utilization",
                 "0.8", "--quantization", "fp8", "--cpu-compile", "--cpu-worker-process"]) == 0
    config = seen["c"]
    assert (config.enforce_eager, config.gpu_memory_utilization, config.quantization) == (True, 0.8, "fp8")
    assert config.cpu_compile is True and config.cpu_worker_process is True
    assert config.dtype == "auto"
    seen.clear()
    assert main(["serve", model, "--port", "0"]) == 0
    assert (seen["c"].enforce_eager, seen["c"].gpu_memory_utilization, seen["c"].quantization) == (
        False, None, None)
    assert seen["c"].cpu_compile is False and seen["c"].cpu_worker_process is False


def test_tiny_checkpoint_names_its_dtype(tiny_checkpoints):
    """dtype auto reads the folder's config.json (the converter writes the language model's)."""
    import json

    config = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    assert config["dtype"] == "float32"


def test_settings_are_the_defining_packages_constants(monkeypatch):
    from encoders.presets import LLM_FAMILIES
    from plugins.skingpt4.config import IMAGE_PAD, IMAGE_PLACEHOLDER
    from plugins.skingpt4.template import SEP
    from serving.api.chat import RESERVED_TOKENS
    from serving.api.policy import ServePolicy

    assert settings.SEP is SEP and ServePolicy().default_stop == (SEP,)
    assert settings.RESERVED_TOKENS == RESERVED_TOKENS == (IMAGE_PLACEHOLDER, IMAGE_PAD)
    assert settings.LLM_FAMILIES is LLM_FAMILIES
    with pytest.raises(AttributeError):
        settings.NOT_A_SETTING  # noqa: B018
    assert settings.api_key({settings.API_KEY_ENV: "k"}) == "k"
    assert settings.api_key({settings.API_KEY_ENV: ""}) is None
    assert settings.api_keys({settings.API_KEY_ENV: "a, b,,c"}) == ("a", "b", "c")
    assert settings.api_keys({}) == ()
    assert settings.cpu_kvcache_gib({}) == str(settings.DEFAULT_CPU_KVCACHE_GIB) == "1"
    assert settings.serve_policy_json({settings.POLICY_ENV: "{}"}) == "{}"
    assert settings.serve_policy_json({}) is None


def test_the_ray_config_file_validates_as_shipped_and_with_its_gpu_options():
    """serving/ray/skingpt4-serve.yaml's server section, and the same with its commented server
    options switched on."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[3] / "serving/ray/skingpt4-serve.yaml"
    text = path.read_text()
    shipped = yaml.safe_load(text)["applications"][0]["args"]["server"]
    EngineConfig.model_validate(shipped)
    commented = [line.strip()[2:] for line in text.splitlines()
                 if line.startswith(" " * 8 + "# ") and ":" in line
                 and line.strip()[2:].split(":")[0] in EngineConfig.model_fields]
    assert {line.split(":")[0] for line in commented} == {"gpu_memory_utilization", "quantization"}
    gpu = EngineConfig.model_validate(shipped | yaml.safe_load("\n".join(commented)))
    options = gpu.engine_options(on_gpu=True)
    assert options["gpu_memory_utilization"] == 0.9 and options["quantization"] == "fp8"
    assert "enforce_eager" not in options
