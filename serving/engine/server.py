"""The embedded server: vLLM's own OpenAI-compatible server, in this process tree, no Ray.

``skingpt4 serve MODEL`` turns :class:`EngineConfig` into vLLM server arguments: the
plugin model, prefix caching (follow-up turns reuse the image's KV cache), at most
``max_images_per_request`` images per prompt, the model folder's generation defaults, xgrammar
structured output without free whitespace, a drain on SIGTERM, and
:class:`serving.api.middleware.RequestPolicyMiddleware` in front of every route.

The engine options are defined once, by :meth:`EngineConfig.engine_options`: vLLM
``AsyncEngineArgs`` / ``FrontendArgs`` field names and their values. The embedded server and
``skingpt4 batch`` render them as vLLM's command line (:func:`cli_args`), after the options only
a server has (:meth:`EngineConfig.server_options`), and parse it with vLLM's own parser
(:func:`parse_vllm_args`); Ray Serve (``serve --ray`` and ``batch --ray``) passes the same dict
as ``engine_kwargs``; ``skingpt4 generate`` (``vllm.LLM``) passes its ``EngineArgs`` fields
(:func:`engine_arguments`).
The engine's environment is defined once too, by :meth:`EngineConfig.environment`, for
all of them.

Where the engine runs decides a few of them. On a GPU (CUDA present): CUDA graphs (eager only
with ``enforce_eager``), vLLM's own KV-cache block size, ``gpu_memory_utilization`` passed on.
On a CPU: eager, 32-token blocks, one engine process for one rank (vLLM's model worker inside
its engine core: :mod:`serving.engine.cpu_executor`), ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB unless
set) and, for tensor parallel, a per-rank thread binding when vLLM's NUMA-based one cannot
work. Both: ``dtype`` ``auto`` (the model folder's ``config.json``) and ``quantization`` passed
on. docs/gpu.md sizes GPU deployments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving import settings
from serving.api.policy import ServePolicy
from serving.usage import FAILED, OK, USAGE

DEFAULT_MODEL_NAME = "skingpt4"
CPU_BLOCK_SIZE = 32
# vLLM itself never fetches a URL: the middleware inlines allowed remote photos as data URLs,
# and this reserved name (RFC 2606) makes vLLM refuse any URL that reaches it some other way.
NO_MEDIA_DOMAINS = ("media.invalid",)
MIDDLEWARE = "serving.api.middleware.RequestPolicyMiddleware"
NUMA_NODES = Path("/sys/devices/system/node")
# serving.engine.cpu_executor.InlineCPUExecutor's import path, named here without importing vLLM.
INLINE_CPU_EXECUTOR = "serving.engine.cpu_executor.InlineCPUExecutor"


class EngineConfig(BaseModel):
    """One engine's configuration and the request policy in front of it, for every way this
    project runs one: ``serve`` (embedded and Ray), ``batch`` (in process and Ray) and
    ``generate``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A SkinGPT-4 model folder.")
    model_name: str = Field(default=DEFAULT_MODEL_NAME, description="Name served on /v1/models.")
    host: str = Field(default="127.0.0.1", description="Address the server listens on")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the server listens on")
    dtype: str = Field(
        default="auto",
        description="Weights/activations dtype (vLLM --dtype). auto: the model folder's "
        "config.json dtype (float16 for the Llama-2 release, bfloat16 for Falcon); vLLM runs a "
        "float32 folder in a 16-bit type.",
    )
    max_model_len: int = Field(default=2048, ge=64,
                               description="Context length in tokens: prompt and answer")
    max_num_seqs: int = Field(default=64, ge=1,
                              description="Requests the engine batches at once")
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = Field(
        default=False,
        description="No CUDA graphs on a GPU (a quicker start, slower decoding). A CPU runs "
        "eager unless cpu_compile is set.",
    )
    cpu_compile: bool = Field(
        default=False,
        description="On a CPU, compile the language model (vLLM's torch.compile mode, inductor "
        "C++ kernels) instead of running eager: a slower start; docs/benchmarks.md measures "
        "both. No effect on a GPU.",
    )
    cpu_worker_process: bool = Field(
        default=False,
        description="On a CPU, run vLLM's model worker in a process of its own beside the "
        "engine core, as vLLM does, instead of in the engine core's process "
        "(serving.engine.cpu_executor): more CPU per request; docs/benchmarks.md measures both. "
        "Tensor parallel always has one process per rank. No effect on a GPU.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of each GPU's memory vLLM may take (weights, activations, KV cache); "
        "None: vLLM's default, 0.9. Not used on a CPU (VLLM_CPU_KVCACHE_SPACE sizes its cache).",
    )
    quantization: str | None = Field(
        default=None,
        description="vLLM --quantization, e.g. fp8 (8-bit weights: Falcon-40B on one 80 GB "
        "GPU); None: the folder's weights as they are.",
    )
    block_size: int | None = Field(
        default=None,
        description="KV-cache block in tokens (prefix caching reuses whole blocks). None: 32 on "
        "a CPU, where vLLM's 128 would leave most of a consult's shared prefix uncached; "
        "vLLM's default on a GPU.",
    )
    shutdown_timeout_s: int = Field(default=30, ge=0, description="SIGTERM drain time.")
    policy: ServePolicy = Field(default_factory=ServePolicy)

    def engine_options(self, on_gpu: bool) -> dict[str, Any]:
        """vLLM engine options, as ``AsyncEngineArgs`` / ``FrontendArgs`` field names: the one
        definition behind both the embedded server's command line and Ray's ``engine_kwargs``.
        Options left to vLLM's defaults are absent."""
        options: dict[str, Any] = {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_prefix_caching": True,
            # vLLM 0.32's sender-side multimodal cache drifts when identical photos arrive
            # together, and the engine then fails the request with a 500 meant to be retried by
            # the client. Sending the pixels every time costs ~0.6 MB of IPC per photo.
            "mm_processor_cache_gb": 0,
            "limit_mm_per_prompt": {"image": self.policy.max_images_per_request},
            "allowed_media_domains": list(NO_MEDIA_DOMAINS),
            "generation_config": "auto",
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            "enable_force_include_usage": True,
            # usage.prompt_tokens_details.cached_tokens: how much of a consult the cache reused.
            "enable_prompt_tokens_details": True,
            "enable_log_requests": False,  # request bodies hold the photos
        }
        if self.tensor_parallel_size > 1:
            # Each rank encodes its share of the photos instead of all of them (the vision stack
            # is replicated, not sharded); the embeddings are gathered on every rank.
            options["mm_encoder_tp_mode"] = "data"
        if not on_gpu and self.tensor_parallel_size == 1 and not self.cpu_worker_process:
            options["distributed_executor_backend"] = INLINE_CPU_EXECUTOR
        if self.enforce_eager or not (on_gpu or self.cpu_compile):
            options["enforce_eager"] = True
        if on_gpu and self.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.quantization:
            options["quantization"] = self.quantization
        block_size = self.kv_block_size(on_gpu)
        if block_size:
            options["block_size"] = block_size
        return options

    def server_options(self) -> dict[str, Any]:
        """Options of the embedded HTTP server only (``FrontendArgs`` / ``AsyncEngineArgs``
        names). On Ray the model goes in ``model_loading_config``, HTTP settings to Serve's
        proxy, the middleware to the ingress and the drain time to the deployment."""
        return {
            "model": self.model,
            "served_model_name": self.model_name,
            "host": self.host,
            "port": self.port,
            "middleware": MIDDLEWARE,
            # The policy's own access log replaces uvicorn's, whose line carries the client's
            # address and the path with its file and batch ids (serving.api.observe).
            "disable_uvicorn_access_log": True,
            "shutdown_timeout": self.shutdown_timeout_s,
            # The middleware answers oversized headers with a clear 431 first.
            "h11_max_incomplete_event_size": 2 * self.policy.max_header_bytes,
        }

    def vllm_args(self, on_gpu: bool | None = None) -> list[str]:
        """vLLM's server command line; ``on_gpu`` None: whether CUDA is present here."""
        on_gpu = cuda_available() if on_gpu is None else on_gpu
        return cli_args(self.server_options() | self.engine_options(on_gpu))

    def kv_block_size(self, on_gpu: bool) -> int | None:
        return self.block_size or (None if on_gpu else CPU_BLOCK_SIZE)

    def served_policy(self) -> ServePolicy:
        """The policy with the photo size of the model folder (read when the folder is here)."""
        config = Path(self.model) / "config.json"
        if not config.is_file():
            return self.policy
        vision = json.loads(config.read_text()).get("vision_config") or {}
        size = vision.get("image_size", self.policy.image_size)
        return self.policy.model_copy(update={"image_size": size})

    def environment(
        self, on_gpu: bool | None = None, environ: Mapping[str, str] = os.environ, *,
        bind_threads: bool = True, policy: bool = True, logs: Literal["vllm", "stderr"] = "vllm",
        verbose: bool = False, loopback: bool = False,
    ) -> dict[str, str]:
        """Variables for the engine's processes, set before vLLM is imported: the one builder
        behind ``serve`` (embedded and Ray), ``generate`` and ``batch`` (plain and Ray).
        ``environ`` holds the user's settings, which win over the defaults here.

        ``on_gpu`` None: whether CUDA is present here. ``bind_threads``: a CPU tensor-parallel
        engine on this machine gets its thread binding (:func:`cpu_thread_binding_env`;
        ValueError with fewer CPUs than ranks); off for engines on other nodes. ``policy``: the
        request policy for :class:`serving.api.middleware.RequestPolicyMiddleware` (it holds the
        API key: off where no middleware runs). ``logs``: ``vllm`` leaves vLLM's logging as
        configured (stdout, INFO); ``stderr`` keeps stdout for the caller's output, at ``ERROR``
        (``INFO`` with ``verbose``). ``loopback``: the engine's processes talk over loopback
        (one machine; not for Ray, whose engines may span nodes)."""
        on_gpu = cuda_available() if on_gpu is None else on_gpu
        env = dict(self.served_policy().to_env()) if policy else {}
        # Defence in depth behind the middleware: vLLM's own decoder limit and no redirects.
        env["VLLM_MAX_IMAGE_PIXELS"] = str(self.policy.max_image_pixels)
        env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
        env["VLLM_MEDIA_CACHE"] = ""  # vLLM's opt-in media download cache writes to disk
        if "VLLM_NO_USAGE_STATS" not in environ:  # no usage reports to vLLM's stats server
            env["VLLM_NO_USAGE_STATS"] = "1"
        if not on_gpu:
            env[settings.KVCACHE_ENV] = settings.cpu_kvcache_gib(environ)
            if bind_threads:
                env.update(cpu_thread_binding_env(self.tensor_parallel_size, environ))
        if logs == "stderr":
            env[settings.LOGGING_STREAM_ENV] = "ext://sys.stderr"
            env[settings.LOGGING_LEVEL_ENV] = environ.get(settings.LOGGING_LEVEL_ENV, "INFO" if verbose else "ERROR")
        if loopback and settings.HOST_IP_ENV not in environ:
            env[settings.HOST_IP_ENV] = settings.LOOPBACK_IP
        return env


def cli_args(options: Mapping[str, Any]) -> list[str]:
    """vLLM's command line for ``options`` (field names -> values), in the form vLLM's parser
    builds from the same fields: ``foo_bar`` -> ``--foo-bar``; booleans as ``--foo-bar`` /
    ``--no-foo-bar``; dicts as JSON; lists as several values."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{name}: an empty list has no command-line form")
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def engine_arguments(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` that are ``vllm.engine.arg_utils.EngineArgs`` fields: what ``vllm.LLM``
    takes. The others are the server's: response shaping (``enable_force_include_usage``,
    ``enable_prompt_tokens_details``) and request logging (``enable_log_requests``, an
    ``AsyncEngineArgs`` field; ``LLM`` never logs requests). Imports vLLM: set :meth:`EngineConfig.environment` first."""
    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return {name: value for name, value in options.items() if name in names}


def parse_vllm_args(
    config: EngineConfig, on_gpu: bool | None = None, prog: str = "skingpt4 serve"
) -> argparse.Namespace:
    """:meth:`EngineConfig.vllm_args` parsed and checked by vLLM's own server parser
    (``make_arg_parser``, ``validate_parsed_serve_args``): the namespace that vLLM's
    ``run_server`` and ``build_async_engine_client`` take. ``on_gpu`` None: whether CUDA is
    present here. Imports vLLM: set :meth:`EngineConfig.environment` first."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog=prog))
    args = parser.parse_args(config.vllm_args(on_gpu))
    validate_parsed_serve_args(args)
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_thread_binding(ranks: int, cpus: Iterable[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` tensor-parallel ranks: ``cpus`` split into
    that many contiguous groups (the first ones one CPU larger when they do not divide), e.g.
    ``0|1`` for 2 ranks on CPUs 0 and 1, ``0-3|4-7`` for 2 on 0-7."""
    cpus = sorted(set(cpus))
    if len(cpus) < ranks:
        raise ValueError(
            f"tensor parallel size {ranks} on a CPU needs at least {ranks} CPUs, one per rank; "
            f"this process may use {len(cpus)}"
        )
    size, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + size + (rank < extra)
        groups.append(_id_list(cpus[start:end]))
        start = end
    return "|".join(groups)


def _id_list(ids: list[int]) -> str:
    """Sorted ids in vLLM's CPU-list syntax: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def numa_nodes_with(cpus: set[int], root: Path = NUMA_NODES) -> int:
    """How many NUMA nodes hold some of ``cpus`` (1 when the system does not say)."""
    found = 0
    for cpulist in root.glob("node[0-9]*/cpulist"):
        try:
            text = cpulist.read_text().strip()
        except OSError:
            continue
        ids = {i for part in text.split(",") if part for i in _id_range(part)}
        found += bool(ids & cpus)
    return max(found, 1)


def _id_range(part: str) -> range:
    low, _, high = part.partition("-")
    return range(int(low), int(high or low) + 1)


def cpu_thread_binding_env(ranks: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The thread binding of a CPU engine with ``ranks`` tensor-parallel ranks, when it needs
    one: vLLM's default (``auto``) binds rank N to NUMA node N and refuses to start with fewer
    nodes than ranks ("Not enough allowed NUMA nodes to bind threads"). Kept empty when the user
    set ``VLLM_CPU_OMP_THREADS_BIND``, for one rank, and when there are nodes enough."""
    if ranks == 1 or settings.CPU_THREADS_BIND_ENV in environ:
        return {}
    cpus = os.sched_getaffinity(0)
    if numa_nodes_with(cpus) >= ranks:
        return {}
    return {settings.CPU_THREADS_BIND_ENV: cpu_thread_binding(ranks, cpus)}


def run_embedded(config: EngineConfig) -> int:
    """Serve until SIGTERM/SIGINT (blocks); 0 after such a stop, 1 when the server stopped by
    itself because its engine died, so that a supervisor restarts it. Must run under
    ``if __name__ == "__main__"``. 2 when this machine cannot run the engine as configured."""
    on_gpu = cuda_available()
    try:
        os.environ.update(config.environment(on_gpu, loopback=True))
    except ValueError as exc:
        print(f"skingpt4 serve: {exc}", file=sys.stderr)
        return USAGE
    import asyncio

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server

    class SignalNotingLoop(uvloop.Loop):
        """uvloop's loop, noting the signals whose handlers ran: vLLM's server returns alike
        after a requested stop and after its engine died."""

        signals_seen: set[int] = set()

        def add_signal_handler(self, sig, callback, *args):
            def noted(*a):
                SignalNotingLoop.signals_seen.add(sig)
                callback(*a)

            return super().add_signal_handler(sig, noted, *args)

    args = parse_vllm_args(config, on_gpu)
    if not on_gpu:
        from serving.engine.front_cpus import keep_front_off_engine

        keep_front_off_engine()  # once vLLM has bound its engine: the rest on the other CPUs
    with asyncio.Runner(loop_factory=SignalNotingLoop) as runner:
        runner.run(run_server(args))
    if SignalNotingLoop.signals_seen:
        return OK
    print("skingpt4 serve: the engine stopped; the server exits with 1", file=sys.stderr)
    return FAILED
