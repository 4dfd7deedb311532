"""The servers under test: each an OpenAI-compatible endpoint the harness starts and stops itself.

A target is a command line, a host and a port. :class:`LaunchedTarget` starts it in its own process
group (logging to a file), waits until ``GET /health`` answers 200, asks ``/v1/models`` for the served
model name, and on stop ends the whole group, then any descendant that left it (Ray's workers).

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
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from serving.commands import free_port

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
    """A target that would not start or answer."""


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


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class LaunchedTarget:
    """A running target; use as a context manager."""

    def __init__(self, target: Target, log_path: Path, startup_timeout_s: float = 300.0, stop_timeout_s: float = 30.0) -> None:
        self.target = target
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.model = ""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def base_url(self) -> str:
        return self.target.base_url

    def __enter__(self) -> LaunchedTarget:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.target.argv, cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Poll ``/health`` until 200; fail fast if the process exits."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetError(
                    f"target {self.target.name!r} exited with code {self.proc.returncode} while starting; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            try:
                if http_get(f"{self.target.root_url}/health", timeout_s=2.0)[0] == 200:
                    self.model = served_model(self.target.root_url)
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise TargetError(
            f"target {self.target.name!r} did not answer /health within {self.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server's live process tree."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after ``stop_timeout_s``; then stragglers, by pid."""
        if self.proc is None:
            return
        tree = self._tree()
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=self.stop_timeout_s)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:  # descendants still running, in the group or in a session of their own
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._signal_group(signal.SIGKILL)
        self.proc = None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the group id is the leader's pid
        except ProcessLookupError:
            pass


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
