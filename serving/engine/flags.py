"""The model and engine flags that ``skingpt4 serve`` and ``skingpt4 batch`` share, and how a
config error reads on the command line."""

from __future__ import annotations

import argparse

from serving.engine.server import DEFAULT_MODEL_NAME


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, photo and engine flags that ``serve`` and ``batch`` share."""
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help="the name requests use as model (default: %(default)s)")
    parser.add_argument("--max-images-per-request", type=int, default=4)
    parser.add_argument("--allowed-media-domains", nargs="*", default=[],
                        help="hosts that remote image URLs may name (default: data URLs only)")
    parser.add_argument("--max-image-pixels", type=int, default=25_000_000)
    parser.add_argument("--dtype", default="auto",
                        help="vLLM --dtype (default auto: the model folder's, float16 for the "
                        "Llama-2 release, bfloat16 for Falcon; float32 for exact tests)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="GPUs per engine (one per rank); on a CPU, ranks get contiguous CPU "
                        "groups unless VLLM_CPU_OMP_THREADS_BIND is set")


def config_error(exc) -> str:
    """A pydantic ``ValidationError`` of the server config as one line: ``field: problem``."""
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
