"""Batch against server: the same requests through ``skingpt4 batch`` and the embedded server.

    python -m benchmarks batch-vs-server --num-requests 96 --concurrency 32 --out bench-results/batch

Both get the same ``single`` requests (one photo each, the same seeds, hence the same JPEGs),
the same weights and options (``--dtype float32``, the harness's 1 GiB KV cache) and the same
sampling (greedy, ``max_tokens``, per-request seed), one after the other on the same machine:

- ``embedded``: ``serving.cli serve`` started by the harness, warmed up, then the load generator
  at ``--concurrency`` (32), streaming, as in the sweep;
- ``batch``: ``serving.cli batch MODEL INPUT.jsonl OUTPUT.jsonl`` on a file of the same request
  bodies (``stream`` off, the Batch format's only mode), written to a temporary folder, at the
  command's own ``--max-concurrency`` unless ``--batch-concurrency`` is given.

The batch's time runs from its engine being ready (its progress bar appears: the engine has
started and the first line is being read) until the last record is in OUTPUT (the file is
polled every 20 ms), so neither side counts the engine's start or shutdown; the command's whole
wall time is recorded too. "After the first answer" divides the answers after the first by the
time from the first answer to the last, for both: the rate once answers flow, without the wait
for the first (a cold engine's first steps, a first wave of prefills). Requests/s and tokens/s (from each answer's ``usage``) of both land
in one JSON (``batch-vs-server.json``), a bar chart (``batch-vs-server.png``) and a Markdown
table (``batch-vs-server.md``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from benchmarks.loadgen import LoadConfig, make_client, warm_up
from benchmarks.report import (
    machine_info,
    machine_line,
    package_versions,
    run_record,
    summary_of,
    write_json,
)
from benchmarks.scenarios import Conversation, build_conversations
from benchmarks.sweep import WARMUP_SEED, measure
from benchmarks.targets import REPO_ROOT, LaunchedTarget, Target, api_key, child_env

READY_MARK = b"skingpt4 batch:"
"""The start of the batch's progress bar on stderr: written once the engine is up."""
POLL_S = 0.02


@dataclass(frozen=True)
class CompareConfig:
    out: Path
    model: Path
    num_requests: int = 96
    concurrency: int = 32
    """The server's: conversations in flight at once."""
    batch_concurrency: int | None = None
    """``skingpt4 batch --max-concurrency``; None: the command's default."""
    max_tokens: int = 64
    temperature: float = 0.0
    image_size: tuple[int, int] = (512, 384)
    seed: int = 0
    warmup_requests: int = 2
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    show_progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class BatchResult:
    """One ``skingpt4 batch`` run over the requests."""

    command: str
    returncode: int
    requests: int
    answered: int
    """Records with status 200."""
    failed: int
    duration: float
    """Seconds from the engine ready to the last record written."""
    wall_s: float
    """The whole command: engine start, the requests, shutdown."""
    startup_s: float
    total_input_tokens: int
    total_output_tokens: int
    cpu_s: float | None = None
    """User + system CPU seconds of the command's process tree over ``duration``."""
    record_times: tuple[float, ...] = ()
    """Seconds after the engine was ready at which each record was seen in OUTPUT (20 ms polls)."""

    def to_json(self) -> dict:
        per_second = 1.0 / self.duration if self.duration > 0 else 0.0
        return {
            **asdict(self),
            "request_throughput": self.answered * per_second,
            "output_throughput": self.total_output_tokens * per_second,
            "total_token_throughput": (self.total_input_tokens + self.total_output_tokens) * per_second,
            "cpu_share": None if self.cpu_s is None or self.duration <= 0 else self.cpu_s / self.duration,
            "after_first_request_throughput": after_first_throughput(self.record_times),
        }


def request_body(conv: Conversation, model: str, config: LoadConfig) -> dict:
    """The body the load generator sends for ``conv``'s first turn, without streaming."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": conv.user_turns[0]}],
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "seed": config.seed + conv.index,
    }


def write_batch_input(path: Path, convs: list[Conversation], model: str, config: LoadConfig) -> Path:
    """An OpenAI Batch input file: one chat request per conversation, ``custom_id`` ``req-<index>``."""
    with open(path, "w") as f:
        for conv in convs:
            line = {"custom_id": f"req-{conv.index}", "method": "POST", "url": "/v1/chat/completions",
                    "body": request_body(conv, model, config)}
            f.write(json.dumps(line) + "\n")
    return path


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_records(records: list[dict]) -> tuple[int, int, int]:
    """(answered, prompt tokens, completion tokens) of the records with status 200."""
    ok = [r["response"]["body"] for r in records if r.get("response") and r["response"]["status_code"] == 200]
    return (len(ok), sum(b["usage"]["prompt_tokens"] for b in ok), sum(b["usage"]["completion_tokens"] for b in ok))


def _lines_in(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def run_batch_command(
    model: Path, convs: list[Conversation], model_name: str, config: LoadConfig, workdir: Path,
    log_path: Path, max_concurrency: int | None = None, timeout_s: float = 1800.0,
) -> BatchResult:
    """Run ``skingpt4 batch`` on ``convs``' requests; time it as the module docstring says."""
    inp = write_batch_input(workdir / "input.jsonl", convs, model_name, config)
    out = workdir / "output.jsonl"
    argv = [sys.executable, "-m", "serving.cli", "batch", str(Path(model).resolve()), str(inp), str(out),
            "--dtype", "float32", "--model-name", model_name]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ready = done = cpu_ready = cpu_done = None
    seen: list[float] = []  # perf_counter time of each record, as the polls find them
    with open(log_path, "ab") as log:
        log_start = log.tell()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=log)
        tree = ProcessTreeCPU(proc.pid)
        try:
            while proc.poll() is None and time.perf_counter() - start < timeout_s:
                now = time.perf_counter()
                if ready is None and READY_MARK in _log_since(log_path, log_start):
                    ready, cpu_ready = now, tree.seconds()
                if ready is not None and done is None:
                    seen += [now] * max(0, _lines_in(out) - len(seen))
                    if len(seen) >= len(convs):
                        done, cpu_done = now, tree.seconds()
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    end = time.perf_counter()
    ready = ready if ready is not None else start
    done = done if done is not None else end
    answered, prompt_tokens, output_tokens = summarize_records(read_records(out))
    return BatchResult(
        command=" ".join(argv), returncode=proc.returncode, requests=len(convs), answered=answered,
        failed=len(convs) - answered, duration=done - ready, wall_s=end - start, startup_s=ready - start,
        total_input_tokens=prompt_tokens, total_output_tokens=output_tokens,
        cpu_s=None if cpu_done is None or cpu_ready is None else cpu_done - cpu_ready,
        record_times=tuple(t - ready for t in seen),
    )


def after_first_throughput(end_times) -> float | None:
    """Requests per second between the first and the last answer: the rate once answers flow,
    without the first answer's wait (engine warm-up, the first wave's prefill)."""
    times = sorted(end_times)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


class ProcessTreeCPU:
    """User + system CPU seconds of a process and its descendants (found again on each reading;
    one that exited keeps its last reading)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.last: dict[int, float] = {}

    def seconds(self) -> float:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                t = p.cpu_times()
                self.last[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return sum(self.last.values())


def _log_since(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


async def _server_run(cfg: CompareConfig, server, convs: list[Conversation], config: LoadConfig) -> dict:
    client = make_client(server.base_url, cfg.request_timeout_s, api_key())
    try:
        await warm_up(client, server.model, build_conversations("single", cfg.warmup_requests, cfg.image_size, WARMUP_SEED), config)
        load, usage = await measure(server, client, convs, config, label=f"{server.name} single")
    finally:
        await client.close()
    return run_record(
        target=server.name, model=server.model, scenario="single", config=config, load=load,
        num_conversations=len(convs), image_size=cfg.image_size, server=usage,
    )


def run_compare(cfg: CompareConfig) -> dict:
    """The server run, then the batch run, on the same requests; write JSON, PNG and Markdown."""
    convs = build_conversations("single", cfg.num_requests, cfg.image_size, cfg.seed)
    config = LoadConfig(
        max_concurrency=cfg.concurrency, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        seed=cfg.seed, show_progress=cfg.show_progress,
    )
    logs = cfg.out / "logs"
    target = Target.named("embedded", cfg.model)
    with LaunchedTarget(target, logs / "embedded.log", startup_timeout_s=cfg.startup_timeout_s) as server:
        record = asyncio.run(_server_run(cfg, server, convs, config))
        model_name = server.model
    write_json(cfg.out / "runs" / f"embedded-single-c{cfg.concurrency}.json", record)
    with tempfile.TemporaryDirectory(prefix="batch-") as tmp:
        batch = run_batch_command(cfg.model, convs, model_name, config, Path(tmp), logs / "batch.log",
                                  max_concurrency=cfg.batch_concurrency)
    server = summary_of(record)
    server["after_first_request_throughput"] = after_first_throughput(
        [start + e2el for start, e2el, ok in zip(record["start_times"], record["e2els"], record["successes"]) if ok])
    summary = comparison(cfg, server, batch, target.command_line())
    write_json(cfg.out / "batch-vs-server.json", summary)
    plot_compare(summary, cfg.out / "batch-vs-server.png")
    (cfg.out / "batch-vs-server.md").write_text(compare_markdown(summary))
    return summary


def comparison(cfg: CompareConfig, server: dict, batch: BatchResult, server_command: str) -> dict:
    b = batch.to_json()
    return {
        "command": cfg.command,
        "model": str(cfg.model),
        "num_requests": cfg.num_requests,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "image_size": f"{cfg.image_size[0]}x{cfg.image_size[1]}",
        "server_concurrency": cfg.concurrency,
        "batch_concurrency": cfg.batch_concurrency,
        "server_command": server_command,
        "server": server,
        "batch": b,
        "batch_over_server": {
            key: (b[key] / server[key] if b.get(key) is not None and server.get(key) else None)
            for key, _ in ROWS
        },
        "machine": machine_info(),
        "versions": package_versions(),
    }


ROWS = (("request_throughput", "req/s"), ("output_throughput", "output tok/s"), ("total_token_throughput", "total tok/s"),
        ("after_first_request_throughput", "req/s after the first answer"))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def compare_markdown(summary: dict) -> str:
    s, b, ratio = summary["server"], summary["batch"], summary["batch_over_server"]
    batch_c = summary["batch_concurrency"] or "default"
    lines = [
        f"| path | concurrency | answered / sent | seconds | {' | '.join(name for _, name in ROWS)} |",
        "|---|---:|---:|---:|" + "---:|" * len(ROWS),
        f"| embedded server | {summary['server_concurrency']} | {s['completed']} / {s['sent']} | {s['duration']:.1f} | "
        + " | ".join(_fmt(s.get(key)) for key, _ in ROWS) + " |",
        f"| skingpt4 batch | {batch_c} | {b['answered']} / {b['requests']} | {b['duration']:.1f} | "
        + " | ".join(_fmt(b.get(key)) for key, _ in ROWS) + " |",
        "| batch / server | | | | " + " | ".join("n/a" if ratio[key] is None else f"{ratio[key]:.2f}x" for key, _ in ROWS) + " |",
    ]
    cpu = "n/a" if b["cpu_share"] is None else f"{b['cpu_share']:.2f}"
    server_cpu = "n/a" if s.get("server_cpu_share") is None else f"{s['server_cpu_share']:.2f}"
    notes = (
        f"\n{summary['num_requests']} `single` requests ({summary['image_size']} photos), greedy, at most "
        f"{summary['max_tokens']} tokens. Batch: from its engine ready to its last record "
        f"(whole command {b['wall_s']:.1f} s, of which {b['startup_s']:.1f} s starting). CPU cores "
        f"busy during the run: server {server_cpu} (its process tree), batch {cpu}. Machine: "
        f"{machine_line(summary.get('machine', {}), summary.get('versions'))}.\n"
    )
    return "\n".join(lines) + "\n" + notes


def plot_compare(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ROWS), figsize=(16, 4))
    for ax, (key, name) in zip(axes, ROWS):
        values = [summary["server"].get(key) or 0.0, summary["batch"].get(key) or 0.0]
        ax.bar(["embedded server", "skingpt4 batch"], values, color=["C0", "C1"])
        for x, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"skingpt4-serve: {summary['num_requests']} requests, server at concurrency {summary['server_concurrency']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
