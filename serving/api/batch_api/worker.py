"""The Batch API's worker: the state machine that takes each batch from ``validating`` through
``in_progress`` and ``finalizing`` to ``completed``, ``failed``, ``cancelled`` or ``expired``,
tenants side by side (each tenant's oldest :data:`BATCHES_PER_TENANT`; the places for
requests in flight shared by :class:`serving.api.batch_api.share.FairShare`), and the expiry of
stored files.

A batch's requests run through :class:`serving.api.batch_api.runner.BatchRun`, answered by the
server's own app in this process (:class:`AppEngine`) at vLLM priority :data:`BATCH_PRIORITY`.
Records are written as each request finishes; a batch a stopped or killed server left resumes
on its next start, its recorded lines skipped, so every ``custom_id`` gets exactly one record.
Lines that failed with a server error are tried again, at most :data:`MAX_PASSES` passes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import uuid
from typing import Any

from serving.api.admission import Admission, LiveTraffic
from serving.api.errors import InternalError, error_for_status
from serving.api.http import call_app, error_message
from serving.api.batch_api import sealed
from serving.api.batch_api.async_store import AsyncStore
from serving.api.batch_api.lines import response_record
from serving.api.batch_api.records import SplitLog, batch_error, record_unrun, validate_lines
from serving.api.batch_api.runner import Answer, BatchRun
from serving.api.batch_api.share import FairShare
from serving.api.batch_api.store import UNFINISHED, tenant_key_id
from serving.api.metrics import metrics
from serving.api.observe import with_request_id
from serving.api.policy import ServePolicy
from serving.api.routes import HEALTH
from serving.api.strict_json import dump_json

logger = logging.getLogger("skingpt4.batches")

BATCH_PRIORITY = 10  # vLLM schedules lower values first; live requests have 0
MAX_PASSES = 3  # passes over a batch's lines that failed with a server error
RETRY_DELAYS_S = (5.0, 30.0)  # before the second and third pass
PROGRESS_EVERY_S = 1.0
BATCHES_PER_TENANT = 2  # a tenant's batches advanced at once (the next one's validation and
# start overlap the last lines and the pauses between passes of the one before)
MAX_BATCHES_RUNNING = 64  # batches advanced at once, all tenants together
BUG_PAUSE_S = 30.0  # before a batch that could not advance (a bug) is tried again


# --- what answers a batch's requests -----------------------------------------------------------


def sub_scope(template: dict, route: str, body: bytes) -> dict:
    """An HTTP scope for a request to ``route`` made in this process, from ``template`` (a
    scope the server itself received: its app, server and state)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    keep = {k: template[k] for k in ("app", "state", "server", "asgi", "root_path") if k in template}
    return keep | {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
                   "path": route, "raw_path": route.encode(), "query_string": b"",
                   "headers": headers, "client": ("127.0.0.1", 0)}


class AppEngine:
    """An :class:`serving.api.batch_api.runner.AnswerEngine` that answers a checked request through
    the server's own app in this process (vLLM's routes embedded, the ingress's on Ray), at the
    batch priority, after the same context check as a live request."""

    dead = False

    def __init__(self, app, policy: ServePolicy, max_tokens, template: dict) -> None:
        self.app, self.policy, self.max_tokens, self.template = app, policy, max_tokens, template

    async def submit(self, route: str, body: dict):
        return self.answer(route, body)

    async def answer(self, route: str, body: dict) -> Answer:
        """The line's answer, with the request id it went to vLLM with (its record's)."""
        started = time.monotonic()
        request_id = "batch_req_" + uuid.uuid4().hex
        try:
            if self.max_tokens is not None:  # None: the app's replicas check (Ray mode)
                await self.max_tokens.check(sub_scope(self.template, route, b""), route, body)
            raw = dump_json(dict(body, priority=BATCH_PRIORITY))
            scope = with_request_id(sub_scope(self.template, route, raw), request_id)
            status, out = await call_app(self.app, scope, raw)
        finally:
            metrics().batch_line_seconds.observe(time.monotonic() - started)
        if status == 200:
            return 200, json.loads(out), request_id
        error = error_for_status(status, *error_message(status, out)).to_dict()
        return status, error, request_id


def _count_record(tenant_id: str):
    """Counts each record a batch's log writes, as answered or not (its request_counts)."""
    counter = metrics().batch_line_outcomes

    def count(answered: bool) -> None:
        counter.inc((tenant_id, "completed" if answered else "failed"))

    return count


# --- which batches advance -----------------------------------------------------------------------


class Running:
    """A batch being advanced: its task, its current pass, and what wakes it between passes."""

    def __init__(self, batch_id: str, tenant: str) -> None:
        self.batch_id, self.tenant = batch_id, tenant
        self.task: asyncio.Task | None = None
        self.run: BatchRun | None = None
        self.woken = asyncio.Event()  # a cancel: no more waiting between passes

    def stop(self) -> None:
        self.woken.set()
        if self.run is not None:
            self.run.stop()


def next_to_run(pending: list[tuple[str, str]],
                running: dict[str, Any]) -> list[tuple[str, str]]:
    """Which of the ``pending`` batches (``(id, tenant)``, oldest first) to start advancing,
    beside the ``running`` ones: each tenant's oldest, up to :data:`BATCHES_PER_TENANT` per
    tenant, taken one tenant at a time (every tenant's first, then every tenant's second)
    within :data:`MAX_BATCHES_RUNNING` in all."""
    queues: dict[str, list[str]] = {}
    for batch_id, tenant in pending:
        queues.setdefault(tenant, []).append(batch_id)
    start: list[tuple[str, str]] = []
    room = MAX_BATCHES_RUNNING - len(running)
    for depth in range(BATCHES_PER_TENANT):
        for tenant, queue in queues.items():
            if depth < len(queue) and queue[depth] not in running and len(start) < room:
                start.append((queue[depth], tenant))
    return start


# --- the worker ----------------------------------------------------------------------------------


class BatchWorker:
    """Advances the store's unfinished batches (each in a task of its own) and deletes expired
    files. ``admission``: the batch checks' own byte budget; ``share``: the tenants' places for
    requests in flight; ``template``: a scope the server received (its app, server and state),
    set before :meth:`start`."""

    def __init__(self, policy: ServePolicy, app, max_tokens, live: LiveTraffic,
                 admission: Admission, share: FairShare, store: AsyncStore) -> None:
        self.policy, self.app, self.max_tokens, self.live = policy, app, max_tokens, live
        self.admission, self.share, self.store = admission, share, store
        self.template: dict | None = None
        self.running: dict[str, Running] = {}
        self.closing = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        # Outside the context of the request that started them (a task copies the context it
        # is made in): their errors carry no request's id.
        self._tasks = [asyncio.create_task(self._work(), name="batch-worker",
                                           context=contextvars.Context()),
                       asyncio.create_task(self._expire(), name="file-expiry",
                                           context=contextvars.Context())]

    async def stop(self) -> None:
        """Stop the running batches where they are (nothing more is recorded; the next start
        resumes them)."""
        self.closing = True
        running = list(self.running.values())
        for batch in running:
            batch.stop()
        tasks = self._tasks + [b.task for b in running if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look at the store's unfinished batches again (one was created, or cancelled)."""
        self._wake.set()

    def cancelled(self, batch_id: str) -> None:
        """``batch_id`` is now cancelling: stop its pass where it is."""
        if batch_id in self.running:
            self.running[batch_id].stop()
        self._wake.set()

    async def _work(self) -> None:
        """Keep the unfinished batches advancing: each in a task of its own, at most
        :data:`BATCHES_PER_TENANT` per tenant (its oldest) and :data:`MAX_BATCHES_RUNNING` in
        all, taken a tenant at a time so that no tenant's queue holds another's."""
        while True:
            self._wake.clear()
            try:
                pending = await self.store.unfinished_batches()
            except Exception:  # the store could not be read: tried again after a pause
                logger.exception("the unfinished batches could not be listed")
                await asyncio.sleep(BUG_PAUSE_S)
                continue
            for batch_id, tenant in next_to_run(pending, self.running):
                running = Running(batch_id, tenant)
                self.running[batch_id] = running
                running.task = asyncio.create_task(self._drive(running),
                                                   name=f"batch-{batch_id[-8:]}")
            await self._wake.wait()

    async def _drive(self, running: Running) -> None:
        """Advance one batch until it is final (or the service stops)."""
        try:
            while not self.closing:
                batch = await self.store.batch(running.batch_id)
                if batch is None or batch["status"] not in UNFINISHED:
                    return
                try:
                    await self._advance(batch, running)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug: the batch stays as it is, retried after a pause
                    logger.exception("batch %s could not advance", running.batch_id)
                    await asyncio.sleep(BUG_PAUSE_S)
        finally:
            self.running.pop(running.batch_id, None)
            self._wake.set()  # a place for the next batch

    async def _advance(self, batch: dict, running: Running) -> None:
        """One step of a batch: validating -> in_progress -> finalizing -> a final status."""
        status = batch["status"]
        if status == "validating":
            await self._validate(batch)
        elif status == "in_progress":
            await self._execute(batch, running)
        elif status == "cancelling":
            await self._finalize(batch, "cancelled")
        elif status == "finalizing":
            await self._finalize(batch, "expired" if batch["expired_at"] else "completed")

    async def _input(self, batch: dict):
        row = await self.store.file(batch["input_file_id"], hidden=True)
        if row is None:
            return None
        return await self.store.open_file(row)

    async def _validate(self, batch: dict) -> None:
        reader = await self._input(batch)
        if reader is None:
            errors = [batch_error("missing_file", "the input file was deleted before the batch "
                                  "started", "input_file_id")]
            total = 0
        else:
            try:
                errors, total = await asyncio.to_thread(
                    validate_lines, reader, batch["endpoint"], self.policy)
            finally:
                reader.close()
        now = int(time.time())
        if errors:
            await self.store.update_batch(batch["id"], status="failed", failed_at=now,
                                          errors={"object": "list", "data": errors})
        elif batch["status"] == "validating":
            current = await self.store.batch(batch["id"])
            if current["status"] == "validating":  # not cancelled meanwhile
                await self.store.update_batch(
                    batch["id"], status="in_progress", in_progress_at=now,
                    request_counts={"total": total, "completed": 0, "failed": 0})

    async def _open_log(self, batch: dict) -> SplitLog:
        tenant, out_id, err_id = await self.store.batch_files(batch["id"])
        writers = []
        for file_id in (out_id, err_id):
            row = await self.store.file(file_id, hidden=True)
            if row is None:  # first start of this batch
                row = await self.store.add_file(
                    file_id, tenant, "batch_output",
                    f"{batch['id']}_{'output' if file_id == out_id else 'error'}.jsonl",
                    0, sealed.new_data_key(), None, visible=False)
            writers.append(await self.store.append_to(row))
        return SplitLog(*writers, on_record=_count_record(tenant_key_id(tenant)))

    async def _execute(self, batch: dict, running: Running) -> None:
        log = await self._open_log(batch)
        engine = AppEngine(self.app, self.policy, self.max_tokens, self.template or {})
        progress = asyncio.create_task(self._report(batch, log))
        share = self.share.share(running.tenant, (batch["created_at"], batch["id"]))
        outcome = "finalizing"
        try:
            for attempt in range(MAX_PASSES):
                if attempt:
                    delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1]
                    with contextlib.suppress(TimeoutError):  # woken early by a cancel
                        await asyncio.wait_for(running.woken.wait(), delay)
                summary = await self._pass(batch, log, engine, running, share)
                if summary is None or summary.complete:
                    break
                if attempt + 1 < MAX_PASSES:
                    metrics().batch_line_outcomes.inc(
                        (tenant_key_id(running.tenant), "retried"), len(summary.failed))
            else:  # still failing after every pass: recorded, so the batch can finish
                if not await self._healthy():
                    return  # the server is going down or its engine died: resumed on restart
                for custom_id in summary.failed:
                    await self.store.run(log.write_record, response_record(
                        custom_id, 500, InternalError(
                            f"the request failed {MAX_PASSES} times with a server error"
                        ).to_dict()))
            if self.closing:
                return
            current = await self.store.batch(batch["id"])
            if current["status"] == "cancelling":
                outcome = "cancelling"
            elif time.time() >= batch["expires_at"]:
                outcome = "expired"
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            await self._save_counts(batch, log)
            await self.store.run(log.close)
        if outcome == "cancelling":
            return  # _advance finalizes it as cancelled
        now = int(time.time())
        fields = {"status": "finalizing", "finalizing_at": now}
        if outcome == "expired":
            fields["expired_at"] = now
        await self.store.update_batch(batch["id"], **fields)

    async def _pass(self, batch: dict, log: SplitLog, engine: AppEngine, running: Running,
                    share) -> Any:
        """One pass of the runner over the input, its requests taking their places from the
        tenant's ``share``; None when it was stopped (cancel, expiry, shutdown)."""
        current = await self.store.batch(batch["id"])
        if current["status"] != "in_progress" or running.woken.is_set():
            return None  # cancelled since the last pass
        reader = await self._input(batch)
        if reader is None:
            return None
        run = BatchRun(engine, log, self.policy.batch_max_inflight, progress=False,
                       admission=self.admission, report_failures=False,
                       line_gate=self.live.batch_slot, slots=share)
        running.run = run
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, batch["expires_at"] - time.time()), run.stop)
        try:
            if self.closing or running.woken.is_set():
                return None
            summary = await run.run_stream(reader)
        finally:
            expiry.cancel()
            running.run = None
            reader.close()
        return None if run.stopping else summary

    async def _healthy(self) -> bool:

        if self.closing:
            return False
        scope = dict(sub_scope(self.template or {}, HEALTH, b""), method="GET")
        try:
            status, _ = await call_app(self.app, scope, b"")
        except Exception:
            return False
        return status == 200

    async def _report(self, batch: dict, log: SplitLog) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            await self._save_counts(batch, log)

    async def _save_counts(self, batch: dict, log: SplitLog) -> None:
        current = await self.store.batch(batch["id"])
        counts = dict(current["request_counts"], completed=log.completed, failed=log.failed)
        if counts != current["request_counts"]:
            await self.store.update_batch(batch["id"], request_counts=counts)

    async def _finalize(self, batch: dict, status: str) -> None:
        """Every line without a record gets one (``batch_cancelled`` / ``batch_expired``), the
        output and error files are published, and the batch takes its final ``status``."""
        log = await self._open_log(batch)
        try:
            if status in ("cancelled", "expired"):
                reader = await self._input(batch)
                if reader is not None:
                    try:
                        await asyncio.to_thread(record_unrun, reader, log, status, self.policy)
                    finally:
                        reader.close()
            out, err = log.output, log.errors
            await self.store.run(out.sync)
            await self.store.run(err.sync)
        finally:
            await self.store.run(log.close)
        tenant, out_id, err_id = await self.store.batch_files(batch["id"])
        files = {}
        now = int(time.time())
        expires_at = now + int(self.policy.file_retention_hours * 3600)
        for name, file_id, writer in (("output_file_id", out_id, out), ("error_file_id", err_id, err)):
            if writer.frames:
                await self.store.show_file(file_id, writer.plain_bytes, expires_at)
                files[name] = file_id
            else:
                await self.store.delete_file(file_id)
        current = await self.store.batch(batch["id"])
        counts = dict(current["request_counts"], completed=log.completed, failed=log.failed)
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}[status]
        await self.store.update_batch(batch["id"], status=status, request_counts=counts,
                                      **{stamp: current.get(stamp) or now}, **files)

    async def _expire(self) -> None:
        """Delete files past their retention (checked every minute, or more often for short
        retentions), unless a running batch still uses them."""
        every = min(60.0, max(1.0, self.policy.file_retention_hours * 3600 / 10))
        while True:
            for file_id in await self.store.expired_files(time.time()):
                if not await self.store.file_in_use(file_id):
                    await self.store.delete_file(file_id)
            await asyncio.sleep(every)
