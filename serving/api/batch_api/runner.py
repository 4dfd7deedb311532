"""One pass over a batch file in OpenAI's Batch format: read, check, answer, record, resume.

Shared by ``skingpt4 batch`` (:mod:`serving.batch`, records in an OUTPUT file) and the HTTP
Batch API (:mod:`serving.api.batch_api.service`, records in encrypted files), so a line is read,
checked, refused and recorded the same way wherever it comes from. What answers the checked
requests is an :class:`AnswerEngine`; where records go is a :class:`RecordLog`.

The lines and records, in OpenAI's Batch format, are :mod:`serving.api.batch_api.lines`'s.
Imports neither vLLM nor Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from serving.api.admission import Admission, BodyReservation
from serving.api.errors import ServingError
from serving.api.batch_api.lines import (
    BatchLine,
    LineError,
    TooLarge,
    count_lines,
    duplicate_line,
    parse_line,
    read_lines,
    refusal_record,
    response_record,
)
from serving.api.policy import ServePolicy

DEFAULT_MAX_CONCURRENCY = 64
# Waiting for memory or a decode slot is normal in a batch (the reader runs ahead of the engine);
# the server's 30 s admission timeout would turn that wait into 503s.
ADMISSION_TIMEOUT_S = 24 * 3600.0


# --- the engine --------------------------------------------------------------------------------


Answer = tuple[int, dict, "str | None"]  # (status, response body, request id)


class RecordLog(Protocol):
    """Where a run's records go: what it holds already (``done_ids``: custom_ids with a
    record; ``done_lines``: line numbers with an unattributable-line record), and one record
    appended durably (blocking: called from one writer thread)."""

    done_ids: set[str]
    done_lines: set[int]

    def write_record(self, record: dict) -> None: ...


class AnswerEngine(Protocol):
    """What answers the requests that passed the checks: :class:`serving.batch.run.BatchEngine`
    (one in-process engine), :class:`serving.batch.ray_serve.ServeEngine` (the LLM replicas of
    ``serve --ray``) or :class:`serving.api.batch_api.worker.AppEngine` (the server's own routes, for
    the HTTP Batch API). Everything else about a run (reading, checks, refusals, records,
    resuming) is :class:`BatchRun`'s, the same for all."""

    policy: ServePolicy

    @property
    def dead(self) -> bool: ...

    async def submit(self, route: str, body: dict) -> Awaitable[Answer]: ...


# --- one run over a file -----------------------------------------------------------------------


@dataclass
class BatchSummary:
    lines: int = 0  # lines read (blank lines aside)
    answered: int = 0  # records with status 200
    refused: int = 0  # records with a 4xx, and unattributable-line records
    skipped: int = 0  # already in OUTPUT
    failed: list[str] = field(default_factory=list)  # custom_ids of server errors, not written
    engine_died: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and not self.engine_died

    def describe(self) -> str:
        text = (f"{self.lines} lines: {self.answered} answered, {self.refused} refused (4xx or "
                f"bad line), {self.skipped} already in OUTPUT, {len(self.failed)} failed")
        if self.engine_died:
            text += "; the engine stopped, so the rest was not run"
        if not self.complete:
            text += "; rerun the same command to finish"
        return text


class Slots(Protocol):
    """Places for requests in flight: an ``asyncio.Semaphore``, or the HTTP service's share of
    a limit that several batches use at once (:class:`serving.api.batch_api.share.Share`)."""

    async def acquire(self) -> bool: ...

    def release(self) -> None: ...


class BatchRun:
    """One pass over INPUT: skip what the log holds, write a record for every other line.

    ``admission``: the byte budget and photo decoders the checks use (None: a private one,
    waiting as long as a batch needs). ``report_failures``: name each server error on stderr
    (the command line; the HTTP service keeps request details out of its logs). ``line_gate``:
    an async context manager held while a line is checked and answered (the HTTP service's
    :meth:`serving.api.admission.LiveTraffic.batch_slot`). ``slots``: where a request to run
    takes its place (default: ``max_concurrency`` of its own); recorded and refused lines take
    none, so a resumed batch skips its recorded lines without waiting for one."""

    def __init__(self, engine: AnswerEngine, log: RecordLog,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY, progress: bool = True, *,
                 admission: Admission | None = None, report_failures: bool = True,
                 line_gate=contextlib.nullcontext, slots: Slots | None = None) -> None:
        self.line_gate = line_gate
        self.engine = engine
        self.log = log
        self.policy = engine.policy
        self._own_admission = admission is None
        self.admission = admission or Admission(
            self.policy.max_inflight_bytes, self.policy.max_concurrent_decodes,
            queue_size=max_concurrency * self.policy.max_images_per_request + 1,
            timeout_s=ADMISSION_TIMEOUT_S, policy=self.policy,
        )
        self.slots: Slots = slots or asyncio.Semaphore(max_concurrency)
        self.progress = progress
        self.report_failures = report_failures
        self.stopping = False
        self._stopped = asyncio.Event()
        self.seen: dict[str, int] = {}  # custom_id -> the line that has it
        self.tasks: set[asyncio.Task] = set()
        self.summary = BatchSummary()
        self.bar = None
        self._writer = None

    async def run(self, input_path: Path) -> BatchSummary:
        with open(input_path, "rb") as f:
            return await self.run_stream(f, count_lines(input_path))

    async def run_stream(self, f: BinaryIO, total: int | None = None) -> BatchSummary:
        """The pass over the lines of ``f`` (``total``: its line count, for the progress bar)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="line", desc="skingpt4 batch",
                        file=sys.stderr, disable=not self.progress, mininterval=1.0,
                        dynamic_ncols=True)
        # One writer thread: fsync stays off the event loop and records never interleave.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-output")
        try:
            for line, raw in read_lines(f, self.policy.max_body_bytes):
                if self.engine.dead or self.stopping:
                    break
                await self._dispatch(line, raw)
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self._writer.shutdown(wait=True)
            self.bar.close()
            if self._own_admission:
                await self.admission.close()
        self.summary.engine_died = self.engine.dead
        return self.summary

    def stop(self) -> None:
        """End the pass now: read no further line and cancel the requests in flight (their
        lines get no record)."""
        self.stopping = True
        self._stopped.set()
        for task in self.tasks:
            task.cancel()

    async def _dispatch(self, line: int, raw: bytes | TooLarge) -> None:
        if isinstance(raw, bytes) and not raw.strip():
            self.bar.update()
            return
        self.summary.lines += 1
        if isinstance(raw, TooLarge):
            limit = self.policy.max_body_bytes
            return await self._line_error(LineError(
                line, "line_too_large",
                f"line {line} is {raw.size} bytes; the limit is {limit} bytes "
                f"({limit / 2**20:g} MiB)",
            ))
        # The line's bytes, reserved by the reader and released by the task that checks it
        # (a body of known size, taken whole: never more than the budget).
        reservation = self.admission.body(len(raw))
        started = False
        try:
            await reservation.cover(reservation.limit)
            job = self._decide(parse_line(line, raw))
            if self.stopping:  # stopped while this line waited for memory
                pass
            elif isinstance(job, LineError):
                await self._line_error(job)
            elif job is None:
                self.summary.skipped += 1
                self.bar.update()
            elif job.refusal is not None:
                await self._write(refusal_record(job.custom_id, job.refusal), refused=True)
            elif await self._take_slot():
                task = asyncio.create_task(self._serve(job, reservation))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                started = True
        finally:
            if not started:
                reservation.release()

    async def _take_slot(self) -> bool:
        """A place for a request (False: the run was stopped while it waited for one)."""
        if self.stopping:
            return False
        taking = asyncio.ensure_future(self.slots.acquire())
        stopped = asyncio.ensure_future(self._stopped.wait())
        waited = False
        try:
            await asyncio.wait((taking, stopped), return_when=asyncio.FIRST_COMPLETED)
            waited = True
        finally:
            stopped.cancel()
            taking.cancel()  # no effect once it has its place
            await asyncio.gather(taking, stopped, return_exceptions=True)
            got = not taking.cancelled() and taking.exception() is None
            if got and (self.stopping or not waited):  # stopped as the place came: hand it on
                self.slots.release()
                got = False
        return got

    def _decide(self, parsed: BatchLine | LineError) -> BatchLine | LineError | None:
        """What to do with a line: run or refuse it, report it, or None to skip it because
        OUTPUT already has its record."""
        if isinstance(parsed, BatchLine):
            first = self.seen.get(parsed.custom_id)
            if first is None:
                self.seen[parsed.custom_id] = parsed.line
                return None if parsed.custom_id in self.log.done_ids else parsed
            parsed = duplicate_line(parsed, first)
        return None if parsed.line in self.log.done_lines else parsed

    async def _line_error(self, error: LineError) -> None:
        if error.line in self.log.done_lines:
            self.summary.skipped += 1
            self.bar.update()
        else:
            await self._write(error.record(), refused=True)

    async def _serve(self, job: BatchLine, reservation: BodyReservation) -> None:
        """Check, run and record one request; holds one concurrency slot (and, while it is
        checked and answered, the line gate's)."""
        try:
            async with self.line_gate():
                try:
                    body = await self._check(job)
                    answer = await self.engine.submit(job.route, body)
                finally:
                    reservation.release()
                status, response, request_id = await answer
            if status >= 500:
                return self._failed(job, status, str(response.get("error", {}).get("message")))
            await self._write(response_record(job.custom_id, status, response, request_id),
                              refused=status != 200)
        except ServingError as error:
            if error.status >= 500:
                return self._failed(job, error.status, error.message)
            await self._write(refusal_record(job.custom_id, error), refused=True)
        except Exception as exc:  # a bug, not the request's fault: retried by a rerun
            self._failed(job, 500, type(exc).__name__)
        finally:
            self.slots.release()

    async def _check(self, job: BatchLine) -> dict:
        """The server's request pipeline: contract, photos decoded once and forwarded small,
        ### stop."""
        from serving.api.pipeline import prepare_request  # imports torch: not at the CLI's start

        return await prepare_request(job.route, job.body, self.policy, self.admission)

    async def _write(self, record: dict, refused: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.log.write_record, record)
        if refused:
            self.summary.refused += 1
        else:
            self.summary.answered += 1
        self.bar.update()

    def _failed(self, job: BatchLine, status: int, message: str) -> None:
        from tqdm import tqdm

        self.summary.failed.append(job.custom_id)
        self.bar.update()
        if self.report_failures:
            tqdm.write(f"skingpt4 batch: {job.custom_id!r} (line {job.line}) failed with {status}: "
                       f"{message[:300]}; not written, a rerun retries it", file=sys.stderr)


async def run_batch(engine: AnswerEngine, input_path: Path, log: RecordLog, *,
                    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                    progress: bool = True) -> BatchSummary:
    """Answer every line of ``input_path`` that ``log`` does not hold yet."""
    return await BatchRun(engine, log, max_concurrency, progress).run(input_path)

