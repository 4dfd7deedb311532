"""The servers under test: each an OpenAI-compatible endpoint the harness starts and stops itself.

A target is a command line, a host and a port. :class:`LaunchedTarget` starts it with
:class:`serving.process.ServerProcess` (its own session, logging to a file), which waits until
``GET /health`` answers 200, then asks ``/v1/models`` for the served model name; on stop the server
gets SIGTERM, then its process group and any descendant that left it (Ray's workers) SIGKILL.

| target       | server                                                      |
|--------------|-------------------------------------------------------------|
| `reference`  | ``benchmarks.hf_server --mode reference`` (the original demo) |
| `hf-batched` | ``benchmarks.hf_server --mode hf-batched`` (static batching)  |
| `embedded`   | ``serving.cli serve`` (vLLM in the API server process)       |
| `ray`        | ``serving.cli serve --ray --replicas 1`` (Ray Serve)          |
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serving.process import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

# Command lines as data: {model}, {host} and {port} are filled in; the interpreter comes first.
TARGET_ARGS: dict[str, tuple[str, ...]] = {
    "reference": ("-m", "benchmarks.hf_server", "{model}", "--mode", "reference", "--host", "{host}", "--port", "{port}"),
    "hf-batched": ("-m", "benchmarks.hf_server", "{model}", "--mode", "hf-batched", "--host", "{host}", "--port", "{port}"),
    # float32 everywhere: the same weights at the same precision as the Hugging Face targets.
    "embedded": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32"),
    "ray": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "1"),
}
TARGETS: tuple[str, ...] = tuple(TARGET_ARGS)

# The only environment the harness sets, for the servers it starts: offline, no telemetry.
CHILD_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",  # one machine: engine traffic stays on loopback
    "TOKENIZERS_PARALLELISM": "false",
}


# A server started with an API key (``serving.cli serve`` reads it from here too) needs it on
# every route but /health; the client sends it when set.
API_KEY_ENV = "SKINGPT4_API_KEY"


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


class TargetError(RuntimeError):
    """A running target that does not answer as an OpenAI server should (a target that will not
    start raises :class:`serving.process.ServerStartError`)."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHILD_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


@dataclass(frozen=True)
class Target:
    name: str
    argv: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000

    @classmethod
    def named(cls, name: str, model: str | Path, host: str = "127.0.0.1", port: int | None = None) -> Target:
        if name not in TARGET_ARGS:
            raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}")
        port = port or free_port(host)
        fill = {"model": str(model), "host": host, "port": str(port)}
        return cls(name, (sys.executable, *(a.format(**fill) for a in TARGET_ARGS[name])), host, port)

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    key = api_key()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with _DIRECT.open(request, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def served_model(root_url: str) -> str:
    """The first model id that ``/v1/models`` lists."""
    try:
        status, body = http_get(f"{root_url}/v1/models")
    except OSError as exc:  # refused, unreachable, timed out
        raise TargetError(f"GET {root_url}/v1/models failed: {exc}") from exc
    if status != 200:
        raise TargetError(f"GET {root_url}/v1/models answered {status}: {body[:200]!r}")
    return json.loads(body)["data"][0]["id"]


class LaunchedTarget:
    """A target the harness starts (through :class:`serving.process.ServerProcess`, the project's
    one start/stop policy) and stops; use as a context manager. A target that will not start
    raises :class:`serving.process.ServerStartError` with the tail of its log."""

    def __init__(self, target: Target, log_path: Path, startup_timeout_s: float = 300.0, stop_timeout_s: float = 60.0) -> None:
        self.target = target
        self.log_path = log_path
        self.process = ServerProcess(
            target.argv, root_url=target.root_url, log_path=log_path, cwd=REPO_ROOT, env=child_env(),
            name=f"target {target.name!r}", startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s, append=True,
        )
        self.model = ""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def base_url(self) -> str:
        return self.target.base_url

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> LaunchedTarget:
        self.process.start()
        try:
            self.model = served_model(self.target.root_url)
        except BaseException:
            self.process.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server's whole process tree since it started."""
        return self.process.cpu_seconds()


class ExternalTarget:
    """An endpoint that is already running (``--endpoint NAME=URL``): used, not started or stopped."""

    def __init__(self, name: str, base_url: str) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = ""

    def __enter__(self) -> ExternalTarget:
        self.model = served_model(self.base_url.removesuffix("/v1"))
        return self

    def __exit__(self, *exc) -> None:
        pass

    def cpu_seconds(self) -> float | None:
        return None  # not our process: unknown
