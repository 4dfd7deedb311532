"""Per-request results and their aggregates, named as ``vllm bench serve`` names them.

Follows vLLM's ``benchmarks/serve.py`` (``calculate_metrics``):

- TTFT: from sending the request to the first streamed chunk with text;
- ITL: the gaps between successive chunks with text;
- TPOT: ``(E2EL - TTFT) / (output_len - 1)`` per request with more than one output token;
- E2EL: from sending the request to the end of its stream;
- throughputs divide completed requests and tokens (from the server's ``usage``) by the run's wall time.

Times are seconds in :class:`RequestResult` and the raw arrays, milliseconds in the aggregates
(``*_ms``), as in vLLM's result files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len < 2:
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
