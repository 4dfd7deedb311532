"""The sweep behind ``make bench``: every target, every concurrency, one run, one report.

    python -m benchmarks sweep --out bench-results
    # the phone scenario alone, this project against plain vLLM and an older checkout
    python -m benchmarks sweep --targets embedded,vllm --before-checkout ../before \
        --concurrency '' --consult-concurrency '' --out bench-results/phone

For each target (``reference``, ``hf-batched``, ``embedded``, ``ray``, ``vllm``, and ``before``
with ``--before-checkout``): start it once, warm it up, run the ``phone`` scenario at
``--phone-concurrency`` (32; ``embedded``, ``vllm`` and ``before`` only), the ``single``
scenario at each concurrency (1, 4, 16, 32) and the ``consult`` scenario at
``--consult-concurrency`` (1 and 4), stop it. ``vllm`` runs only ``phone``: it is there to
compare the API server's cost of full-size photos. ``before`` runs what ``embedded`` runs: the
same server as an older commit wrote it, for an A/B in one sweep. Same weights (the ``bench``
preset, built into ``artifacts/bench-<family>`` if missing), same photos, same client for every
target. Writes into ``--out``: ``runs/<target>-<scenario>-c<N>.json``, ``summary.json``,
``sweep.png``, ``consult.png`` (TTFT and prefix-cache hit rate per consult turn), ``report.md``
and the servers' logs under ``logs/``.

    # consult only: the prefix cache on one engine, and on two Ray replicas routed by session
    # affinity, by prefix affinity, and by Ray Serve's default power-of-two router
    python -m benchmarks sweep --targets embedded,ray-affinity,ray-prefix,ray-pow2 --concurrency '' \
        --phone-concurrency '' --consult-concurrency 4 --consult-conversations 8 --out bench-results/consult

Sized for ``make bench`` on 2 CPU cores (20 minutes at most): greedy answers of at most 64 tokens,
``max(16, 3 x concurrency)`` requests per level, 4 consult conversations per level, 32 phone
requests. A time budget (``--budget-s``, 18 minutes) bounds the whole sweep: a run starts no
conversation past it, and targets and runs that would start after it are skipped and listed in
the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import LoadConfig, LoadResult, make_client, run_load, warm_up
from benchmarks.metrics import ServerUsage
from benchmarks.pinning import Layout
from benchmarks.report import (
    cpu_by_process_markdown,
    machine_info,
    markdown_report,
    package_versions,
    plot_consult,
    plot_sweep,
    run_record,
    summary_of,
    write_json,
)
from benchmarks.scenarios import (
    DEFAULT_IMAGE_SIZE,
    PHONE_IMAGE_SIZE,
    Conversation,
    ScenarioName,
    build_conversations,
)
from benchmarks.targets import (
    CHECKOUT_TARGETS,
    ExternalTarget,
    LaunchedTarget,
    Target,
    TargetError,
    api_key,
)

DEFAULT_TARGETS = ("reference", "hf-batched", "embedded", "ray", "vllm")
DEFAULT_CONCURRENCY = (1, 4, 16, 32)
PHONE_TARGETS = ("embedded", "vllm", "before")
PHONE_ONLY_TARGETS = frozenset({"vllm"})
"""Targets that stand in the phone comparison only, not in the sweep against the HF baselines."""
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
    phone_concurrency: tuple[int, ...] = (32,)
    phone_requests: int | None = None
    """Phone conversations per level; ``None``: the level's concurrency (at least 16)."""
    phone_targets: tuple[str, ...] = PHONE_TARGETS
    """Those of ``targets`` that run the ``phone`` scenario."""
    phone_image_size: tuple[int, int] = PHONE_IMAGE_SIZE
    before_checkout: Path | None = None
    """The checkout the ``before`` target runs (e.g. ``git worktree add DIR 3cb75e0``)."""
    max_tokens: int = 64
    temperature: float = 0.0
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    """Photos of ``single``, ``consult`` and the warm-up."""
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
    session_ids: bool = True
    """Send ``x-session-id`` with every turn (Ray's session affinity; see ``LoadConfig``)."""
    stream: bool = True
    """Streamed answers (``--no-stream``: whole ones; see ``LoadConfig``)."""
    pin_engine: int | None = None
    """Engine CPUs of the pinned layout (:mod:`benchmarks.pinning`); None: nothing pinned."""
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
    """Every run of the sweep, in order: phone first (each server's memory is then measured from
    the same state: started and warmed up), then the swept scenario, then consult."""
    levels = [("phone", c, cfg.phone_requests or max(16, c)) for c in cfg.phone_concurrency]
    levels += [(cfg.scenario, c, cfg.num_requests or max(16, 3 * c)) for c in cfg.concurrency]
    levels += [("consult", c, cfg.consult_conversations) for c in cfg.consult_concurrency]
    return [
        PlannedRun(s, c, n, cfg.seed + i * SEEDS_PER_RUN) for i, (s, c, n) in enumerate(levels)
    ]


def runs_for(cfg: SweepConfig, plan: list[PlannedRun], target: str) -> list[PlannedRun]:
    """The runs of ``plan`` that ``target`` takes part in."""
    if target in PHONE_ONLY_TARGETS:
        return [r for r in plan if r.scenario == "phone" and target in cfg.phone_targets]
    return [r for r in plan if r.scenario != "phone" or target in cfg.phone_targets]


def image_size_of(cfg: SweepConfig, scenario: ScenarioName) -> tuple[int, int]:
    return cfg.phone_image_size if scenario == "phone" else cfg.image_size


class Conversations:
    """The conversations of each planned run, the same for every target. Built on first use and
    kept, except ``phone``'s (about 10 MB each): rebuilt per target from the cached base photos."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self._kept: dict[PlannedRun, list[Conversation]] = {}

    def __getitem__(self, run: PlannedRun) -> list[Conversation]:
        if run in self._kept:
            return self._kept[run]
        convs = build_conversations(run.scenario, run.conversations, image_size_of(self.cfg, run.scenario), run.seed)
        if run.scenario != "phone":
            self._kept[run] = convs
        return convs


class Clock:
    """Seconds left of the sweep's budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def open_target(cfg: SweepConfig, name: str, layout: Layout | None = None) -> AbstractContextManager:
    """``name`` started (or, from ``cfg.endpoints``, used as it runs); ``layout``: pinned so."""
    if name in cfg.endpoints:
        return ExternalTarget(name, cfg.endpoints[name])
    target = Target.named(name, cfg.model, checkout=cfg.before_checkout if name in CHECKOUT_TARGETS else None)
    return LaunchedTarget(target, cfg.out / "logs" / f"{name}.log", startup_timeout_s=cfg.startup_timeout_s,
                          layout=layout)


async def measure(server, client, convs: list[Conversation], config: LoadConfig, label: str) -> tuple[LoadResult, ServerUsage]:
    """One load run, with the server's CPU time (tree and API server) and its tree's RSS sampled
    throughout (the idle reading just before)."""
    layout = server.pin()
    with server.memory_sampler() or contextlib.nullcontext() as sampler:
        cpu0, api0 = server.cpu_seconds(), server.api_cpu_seconds()
        kinds0 = server.cpu_by_process()
        load = await run_load(client, server.model, convs, config, label=label)
        cpu1, api1 = server.cpu_seconds(), server.api_cpu_seconds()
        kinds1 = server.cpu_by_process()
    usage = ServerUsage.of(
        None if cpu0 is None else cpu1 - cpu0, None if api0 is None else api1 - api0, sampler
    )
    if kinds0 is not None and kinds1 is not None:
        usage = dataclasses.replace(usage, cpu_by_process={
            k: v - kinds0.get(k, 0.0) for k, v in kinds1.items() if v - kinds0.get(k, 0.0) > 0})
    if layout is not None:
        usage = dataclasses.replace(usage, layout={
            "engine_cpus": sorted(server.layout.engine), "front_cpus": sorted(server.layout.front),
            "processes": layout})
    return load, usage


def load_config(cfg: SweepConfig, run: PlannedRun, clock: Clock) -> LoadConfig:
    return LoadConfig(
        max_concurrency=run.concurrency,
        max_duration_s=max(1.0, min(cfg.max_duration_s, clock.left() - MIN_RUN_S)),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        show_progress=cfg.show_progress,
        session_ids=cfg.session_ids,
        stream=cfg.stream,
    )


async def _run_one(cfg, server, client, run: PlannedRun, convs: list[Conversation], clock: Clock) -> dict:
    config = load_config(cfg, run, clock)
    load, usage = await measure(server, client, convs, config, label=f"{server.name} {run.name}")
    record = run_record(
        target=server.name, model=server.model, scenario=run.scenario, config=config, load=load,
        num_conversations=len(convs), image_size=image_size_of(cfg, run.scenario), server=usage,
    )
    write_json(cfg.out / "runs" / f"{server.name}-{run.name}.json", record)
    return summary_of(record)


async def _run_target(cfg, server, plan, photos: Conversations, clock: Clock, runs: list[dict], failures: dict[str, str]) -> None:
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
    photos = Conversations(cfg)
    clock = Clock(cfg.budget_s)
    runs: list[dict] = []
    failures: dict[str, str] = {}
    commands: dict[str, str] = {}
    # Once, from the harness's affinity before the first pinning narrows it to the front's CPUs.
    layout = Layout.split(cfg.pin_engine) if cfg.pin_engine else None
    for name in cfg.targets:
        mine = runs_for(cfg, plan, name)
        if not mine:
            failures[name] = "skipped: none of the planned runs is for this target"
            continue
        if clock.left() < MIN_TARGET_S:
            failures[name] = "skipped: the sweep's time budget is spent"
            continue
        try:
            server = open_target(cfg, name, layout)
            commands[name] = server.describe()
            with server:
                if getattr(server, "origins", None):
                    commands[name] += "  # modules from: " + ", ".join(server.origins.values())
                asyncio.run(_run_target(cfg, server, mine, photos, clock, runs, failures))
        except (TargetError, RuntimeError, ValueError) as exc:  # ServerStartError too; the next target still runs
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
        "phone_image_size": f"{cfg.phone_image_size[0]}x{cfg.phone_image_size[1]}",
        "before_checkout": None if cfg.before_checkout is None else str(cfg.before_checkout),
        "machine": machine_info(),
        "versions": package_versions(),
    }


def write_outputs(cfg: SweepConfig, runs: list[dict], failures: dict[str, str], commands: dict[str, str]) -> dict:
    header = header_of(cfg, commands)
    files = {"png": cfg.out / "sweep.png", "markdown": cfg.out / "report.md", "summary": cfg.out / "summary.json"}
    plot_sweep(runs, files["png"], scenario=cfg.scenario)
    if plot_consult(runs, cfg.out / "consult.png"):
        files["consult_png"] = cfg.out / "consult.png"
    files["markdown"].write_text(markdown_report(runs, header, failures, scenario=cfg.scenario))
    files["cpu_by_process"] = cfg.out / "cpu-by-process.md"
    files["cpu_by_process"].write_text(cpu_by_process_markdown(runs))
    summary = {**header, "runs": runs, "failures": failures, "files": {k: str(v) for k, v in files.items()}}
    write_json(files["summary"], summary)
    return summary
