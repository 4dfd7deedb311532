"""The load generator: conversations against one OpenAI-compatible endpoint, on the async ``openai`` SDK.

Like ``vllm bench serve``: arrivals are a Poisson process of ``request_rate`` per second (seeded;
``inf`` sends all at once) and at most ``max_concurrency`` conversations run at a time (closed loop
when the rate is ``inf``). Every request streams, with ``stream_options={"include_usage": True}``
for the token counts and the prompt tokens the server's prefix cache supplied
(``usage.prompt_tokens_details.cached_tokens``), unless ``stream`` is off: then each answer
comes whole, its TTFT is its end-to-end latency and it has no TPOT or ITL. Every turn of a
conversation carries the same ``x-session-id`` header, as a consult client sends it for Ray
Serve's session affinity (``session_ids=False``: no header). The run stops starting conversations after ``num_requests`` or
``max_duration_s``, whichever comes first; started conversations finish.

The client's own CPU time (``getrusage(RUSAGE_SELF)``, all threads, no child processes) over the
run is measured, because the client shares the machine with the server it measures. The client
never retries: a 503 from the server's admission control is a failed request, counted by status.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from dataclasses import dataclass

import httpx
import numpy as np
from openai import AsyncOpenAI
from tqdm.auto import tqdm

from benchmarks.metrics import RequestResult
from benchmarks.scenarios import Conversation, images_in


@dataclass(frozen=True)
class LoadConfig:
    max_concurrency: int | None = None
    """Conversations in flight at most; ``None``: no limit."""
    request_rate: float = math.inf
    """Poisson arrivals of conversations per second; ``inf``: all at once."""
    max_duration_s: float | None = None
    """Start no conversation after this many seconds."""
    max_tokens: int = 64
    temperature: float = 0.0
    """0: greedy, so every target generates the same lengths from the same weights."""
    seed: int = 0
    """Seeds the arrival times and each request's sampling seed."""
    show_progress: bool = True
    session_ids: bool = True
    """Send ``x-session-id: <run seed>-<conversation>`` with every turn (the embedded server
    ignores it; Ray's session router keeps a consult on one replica by it)."""
    stream: bool = True
    """Stream the answers (server-sent events); False: one JSON body per answer."""

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency is {self.max_concurrency}; it must be at least 1")
        if self.request_rate <= 0:
            raise ValueError(f"request_rate is {self.request_rate}; it must be positive (inf: all at once)")


@dataclass
class LoadResult:
    results: list[RequestResult]
    duration: float
    client_cpu_s: float
    sent: int

    @property
    def client_cpu_share(self) -> float:
        """Client CPU seconds per wall second (1.0 = one core busy)."""
        return self.client_cpu_s / self.duration if self.duration > 0 else 0.0


def make_client(base_url: str, timeout_s: float, api_key: str | None = None, connections: int = 256) -> AsyncOpenAI:
    """An SDK client that talks to ``base_url`` directly: no proxy from the environment, no retries."""
    http = httpx.AsyncClient(
        trust_env=False,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
    return AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", http_client=http, max_retries=0)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


SESSION_HEADER = "x-session-id"


def session_header(config: LoadConfig, conversation: int) -> dict[str, str] | None:
    return {SESSION_HEADER: f"{config.seed}-{conversation}"} if config.session_ids else None


def cached_tokens(usage) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens``; None when the server does not report it."""
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return getattr(details, "cached_tokens", None) if details else None


async def chat_request(
    client: AsyncOpenAI, model: str, messages: list[dict], config: LoadConfig, result: RequestResult, t0: float
) -> None:
    """Send one chat completion (streamed unless ``config.stream`` is off) and fill ``result``
    (times relative to ``t0``, perf_counter)."""
    start = time.perf_counter()
    result.start = start - t0
    result.streamed = config.stream
    text: list[str] = []
    last = start
    first: float | None = None
    usage = None
    try:
        request = dict(model=model, messages=messages, max_tokens=config.max_tokens,
                       temperature=config.temperature, seed=config.seed + result.conversation,
                       extra_headers=session_header(config, result.conversation))
        if not config.stream:
            answer = await client.chat.completions.create(**request)
            usage = answer.usage
            text.append(answer.choices[0].message.content or "")
        else:
            stream = await client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                now = time.perf_counter()
                usage = chunk.usage or usage
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = now
                    else:
                        result.itl.append(now - last)
                    last = now
                    text.append(chunk.choices[0].delta.content)
    except Exception as exc:  # every failure is data: kept in ``errors`` (and ``statuses``)
        result.error = f"{type(exc).__name__}: {exc}"
        result.status = getattr(exc, "status_code", None)  # openai.APIStatusError: 4xx/5xx
        result.latency = time.perf_counter() - start
        return
    end = time.perf_counter()
    result.latency = end - start
    # No streamed text (or none asked for): the end is the first sign of an answer.
    result.ttft = (first if first is not None else end) - start
    result.generated_text = "".join(text)
    result.prompt_len = usage.prompt_tokens if usage else 0
    result.output_len = usage.completion_tokens if usage else len(text)
    result.cached_tokens = cached_tokens(usage)
    result.success = True


async def run_conversation(
    client: AsyncOpenAI, model: str, conv: Conversation, config: LoadConfig, t0: float, on_done=None
) -> list[RequestResult]:
    """The conversation's turns in order, each with the history and the previous answers.

    A failed turn ends the conversation: later turns are not sent (they would lack an answer).
    """
    messages: list[dict] = []
    results = []
    for turn, content in enumerate(conv.user_turns, start=1):
        messages.append({"role": "user", "content": content})
        result = RequestResult(conversation=conv.index, turn=turn, images=images_in(messages))
        await chat_request(client, model, messages, config, result, t0)
        results.append(result)
        if on_done is not None:
            on_done(result)
        if not result.success:
            break
        messages.append({"role": "assistant", "content": result.generated_text})
    return results


def arrival_gaps(count: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each conversation: exponential gaps (Poisson arrivals), 0 if ``rate`` is inf."""
    if math.isinf(rate):
        return [0.0] * count
    return np.random.default_rng(seed).exponential(1.0 / rate, size=count).tolist()


async def run_load(
    client: AsyncOpenAI, model: str, conversations: list[Conversation], config: LoadConfig, label: str = ""
) -> LoadResult:
    """Send ``conversations`` under ``config``; return every request's result in send order."""
    limit = asyncio.Semaphore(config.max_concurrency or len(conversations) or 1)
    total_turns = sum(len(c.user_turns) for c in conversations)
    bar = tqdm(total=total_turns, desc=label or "requests", unit="req", disable=not config.show_progress)
    t0 = time.perf_counter()
    deadline = math.inf if config.max_duration_s is None else t0 + config.max_duration_s

    async def limited(conv: Conversation) -> list[RequestResult]:
        async with limit:
            if time.perf_counter() >= deadline:
                return []
            return await run_conversation(client, model, conv, config, t0, on_done=lambda _: bar.update())

    cpu0 = _cpu_seconds()
    tasks = []
    for conv, gap in zip(conversations, arrival_gaps(len(conversations), config.request_rate, config.seed)):
        await asyncio.sleep(gap)
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(limited(conv)))
    per_conversation = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    bar.close()
    results = sorted((r for rs in per_conversation for r in rs), key=lambda r: r.start)
    return LoadResult(results=results, duration=duration, client_cpu_s=cpu, sent=len(results))


async def warm_up(client: AsyncOpenAI, model: str, conversations: list[Conversation], config: LoadConfig) -> None:
    """Send the first turn of each warm-up conversation, one at a time; raise if any fails."""
    t0 = time.perf_counter()
    for conv in conversations:
        first = Conversation(conv.index, conv.user_turns[:1])
        (result,) = await run_conversation(client, model, first, config, t0)
        if not result.success:
            raise RuntimeError(f"warm-up request failed: {result.error}")
