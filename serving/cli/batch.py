"""``skingpt4 batch``: the command line of a batch run (checks before the engine starts, the
engine in-process or Ray Serve LLM replicas, the exit status), over :mod:`serving.batch.run`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path

from serving.batch import run as batch_run
from serving.api.batch_api.runner import DEFAULT_MAX_CONCURRENCY, BatchSummary, run_batch
from serving.batch.run import OutputError, OutputLog, open_engine
from serving.engine.flags import add_model_arguments, config_error, config_from_args
from serving.engine.server import EngineConfig
from serving.usage import FAILED, STOPPED, USAGE, UsageError, check_model_folder

# --- command line ------------------------------------------------------------------------------

EPILOG = """\
Every line gets a record in OUTPUT (in completion order; match by custom_id). Run the same
command again after a crash or a stop: it appends only the missing records.
exit status: 0 every line has its record; 1 some lines failed with a server error (rerun to
retry them); 2 a usage problem (nothing was run); 130 stopped by a signal.
environment:
  VLLM_CPU_KVCACHE_SPACE  KV-cache size in GiB on a CPU (default here: 1, as for `skingpt4 serve`)
  VLLM_LOGGING_LEVEL      vLLM's log level on stderr (default here: ERROR, or INFO with --verbose)
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", type=Path, help="a SkinGPT-4 model folder")
    parser.add_argument("input", type=Path,
                        help="requests, one JSON object a line (OpenAI Batch input format)")
    parser.add_argument("output", type=Path,
                        help="records are appended here (OpenAI Batch output format); a rerun "
                        "resumes")
    parser.add_argument("--max-concurrency", type=_positive, default=DEFAULT_MAX_CONCURRENCY,
                        help="requests in flight at once, over all engines (default: "
                        "%(default)s; each engine batches up to --max-num-seqs of them)")
    add_model_arguments(parser)
    ray = parser.add_argument_group(
        "Ray", "--ray answers the checked requests with the LLM replicas of serve --ray across a "
        "cluster (RAY_ADDRESS; without it, a local Ray instance): the same checks, records, "
        "resuming and answer bodies")
    ray.add_argument("--ray", action="store_true",
                     help="answer with Ray Serve LLM replicas instead of an in-process engine")
    ray.add_argument("--replicas", type=_positive, default=1,
                     help="engines, spread over the cluster's nodes (--ray; default: 1)")
    ray.add_argument("--accelerator", choices=["cpu", "gpu"], default=None,
                     help="engine resources (--ray; default: gpu when the cluster has GPUs)")
    ray.add_argument("--accelerator-type", default=None,
                     help="GPU kind for the engines, e.g. A100 or H100 (--ray, gpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--verbose", action="store_true", help="vLLM's INFO logs on stderr")
    parser.set_defaults(func=run_batch_command)
    return parser


def add_batch_command(subparsers) -> argparse.ArgumentParser:
    """Register ``skingpt4 batch`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "batch", help="answer a JSONL file of requests (OpenAI Batch format; resumable)",
        description=batch_run.__doc__.split("\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure_parser(parser)


def _config(args: argparse.Namespace) -> EngineConfig:
    from pydantic import ValidationError

    try:
        return config_from_args(args)
    except ValidationError as exc:
        raise UsageError(config_error(exc)) from None


def batch_environment(config: EngineConfig, verbose: bool = False) -> dict[str, str]:
    """The engine environment of a batch run (:meth:`EngineConfig.environment`; set it
    before vLLM is imported): the server's, with vLLM's logs on stderr and no request policy (no
    middleware runs here). A local Ray instance's engines inherit it too (the CPU thread
    binding of tensor parallel among it)."""
    try:
        return config.environment(policy=False, logs="stderr", verbose=verbose, loopback=True)
    except ValueError as exc:  # more tensor-parallel ranks than CPUs
        raise UsageError(str(exc)) from None


def _check_files(args: argparse.Namespace) -> None:
    check_model_folder(args.model)
    if not args.input.is_file():
        raise UsageError(f"INPUT {args.input}: no such file")
    if not os.access(args.input, os.R_OK):
        raise UsageError(f"INPUT {args.input}: not readable")
    if not args.output.parent.is_dir():
        raise UsageError(f"OUTPUT {args.output}: folder {args.output.parent} does not exist")
    if args.output.exists() and args.output.samefile(args.input):
        raise UsageError("OUTPUT must be another file than INPUT")


def _open(config: EngineConfig, args: argparse.Namespace):
    """The engine that answers the checked requests: in-process, or the LLM replicas of
    ``serve --ray`` with ``--ray``."""
    if not args.ray:
        return open_engine(config)
    from serving.batch.ray_serve import RayBatchSettings, open_ray_engine

    return open_ray_engine(config, RayBatchSettings(
        replicas=args.replicas, accelerator=args.accelerator,
        accelerator_type=args.accelerator_type, verbose=args.verbose))


async def _run_once(config: EngineConfig, args: argparse.Namespace,
                    log: OutputLog) -> BatchSummary:
    main_task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with _open(config, args) as engine:
        return await run_batch(engine, args.input, log, max_concurrency=args.max_concurrency,
                               progress=not args.no_progress)


def run_batch_command(args: argparse.Namespace) -> int:
    """``skingpt4 batch``: the exit status of :data:`EPILOG`. Usage problems are found before
    the engine starts."""
    try:
        _check_files(args)
        config = _config(args)
        environment = batch_environment(config, args.verbose)
        log = OutputLog.open(args.output)
    except (UsageError, OutputError, OSError) as exc:
        print(f"skingpt4 batch: {exc}", file=sys.stderr)
        return USAGE
    with log:
        if log.repaired_bytes:
            print(f"skingpt4 batch: removed a torn last line ({log.repaired_bytes} bytes) that an "
                  f"interrupted run left in {args.output}", file=sys.stderr)
        if log.done_ids or log.done_lines:
            print(f"skingpt4 batch: resuming; {len(log.done_ids) + len(log.done_lines)} records "
                  f"already in {args.output}", file=sys.stderr)
        os.environ.update(environment)
        try:
            summary = asyncio.run(_run_once(config, args, log))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(f"skingpt4 batch: stopped; the records written so far are in {args.output}; "
                  "rerun the same command to finish", file=sys.stderr)
            return STOPPED
        except OSError as exc:  # writing OUTPUT failed (a full disk, say)
            print(f"skingpt4 batch: cannot write {args.output} ({exc.strerror or exc}); the "
                  "records written before are kept; rerun the same command to finish",
                  file=sys.stderr)
            return FAILED
        finally:
            # vLLM's AsyncLLM.__del__ shuts down again; run it now, not at interpreter exit,
            # when the globals it calls are gone (a TypeError traceback on stderr).
            gc.collect()
    print(f"skingpt4 batch: {summary.describe()}", file=sys.stderr)
    return 0 if summary.complete else FAILED
