"""Where the CPU goes: ``py-spy`` samples of vLLM's engine processes, or of the front end's
(the API server; Ray's proxy, ingress and replica actors), under load.

    python -m benchmarks profile --concurrency 1,32 --out bench-results/profile
    # the same with the engine compiled (or --target embedded-all-cores: its threads on every core)
    python -m benchmarks profile --target embedded-compiled --out bench-results/profile-compiled
    # the front end's processes: Ray's (unpinned: pinned, py-spy reads every Ray thread as idle)
    python -m benchmarks profile --target ray --processes front --concurrency 32 --rate 100 --out bench-results/profile-ray
    python -m benchmarks profile --target embedded --processes front --pin-engine --concurrency 32 --out bench-results/profile-front

The harness starts the target (``embedded`` unless ``--target``), warms it up, then for each
concurrency attaches ``py-spy record`` (``--format raw``: one line per distinct stack with its
sample count; threads asleep are not sampled, threads that spin are)
to every ``VLLM::EngineCore`` and ``VLLM::Worker`` process of its tree (``--processes engine``),
to its other Python processes (``front``: Ray's idle workers and its native daemons are left
out), or to both (``all``), and runs the ``single`` scenario. An engine stack goes to the first
category of :data:`CATEGORIES` whose pattern it matches (waiting on the other engine process,
vision encoder, sampling, structured output, attention, the language model's other layers,
input preparation, scheduler, outputs and IPC, other Python); a front-end stack to the category
of :data:`FRONT_CATEGORIES` of its innermost frame that matches one (photos, Ray's actor calls
and serialisation, Ray Serve's machinery, Ray Serve LLM, metrics and logging, pydantic, vLLM's
engine client, vLLM's OpenAI layer, the policy layer, the HTTP server, JSON, the event loop).
Samples are converted to CPU milliseconds per answered request (samples / rate / answered), and
the process's measured CPU time per request is written beside them. The two differ both ways:
native threads without a Python frame (OpenMP workers, Ray's core worker) are not sampled, and a
thread spinning on ``sched_yield`` is sampled as busy while it hands most of its core to others.

Writes ``profile.json`` (per run: the categories, the top stacks, the load's summary, the
machine) and ``profile.md`` (the table of ``docs/benchmarks.md``). ``py-spy`` must be installed
(``pip install py-spy``) and allowed to read other processes (root, or ``ptrace_scope`` 0).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.loadgen import LoadConfig, make_client, warm_up
from benchmarks.metrics import compute_metrics
from benchmarks.pinning import Layout
from benchmarks.report import machine_info, machine_line, package_versions, write_json
from benchmarks.scenarios import DEFAULT_IMAGE_SIZE, build_conversations
from benchmarks.sweep import WARMUP_SEED, measure
from benchmarks.targets import LaunchedTarget, Target, api_key
from serving.engine.front_cpus import is_engine
from serving.engine.process import process_label

RATE = 250  # samples per second per process

# (category, pattern over a whole collapsed stack), first match wins: the specific before the
# general. Frames read "function (file:line)".
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    # vLLM's CPU engine is two processes that pass each step through a shared-memory queue; a
    # reader spins on it (sched_yield) for a second after each read before it sleeps on a socket.
    ("waiting on the other process (shared-memory queue spin)",
     r"SpinCondition\.wait|MessageQueue\.acquire_read|acquire_read\.<locals>"),
    ("vision encoder (EVA ViT, Q-Former, projection)",
     r"timm/|encoders/|_execute_mm_encoder|embed_multimodal|qformer|QFormer"),
    ("sampling and logits",
     r"/sample/|sampler\.py|compute_logits|logits_processor|sample_tokens"),
    ("structured output", r"structured_output|xgrammar|grammar_bitmask"),
    ("attention (paged KV cache)", r"attention|Attention|attn\b|_attn|cpu_attn"),
    ("language model: linear layers (oneDNN GEMM)", r"layers/linear\.py|onednn_mm|unquantized_gemm"),
    ("language model: norms, activation, rotary, embedding",
     r"models/llama\.py|models/falcon\.py|layernorm|activation\.py|rotary_embedding|"
     r"vocab_parallel_embedding"),
    ("model runner: input preparation and state",
     r"_prepare_inputs|_update_states|input_batch|block_table|_prepare|_preprocess|"
     r"_calc_|_gather_mm|_bookkeeping|_to_list"),
    ("scheduler and KV-cache manager", r"core/sched/|kv_cache_manager|block_pool|kv_cache_utils"),
    ("outputs, serialisation and IPC",
     r"serial_utils|msgspec|msgpack|zmq|shm_broadcast|process_input_sockets|"
     r"process_output_sockets|multiproc_executor|message_queue|pickle"),
))
OTHER = "other Python (engine loop, bookkeeping)"

# The front end's processes (the API server; Ray's proxy, ingress and LLM replica actors): each
# stack goes to the category of its innermost frame that matches one, so that time is charged to
# the library doing the work, not to the server loop every stack starts in.
FRONT_CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("photos: base64, decode, resize", r"base64|PIL/|serving/api/media\.py|serving/api/workers\.py|"
     r"encoders/preprocess|image_load"),
    ("Ray: actor calls, object transfer, serialisation",
     r"ray/_raylet|_raylet\.pyx|ray/_private/(serialization|worker|function_manager)|cloudpickle|"
     r"pickle|ray/actor\.py|ray/serve/handle\.py|ray/serve/_private/(replica_result|router|"
     r"request_router)|ray/experimental/|object_ref"),
    ("Ray Serve: proxy and replica machinery",
     r"ray/serve/_private/|ray/serve/"),
    ("Ray Serve LLM: ingress and LLMServer", r"ray/llm/"),
    ("metrics and logging", r"prometheus_client|opentelemetry|ray/util/metrics|/logging/|"
     r"serving/api/(metrics|observe)\.py"),
    ("pydantic: request and response models", r"pydantic"),
    ("vLLM's engine client: inputs, outputs, detokenizing",
     r"vllm/v1/engine/(async_llm|output_processor|detokenizer|core_client|input_processor|"
     r"processor)|vllm/inputs/|vllm/multimodal/"),
    ("vLLM's OpenAI layer: chat template, tokenizer, streaming chunks",
     r"vllm/entrypoints/|vllm/renderers/|vllm/tokenizers/|transformers/|tokenizers|jinja2"),
    ("the policy layer (serving/api)", r"serving/api/|serving/cluster/"),
    ("HTTP server and ASGI (uvicorn, Starlette, FastAPI)",
     r"uvicorn|starlette|fastapi|h11|httptools|anyio"),
    ("JSON", r"\bjson/|orjson|msgspec"),
    ("asyncio event loop", r"asyncio/|uvloop|selectors\.py"),
))
FRONT_OTHER = "other Python"
# Front-end processes not sampled: Ray's idle worker pool and non-Python daemons (raylet, GCS).
NOT_SAMPLED = ("ray::IDLE",)


@dataclass(frozen=True)
class ProfileConfig:
    out: Path
    model: Path
    target: str = "embedded"
    checkout: Path | None = None
    """The checkout the ``before`` target runs (``--before-checkout``)."""
    concurrency: tuple[int, ...] = (1, 32)
    num_requests: int | None = None
    """Per run; ``None``: ``max(16, 3 x concurrency)``."""
    max_tokens: int = 64
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    rate: int = RATE
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    seed: int = 0
    layout: Layout | None = None
    """The pinned layout (``--pin-engine``), or None."""
    processes: str = "engine"
    """Which processes to sample (:data:`PROCESSES`): vLLM's engine, the front end's, or all."""
    stream: bool = True
    command: str = ""


def categorize(stack: str) -> str:
    """An engine process's stack: the first category whose pattern matches anywhere in it."""
    for name, pattern in CATEGORIES:
        if pattern.search(stack):
            return name
    return OTHER


def categorize_front(stack: str) -> str:
    """A front-end process's stack: the category of its innermost frame that matches one (the
    first pattern of :data:`FRONT_CATEGORIES` matching that frame)."""
    for frame in reversed(stack.split(";")):
        for name, pattern in FRONT_CATEGORIES:
            if pattern.search(frame):
                return name
    return FRONT_OTHER


def category_of(label: str, stack: str) -> str:
    """The category of ``stack`` sampled in a process of kind ``label``."""
    return categorize(stack) if is_engine(label) else categorize_front(stack)


def read_raw(path: Path) -> Counter:
    """py-spy's ``--format raw`` file: ``{stack: samples}``."""
    stacks: Counter = Counter()
    if not path.exists():
        return stacks
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def breakdown(stacks: Counter, rate: int, answered: int, label: str) -> dict[str, float]:
    """CPU milliseconds per answered request by category (``label``: the process's kind)."""
    per_category: Counter = Counter()
    for stack, samples in stacks.items():
        per_category[category_of(label, stack)] += samples
    return {name: 1000.0 * samples / rate / max(answered, 1)
            for name, samples in per_category.most_common()}


PROCESSES = ("engine", "front", "all")


def wanted(label: str, which: str) -> bool:
    """Whether a process of kind ``label`` is sampled when profiling ``which`` processes
    (:data:`PROCESSES`): the engine's, the front end's Python processes, or both."""
    if is_engine(label):
        return which in ("engine", "all")
    python = label.startswith(("ray::", "-m ", "python"))
    return which in ("front", "all") and python and not label.startswith(NOT_SAMPLED)


def profiled_pids(root: int, which: str = "engine") -> dict[int, str]:
    """The processes of ``root``'s tree to sample: pid -> label (``VLLM::EngineCore``,
    ``ray::ProxyActor``, ...; ``server`` for ``root`` itself, as the run's CPU measurement
    names it)."""
    found = {root: "server"} if which in ("front", "all") else {}
    for proc in psutil.Process(root).children(recursive=True):
        label = process_label(proc)
        if wanted(label, which):
            found[proc.pid] = label
    return found


READY = "Sampling process"  # what py-spy record prints once it samples
READY_TIMEOUT_S = 120.0


class Recorders:
    """One ``py-spy record`` per process, from ``start`` to ``stop`` (SIGINT: py-spy writes its
    file and exits). Each is started, and sampling, before the next starts: py-spy reads a large
    process's memory maps first, which on a busy core can take long enough for it to give up
    when all start at once. py-spy's own output goes to ``<file>.log``; a process it could not
    attach to is named in :attr:`failed`."""

    def __init__(self, pids: dict[int, str], folder: Path, rate: int) -> None:
        self.pids, self.folder, self.rate = pids, folder, rate
        self.procs: list[subprocess.Popen] = []
        self.files: dict[int, Path] = {}
        self.failed: dict[int, str] = {}

    def __enter__(self) -> Recorders:
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        if spy is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.folder.mkdir(parents=True, exist_ok=True)
        for pid, label in self.pids.items():
            path = self.folder / f"{label.replace('::', '-').replace(' ', '_')}-{pid}.txt"
            log = path.with_suffix(".log")
            self.files[pid] = path
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                     "--output", str(path), "--nonblocking"],
                    stdout=out, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while READY not in (said := log.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.failed[pid] = said.strip()[-500:] or "no output"
                    break
                time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def profile_run(server: LaunchedTarget, cfg: ProfileConfig, concurrency: int) -> dict:
    pids = profiled_pids(server.pid, cfg.processes)
    n = cfg.num_requests or max(16, 3 * concurrency)
    convs = build_conversations("single", n, cfg.image_size, cfg.seed + concurrency)
    load_cfg = LoadConfig(max_concurrency=concurrency, max_tokens=cfg.max_tokens, show_progress=False,
                          stream=cfg.stream)
    client = make_client(server.base_url, cfg.request_timeout_s, api_key())
    folder = cfg.out / "stacks" / f"c{concurrency}"
    # An unmeasured pass at the same concurrency first: oneDNN builds its kernels for each new
    # batch shape, which a first pass at a new concurrency pays for.
    await measure(server, client, build_conversations("single", n, cfg.image_size, WARMUP_SEED + concurrency),
                  load_cfg, f"warm c{concurrency}")
    with Recorders(pids, folder, cfg.rate) as recorders:
        load, usage = await measure(server, client, convs, load_cfg, f"profile c{concurrency}")
    metrics = compute_metrics(load.results, load.duration)
    answered = metrics.completed
    processes = {}
    for label in sorted(set(pids.values())):  # the processes of a kind together (ranks)
        stacks = sum((read_raw(recorders.files[pid]) for pid, of in pids.items() if of == label), Counter())
        processes[label] = {
            "label": label,
            "not_sampled": {str(pid): why for pid, why in recorders.failed.items() if pids[pid] == label},
            # measured by the run itself, over the same requests
            "cpu_ms_per_request": 1000.0 * (usage.cpu_by_process or {}).get(label, 0.0) / max(answered, 1),
            "sampled_ms_per_request": 1000.0 * sum(stacks.values()) / cfg.rate / max(answered, 1),
            "categories_ms_per_request": breakdown(stacks, cfg.rate, answered, label),
            "top_stacks": [{"samples": s, "category": category_of(label, k), "leaf": k.split(";")[-3:]}
                           for k, s in stacks.most_common(15)],
        }
    return {"concurrency": concurrency, "requests": n, "answered": answered,
            "load": metrics.to_json(), "server_cpu_s_by_process": usage.cpu_by_process,
            "processes": processes}


def markdown(summary: dict) -> str:
    """One table per run: each engine process's CPU per request, split by category."""
    answers = "streamed" if summary.get("stream", True) else "whole"
    out = [f"Machine: {machine_line(summary['machine'], summary['versions'])}. Target "
           f"`{summary['target']}`, {summary['max_tokens']} greedy tokens per {answers} answer, "
           f"{summary.get('processes', 'engine')} processes sampled at {summary['rate']} Hz.\n"]
    for run in summary["runs"]:
        load = run["load"]
        out += [f"### Concurrency {run['concurrency']}: {run['answered']} answered, "
                f"{load['request_throughput']:.2f} req/s, median TTFT {load['median_ttft_ms']:.0f} ms, "
                f"median TPOT {load['median_tpot_ms']:.1f} ms\n",
                "| process | category | CPU ms / request | share of sampled |",
                "|---|---|---:|---:|"]
        for name, proc in sorted(run["processes"].items(), key=lambda kv: -kv[1]["cpu_ms_per_request"]):
            sampled = proc["sampled_ms_per_request"] or 1e-9
            for category, ms in proc["categories_ms_per_request"].items():
                out.append(f"| `{proc['label']}` | {category} | {ms:.1f} | {100 * ms / sampled:.0f}% |")
            if proc.get("not_sampled"):
                out.append(f"| `{proc['label']}` | **not sampled: py-spy could not attach to "
                           f"{len(proc['not_sampled'])} process(es)** | | |")
            out.append(f"| `{proc['label']}` | **sampled (Python threads)** | **{proc['sampled_ms_per_request']:.1f}** | |")
            out.append(f"| `{proc['label']}` | **measured CPU (all threads)** | **{proc['cpu_ms_per_request']:.1f}** | |")
        out.append("")
    return "\n".join(out)


async def run_profile(cfg: ProfileConfig) -> dict:
    target = Target.named(cfg.target, cfg.model, checkout=cfg.checkout)
    with LaunchedTarget(target, cfg.out / "logs" / f"{cfg.target}.log",
                        startup_timeout_s=cfg.startup_timeout_s, layout=cfg.layout) as server:
        warm = LoadConfig(max_concurrency=2, max_tokens=cfg.max_tokens, show_progress=False)
        await warm_up(make_client(server.base_url, cfg.request_timeout_s, api_key()), server.model,
                      build_conversations("single", 2, cfg.image_size, WARMUP_SEED), warm)
        runs = [await profile_run(server, cfg, c) for c in cfg.concurrency]
        command = server.describe()
    summary = {"command": cfg.command, "target": cfg.target, "server_command": command,
               "processes": cfg.processes, "stream": cfg.stream,
               "max_tokens": cfg.max_tokens, "rate": cfg.rate, "runs": runs,
               "machine": machine_info(), "versions": package_versions()}
    write_json(cfg.out / "profile.json", summary)
    (cfg.out / "profile.md").write_text(markdown(summary))
    return summary


def main_profile(cfg: ProfileConfig) -> dict:
    return asyncio.run(run_profile(cfg))
