"""The servers under test: each an OpenAI-compatible endpoint the harness starts and stops itself.

A target is a command line, a host and a port. :class:`LaunchedTarget` starts it with
:class:`serving.engine.process.ServerProcess` (its own session, logging to a file), which waits until
``GET /health`` answers 200, then asks ``/v1/models`` for the served model name; on stop the server
gets SIGTERM, then its process group and any descendant that left it (Ray's workers) SIGKILL.

| target       | server                                                      |
|--------------|-------------------------------------------------------------|
| `reference`  | ``benchmarks.hf_server --mode reference`` (the original demo) |
| `hf-batched` | ``benchmarks.hf_server --mode hf-batched`` (static batching)  |
| `embedded`   | ``serving.cli serve`` (vLLM in the API server process)       |
| `ray`        | ``serving.cli serve --ray --replicas 1`` (Ray Serve)          |
| `ray-affinity` | ``serving.cli serve --ray --replicas 2``: session affinity (``x-session-id``), else prefix |
| `ray-prefix` | the same with ``--routing prefix``: prefix affinity only |
| `ray-pow2`   | the same with ``--routing pow2``: Ray Serve's default power-of-two router |
| `ray-one`    | ``serving.cli serve --ray --replicas 1 --ingress replica``: the LLM replica is the ingress |
| `ray-one-direct` | the same, clients straight to the replica (``benchmarks.ray_one_deployment``: Ray's direct ingress, no proxy) |
| `vllm`       | vLLM's own OpenAI server on the same folder: no middleware, vLLM's defaults |
| `embedded-compiled` | ``serving.cli serve --cpu-compile``: the engine compiled, not eager |
| `embedded-all-cores` | ``serving.cli serve`` with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``: the engine's threads on every core |
| `embedded-worker-process` | ``serving.cli serve --cpu-worker-process``: vLLM's model worker in a process of its own |
| `ray-worker-process` | ``serving.cli serve --ray --replicas 1 --cpu-worker-process``: the same on Ray |
| `before`     | ``serving.cli serve`` of another checkout (``--before-checkout DIR``) |

``vllm`` runs ``vllm.entrypoints.launchers.api_server.entry.run_server`` from ``python -c`` with
only ``--model --dtype float32 --max-model-len 2048 --enforce-eager`` (the ``vllm`` console
script does not run under the ``vllm-cpu`` distribution); the plugin still loads, through its
entry point. ``before`` is this project's server as an older commit wrote it: the command runs
in DIR with ``PYTHONPATH=DIR``, so DIR's ``serving``, ``plugins`` and ``encoders`` shadow the
editable install of this checkout (whose finder comes after ``sys.path``, and vLLM's spawned
processes inherit ``sys.path``). :func:`checkout_origins` checks that before the server starts.

The harness sets ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB unless set) for every target alike.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.metrics import MemorySampler
from benchmarks.pinning import Layout, pin_tree
from serving import settings
from serving.engine.process import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

# Command lines as data: {model}, {host} and {port} are filled in; the interpreter comes first.
TARGET_ARGS: dict[str, tuple[str, ...]] = {
    "reference": ("-m", "benchmarks.hf_server", "{model}", "--mode", "reference", "--host", "{host}", "--port", "{port}"),
    "hf-batched": ("-m", "benchmarks.hf_server", "{model}", "--mode", "hf-batched", "--host", "{host}", "--port", "{port}"),
    # float32 everywhere: the same weights at the same precision as the Hugging Face targets.
    "embedded": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32"),
    "ray": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "1"),
    # Two replicas: a consult's turns on the replica its x-session-id hashes to (serve --ray's
    # default router), by prefix affinity only, or wherever Ray Serve's power-of-two router puts them.
    "ray-affinity": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "2"),
    "ray-prefix": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "2", "--routing", "prefix"),
    "ray-pow2": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "2", "--routing", "pow2"),
    # Ray Serve with LLM replicas that are their own ingress (one actor hop fewer), through
    # Serve's proxy or straight to the replica (benchmarks/ray_one_deployment.py).
    "ray-one": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "1", "--ingress", "replica"),
    "ray-one-direct": ("-m", "benchmarks.ray_one_deployment", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32"),
    # vLLM out of the box: what `vllm serve FOLDER` would run, with the same precision, context
    # and eager mode as `embedded` (whose --max-model-len default is 2048).
    "vllm": ("-c", "{vllm_script}", "--model", "{model}", "--dtype", "float32", "--max-model-len", "2048",
             "--enforce-eager", "--host", "{host}", "--port", "{port}"),
    # The engine's CPU choices, against `embedded` (docs/benchmarks.md, "The engine's own speed"):
    # compiled instead of eager, the engine's OpenMP threads on every core (TARGET_ENV), and
    # vLLM's own two engine processes (its model worker beside the engine core).
    "embedded-compiled": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--cpu-compile"),
    "embedded-all-cores": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32"),
    "embedded-worker-process": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--cpu-worker-process"),
    "ray-worker-process": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32", "--ray", "--replicas", "1", "--cpu-worker-process"),
    # `embedded` as another checkout has it (cwd and PYTHONPATH: the checkout).
    "before": ("-m", "serving.cli", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--dtype", "float32"),
}
# Environment of a target on top of the harness's own (CHILD_ENV_DEFAULTS). vLLM's CPU engine
# keeps one core per rank free of its OpenMP threads by default (for the API server); 0 gives it
# every core.
TARGET_ENV: dict[str, dict[str, str]] = {
    "embedded-all-cores": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}
CHECKOUT_TARGETS = frozenset({"before"})
"""Targets that run another checkout's code and need one (``--before-checkout``)."""

# One line, so that reports show the command as it ran; the guard keeps vLLM's spawned processes
# from running it again.
VLLM_SERVER_SCRIPT = (
    'if __name__ == "__main__": import sys, uvloop; '
    "from vllm.entrypoints.launchers.api_server.entry import run_server; "
    "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    'args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(sys.argv[1:]); '
    "validate_parsed_serve_args(args); uvloop.run(run_server(args))"
)
# The modules whose origin tells which checkout a server runs: the CLI, the request policy in
# front of vLLM, and the plugin that every vLLM process loads through its entry point.
CHECKOUT_MODULES = ("serving", "serving.cli", "plugins.skingpt4", "encoders")
TARGETS: tuple[str, ...] = tuple(TARGET_ARGS)

# The only environment the harness sets, for the servers it starts: offline, no telemetry.
CHILD_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    settings.KVCACHE_ENV: str(settings.DEFAULT_CPU_KVCACHE_GIB),
    settings.HOST_IP_ENV: settings.LOOPBACK_IP,  # one machine: engine traffic stays on loopback
    "TOKENIZERS_PARALLELISM": "false",
}


# A server started with an API key (``serving.cli serve`` reads it from here too) needs it on
# every route but /health; the client sends it when set.
API_KEY_ENV = settings.API_KEY_ENV


def api_key() -> str | None:
    return settings.api_key()


class TargetError(RuntimeError):
    """A running target that does not answer as an OpenAI server should (a target that will not
    start raises :class:`serving.engine.process.ServerStartError`)."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHILD_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def checkout_env(checkout: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(checkout)}


def checkout_origins(checkout: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Where the server's modules come from when started in ``checkout`` as the harness starts
    it (same interpreter, working directory and ``PYTHONPATH``); :class:`TargetError` unless
    every one of ``CHECKOUT_MODULES`` is the checkout's own."""
    code = (
        "import importlib.util, json; "
        f"print(json.dumps({{m: importlib.util.find_spec(m).origin for m in {CHECKOUT_MODULES!r}}}))"
    )
    env = {**child_env(), **checkout_env(checkout)} if env is None else env
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise TargetError(f"cannot import the server's modules from {checkout}: {done.stderr.strip()[-500:]}")
    origins = json.loads(done.stdout.strip().splitlines()[-1])
    outside = {m: o for m, o in origins.items() if not Path(o).resolve().is_relative_to(checkout.resolve())}
    if outside:
        raise TargetError(f"started in {checkout}, these modules come from elsewhere: {outside}")
    return origins


@dataclass(frozen=True)
class Target:
    name: str
    argv: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    cwd: Path = REPO_ROOT
    env: dict[str, str] = field(default_factory=dict)
    """Set on top of :func:`child_env`."""
    checkout: Path | None = None
    """The checkout whose code this target runs, when not this one."""

    @classmethod
    def named(
        cls, name: str, model: str | Path, host: str = "127.0.0.1", port: int | None = None,
        checkout: str | Path | None = None,
    ) -> Target:
        """``name``'s command line on ``model``; ``checkout`` only (and always) for ``before``."""
        if name not in TARGET_ARGS:
            raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}")
        if (name in CHECKOUT_TARGETS) != (checkout is not None):
            raise ValueError(
                f"target {name!r} needs a checkout (--before-checkout DIR)" if checkout is None
                else f"target {name!r} runs this checkout; a checkout is only for {sorted(CHECKOUT_TARGETS)}"
            )
        port = port or free_port(host)
        # Absolute: a checkout target runs in another directory.
        fill = {"model": str(Path(model).resolve()), "host": host, "port": str(port), "vllm_script": VLLM_SERVER_SCRIPT}
        argv = (sys.executable, *(a.format(**fill) for a in TARGET_ARGS[name]))
        if checkout is None:
            return cls(name, argv, host, port, env=dict(TARGET_ENV.get(name, {})))
        checkout = Path(checkout).resolve()
        return cls(name, argv, host, port, cwd=checkout, env=checkout_env(checkout), checkout=checkout)

    def command_line(self) -> str:
        """The shell command that starts the target (for reports)."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        cd = f"cd {shlex.quote(str(self.cwd))} && " if self.cwd != REPO_ROOT else ""
        return cd + " ".join([*prefix, shlex.join(self.argv)])

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
    """A target the harness starts (through :class:`serving.engine.process.ServerProcess`, the project's
    one start/stop policy) and stops; use as a context manager. A target that will not start
    raises :class:`serving.engine.process.ServerStartError` with the tail of its log."""

    def __init__(
        self, target: Target, log_path: Path, startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0, layout: Layout | None = None,
    ) -> None:
        self.target = target
        self.log_path = log_path
        self.layout = layout
        """The pinned layout (:mod:`benchmarks.pinning`), or None: every process free."""
        self.env = {**child_env(), **target.env, **(layout.target_env() if layout else {})}
        self.process = ServerProcess(
            target.argv, root_url=target.root_url, log_path=log_path, cwd=target.cwd, env=self.env,
            name=f"target {target.name!r}", startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s, append=True,
        )
        self.model = ""
        self.origins: dict[str, str] = {}
        """For a checkout target: where its modules were found (:func:`checkout_origins`)."""
        self._api_cpu = 0.0

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
        if self.target.checkout is not None:
            self.origins = checkout_origins(self.target.checkout, self.env)
        self.process.start()
        try:
            self.model = served_model(self.target.root_url)
        except BaseException:
            self.process.stop()
            raise
        self.pin()
        return self

    def pin(self) -> dict[str, int] | None:
        """With a layout: pin the server's tree and this process (again before each run, for
        processes started since); how many processes went to the engine's and the front's CPUs."""
        if self.layout is None:
            return None
        self.layout.pin_self()
        return pin_tree(self.pid, self.layout)

    def __exit__(self, *exc) -> None:
        self.process.stop()

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server's whole process tree since it started."""
        return self.process.cpu_seconds()

    def cpu_by_process(self) -> dict[str, float] | None:
        """:meth:`cpu_seconds` by kind of process (the server, its engine, Ray's daemons...)."""
        return self.process.cpu_by_process()

    def api_cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the API-server process alone (the leader: the process
        that parses requests and decodes photos; vLLM's engine runs in its children)."""
        try:
            t = psutil.Process(self.pid).cpu_times()
            self._api_cpu = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # exited: its last reading
        return self._api_cpu

    def memory_sampler(self, interval_s: float = 0.05) -> MemorySampler:
        """RSS of the server's process tree, sampled while the returned context is open."""
        return MemorySampler(self.pid, interval_s=interval_s)

    def describe(self) -> str:
        line = self.target.command_line()
        if self.layout is not None:
            line += (f"  # pinned: engine on CPUs {sorted(self.layout.engine)}, everything else "
                     f"(and the client) on {sorted(self.layout.front)}")
        return line


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

    def api_cpu_seconds(self) -> float | None:
        return None

    def cpu_by_process(self) -> dict[str, float] | None:
        return None

    def memory_sampler(self, interval_s: float = 0.05) -> None:
        return None

    def pin(self) -> None:
        return None  # not our processes: --pin-engine is refused for them

    def describe(self) -> str:
        return self.base_url
