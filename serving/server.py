"""The embedded server: vLLM's own OpenAI-compatible server, in this process tree, no Ray.

``skingpt4 serve MODEL`` turns :class:`EmbeddedServerConfig` into vLLM server arguments: the
plugin model, prefix caching (follow-up turns reuse the image's KV cache), at most
``max_images_per_request`` images per prompt, the model folder's generation defaults, xgrammar
structured output without free whitespace, a drain on SIGTERM, and
:class:`serving.middleware.RequestPolicyMiddleware` in front of every route.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serving.policy import ServePolicy

DEFAULT_MODEL_NAME = "skingpt4"
CPU_BLOCK_SIZE = 32
# vLLM itself never fetches a URL: the middleware inlines allowed remote photos as data URLs,
# and this reserved name (RFC 2606) makes vLLM refuse any URL that reaches it some other way.
NO_MEDIA_DOMAINS = ("media.invalid",)


class EmbeddedServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A SkinGPT-4 model folder.")
    model_name: str = Field(default=DEFAULT_MODEL_NAME, description="Name served on /v1/models.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    dtype: str = Field(default="auto", description="Weights/activations dtype (vLLM --dtype).")
    max_model_len: int = Field(default=2048, ge=64)
    max_num_seqs: int = Field(default=64, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = Field(default=True, description="No graph capture (CPU, quick start).")
    block_size: int | None = Field(
        default=None,
        description="KV-cache block in tokens (prefix caching reuses whole blocks). None: 32 on "
        "a CPU, where vLLM's 128 would leave most of a consult's shared prefix uncached; "
        "vLLM's default on a GPU.",
    )
    shutdown_timeout_s: int = Field(default=30, ge=0, description="SIGTERM drain time.")
    policy: ServePolicy = Field(default_factory=ServePolicy)

    def vllm_args(self) -> list[str]:
        args = [
            "--model", self.model,
            "--served-model-name", self.model_name,
            "--dtype", self.dtype,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--enable-prefix-caching",
            # vLLM 0.32's sender-side multimodal cache drifts when identical photos arrive
            # together, and the engine then fails the request with a 500 meant to be retried by
            # the client. Sending the pixels every time costs ~0.6 MB of IPC per photo.
            "--mm-processor-cache-gb", "0",
            "--limit-mm-per-prompt", json.dumps({"image": self.policy.max_images_per_request}),
            "--allowed-media-domains", *NO_MEDIA_DOMAINS,
            "--generation-config", "auto",
            "--structured-outputs-config",
            json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
            "--middleware", "serving.middleware.RequestPolicyMiddleware",
            "--shutdown-timeout", str(self.shutdown_timeout_s),
            # The middleware answers oversized headers with a clear 431 first.
            "--h11-max-incomplete-event-size", str(2 * self.policy.max_header_bytes),
            "--enable-force-include-usage",
            # usage.prompt_tokens_details.cached_tokens: how much of a consult the cache reused.
            "--enable-prompt-tokens-details",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        block_size = self.kv_block_size(on_gpu=_has_cuda())
        if block_size:
            args += ["--block-size", str(block_size)]
        return args

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

    def environment(self) -> dict[str, str]:
        env = dict(self.served_policy().to_env())
        # Defence in depth behind the middleware: vLLM's own decoder limit and no redirects.
        env["VLLM_MAX_IMAGE_PIXELS"] = str(self.policy.max_image_pixels)
        env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
        env["VLLM_MEDIA_CACHE"] = ""  # vLLM's opt-in media download cache writes to disk
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_embedded(config: EmbeddedServerConfig) -> int:
    """Serve until SIGTERM/SIGINT (blocks); 0 after such a stop, 1 when the server stopped by
    itself because its engine died, so that a supervisor restarts it. Must run under
    ``if __name__ == "__main__"``."""
    os.environ.update(config.environment())
    # One machine: the engine's processes talk over loopback, not the host's network address.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    import asyncio

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class SignalNotingLoop(uvloop.Loop):
        """uvloop's loop, noting the signals whose handlers ran: vLLM's server returns alike
        after a requested stop and after its engine died."""

        signals_seen: set[int] = set()

        def add_signal_handler(self, sig, callback, *args):
            def noted(*a):
                SignalNotingLoop.signals_seen.add(sig)
                callback(*a)

            return super().add_signal_handler(sig, noted, *args)

    parser = make_arg_parser(FlexibleArgumentParser(prog="skingpt4 serve"))
    args = parser.parse_args(config.vllm_args())
    validate_parsed_serve_args(args)
    with asyncio.Runner(loop_factory=SignalNotingLoop) as runner:
        runner.run(run_server(args))
    if SignalNotingLoop.signals_seen:
        return 0
    print("skingpt4 serve: the engine stopped; the server exits with 1", file=sys.stderr)
    return 1
