"""``skingpt4``: the project's command line.

    skingpt4 checkpoint tiny OUT [--preset tiny|bench] [--llm falcon|llama] [--seed N]
    skingpt4 checkpoint convert --vit F --qformer F --proj F --llm DIR OUT
    skingpt4 generate MODEL --image PATH [--image PATH ...] [--question TEXT]
    skingpt4 serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key K] [--ray ...]
    skingpt4 demo

vLLM and Ray are imported only by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encoders.presets import LLM_FAMILIES, PRESETS
from plugins.skingpt4.template import DEFAULT_QUESTION


def _checkpoint_parser(sub) -> None:
    ck = sub.add_parser("checkpoint", help="build or convert a SkinGPT-4 model folder")
    cks = ck.add_subparsers(dest="action", required=True)
    tiny = cks.add_parser("tiny", help="a model folder with random weights (tests, demo, benchmarks)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--preset", choices=sorted(PRESETS.keys() - {"skingpt4"}), default="tiny")
    tiny.add_argument("--llm", choices=LLM_FAMILIES, default="llama")
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
            return 2
    print(out)
    return 0


def _run_generate(args) -> int:
    from PIL import Image

    from serving.offline import generate_answer

    images = []
    for path in args.image:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    answer = generate_answer(
        args.model, images, args.question, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed,
    )
    print(answer)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skingpt4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _checkpoint_parser(sub)

    gen = sub.add_parser("generate", help="one offline answer through vLLM")
    gen.add_argument("model", type=Path)
    gen.add_argument("--image", action="append", required=True, help="a photo (repeatable)")
    gen.add_argument("--question", default=DEFAULT_QUESTION)
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)

    from serving.commands import add_serving_commands

    add_serving_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "checkpoint":
        return _run_checkpoint(args)
    if args.command == "generate":
        return _run_generate(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
