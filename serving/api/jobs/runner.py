"""One pass over a batch file in OpenAI's Batch format: read, check, answer, record, resume.

Shared by ``skingpt4 batch`` (:mod:`serving.batch`, records in an OUTPUT file) and the HTTP
Batch API (:mod:`serving.api.jobs.service`, records in encrypted files), so a line is read,
checked, refused and recorded the same way wherever it comes from. What answers the checked
requests is an :class:`AnswerEngine`; where records go is a :class:`RecordLog`.

Input, one JSON object a line::

    {"custom_id": "case-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Records, one JSON object a line (OpenAI's Batch output format)::

    {"id": "batch_req_...", "custom_id": "case-17",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

A refused request has its 4xx status and OpenAI error body in ``response``; a line that cannot be
attributed to a ``custom_id`` has ``custom_id`` and ``response`` null and ``error`` =
``{"code", "message", "param", "line"}``. Server errors (5xx) are not recorded: a later pass
retries them. Imports neither vLLM nor Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from serving.api.admission import Admission
from serving.api.contract import CHAT_ROUTE, COMPLETIONS_ROUTE
from serving.api.errors import InvalidRequest, NotFound, ServingError
from serving.api.policy import BODY_COST_FACTOR, ServePolicy
from serving.api.strict_json import parse_json

ROUTES = (CHAT_ROUTE, COMPLETIONS_ROUTE)
LINE_KEYS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID_CHARS = 512
DEFAULT_MAX_CONCURRENCY = 64
# Waiting for memory or a decode slot is normal in a batch (the reader runs ahead of the engine);
# the server's 30 s admission timeout would turn that wait into 503s.
ADMISSION_TIMEOUT_S = 24 * 3600.0


# --- records ----------------------------------------------------------------------------------


def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(custom_id: str, status: int, body: dict, request_id: str | None = None) -> dict:
    """A request that got an HTTP answer (200, or the 4xx the server would send)."""
    return {
        "id": _record_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": None,
    }


def refusal_record(custom_id: str, error: ServingError) -> dict:
    """The status and OpenAI error body the server's middleware sends for ``error``."""
    return response_record(custom_id, error.status, error.to_dict())


@dataclass(frozen=True)
class LineError:
    """A line that cannot be attributed to a ``custom_id``; reported by its line number."""

    line: int
    code: str
    message: str
    param: str | None = None

    def record(self) -> dict:
        error = {"code": self.code, "message": self.message, "param": self.param, "line": self.line}
        return {"id": _record_id(), "custom_id": None, "response": None, "error": error}


def encode_record(record: dict) -> bytes:
    """One line of JSON (strings escape their newlines), UTF-8."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything instead
        return (json.dumps(record) + "\n").encode("ascii")


def record_key(raw: bytes) -> tuple[str, str | int] | None:
    """``("id", custom_id)`` or ``("line", n)`` for an output record; None for anything else."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or "custom_id" not in record:
        return None
    custom_id = record["custom_id"]
    if isinstance(custom_id, str) and custom_id:
        return ("id", custom_id)
    error = record.get("error")
    if custom_id is None and isinstance(error, dict) and type(error.get("line")) is int:
        return ("line", error["line"])
    return None


# --- INPUT: lines and their envelope -----------------------------------------------------------


@dataclass(frozen=True)
class TooLarge:
    size: int


def read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | TooLarge]]:
    """(1-based line number, bytes) for each line; a line over ``limit`` bytes is skipped
    without being held in memory, and reported as :class:`TooLarge`."""
    number = 0
    while raw := f.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            size = len(raw)
            while chunk := f.readline(2**20):
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield number, TooLarge(size)
        else:
            yield number, raw


def count_lines(path: Path) -> int:
    """Lines in ``path`` (the progress bar's total), without reading it as lines."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


@dataclass
class BatchLine:
    """A line with a usable ``custom_id``: a request to check and run, or its refusal."""

    line: int
    custom_id: str
    route: str = ""
    body: Any = None
    refusal: ServingError | None = None


def parse_line(line: int, raw: bytes) -> BatchLine | LineError:
    """The line's ``custom_id`` and request, or why it cannot be attributed."""

    try:
        obj = parse_json(raw)
    except InvalidRequest as exc:
        message = exc.message  # "the request body is not valid JSON (...)": name the line
        if "the request body" in message:
            message = message.replace("the request body", f"line {line}", 1)
        else:
            message = f"line {line}: {message}"
        return LineError(line, "invalid_json_line", message)
    if not isinstance(obj, dict):
        return LineError(
            line, "invalid_json_line",
            f"line {line} is a JSON {type(obj).__name__}, not an object with custom_id, method, "
            "url and body",
        )
    custom_id = obj.get("custom_id")
    if custom_id is None:
        return LineError(
            line, "missing_custom_id",
            f"line {line} has no custom_id; each line needs a unique custom_id to match its answer",
            "custom_id",
        )
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return LineError(
            line, "invalid_custom_id",
            f"line {line}: custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters "
            f"(got {type(custom_id).__name__})",
            "custom_id",
        )
    try:
        route, body = check_envelope(obj)
    except ServingError as error:
        return BatchLine(line, custom_id, refusal=error)
    return BatchLine(line, custom_id, route, body)


def duplicate_line(line: BatchLine, first: int) -> LineError:
    """A line whose ``custom_id`` line ``first`` already has."""
    return LineError(
        line.line, "duplicate_custom_id",
        f"line {line.line}: custom_id {line.custom_id!r} is already used on line {first}; "
        "custom_ids must be unique, so this line was not run", "custom_id",
    )


def check_envelope(obj: dict) -> tuple[str, Any]:
    """The route and body of a batch line; refuse what the server would not serve as asked."""
    for key in obj:
        if key not in LINE_KEYS:
            raise InvalidRequest(
                f"unknown field {key!r} in the batch line; a line holds {', '.join(LINE_KEYS)}",
                param=str(key),
            )
    method = obj.get("method")
    if method != "POST":
        raise InvalidRequest(f"method is {method!r}; batch requests use POST", param="method")
    url = obj.get("url")
    if url not in ROUTES:
        raise NotFound(
            f"url {url!r} is not served; a batch line calls {' or '.join(ROUTES)}", param="url"
        )
    if "body" not in obj:
        raise InvalidRequest(f"body is missing: the {url} request", param="body")
    body = obj["body"]
    if isinstance(body, dict) and body.get("stream") is True:
        raise InvalidRequest(
            "stream: a batch answer is one whole response; remove stream", param="stream"
        )
    return url, body


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
    ``serve --ray``) or :class:`serving.api.jobs.service.AppEngine` (the server's own routes, for
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


class _Reservation:
    """A line's bytes, reserved from the admission budget by the reader and released by the
    task that checks the line (once, from any task)."""

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self._admission = admission
        self._nbytes = min(nbytes, admission.max_bytes)
        self._held = False

    async def acquire(self) -> None:
        await self._admission.reserve(self._nbytes, self._admission.deadline())
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.release(self._nbytes)


class Slots(Protocol):
    """Places for requests in flight: an ``asyncio.Semaphore``, or the HTTP service's share of
    a limit that several batches use at once (:class:`serving.api.jobs.share.Share`)."""

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
        reservation = _Reservation(self.admission, BODY_COST_FACTOR * len(raw))
        started = False
        try:
            await reservation.acquire()
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
                await reservation.release()

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

    async def _serve(self, job: BatchLine, reservation: _Reservation) -> None:
        """Check, run and record one request; holds one concurrency slot (and, while it is
        checked and answered, the line gate's)."""
        try:
            async with self.line_gate():
                try:
                    body = await self._check(job)
                    answer = await self.engine.submit(job.route, body)
                finally:
                    await reservation.release()
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

