"""Hugging Face ``generate`` behind a queue: the engine of both benchmark baselines (``hf_server``).

A worker thread takes jobs from a queue and runs them through ``ReferencePipeline.lm.generate``:

- ``max_batch_size=1``: the original SkinGPT-4 demo (MiniGPT-4 ``Chat.answer``), one request at a
  time, batch 1, in arrival order;
- ``max_batch_size>1``: static batching. The oldest waiting job plus compatible ones (same sampling
  settings) that wait now or arrive within ``batch_wait_s``; their (1, T_i, H) prompt embeddings are
  left-padded into one (B, T_max, H) batch with a (B, T_max) attention mask (``generate`` derives the
  position ids from it) and run in one ``generate``. Jobs that arrive meanwhile wait for the next batch.

A stopping criterion called after every step streams each row's new token to its job (so time to
first token is real) and ends rows one by one: EOS, ``###`` in the row's text (MiniGPT-4
``StoppingCriteriaSub``), the row's own ``max_tokens``, or a client that went away. A finished row's
slot stays idle until the whole batch ends: that is static batching's cost.

``close()`` (or leaving ``with HFEngine(...)``) stops the worker: the running batch's rows are
cancelled (they end at the next step), jobs still waiting get an ``error`` event, and the thread is joined.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from benchmarks.reference import ReferencePipeline
from plugins.skingpt4.template import SEP

FinishReason = Literal["stop", "length", "abort"]

_CLOSE = object()  # put in the inbox by ``close()`` to wake the worker


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings; ``temperature == 0`` is greedy."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    """Seeds ``torch`` before the batch; in a batch of several, the first job's seed counts."""

    @property
    def batch_key(self) -> tuple[float, float]:
        """Requests share one ``generate`` only when these match (HF takes one setting per call)."""
        return (self.temperature, 1.0 if self.temperature == 0 else self.top_p)


@dataclass
class Job:
    """One chat request, from the HTTP handler to the worker thread and back as events.

    Events on ``events``: ``("start", prompt_len)``, ``("token", token_id)``, ``("done", finish_reason)``
    or ``("error", message)``.
    """

    prompt: str
    images: list[Image.Image]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def finish(self, reason: FinishReason) -> None:
        self.finished = True
        self.emit("done", reason)


class _BatchMonitor(StoppingCriteria):
    """Called by ``generate`` after every step: streams each row's new token, decides per row whether
    it is done (EOS, ``###`` in its text as MiniGPT-4's ``StoppingCriteriaSub``, its own ``max_tokens``,
    or the client went away) and returns the (B,) done mask."""

    def __init__(self, jobs: list[Job], tokenizer) -> None:
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id

    def _row_reason(self, job: Job, token: int) -> FinishReason | None:
        if token == self.eos:
            return "stop"
        if SEP in self.tokenizer.decode(job.token_ids, skip_special_tokens=True):
            return "stop"
        if len(job.token_ids) >= job.sampling.max_tokens:
            return "length"
        return "abort" if job.cancelled else None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()  # (B,) the token just generated per row
        for row, job in enumerate(self.jobs):
            if job.finished:
                continue
            job.token_ids.append(last[row])
            job.emit("token", last[row])
            reason = self._row_reason(job, last[row])
            if reason is not None:
                job.finish(reason)
        return torch.tensor([job.finished for job in self.jobs], device=input_ids.device)


def left_pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T_i, H) prompts -> (B, T_max, H) embeddings, zeros on the left, and the (B, T_max) mask."""
    longest = max(e.shape[1] for e in embeds)
    hidden = embeds[0].shape[2]
    batch = embeds[0].new_zeros((len(embeds), longest, hidden))  # (B, T_max, H)
    mask = torch.zeros((len(embeds), longest), dtype=torch.long, device=embeds[0].device)
    for row, e in enumerate(embeds):
        batch[row, longest - e.shape[1]:] = e[0]
        mask[row, longest - e.shape[1]:] = 1
    return batch, mask


class HFEngine:
    """A worker thread that runs batches of jobs through ``ReferencePipeline.lm.generate``.

    ``max_batch_size=1`` is the reference demo; larger sizes are static batching.
    """

    def __init__(self, pipeline: ReferencePipeline, max_batch_size: int = 1, batch_wait_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size is {max_batch_size}; it must be at least 1")
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._inbox: queue.Queue[Job | object] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the inbox but left for a later batch
        self._closing = threading.Event()
        self._running: list[Job] = []  # the batch in ``generate`` now
        self.batch_sizes: list[int] = []
        self.thread = threading.Thread(target=self._serve_forever, name="hf-generate", daemon=True)
        self.thread.start()

    def __enter__(self) -> HFEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise RuntimeError("the HF engine is closed; it takes no more jobs")
        self._inbox.put(job)

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the worker thread: cancel the running batch, fail the waiting jobs, join the thread.
        Idempotent."""
        if not self._closing.is_set():
            self._closing.set()
            for job in list(self._running):
                job.cancelled = True  # ``_BatchMonitor`` ends the row at the next step
            self._inbox.put(_CLOSE)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the HF engine's worker did not stop within {timeout_s} s")

    def _take(self, timeout: float | None) -> Job | object | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def next_batch(self) -> list[Job]:
        """The oldest job plus compatible ones waiting now or arriving within the wait window;
        empty once ``close()`` was called."""
        first = self._take(timeout=None)
        if first is _CLOSE or self._closing.is_set():
            if first is not _CLOSE:
                self._held.appendleft(first)  # left for ``_fail_waiting``
            return []
        batch, skipped = [first], []
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            job = self._take(timeout=max(0.0, deadline - time.monotonic()))
            if job is None or job is _CLOSE:
                break
            (batch if job.sampling.batch_key == first.sampling.batch_key else skipped).append(job)
        self._held.extendleft(reversed(skipped))
        return batch

    def _serve_forever(self) -> None:
        while not self._closing.is_set():
            batch = [job for job in self.next_batch() if not job.cancelled]
            if batch and not self._closing.is_set():
                self.run_batch(batch)
            else:
                self._held.extendleft(reversed(batch))
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Answer every job that will now never run, so no client waits forever."""
        while True:
            job = self._take(timeout=0)
            if job is None:
                return
            if job is not _CLOSE and not job.finished:
                job.finished = True
                try:
                    job.emit("error", "the HF engine was closed before this request ran")
                except RuntimeError:  # its event loop is gone: nobody is waiting
                    pass

    def _embed(self, jobs: list[Job]) -> tuple[list[Job], list[torch.Tensor]]:
        ready, embeds = [], []
        for job in jobs:
            try:
                e = self.pipeline.embed_prompt(job.prompt, job.images)  # (1, T_i, H)
            except Exception as exc:  # a bad request must not take the batch down
                job.finished = True
                job.emit("error", f"{type(exc).__name__}: {exc}")
                continue
            job.emit("start", e.shape[1])
            ready.append(job)
            embeds.append(e)
        return ready, embeds

    @torch.inference_mode()
    def run_batch(self, jobs: list[Job]) -> None:
        jobs, embeds = self._embed(jobs)
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))
        self._running = jobs
        if self._closing.is_set():  # close() may have missed this batch
            for job in jobs:
                job.cancelled = True
        inputs, mask = left_pad(embeds)
        sampling = jobs[0].sampling
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        greedy = sampling.temperature == 0
        kwargs = dict(
            inputs_embeds=inputs,
            attention_mask=mask,
            max_new_tokens=max(job.sampling.max_tokens for job in jobs),
            do_sample=not greedy,
            repetition_penalty=1.0,
            pad_token_id=self.pipeline.tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_BatchMonitor(jobs, self.pipeline.tokenizer)]),
        )
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        try:
            self.pipeline.lm.generate(**kwargs)
        except Exception as exc:
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.emit("error", f"generate failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._running = []
        for job in jobs:
            if not job.finished:
                job.finish("length")
