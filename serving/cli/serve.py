"""``skingpt4 serve`` and ``skingpt4 demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import settings
from serving.api.policy import ServePolicy
from serving.engine.process import ServerProcess, free_port
from serving.engine.flags import add_model_arguments, config_error
from serving.engine.server import DEFAULT_MODEL_NAME, EmbeddedServerConfig
from serving.usage import USAGE

DEMO_DIR = Path("artifacts/tiny-llama")


def add_serving_commands(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible server (embedded; --ray for Ray Serve)")
    serve.add_argument("model", help="a SkinGPT-4 model folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    add_model_arguments(serve)
    serve.add_argument("--api-key", default=settings.api_key(),
                       help=f"require this key on every route but /health (or {settings.API_KEY_ENV})")
    serve.add_argument("--max-inflight-mb", type=int, default=None,
                       help="memory budget (MiB) for request bodies being read and checked at "
                       "once; default: 1/16 of the machine's memory (docs/api.md, Admission control)")
    serve.add_argument("--max-concurrent-decodes", type=int, default=None,
                       help="photos decoded at once (default: the CPU count, at most 8)")
    serve.add_argument("--admission-queue-size", type=int, default=None,
                       help="requests that may wait for admission before a 503 (default 256)")
    serve.add_argument("--admission-timeout", type=float, default=None,
                       help="seconds a request may wait for admission before a 503 (default 30)")
    serve.add_argument("--upload-timeout", type=float, default=None,
                       help="seconds a request body may take to arrive before a 408 (default 300)")
    serve.add_argument("--min-upload-rate", type=int, default=None,
                       help="KiB/s a request body must average after its first idle timeout, "
                       "or 408 (default 8)")
    serve.add_argument("--upload-idle-timeout", type=float, default=None,
                       help="longest pause (s) in a request body before a 408, or a 400 for a "
                       "body short of its Content-Length (default 10)")
    serve.add_argument("--decode-timeout", type=float, default=None,
                       help="seconds one photo's decode may take before a 400; its worker is "
                       "replaced (default 10)")
    serve.add_argument("--max-jpeg-scans", type=int, default=None,
                       help="progressive scans a JPEG may have, counted before decoding "
                       "(default 100)")
    serve.add_argument("--schema-compile-timeout", type=float, default=None,
                       help="seconds a response_format schema may take to compile before a 400 "
                       "(default 2)")
    serve.add_argument("--schema-compile-memory-mb", type=int, default=None,
                       help="MiB a response_format schema may take to compile (default 512)")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs on a GPU (quicker start, slower decoding); a CPU "
                       "always runs eager")
    serve.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="share of each GPU's memory vLLM may take (default: vLLM's 0.9; "
                       "docs/gpu.md)")
    serve.add_argument("--quantization", default=None,
                       help="vLLM --quantization, e.g. fp8 to fit Falcon-40B on one 80 GB GPU")
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
    serve.set_defaults(func=run_serve)

    demo = sub.add_parser("demo", help="tiny checkpoint, server, one streamed diagnosis, stop")
    demo.add_argument("--model", type=Path, default=DEMO_DIR)
    demo.add_argument("--port", type=int, default=0, help="0: a free loopback port")
    demo.set_defaults(func=run_demo)


def _policy(args) -> ServePolicy:
    optional = {
        "max_inflight_bytes": args.max_inflight_mb and args.max_inflight_mb * 2**20,
        "max_concurrent_decodes": args.max_concurrent_decodes,
        "admission_queue_size": args.admission_queue_size,
        "admission_timeout_s": args.admission_timeout,
        "upload_timeout_s": args.upload_timeout,
        "min_upload_rate": args.min_upload_rate and args.min_upload_rate * 1024,
        "upload_idle_timeout_s": args.upload_idle_timeout,
        "decode_timeout_s": args.decode_timeout,
        "max_jpeg_scans": args.max_jpeg_scans,
        "schema_compile_timeout_s": args.schema_compile_timeout,
        "schema_compile_memory_mb": args.schema_compile_memory_mb,
    }
    return ServePolicy(
        api_key=args.api_key,
        max_images_per_request=args.max_images_per_request,
        allowed_media_domains=tuple(args.allowed_media_domains),
        max_image_pixels=args.max_image_pixels,
        **{k: v for k, v in optional.items() if v is not None},
    )


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        config = EmbeddedServerConfig(
            model=str(args.model), model_name=args.model_name, host=args.host, port=args.port,
            dtype=args.dtype,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization, quantization=args.quantization,
            policy=_policy(args),
        )
    except ValidationError as exc:
        print(f"skingpt4 serve: {config_error(exc)}", file=sys.stderr)
        return USAGE
    if args.ray:
        from serving.cluster.app import run_ray

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
