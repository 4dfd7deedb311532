"""Live consults while a Batch API batch runs on the same server.

    python -m benchmarks live-vs-batch --num-requests 48 --concurrency 4 --batch-lines 200 \\
        --out bench-results/live-batch

One embedded server (``serving.cli serve --data-dir`` in a temporary folder), the harness's
weights and options, warmed up, then in one run:

1. ``quiet``: ``--num-requests`` live ``single`` requests (one photo each), streamed, at
   ``--concurrency``, with nothing else on the server;
2. a ``--batch-lines`` photo batch is uploaded and started through the ``openai`` SDK
   (``files.create``, ``batches.create``); once it is running (its first records are in),
3. ``during batch``: the same number of live requests (other photos of the same size, so neither
   run reuses the other's prefix cache) at the same concurrency;
4. the batch is polled until it ends: it must still finish, all its lines answered. Its count
   of answered lines, polled every 0.25 s during step 3 (the server updates it every second),
   gives the lines answered while the live requests ran.

TTFT p50 and p99 of both live runs, their ratios, and the batch's progress (lines answered during
the live run, lines per second, total time) go to one JSON (``live-vs-batch.json``), a bar chart
(``live-vs-batch.png``) and a Markdown table (``live-vs-batch.md``).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.batch_compare import request_body
from benchmarks.loadgen import LoadConfig, make_client, warm_up
from benchmarks.report import (
    machine_info,
    machine_line,
    package_versions,
    run_record,
    summary_of,
    write_json,
)
from benchmarks.scenarios import build_conversations
from benchmarks.sweep import WARMUP_SEED, measure
from benchmarks.targets import LaunchedTarget, Target, api_key

BATCH_SEED = 100_000
DURING_SEED = 50_000
GOALS = {"p50": 1.25, "p99": 1.5}  # TTFT during the batch / quiet, at most
FINAL = ("completed", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class LiveBatchConfig:
    out: Path
    model: Path
    num_requests: int = 48
    concurrency: int = 4
    batch_lines: int = 200
    batch_max_inflight: int | None = None
    """``serve --batch-max-inflight``; None: the server's default."""
    max_tokens: int = 64
    temperature: float = 0.0
    image_size: tuple[int, int] = (512, 384)
    seed: int = 0
    warmup_requests: int = 2
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    batch_timeout_s: float = 3600.0
    show_progress: bool = True
    command: str = ""


def batch_file(cfg: LiveBatchConfig, model: str, config: LoadConfig) -> bytes:
    convs = build_conversations("single", cfg.batch_lines, cfg.image_size, cfg.seed + BATCH_SEED)
    return "".join(json.dumps({"custom_id": f"case-{c.index}", "method": "POST",
                               "url": "/v1/chat/completions",
                               "body": request_body(c, model, config)}) + "\n"
                   for c in convs).encode()


def answered_at(samples: list[tuple[float, int]], when: float) -> int:
    """The batch's answered lines at ``when``: the last sample at or before it (the server
    updates the count every second, so this lags by up to a second)."""
    earlier = [count for t, count in samples if t <= when]
    return earlier[-1] if earlier else (samples[0][1] if samples else 0)


async def _runs(cfg: LiveBatchConfig, server, config: LoadConfig) -> dict:
    client = make_client(server.base_url, cfg.request_timeout_s, api_key())
    try:
        await warm_up(client, server.model, build_conversations(
            "single", cfg.warmup_requests, cfg.image_size, WARMUP_SEED), config)
        quiet_convs = build_conversations("single", cfg.num_requests, cfg.image_size, cfg.seed)
        quiet, quiet_usage = await measure(server, client, quiet_convs, config, label="quiet")

        upload = await client.files.create(file=("live-vs-batch.jsonl", batch_file(
            cfg, server.model, config)), purpose="batch")
        started = time.perf_counter()
        batch = await client.batches.create(input_file_id=upload.id, completion_window="24h",
                                            endpoint="/v1/chat/completions")
        while batch.request_counts.completed < 1 and batch.status not in FINAL:
            await asyncio.sleep(0.2)
            batch = await client.batches.retrieve(batch.id)
        samples: list[tuple[float, int]] = []  # (time, lines answered), every 0.25 s

        async def sample():
            while True:
                current = await client.batches.retrieve(batch.id)
                samples.append((time.perf_counter(), current.request_counts.completed))
                await asyncio.sleep(0.25)

        poller = asyncio.create_task(sample())
        busy_convs = build_conversations("single", cfg.num_requests, cfg.image_size,
                                         cfg.seed + DURING_SEED)
        busy, busy_usage = await measure(server, client, busy_convs, config, label="during batch")
        live_end = time.perf_counter()
        live_s = busy.duration  # the live requests' own span, ending as measure() returns
        await asyncio.sleep(0.3)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        during = answered_at(samples, live_end) - answered_at(samples, live_end - live_s)
        batch = await client.batches.retrieve(batch.id)
        while batch.status not in FINAL and time.perf_counter() - started < cfg.batch_timeout_s:
            await asyncio.sleep(0.5)
            batch = await client.batches.retrieve(batch.id)
        batch_s = time.perf_counter() - started
    finally:
        await client.close()
    records = {
        name: run_record(target=server.name, model=server.model, scenario="single",
                         config=config, load=load, num_conversations=cfg.num_requests,
                         image_size=cfg.image_size, server=usage)
        for name, load, usage in (("quiet", quiet, quiet_usage), ("during_batch", busy, busy_usage))
    }
    return {"records": records, "batch": {
        "lines": cfg.batch_lines, "status": batch.status,
        "completed": batch.request_counts.completed, "failed": batch.request_counts.failed,
        "seconds": batch_s, "lines_per_s": batch.request_counts.completed / batch_s,
        "answered_during_live_run": during,
        "lines_per_s_during_live_run": during / live_s if live_s > 0 else None,
    }}


def run_live_vs_batch(cfg: LiveBatchConfig) -> dict:
    config = LoadConfig(max_concurrency=cfg.concurrency, max_tokens=cfg.max_tokens,
                        temperature=cfg.temperature, seed=cfg.seed,
                        show_progress=cfg.show_progress)
    target = Target.named("embedded", cfg.model)
    with tempfile.TemporaryDirectory(prefix="live-batch-") as data:
        extra = ("--data-dir", data)
        if cfg.batch_max_inflight is not None:
            extra += ("--batch-max-inflight", str(cfg.batch_max_inflight))
        target = replace(target, argv=(*target.argv, *extra))
        with LaunchedTarget(target, cfg.out / "logs" / "embedded.log",
                            startup_timeout_s=cfg.startup_timeout_s) as server:
            result = asyncio.run(_runs(cfg, server, config))
    for name, record in result["records"].items():
        write_json(cfg.out / "runs" / f"live-{name}-c{cfg.concurrency}.json", record)
    quiet, busy = (summary_of(result["records"][k]) for k in ("quiet", "during_batch"))
    ratios = {q: busy[f"{k}_ttft_ms"] / quiet[f"{k}_ttft_ms"]
              for q, k in (("p50", "median"), ("p99", "p99"))}
    summary = {
        "command": cfg.command, "model": str(cfg.model), "server_command": target.command_line(),
        "num_requests": cfg.num_requests, "concurrency": cfg.concurrency,
        "max_tokens": cfg.max_tokens, "image_size": f"{cfg.image_size[0]}x{cfg.image_size[1]}",
        "quiet": quiet, "during_batch": busy, "ttft_ratio": ratios, "goals": GOALS,
        "goals_met": all(ratios[q] <= GOALS[q] for q in GOALS)
        and result["batch"]["status"] == "completed",
        "batch": result["batch"], "machine": machine_info(), "versions": package_versions(),
    }
    write_json(cfg.out / "live-vs-batch.json", summary)
    plot(summary, cfg.out / "live-vs-batch.png")
    (cfg.out / "live-vs-batch.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    q, b, r, batch = summary["quiet"], summary["during_batch"], summary["ttft_ratio"], summary["batch"]
    rows = [
        "| live requests | completed / sent | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("no batch", q), ("during the batch", b)):
        rows.append(f"| {name} | {s['completed']} / {s['sent']} | {s['request_throughput']:.2f} | "
                    f"{s['median_ttft_ms']:.0f} | {s['p99_ttft_ms']:.0f} | {s['median_tpot_ms']:.1f} |")
    rows.append(f"| during / no batch (goal: p50 <= {summary['goals']['p50']}x, p99 <= "
                f"{summary['goals']['p99']}x) | | | {r['p50']:.2f}x | {r['p99']:.2f}x | |")
    during = batch["lines_per_s_during_live_run"]
    notes = (
        f"\n{summary['num_requests']} live `single` requests ({summary['image_size']} photos, "
        f"greedy, at most {summary['max_tokens']} tokens, streamed) at concurrency "
        f"{summary['concurrency']}. The batch: {batch['lines']} photo lines, {batch['status']}, "
        f"{batch['completed']} answered and {batch['failed']} failed in {batch['seconds']:.0f} s "
        f"({batch['lines_per_s']:.2f} lines/s overall; {batch['answered_during_live_run']} lines, "
        f"{'n/a' if during is None else f'{during:.2f}'} lines/s, while the live requests ran). "
        f"Machine: {machine_line(summary.get('machine', {}), summary.get('versions'))}.\n"
    )
    return "\n".join(rows) + "\n" + notes


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = ["TTFT p50", "TTFT p99"]
    quiet = [summary["quiet"]["median_ttft_ms"], summary["quiet"]["p99_ttft_ms"]]
    busy = [summary["during_batch"]["median_ttft_ms"], summary["during_batch"]["p99_ttft_ms"]]
    for offset, values, label in ((-0.2, quiet, "no batch"), (0.2, busy, "during the batch")):
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, values, width=0.4, label=label)
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms")
    ax.legend()
    ax.set_title(f"live requests at concurrency {summary['concurrency']}, "
                 f"{summary['batch']['lines']}-line batch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
