"""``skingpt4 serve`` and ``skingpt4 demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import settings
from serving.engine.process import ServerProcess, free_port
from serving.engine.flags import SERVE_FLAGS, add_flags, add_model_arguments, config_error, config_from_args
from serving.engine.server import DEFAULT_MODEL_NAME
from serving.usage import USAGE

DEMO_DIR = Path("artifacts/tiny-llama")


def add_serving_commands(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible server (embedded; --ray for Ray Serve)")
    serve.add_argument("model", help="a SkinGPT-4 model folder")
    add_model_arguments(serve)
    add_flags(serve, SERVE_FLAGS)
    serve.add_argument("--api-key", action="append", dest="api_keys", default=None,
                       help="require this key on every route but /health; give it more than "
                       "once for several keys, each a tenant of the Batch API (default: "
                       f"{settings.API_KEY_ENV}, keys separated by commas)")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve (ray.serve.llm)")
    serve.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (--ray)")
    serve.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (--ray)")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (--ray)")
    serve.add_argument("--accelerator", choices=["cpu", "gpu"], default=None,
                       help="replica resources (--ray; default: gpu when CUDA is present)")
    serve.add_argument("--routing", choices=settings.RAY_ROUTINGS, default="session",
                       help="which replica a request goes to (--ray): session (x-session-id, "
                       "else prefix affinity; default), prefix (prefix affinity), pow2 (Ray "
                       "Serve's default, the less loaded of two random replicas)")
    serve.add_argument("--ingress", choices=settings.RAY_INGRESSES, default="deployment",
                       help="what Serve's proxy sends a request to (--ray): deployment (an "
                       "ingress deployment that calls the LLM replicas; default) or replica (the "
                       "LLM replicas themselves, one hop fewer: no prefix routing, and --data-dir "
                       "needs one replica)")
    serve.set_defaults(func=run_serve)

    demo = sub.add_parser("demo", help="tiny checkpoint, server, one streamed diagnosis, stop")
    demo.add_argument("--model", type=Path, default=DEMO_DIR)
    demo.add_argument("--port", type=int, default=0, help="0: a free loopback port")
    demo.set_defaults(func=run_demo)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        keys = tuple(args.api_keys) if args.api_keys is not None else settings.api_keys()
        config = config_from_args(args, api_keys=keys)
    except ValidationError as exc:
        print(f"skingpt4 serve: {config_error(exc)}", file=sys.stderr)
        return USAGE
    if args.ray:
        from serving.cli.serve_ray import run_ray

        return run_ray(config, args)
    from serving.engine.server import run_embedded

    return run_embedded(config)


def run_demo(args: argparse.Namespace) -> int:
    from openai import OpenAI

    from encoders.samples import encode_image, synthetic_skin_photo
    from plugins.skingpt4.checkpoint import write_tiny_checkpoint
    from plugins.skingpt4.template import DEFAULT_QUESTION

    if not (args.model / "config.json").exists():
        print(f"building the tiny checkpoint in {args.model}", file=sys.stderr)
        write_tiny_checkpoint(args.model, preset="tiny", family="llama")
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = args.model.parent / "demo-server.log"
    print(f"starting the server on {base} (about 40 s on a CPU; log: {log_path})...", file=sys.stderr)
    server = ServerProcess(
        [sys.executable, "-m", "serving.cli", "serve", str(args.model), "--port", str(port)],
        root_url=base, log_path=log_path, name="the demo server",
    )
    try:
        server.start()
        import base64

        photo = base64.b64encode(encode_image(synthetic_skin_photo(seed=0))).decode()
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        print(f"Q: {DEFAULT_QUESTION}\nA: ", end="", flush=True)
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}},
                {"type": "text", "text": DEFAULT_QUESTION},
            ]}],
            max_tokens=48, seed=0, stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    finally:
        code = server.stop()
        print(f"server stopped (exit code {code})", file=sys.stderr)
    return 0
