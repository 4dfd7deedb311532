"""Command-line flags from the config models, in one place (as vLLM's ``add_cli_args``): each
flag names a field of :class:`serving.engine.server.EngineConfig` or of its
:class:`serving.api.policy.ServePolicy`, and takes its default and help from that field.
:func:`config_from_args` builds the config back from whichever of them a command has, so
``serve`` and ``batch`` cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.api.policy import ServePolicy
from serving.engine.server import EngineConfig


@dataclass(frozen=True)
class Flag:
    """``--name`` for ``field`` of ``model`` (``"server"`` or ``"policy"``); ``scale``: the field
    holds the flag's value times this (MiB and KiB flags of byte fields)."""

    name: str
    model: str
    field: str
    type: Any = None
    scale: int = 1
    unit: str = ""
    help: str | None = None  # instead of the field's description


FLAGS = {f.name: f for f in (
    Flag("model-name", "server", "model_name", help="the name requests use as model"),
    Flag("max-images-per-request", "policy", "max_images_per_request", int),
    Flag("allowed-media-domains", "policy", "allowed_media_domains"),
    Flag("max-image-pixels", "policy", "max_image_pixels", int),
    Flag("dtype", "server", "dtype"),
    Flag("max-model-len", "server", "max_model_len", int),
    Flag("max-num-seqs", "server", "max_num_seqs", int),
    Flag("tensor-parallel-size", "server", "tensor_parallel_size", int,
         help="GPUs per engine (one per rank); on a CPU, ranks get contiguous CPU groups unless "
         "VLLM_CPU_OMP_THREADS_BIND is set"),
    Flag("host", "server", "host"),
    Flag("port", "server", "port", int),
    Flag("enforce-eager", "server", "enforce_eager"),
    Flag("cpu-compile", "server", "cpu_compile"),
    Flag("cpu-worker-process", "server", "cpu_worker_process"),
    Flag("gpu-memory-utilization", "server", "gpu_memory_utilization", float),
    Flag("quantization", "server", "quantization"),
    Flag("max-inflight-mb", "policy", "max_inflight_bytes", int, 2**20, " MiB"),
    Flag("max-concurrent-decodes", "policy", "max_concurrent_decodes", int),
    Flag("admission-queue-size", "policy", "admission_queue_size", int),
    Flag("admission-timeout", "policy", "admission_timeout_s", float, unit=" s"),
    Flag("upload-timeout", "policy", "upload_timeout_s", float, unit=" s"),
    Flag("min-upload-rate", "policy", "min_upload_rate", int, 1024, " KiB/s"),
    Flag("upload-idle-timeout", "policy", "upload_idle_timeout_s", float, unit=" s"),
    Flag("decode-timeout", "policy", "decode_timeout_s", float, unit=" s"),
    Flag("max-jpeg-scans", "policy", "max_jpeg_scans", int),
    Flag("schema-compile-timeout", "policy", "schema_compile_timeout_s", float, unit=" s"),
    Flag("schema-compile-memory-mb", "policy", "schema_compile_memory_mb", int, unit=" MiB"),
    Flag("data-dir", "policy", "data_dir"),
    Flag("data-key-file", "policy", "data_key_file"),
    Flag("file-retention-hours", "policy", "file_retention_hours", float, unit=" h"),
    Flag("max-file-mb", "policy", "max_file_bytes", int, 2**20, " MiB"),
    Flag("max-batch-lines", "policy", "max_batch_lines", int),
    Flag("max-files-per-key", "policy", "max_files_per_tenant", int),
    Flag("max-storage-gb-per-key", "policy", "max_tenant_bytes", int, 2**30, " GiB"),
    Flag("batch-max-inflight", "policy", "batch_max_inflight", int),
    Flag("ui", "policy", "ui"),
    Flag("access-log", "policy", "access_log"),
)}

# The flags ``serve`` and ``batch`` share: the model, its photos and its engine.
MODEL_FLAGS = ("model-name", "max-images-per-request", "allowed-media-domains", "max-image-pixels",
               "dtype", "max-model-len", "max-num-seqs", "tensor-parallel-size", "cpu-compile",
               "cpu-worker-process")
# The Batch and Files API's store and limits (``serve``).
BATCH_API_FLAGS = ("data-dir", "data-key-file", "file-retention-hours", "max-file-mb",
                   "max-batch-lines", "max-files-per-key", "max-storage-gb-per-key",
                   "batch-max-inflight")
# ``serve``'s own: the HTTP server, the engine on a GPU, and the request policy's bounds.
SERVE_FLAGS = ("host", "port", "max-inflight-mb", "max-concurrent-decodes", "admission-queue-size",
               "admission-timeout", "upload-timeout", "upload-idle-timeout", "min-upload-rate",
               "decode-timeout", "max-jpeg-scans", "schema-compile-timeout",
               "schema-compile-memory-mb", "enforce-eager", "gpu-memory-utilization",
               "quantization", "ui", "access-log", *BATCH_API_FLAGS)

PATH_FIELDS = ("data_dir", "data_key_file")
MODELS = {"server": EngineConfig, "policy": ServePolicy}


def _info(flag: Flag):
    return MODELS[flag.model].model_fields[flag.field]


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """``--name`` for each of ``names``: a fixed default is the field's (so ``--help`` shows it);
    a default computed from the machine stays the model's to compute (``None`` here)."""
    for name in names:
        flag = FLAGS[name]
        info = _info(flag)
        text = flag.help or (info.description or "").rstrip(".")
        if info.default_factory is not None:
            default = None
            shown = "computed from the machine"
        else:
            default = info.default
            if flag.scale != 1 and default is not None:
                default //= flag.scale
            shown = f"{default}{flag.unit}" if default not in (None, ()) else "none"
        help_text = f"{text} (default: {shown})" if text else f"default: {shown}"
        dest = {"dest": name.replace("-", "_")}
        if info.default is True:  # on by default: --no-NAME turns it off
            parser.add_argument(f"--no-{name}", action="store_const", const=False, default=True,
                                help=f"{text} is on; this turns it off", **dest)
        elif isinstance(info.default, bool):
            parser.add_argument(f"--{name}", action="store_true", help=help_text, **dest)
        elif flag.field == "allowed_media_domains":
            parser.add_argument(f"--{name}", nargs="*", default=list(default), help=help_text, **dest)
        else:
            parser.add_argument(f"--{name}", type=flag.type, default=default, help=help_text, **dest)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, photo and engine flags that ``serve`` and ``batch`` share."""
    add_flags(parser, MODEL_FLAGS)


def config_from_args(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    """The config from the flags ``args`` has (any of :data:`FLAGS`; a flag left ``None`` keeps
    the model's default), the model folder (``args.model``) and ``extra`` policy fields (e.g. the
    API key). Raises pydantic's ``ValidationError`` (see :func:`config_error`)."""
    fields: dict[str, dict[str, Any]] = {"server": {}, "policy": dict(extra)}
    for flag in FLAGS.values():
        value = getattr(args, flag.name.replace("-", "_"), None)
        if value is None:
            continue
        if flag.field == "allowed_media_domains":
            value = tuple(value)
        if flag.field in PATH_FIELDS:  # the server (or a Ray replica) runs elsewhere
            value = str(Path(value).expanduser().absolute())
        fields[flag.model][flag.field] = value * flag.scale if flag.scale != 1 else value
    return EngineConfig(model=str(args.model), **fields["server"],
                                policy=ServePolicy(**fields["policy"]))


def config_error(exc) -> str:
    """A pydantic ``ValidationError`` of the server config as one line: ``field: problem``, or
    the problem alone for a check across fields."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")  # a check of several fields: no field
    return f"{where}: {message}" if where else message
