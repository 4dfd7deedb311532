"""``skingpt4``: the project's command line.

    skingpt4 checkpoint tiny OUT [--preset tiny|bench] [--llm falcon|llama] [--seed N]
    skingpt4 checkpoint convert --vit F --qformer F --proj F --llm DIR OUT
    skingpt4 generate MODEL --image PATH [--image PATH ...] [--question TEXT] [--verbose]
    skingpt4 serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key K] [--ray ...]
    skingpt4 batch MODEL INPUT.jsonl OUTPUT.jsonl [--ray [--replicas N] [--accelerator cpu|gpu]]
    skingpt4 demo

vLLM and Ray are imported only by the subcommands that need them. Problems the user can fix (a
missing model folder or photo, a folder that is not a SkinGPT-4 one, a port in use, a data key
that does not open the Batch API's store) are checked before any engine starts and reported on
one line of stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from plugins.skingpt4.template import DEFAULT_QUESTION
from serving import settings
from serving.settings import DEFAULT_CPU_KVCACHE_GIB, KVCACHE_ENV
from serving.usage import USAGE, UsageError, check_model_folder

# encoders.presets' LLM_FAMILIES and small presets, spelled out: importing them loads torch and
# timm (seconds) before any error or --help could be printed. tests/serving/cli/test_cli.py checks
# that they agree.
LLM_CHOICES = ("falcon", "llama")
TINY_PRESETS = ("bench", "tiny")
GENERATE_EPILOG = f"""\
The engine runs with the options of `skingpt4 serve MODEL` (its defaults).
stdout holds the answer only; vLLM's logs go to stderr (errors only, unless --verbose).
environment:
  {KVCACHE_ENV}  KV-cache size in GiB on a CPU (default here: {DEFAULT_CPU_KVCACHE_GIB}, as for
                          `skingpt4 serve`; vLLM's own default reserves most of the machine's
                          memory)
  VLLM_LOGGING_LEVEL      vLLM's log level (default here: ERROR, or INFO with --verbose)
"""


def load_photos(paths: list[Path]) -> list:
    """The photos as RGB images; a missing or unreadable one is a :class:`UsageError`."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            raise UsageError(f"photo {path}: no such file") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UsageError(f"photo {path}: cannot be read as an image ({exc})") from None
    return images


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as vLLM's server will (``SO_REUSEADDR``): it fails if a server listens
    there. vLLM also sets ``SO_REUSEPORT`` and would start next to another server on Linux."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is already in use; stop what listens there or "
                    f"choose another with --port"
                ) from None
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror})") from None


def _checkpoint_parser(sub) -> None:
    ck = sub.add_parser("checkpoint", help="build or convert a SkinGPT-4 model folder")
    cks = ck.add_subparsers(dest="action", required=True)
    tiny = cks.add_parser("tiny", help="a model folder with random weights (tests, demo, benchmarks)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--preset", choices=TINY_PRESETS, default="tiny")
    tiny.add_argument("--llm", choices=LLM_CHOICES, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    conv = cks.add_parser("convert", help="turn the released SkinGPT-4 files into a model folder")
    conv.add_argument("--vit", type=Path, required=True, help="eva_vit_g.pth")
    conv.add_argument("--qformer", type=Path, required=True, help="blip2_pretrained_flant5xxl.pth")
    conv.add_argument("--proj", type=Path, required=True, help="the SkinGPT-4 checkpoint (.pth)")
    conv.add_argument("--llm", type=Path, required=True, help="the language model's HF folder")
    conv.add_argument("out", type=Path)


def _run_checkpoint(args) -> int:
    if args.action == "tiny":
        from plugins.skingpt4.checkpoint import write_tiny_checkpoint

        out = write_tiny_checkpoint(args.out, preset=args.preset, family=args.llm, seed=args.seed)
    else:
        from plugins.skingpt4.convert import ConversionError, convert_release

        try:
            out = convert_release(
                vit=args.vit, qformer=args.qformer, proj=args.proj, llm=args.llm, out=args.out
            )
        except (ConversionError, OSError) as exc:
            print(f"skingpt4 checkpoint convert: {exc}", file=sys.stderr)
            return USAGE
    print(out)
    return 0


def _run_generate(args) -> int:
    from serving.engine.offline import generate_answer
    from serving.engine.server import EngineConfig

    check_model_folder(args.model)
    images = load_photos(args.image)
    # The engine of `skingpt4 serve MODEL` with its defaults (generate has no engine flags).
    config = EngineConfig(model=str(args.model))
    answer = generate_answer(
        config, images, args.question, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, verbose=args.verbose,
    )
    print(answer)
    return 0


def check_data_store(data_dir: Path, key_file: Path | None) -> None:
    """The Batch API's master key (``SKINGPT4_DATA_KEY`` or the key file) must open the store
    in ``data_dir``; read only, so a refused start changes nothing there."""
    from serving.api.batch_api.store import DataKeyError, check_data_key

    try:
        check_data_key(data_dir.expanduser().absolute(),
                       key_file.expanduser().absolute() if key_file else None)
    except DataKeyError as exc:
        raise UsageError(str(exc)) from None


def _check_serve(args) -> None:
    if args.ray and settings.ray_address():
        # Joining a running cluster: the folders may exist only on its nodes, and its Serve proxy
        # may already hold the port (a redeploy); Ray reports its own errors.
        return
    check_model_folder(Path(args.model))
    check_port_free(args.host, args.port)
    if args.data_dir:
        key_file = Path(args.data_key_file) if args.data_key_file else None
        check_data_store(Path(args.data_dir), key_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skingpt4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _checkpoint_parser(sub)

    gen = sub.add_parser(
        "generate", help="one offline answer through vLLM", epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("model", type=Path, help="a SkinGPT-4 model folder")
    gen.add_argument("--image", type=Path, action="append", required=True,
                     help="a photo (repeatable)")
    gen.add_argument("--question", default=DEFAULT_QUESTION)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 for greedy answers (default: the model folder's, 1.0)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--verbose", action="store_true", help="vLLM's INFO logs on stderr")

    from serving.cli.batch import add_batch_command
    from serving.cli.serve import add_serving_commands

    add_serving_commands(sub)
    add_batch_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "checkpoint":
            return _run_checkpoint(args)
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "serve":
            _check_serve(args)
        return args.func(args)
    except UsageError as exc:
        print(f"skingpt4 {args.command}: {exc}", file=sys.stderr)
        return USAGE
