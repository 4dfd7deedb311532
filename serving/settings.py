"""Settings of ``serving/`` shared across its layers: the environment variables that carry the
server's own configuration between processes, their defaults, and the SkinGPT-4 constants it
shares with the plugin and the vision stack.

Each variable here is read by a function that takes the environment as an argument (so tests
pass a dict). Variables that one module alone sets or reads are named in that module, beside
the code they configure: vLLM's (``VLLM_*``) in
:meth:`serving.engine.server.EngineConfig.environment`, the one builder of the engine's
environment; Ray Serve's switches (``RAY_SERVE_*``, ``RAY_USAGE_STATS_ENABLED``) in
:mod:`serving.cluster.session` and :mod:`serving.batch.ray_serve`; the Batch API's master key
(``SKINGPT4_DATA_KEY``) in :mod:`serving.api.batch_api.sealed`. Constants that ``plugins/`` or
``encoders/`` define stay defined there (those folders may not import ``serving/``) and are
re-exported here for ``serving/``: one definition of each. Importing this module stays light
(``skingpt4 --help`` must not wait for torch): the separator comes from a module without
imports, and the names whose home imports transformers or torch (:data:`RESERVED_TOKENS`,
:data:`IMAGE_PLACEHOLDER`, :data:`IMAGE_PAD`, :data:`LLM_FAMILIES`) are loaded on first use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from plugins.skingpt4.template import SEP

# --- environment variables ------------------------------------------------------------------

API_KEY_ENV = "SKINGPT4_API_KEY"
"""The server's API key when ``--api-key`` is not given (and the Ray ingress's, on its node)."""

POLICY_ENV = "SKINGPT4_SERVE_POLICY"
"""The server's :class:`serving.api.policy.ServePolicy` as JSON, for the middleware that vLLM builds
without arguments, possibly in another process."""

KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KVCACHE_GIB = 1
"""vLLM-CPU's KV cache (GiB) unless the user set one: vLLM's own default reserves most of the
machine's memory and refuses to start when less is free."""

HOST_IP_ENV = "VLLM_HOST_IP"
LOOPBACK_IP = "127.0.0.1"
"""One machine: the engine's processes talk over loopback, not the host's network address."""

CPU_THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM-CPU's per-rank CPU lists (``0-3|4-7``); its default, ``auto``, needs one NUMA node per
tensor-parallel rank."""

LOGGING_STREAM_ENV = "VLLM_LOGGING_STREAM"
LOGGING_LEVEL_ENV = "VLLM_LOGGING_LEVEL"
"""vLLM's log stream and level: ``generate`` and ``batch`` send its logs to stderr (stdout holds
the answer), quiet unless asked; a level the user set is kept."""

RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Request routers of the Ray LLM deployment (serving.cluster.routers.ROUTERS): the CLI offers these.
RAY_ROUTINGS = ("session", "prefix", "pow2")
# What Serve's proxy sends a request to (serving.cluster.app.ReplicaSettings.ingress).
RAY_INGRESSES = ("deployment", "replica")


def serve_policy_json(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(POLICY_ENV) or None


def api_keys(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The keys in ``SKINGPT4_API_KEY``: one, or several separated by commas."""
    return tuple(k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip())


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    """The first key in ``SKINGPT4_API_KEY`` (what a client here sends), or None."""
    return next(iter(api_keys(environ)), None)


def cpu_kvcache_gib(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(KVCACHE_ENV, str(DEFAULT_CPU_KVCACHE_GIB))


def ray_address(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(RAY_ADDRESS_ENV) or None


# --- SkinGPT-4 constants, defined by plugins/ and encoders/ -----------------------------------

__all__ = [
    "SEP", "RESERVED_TOKENS", "IMAGE_PLACEHOLDER", "IMAGE_PAD", "LLM_FAMILIES",
    "API_KEY_ENV", "POLICY_ENV", "KVCACHE_ENV", "DEFAULT_CPU_KVCACHE_GIB", "HOST_IP_ENV",
    "LOOPBACK_IP", "CPU_THREADS_BIND_ENV", "LOGGING_STREAM_ENV", "LOGGING_LEVEL_ENV", "RAY_ADDRESS_ENV", "RAY_ROUTINGS",
    "RAY_INGRESSES",
    "api_keys", "api_key", "serve_policy_json", "cpu_kvcache_gib", "ray_address",
]


def __getattr__(name: str) -> Any:
    """The re-exports whose home modules import transformers (plugins.skingpt4.config) or torch
    (encoders), loaded when first asked for (PEP 562)."""
    if name in ("IMAGE_PLACEHOLDER", "IMAGE_PAD", "RESERVED_TOKENS"):
        from plugins.skingpt4.config import IMAGE_PAD, IMAGE_PLACEHOLDER

        # Text that names an image token could place or fake image positions.
        values = {"IMAGE_PLACEHOLDER": IMAGE_PLACEHOLDER, "IMAGE_PAD": IMAGE_PAD,
                  "RESERVED_TOKENS": (IMAGE_PLACEHOLDER, IMAGE_PAD)}
    elif name == "LLM_FAMILIES":
        from encoders.presets import LLM_FAMILIES

        values = {"LLM_FAMILIES": LLM_FAMILIES}
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(values)
    return values[name]
