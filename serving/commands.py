"""``skingpt4 serve`` and ``skingpt4 demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_DIR = Path("artifacts/tiny-llama")


def add_serving_commands(sub) -> None:
    demo = sub.add_parser("demo", help="tiny checkpoint, one diagnosis question, printed answer")
    demo.add_argument("--model", type=Path, default=DEMO_DIR)
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from encoders.samples import synthetic_skin_photo
    from plugins.skingpt4.checkpoint import write_tiny_checkpoint
    from plugins.skingpt4.template import DEFAULT_QUESTION
    from serving.offline import generate_answer

    if not (args.model / "config.json").exists():
        print(f"building the tiny checkpoint in {args.model}", file=sys.stderr)
        write_tiny_checkpoint(args.model, preset="tiny", family="llama")
    photo = synthetic_skin_photo(seed=0)
    answer = generate_answer(args.model, [photo], DEFAULT_QUESTION, max_tokens=48, seed=0)
    print(f"Q: {DEFAULT_QUESTION}\nA: {answer}")
    return 0
