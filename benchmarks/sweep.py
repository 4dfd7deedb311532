"""The sweep behind ``make bench``: every target, every concurrency, one run, one report.

    python -m benchmarks sweep --out bench-results

For each target (``reference``, ``hf-batched``, ``embedded``, ``ray``): start it once, warm it up,
run the ``single`` scenario at each concurrency (1, 4, 16, 32) and the ``consult`` scenario at
``--consult-concurrency`` (1 and 4), stop it. Same weights (the ``bench`` preset, built into
``artifacts/bench-<family>`` if missing), same photos, same client for every target. Writes into
``--out``: ``runs/<target>-<scenario>-c<N>.json``, ``summary.json``, ``sweep.png``, ``report.md``
and the servers' logs under ``logs/``.

Sized for ``make bench`` on 2 CPU cores (20 minutes at most): greedy answers of at most 64 tokens,
``max(16, 3 x concurrency)`` requests per level, 4 consult conversations per level. A time budget
(``--budget-s``, 18 minutes) bounds the whole sweep: a run starts no conversation past it, and
targets and runs that would start after it are skipped and listed in the report.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import LoadConfig, make_client, run_load, warm_up
from benchmarks.report import (
    machine_info,
    markdown_report,
    package_versions,
    plot_sweep,
    run_record,
    summary_of,
    write_json,
)
from benchmarks.scenarios import Conversation, ScenarioName, build_conversations
from benchmarks.targets import ExternalTarget, LaunchedTarget, Target, TargetError, api_key

DEFAULT_TARGETS = ("reference", "hf-batched", "embedded", "ray")
DEFAULT_CONCURRENCY = (1, 4, 16, 32)
WARMUP_SEED = 1_000_000  # warm-up photos never appear in a measured run
SEEDS_PER_RUN = 10_000
MIN_RUN_S = 15.0
MIN_TARGET_S = 60.0


@dataclass(frozen=True)
class SweepConfig:
    out: Path
    model: Path
    targets: tuple[str, ...] = DEFAULT_TARGETS
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    scenario: ScenarioName = "single"
    num_requests: int | None = None
    """Conversations per level; ``None``: ``max(16, 3 x concurrency)``."""
    consult_concurrency: tuple[int, ...] = (1, 4)
    consult_conversations: int = 4
    max_tokens: int = 64
    temperature: float = 0.0
    image_size: tuple[int, int] = (512, 384)
    warmup_requests: int = 2
    max_duration_s: float = 120.0
    """Per run: start no conversation after this."""
    budget_s: float = 1080.0
    """The whole sweep: skip targets and runs that would start after this."""
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    endpoints: dict[str, str] = field(default_factory=dict)
    """Targets already running, name -> base URL (``http://127.0.0.1:8000/v1``): not launched."""
    seed: int = 0
    show_progress: bool = True
    command: str = ""


@dataclass(frozen=True)
class PlannedRun:
    scenario: ScenarioName
    concurrency: int
    conversations: int
    seed: int
    """First photo seed: the same for every target, different for every run."""

    @property
    def name(self) -> str:
        return f"{self.scenario}-c{self.concurrency}"


def plan_runs(cfg: SweepConfig) -> list[PlannedRun]:
    levels = [(cfg.scenario, c, cfg.num_requests or max(16, 3 * c)) for c in cfg.concurrency]
    levels += [("consult", c, cfg.consult_conversations) for c in cfg.consult_concurrency]
    return [
        PlannedRun(s, c, n, cfg.seed + i * SEEDS_PER_RUN) for i, (s, c, n) in enumerate(levels)
    ]


class Clock:
    """Seconds left of the sweep's budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def open_target(cfg: SweepConfig, name: str) -> AbstractContextManager:
    if name in cfg.endpoints:
        return ExternalTarget(name, cfg.endpoints[name])
    target = Target.named(name, cfg.model)
    return LaunchedTarget(target, cfg.out / "logs" / f"{name}.log", startup_timeout_s=cfg.startup_timeout_s)


def load_config(cfg: SweepConfig, run: PlannedRun, clock: Clock) -> LoadConfig:
    return LoadConfig(
        max_concurrency=run.concurrency,
        max_duration_s=max(1.0, min(cfg.max_duration_s, clock.left() - MIN_RUN_S)),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        show_progress=cfg.show_progress,
    )


async def _run_one(cfg, server, client, run: PlannedRun, convs: list[Conversation], clock: Clock) -> dict:
    config = load_config(cfg, run, clock)
    cpu0 = server.cpu_seconds()
    load = await run_load(client, server.model, convs, config, label=f"{server.name} {run.name}")
    cpu1 = server.cpu_seconds()
    record = run_record(
        target=server.name, model=server.model, scenario=run.scenario, config=config, load=load,
        num_conversations=len(convs), image_size=cfg.image_size,
        server_cpu_s=None if cpu0 is None else cpu1 - cpu0,
    )
    write_json(cfg.out / "runs" / f"{server.name}-{run.name}.json", record)
    return summary_of(record)


async def _run_target(cfg, server, plan, photos, clock: Clock, runs: list[dict], failures: dict[str, str]) -> None:
    """Warm up, then the plan's runs in order; each run's summary lands in ``runs`` as it ends."""
    client = make_client(server.base_url, cfg.request_timeout_s, api_key())
    warm = LoadConfig(max_tokens=cfg.max_tokens, temperature=cfg.temperature, show_progress=False)
    try:
        await warm_up(client, server.model, build_conversations("single", cfg.warmup_requests, cfg.image_size, WARMUP_SEED), warm)
        for run in plan:
            if clock.left() < MIN_RUN_S:
                failures[f"{server.name} {run.name}"] = "skipped: the sweep's time budget is spent"
                continue
            runs.append(await _run_one(cfg, server, client, run, photos[run], clock))
    finally:
        await client.close()


def run_sweep(cfg: SweepConfig) -> dict:
    """Run the plan on every target; write the JSON files, the plot and the report; return the summary."""
    plan = plan_runs(cfg)
    photos = {run: build_conversations(run.scenario, run.conversations, cfg.image_size, run.seed) for run in plan}
    clock = Clock(cfg.budget_s)
    runs: list[dict] = []
    failures: dict[str, str] = {}
    commands: dict[str, str] = {}
    for name in cfg.targets:
        if clock.left() < MIN_TARGET_S:
            failures[name] = "skipped: the sweep's time budget is spent"
            continue
        server = open_target(cfg, name)
        commands[name] = shlex.join(server.target.argv) if isinstance(server, LaunchedTarget) else server.base_url
        try:
            with server:
                asyncio.run(_run_target(cfg, server, plan, photos, clock, runs, failures))
        except (TargetError, RuntimeError) as exc:  # ServerStartError too; the next target still runs
            failures[name] = str(exc)
    return write_outputs(cfg, runs, failures, commands)


def header_of(cfg: SweepConfig, commands: dict[str, str]) -> dict:
    return {
        "command": cfg.command,
        "target_commands": commands,
        "model": str(cfg.model),
        "targets": list(cfg.targets),
        "concurrency": list(cfg.concurrency),
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "image_size": f"{cfg.image_size[0]}x{cfg.image_size[1]}",
        "machine": machine_info(),
        "versions": package_versions(),
    }


def write_outputs(cfg: SweepConfig, runs: list[dict], failures: dict[str, str], commands: dict[str, str]) -> dict:
    header = header_of(cfg, commands)
    files = {"png": cfg.out / "sweep.png", "markdown": cfg.out / "report.md", "summary": cfg.out / "summary.json"}
    plot_sweep(runs, files["png"], scenario=cfg.scenario)
    files["markdown"].write_text(markdown_report(runs, header, failures, scenario=cfg.scenario))
    summary = {**header, "runs": runs, "failures": failures, "files": {k: str(v) for k, v in files.items()}}
    write_json(files["summary"], summary)
    return summary
