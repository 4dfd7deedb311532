"""Per-request results and their aggregates, named as ``vllm bench serve`` names them.

Follows vLLM's ``benchmarks/serve.py`` (``calculate_metrics``):

- TTFT: from sending the request to the first streamed chunk with text;
- ITL: the gaps between successive chunks with text;
- TPOT: ``(E2EL - TTFT) / (output_len - 1)`` per request with more than one output token;
- E2EL: from sending the request to the end of its stream;
- throughputs divide completed requests and tokens (from the server's ``usage``) by the run's wall time;
- cache hit rate: the prompt tokens the server's prefix cache supplied
  (``usage.prompt_tokens_details.cached_tokens``) over all prompt tokens, of the successful
  requests whose server reports it; per turn too (``consult``: turns 2-4 should find the photo
  and the history cached).

Times are seconds in :class:`RequestResult` and the raw arrays, milliseconds in the aggregates
(``*_ms``), as in vLLM's result files.

The server side of a run (:class:`ServerUsage`): the CPU time of the server's process tree and
of its API-server process alone, and the RSS of the whole tree sampled on a thread
(:class:`MemorySampler`) while the run lasts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import psutil

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATISTICS = ("mean", "median", "std", "p90", "p99")


@dataclass
class RequestResult:
    """One chat request as the client saw it."""

    conversation: int
    """Index of the conversation (the unit of work) in the run."""
    turn: int = 1
    """1-based turn in the conversation; ``consult`` has four."""
    success: bool = False
    prompt_len: int = 0
    """``usage.prompt_tokens``: text tokens plus the image positions."""
    output_len: int = 0
    """``usage.completion_tokens``."""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    """End-to-end latency (E2EL)."""
    start: float = 0.0
    """Send time, seconds after the run began."""
    generated_text: str = ""
    error: str = ""
    status: int | None = None
    """HTTP status of a failed request (503: refused by admission control); None otherwise."""
    images: int = 0
    """Image parts in the request's messages, history included (the server decodes them all)."""
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``: prompt tokens found in the prefix cache;
    None when the server does not report it."""
    streamed: bool = True
    """False: the answer came whole (TTFT is its latency; no TPOT)."""

    @property
    def tpot(self) -> float | None:
        if not self.success or not self.streamed or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class LatencyStats:
    """One latency metric over a run, in milliseconds; zeros when there is no sample (as vLLM)."""

    mean: float
    median: float
    std: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            mean=float(ms.mean()), median=float(np.median(ms)), std=float(ms.std()),
            p90=float(np.percentile(ms, 90)), p99=float(np.percentile(ms, 99)),
        )


@dataclass(frozen=True)
class BenchmarkMetrics:
    """A run's aggregates. :meth:`to_json` flattens ``latency`` into ``{stat}_{metric}_ms`` keys."""

    completed: int
    failed: int
    duration: float
    """Seconds from the first request sent to the last response ended."""
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    latency: dict[str, LatencyStats]
    """Keyed by ``ttft``, ``tpot``, ``itl``, ``e2el``."""

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "latency"}
        for metric, stats in self.latency.items():
            for stat in STATISTICS:
                out[f"{stat}_{metric}_ms"] = getattr(stats, stat)
        return out


def compute_metrics(results: list[RequestResult], duration: float) -> BenchmarkMetrics:
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    per_second = 1.0 / duration if duration > 0 else 0.0
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(results) - len(done),
        duration=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) * per_second,
        output_throughput=total_out * per_second,
        total_token_throughput=(total_in + total_out) * per_second,
        latency={name: LatencyStats.of(values) for name, values in samples.items()},
    )


def raw_arrays(results: list[RequestResult]) -> dict[str, list]:
    """Per-request arrays saved in the result JSON (seconds), in send order."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "start_times": [r.start for r in results],
        "conversations": [r.conversation for r in results],
        "turns": [r.turn for r in results],
        "successes": [r.success for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "statuses": [r.status for r in results],
        "images": [r.images for r in results],
        "cached_tokens": [r.cached_tokens for r in results],
    }


def median_ttft_by_turn(results: list[RequestResult]) -> dict[str, float]:
    """Median TTFT (ms) of the successful requests of each turn, keyed by the turn number."""
    by_turn: dict[int, list[float]] = {}
    for r in results:
        if r.success:
            by_turn.setdefault(r.turn, []).append(r.ttft)
    return {str(t): float(np.median(v)) * 1000.0 for t, v in sorted(by_turn.items())}


def followup_ttft_ratio(results: list[RequestResult]) -> float | None:
    """Median TTFT of turns 2+ over that of turn 1 (``consult``: the prefix cache's effect)."""
    first = [r.ttft for r in results if r.success and r.turn == 1]
    later = [r.ttft for r in results if r.success and r.turn > 1]
    if not first or not later or np.median(first) == 0:
        return None
    return float(np.median(later) / np.median(first))


def cache_hit_rate(results: list[RequestResult], turns: range | None = None) -> float | None:
    """Cached prompt tokens over prompt tokens of the successful requests (of ``turns`` only, if
    given) that report cached tokens; None when there are none."""
    done = [r for r in results if r.success and r.cached_tokens is not None and r.prompt_len > 0
            and (turns is None or r.turn in turns)]
    prompt = sum(r.prompt_len for r in done)
    return sum(r.cached_tokens for r in done) / prompt if prompt else None


def cache_hit_rate_by_turn(results: list[RequestResult]) -> dict[str, float]:
    """:func:`cache_hit_rate` of each turn that has one, keyed by the turn number."""
    rates = {t: cache_hit_rate(results, range(t, t + 1)) for t in sorted({r.turn for r in results})}
    return {str(t): rate for t, rate in rates.items() if rate is not None}


FOLLOWUP_TURNS = range(2, 1_000)
"""The turns after the first (``consult``: 2-4)."""


def history_reuse(results: list[RequestResult]) -> float | None:
    """How much of the previous turn the prefix cache still held: over every successful later
    turn whose previous turn succeeded, its cached tokens over that previous turn's prompt and
    answer tokens. 1.0 at best, less a block's rounding (the cache reuses whole KV blocks, and
    the last generated token is never fed back); None without such turns."""
    done = {(r.conversation, r.turn): r for r in results if r.success and r.cached_tokens is not None}
    pairs = [(r, done[(c, t - 1)]) for (c, t), r in done.items() if (c, t - 1) in done]
    history = sum(prev.prompt_len + prev.output_len for _, prev in pairs)
    return sum(r.cached_tokens for r, _ in pairs) / history if history else None


def count_status(results: list[RequestResult], status: int) -> int:
    return sum(1 for r in results if r.status == status)


# --------------------------------------------------------------------------- the server's side


def tree_rss(processes: list[psutil.Process]) -> int:
    """Summed RSS of ``processes`` (those that exited count 0). Shared pages count once per
    process, as ``ps`` shows them."""
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class MemorySampler:
    """RSS of a process tree (the root and every descendant), read every ``interval_s`` on a
    thread while used as a context manager.

    On entry it takes the *idle* reading (the median of three, ``interval_s`` apart); then the
    thread samples until exit. Reading a known process's RSS is one small ``/proc`` read; the
    tree itself (a scan of the whole process table) is found again only every ``rescan_s``.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.05, rescan_s: float = 1.0) -> None:
        self.root = psutil.Process(root_pid)
        self.interval_s = interval_s
        self.rescan_s = rescan_s
        self.idle = 0
        self.times: list[float] = []
        """Seconds since entry of each sample."""
        self.rss: list[int] = []
        """Bytes, one per time."""
        self._tree: list[psutil.Process] = []
        self._scanned = -float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    @property
    def peak(self) -> int:
        """The largest reading, idle included."""
        return max(self.idle, *self.rss)

    def read(self) -> int:
        now = time.monotonic()
        if now - self._scanned >= self.rescan_s:
            try:
                self._tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._tree = []
            self._scanned = now
        return tree_rss(self._tree)

    def __enter__(self) -> MemorySampler:
        self._t0 = time.monotonic()
        idle = []
        for _ in range(3):
            idle.append(self.read())
            time.sleep(self.interval_s)
        self.idle = int(np.median(idle))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.read()
            self.times.append(time.monotonic() - self._t0)
            self.rss.append(rss)
            self._stop.wait(self.interval_s)


@dataclass(frozen=True)
class ServerUsage:
    """What a run cost the server; None where the harness cannot see it (an external endpoint)."""

    cpu_s: float | None = None
    """User + system CPU seconds of the whole process tree (API server, engine, workers)."""
    api_cpu_s: float | None = None
    """The same for the API-server process alone (the tree's leader: HTTP, JSON, photos)."""
    idle_rss: int | None = None
    """Bytes, the tree's RSS just before the run."""
    peak_rss: int | None = None
    """Bytes, the largest sample during the run."""
    rss_times: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    cpu_by_process: dict[str, float] | None = None
    """``cpu_s`` by kind of process (``serving.engine.process.process_label``)."""
    layout: dict | None = None
    """The pinned layout the run had (``--pin-engine``): CPUs and processes on each side."""

    @classmethod
    def of(cls, cpu_s: float | None, api_cpu_s: float | None, memory: MemorySampler | None) -> ServerUsage:
        if memory is None:
            return cls(cpu_s, api_cpu_s)
        return cls(cpu_s, api_cpu_s, memory.idle, memory.peak, list(memory.times), list(memory.rss))


def per_photo(results: list[RequestResult], usage: ServerUsage, concurrency: int | None) -> dict:
    """The server's cost per photo: CPU milliseconds per photo of the answered requests, and the
    RSS growth over idle per photo in flight at most (``concurrency`` x the most images one
    request carried, at most the run's photos)."""
    answered = sum(r.images for r in results if r.success)
    most = max((r.images for r in results), default=0)
    in_flight = min(sum(r.images for r in results), (concurrency or len(results)) * most)
    growth = None if usage.peak_rss is None else max(0, usage.peak_rss - usage.idle_rss)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None or answered == 0 else 1000.0 * seconds / answered

    return {
        "photos": sum(r.images for r in results),
        "photos_answered": answered,
        "photos_in_flight": in_flight,
        "server_cpu_ms_per_photo": ms(usage.cpu_s),
        "api_cpu_ms_per_photo": ms(usage.api_cpu_s),
        "rss_growth_bytes": growth,
        "rss_growth_per_photo_mib": None if growth is None or in_flight == 0 else growth / in_flight / 2**20,
    }
