"""The OpenAI Files and Batch API over HTTP: ``/v1/files`` and ``/v1/batches``.

A platform uploads a JSONL file of requests (``client.files.create(purpose="batch")``), starts a
batch over it (``client.batches.create``), polls it (``client.batches.retrieve``) and downloads
the answers (``client.files.content(batch.output_file_id)``), with the unmodified ``openai``
SDK. :class:`BatchService` serves those routes for :class:`serving.api.middleware.
RequestPolicyMiddleware`, on the embedded server and on the Ray ingress alike (docs/batch.md).

- **The same answers.** A batch runs through :class:`serving.api.jobs.runner.BatchRun`, the pass
  ``skingpt4 batch`` makes: the same line checks, request pipeline and records. Each checked
  request then goes through the app in this process (:class:`AppEngine`), the route a live
  request takes after the middleware, so its body is the server's.
- **Live traffic first.** Batch requests run at vLLM priority :data:`BATCH_PRIORITY` (live
  requests have 0 and are scheduled first), at most ``batch_max_inflight`` being checked or
  answered at once, and only one while live requests are in flight or were a moment ago
  (:class:`serving.api.admission.LiveTraffic`), so a batch's photo decodes do not hold the photo
  workers either; their photos are checked one at a time, within a byte budget of their own.
- **Tenants side by side.** Batches of different API keys run at once, each tenant's oldest
  :data:`BATCHES_PER_TENANT`; the ``batch_max_inflight`` places go to the tenants in turn
  (:class:`serving.api.jobs.share.FairShare`), so one tenant's big batch, or many, do not
  hold another tenant's small one.
- **Durable.** Records go to the batch's output and error files as each request finishes,
  one sealed frame each, synced. A server killed mid-batch resumes it on its next start
  (:meth:`BatchService.start`): lines with a record are skipped, so every ``custom_id`` gets
  exactly one record. Lines that failed with a server error (a 5xx, a photo worker that
  died under them) are tried again (at most :data:`MAX_PASSES` passes) before they are
  recorded as failed; only refusals that belong to the line (4xx) are recorded at once.
- **Private.** Files are encrypted at rest (:mod:`serving.api.jobs.sealed`); a delete removes
  the bytes and the key; files expire after ``file_retention_hours``; no request content is
  logged. Each API key is a tenant: another key's ids answer 404.
- **Bounded.** Upload size, lines per batch, files and bytes per key, free disk; uploads are
  encrypted as they stream in, never held whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from serving.api.admission import Admission, LiveTraffic
from serving.api.http import (
    call_app,
    check_content_type,
    check_declared_size,
    error_message,
    header,
    next_message,
    read_body,
    refuse,
    send_json,
)
from serving.api.contract import CHAT_ROUTE, COMPLETIONS_ROUTE
from serving.api.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServerBusy,
    ServingError,
    UnsupportedMediaType,
    error_for_status,
)
from serving.api.jobs import sealed
from serving.api.jobs.runner import (
    ADMISSION_TIMEOUT_S,
    Answer,
    BatchLine,
    BatchRun,
    LineError,
    TooLarge,
    duplicate_line,
    encode_record,
    parse_line,
    read_lines,
    record_key,
    response_record,
)
from serving.api.jobs.share import FairShare
from serving.api.jobs.store import UNFINISHED, Store, new_batch_id, new_file_id
from serving.api.policy import ServePolicy
from serving.api.strict_json import dump_json, parse_json

logger = logging.getLogger("skingpt4.batches")

ENDPOINTS = (CHAT_ROUTE, COMPLETIONS_ROUTE)
BATCH_PRIORITY = 10  # vLLM schedules lower values first; live requests have 0
COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600
MAX_PASSES = 3  # passes over a batch's lines that failed with a server error
RETRY_DELAYS_S = (5.0, 30.0)  # before the second and third pass
MAX_VALIDATION_ERRORS = 1000
MAX_CREATE_BODY = 64 * 1024
MAX_FORM_FIELD = 1024
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries around the file
MAX_UPLOADS = 16  # uploads read at once
PROGRESS_EVERY_S = 1.0
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
LIST_LIMIT = (1, 100)
FILE_LIST_LIMIT = (1, 10_000)
BATCHES_PER_TENANT = 2  # a tenant's batches advanced at once (the next one's validation and
# start overlap the last lines and the pauses between passes of the one before)
MAX_BATCHES_RUNNING = 64  # batches advanced at once, all tenants together
BUG_PAUSE_S = 30.0  # before a batch that could not advance (a bug) is tried again


def tenant_of(key: str | None) -> str:
    """A tenant's name in the store: a digest of its API key (the key itself is never stored)."""
    return "open" if key is None else "key_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _query(scope) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}


def _limit(query: dict[str, str], bounds: tuple[int, int], default: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not bounds[0] <= int(raw) <= bounds[1]:
        raise InvalidRequest(f"limit must be an integer from {bounds[0]} to {bounds[1]}",
                             param="limit")
    return int(raw)


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


# --- where a batch's records go ------------------------------------------------------------------


class SplitLog:
    """A batch's :class:`serving.api.jobs.runner.RecordLog`: answered requests (status 200) to
    the output file, everything else to the error file, one sealed frame per record, synced.
    Opening it reads back the records a crashed run left."""

    def __init__(self, output: sealed.SealedWriter, errors: sealed.SealedWriter) -> None:
        self.output, self.errors = output, errors
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()
        self.completed = self.failed = 0
        for writer in (output, errors):
            for frame in writer.existing:
                key = record_key(frame)
                if key is None:
                    continue
                (self.done_ids if key[0] == "id" else self.done_lines).add(key[1])
                if writer is output:
                    self.completed += 1
                else:
                    self.failed += 1
            writer.existing = []

    def write_record(self, record: dict) -> None:
        response = record.get("response")
        answered = bool(response) and response.get("status_code") == 200
        writer = self.output if answered else self.errors
        line = encode_record(record)
        writer.write(line)
        writer.sync()
        if answered:
            self.completed += 1
        else:
            self.failed += 1
        key = record_key(line)
        if key is not None:
            (self.done_ids if key[0] == "id" else self.done_lines).add(key[1])

    def close(self) -> None:
        self.output.close()
        self.errors.close()


# --- what answers a batch's requests ---------------------------------------------------------------


def sub_scope(template: dict, route: str, body: bytes) -> dict:
    """An HTTP scope for a request to ``route`` made in this process, from ``template`` (a
    scope the server itself received: its app, server and state)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    keep = {k: template[k] for k in ("app", "state", "server", "asgi", "root_path") if k in template}
    return keep | {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
                   "path": route, "raw_path": route.encode(), "query_string": b"",
                   "headers": headers, "client": ("127.0.0.1", 0)}


class AppEngine:
    """An :class:`serving.api.jobs.runner.AnswerEngine` that answers a checked request through
    the server's own app in this process (vLLM's routes embedded, the ingress's on Ray), at the
    batch priority, after the same context check as a live request."""

    dead = False

    def __init__(self, app, policy: ServePolicy, max_tokens, template: dict) -> None:
        self.app, self.policy, self.max_tokens, self.template = app, policy, max_tokens, template

    async def submit(self, route: str, body: dict):
        return self.answer(route, body)

    async def answer(self, route: str, body: dict) -> Answer:

        if self.max_tokens is not None:  # None: the app's replicas check (Ray mode)
            await self.max_tokens.check(sub_scope(self.template, route, b""), route, body)
        raw = dump_json(dict(body, priority=BATCH_PRIORITY))
        status, out = await call_app(self.app, sub_scope(self.template, route, raw), raw)
        if status == 200:
            response = json.loads(out)
            return 200, response, response.get("id")
        return status, error_for_status(status, *error_message(status, out)).to_dict(), None


# --- the service -------------------------------------------------------------------------------


class _Running:
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


class BatchService:
    """``/v1/files`` and ``/v1/batches`` over one store, and the worker that runs the batches
    (tenants side by side, each tenant's oldest first)."""

    def __init__(self, policy: ServePolicy, app, admission: Admission, max_tokens,
                 live: LiveTraffic) -> None:
        self.policy = policy
        self.app = app
        self.max_tokens = max_tokens
        self.live = live
        # Batch checks share the server's photo and schema worker processes, one decode at a
        # time, with a byte budget of their own (an eighth of the server's, at least one
        # largest body), so they never take the budget live requests wait for.
        self.admission = Admission(
            max(policy.max_inflight_bytes // 8, 3 * policy.max_body_bytes), 1,
            # the lines in flight, and one line read ahead by each running batch
            queue_size=policy.batch_max_inflight * policy.max_images_per_request
            + MAX_BATCHES_RUNNING,
            timeout_s=ADMISSION_TIMEOUT_S, policy=policy,
        )
        self.share = FairShare(policy.batch_max_inflight)
        self.server_admission = admission  # for the API's own small request bodies
        self.admission.photo_workers = admission.photo_workers
        self.admission.schema_workers = admission.schema_workers
        self.admission.schema_slots = admission.schema_slots
        self.store: Store | None = None
        self.template: dict | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-store")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, _Running] = {}
        self._closing = False
        self._uploads = 0
        self._start_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------------

    async def lifespan(self, scope, receive, send, app) -> None:
        """Pass the app's lifespan through, starting the service once the app has started (so a
        batch left by a crash resumes without waiting for a request) and stopping it first at
        shutdown."""

        async def on_receive():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        async def on_send(message):
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.start(scope)
                except Exception as exc:  # a bad key or folder: the server must not start
                    return await send({"type": "lifespan.startup.failed",
                                       "message": f"the Batch API's store: {exc}"})
            await send(message)

        await app(scope, on_receive, on_send)

    async def start(self, scope: dict) -> None:
        """Open the store and start the worker (once; later calls only note the scope)."""
        async with self._start_lock:
            if self.template is None or "app" not in self.template:
                self.template = {k: scope[k] for k in ("app", "state", "server", "asgi")
                                 if k in scope}
            if self.store is not None:
                return
            key_file = Path(self.policy.data_key_file) if self.policy.data_key_file else None
            self.store = await self._db(Store, Path(self.policy.data_dir), key_file)
            self._tasks = [asyncio.create_task(self._work(), name="batch-worker"),
                           asyncio.create_task(self._expire(), name="file-expiry")]

    async def stop(self) -> None:
        """Stop the running batches where they are (nothing more is recorded; the next start
        resumes them) and close the store."""
        self._closing = True
        running = list(self._running.values())
        for batch in running:
            batch.stop()
        tasks = self._tasks + [b.task for b in running if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.store is not None:
            await self._db(self.store.close)
        self._executor.shutdown(wait=False)

    async def _db(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(fn, *args, **kwargs))

    # --- HTTP ------------------------------------------------------------------------------------

    async def handle(self, scope, receive, send, key: str | None, clock=None) -> None:
        """One request to ``/v1/files...`` or ``/v1/batches...`` (the API key already checked);
        ``clock``: the upload clock of a POST's body (:class:`serving.api.http.UploadClock`)."""
        tenant = tenant_of(key)
        method, parts = scope.get("method"), scope["path"].rstrip("/").split("/")[2:]
        try:
            await self.start(scope)
            if parts[0] == "files":
                return await self._files(scope, receive, send, tenant, method, parts[1:], clock)
            return await self._batches(scope, receive, send, tenant, method, parts[1:], clock)
        except ServingError as error:
            error_out = error
        except Exception:
            logger.exception("the Batch API failed on %s %s", method, "/".join(parts[:1]))
            error_out = InternalError("the Batch API failed; see the server log")
        # the body may be unread: read the rest (bounded) so that the client reads the answer
        await refuse(scope, receive, send, error_out, clock, 2 * self.policy.max_body_bytes)

    async def _files(self, scope, receive, send, tenant, method, rest, clock) -> None:
        if not rest:
            if method == "POST":
                return await send_json(send, 200, await self._upload(scope, receive, tenant, clock))
            if method == "GET":
                return await send_json(send, 200, await self._list_files(scope, tenant))
        elif len(rest) == 1 and method == "GET":
            return await send_json(send, 200, (await self._file(rest[0], tenant)).to_dict())
        elif len(rest) == 1 and method == "DELETE":
            return await send_json(send, 200, await self._delete_file(rest[0], tenant))
        elif rest[1:] == ["content"] and method == "GET":
            return await self._content(send, await self._file(rest[0], tenant))
        raise _no_route(method, scope["path"])

    async def _batches(self, scope, receive, send, tenant, method, rest, clock) -> None:
        if not rest:
            if method == "POST":
                return await send_json(send, 200, await self._create(scope, receive, tenant, clock))
            if method == "GET":
                return await send_json(send, 200, await self._list_batches(scope, tenant))
        elif len(rest) == 1 and method == "GET":
            return await send_json(send, 200, await self._batch(rest[0], tenant))
        elif rest[1:] == ["cancel"] and method == "POST":
            return await send_json(send, 200, await self._cancel(rest[0], tenant))
        raise _no_route(method, scope["path"])

    # --- files -----------------------------------------------------------------------------------

    async def _file(self, file_id: str, tenant: str):
        row = await self._db(self.store.file, file_id, tenant)
        if row is None:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return row

    async def _list_files(self, scope, tenant: str) -> dict:
        query = _query(scope)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", param="order")
        rows, more = await self._db(self.store.list_files, tenant, query.get("purpose"),
                                    query.get("after"), _limit(query, FILE_LIST_LIMIT, 10_000),
                                    order)
        return _page([r.to_dict() for r in rows], more)

    async def _delete_file(self, file_id: str, tenant: str) -> dict:
        await self._file(file_id, tenant)
        if await self._db(self.store.file_in_use, file_id):
            raise Conflict(f"file {file_id!r} belongs to a batch that is still running; cancel "
                           "the batch or wait for it to finish", param="file_id")
        await self._db(self.store.delete_file, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def _content(self, send, row) -> None:
        reader = await self._db(sealed.open_sealed, self.store.path(row.id), row.data_key,
                                row.id, row.bytes)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(row.bytes).encode()),
            ]})
            while chunk := await self._db(reader.read, sealed.FRAME_BYTES):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            reader.close()

    async def _upload(self, scope, receive, tenant: str, clock) -> dict:
        from python_multipart.multipart import parse_options_header


        kind, params = parse_options_header(header(scope, b"content-type") or "")
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise UnsupportedMediaType(
                "upload a file as multipart/form-data with the fields purpose (batch) and file"
            )
        p = self.policy
        declared = clock.declared
        check_declared_size(declared, p.max_file_bytes + MULTIPART_OVERHEAD)
        count, used = await self._db(self.store.tenant_usage, tenant)
        if count >= p.max_files_per_tenant:
            raise QuotaExceeded(f"this API key holds {count} files, the most it may; delete "
                                "some first (DELETE /v1/files/{id})")
        if self._uploads >= MAX_UPLOADS:
            raise ServerBusy(f"{MAX_UPLOADS} uploads are being read; retry in 5 s", retry_after_s=5)
        file_id = new_file_id()
        data_key = sealed.new_data_key()
        path = self.store.path(file_id)
        self._uploads += 1
        form = None
        try:
            form = _Form(p.max_file_bytes, p.max_tenant_bytes - used,
                         sealed.SealedWriter(path, data_key, file_id))
            free = shutil.disk_usage(self.store.data_dir).free
            if declared is not None and free - declared < p.min_free_disk_bytes:
                raise QuotaExceeded("the server's disk is too full to take this file; try a "
                                    "smaller file later")
            await _read_form(receive, params[b"boundary"], clock, form)
            purpose, filename, expires_s = form.result(p.file_retention_hours * 3600)
            await self._db(form.writer.sync)
            form.writer.close()
            now = int(time.time())
            row = await self._db(self.store.add_file, file_id, tenant, purpose, filename,
                                 form.writer.plain_bytes, data_key, now + expires_s,
                                 created_at=now)
        except BaseException:
            if form is not None:
                form.writer.close()
            path.unlink(missing_ok=True)
            raise
        finally:
            self._uploads -= 1
        return row.to_dict()

    # --- batches -------------------------------------------------------------------------------

    async def _batch(self, batch_id: str, tenant: str) -> dict:
        batch = await self._db(self.store.batch, batch_id, tenant)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        return batch

    async def _list_batches(self, scope, tenant: str) -> dict:
        query = _query(scope)
        batches, more = await self._db(self.store.list_batches, tenant, query.get("after"),
                                       _limit(query, LIST_LIMIT, 20))
        return _page(batches, more)

    async def _create(self, scope, receive, tenant: str, clock) -> dict:
        check_content_type(scope)
        reservation = self.server_admission.body(clock.declared, MAX_CREATE_BODY)
        try:
            body = parse_json(await read_body(receive, MAX_CREATE_BODY, clock, reservation))
        finally:
            reservation.release()
        request = _batch_request(body)
        source = await self._db(self.store.file, request["input_file_id"], tenant)
        if source is None:
            raise NotFound(f"no file {request['input_file_id']!r}", param="input_file_id")
        if source.purpose != "batch":
            raise InvalidRequest(f"file {source.id!r} has purpose {source.purpose!r}; a batch "
                                 "reads a file uploaded with purpose batch", param="input_file_id")
        now = int(time.time())
        batch = {
            "id": new_batch_id(), "object": "batch", "endpoint": request["endpoint"],
            "model": None, "errors": None, "input_file_id": source.id,
            "completion_window": COMPLETION_WINDOW, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + WINDOW_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": request["metadata"],
        }
        await self._db(self.store.add_batch, tenant, batch, new_file_id(), new_file_id())
        self._wake.set()
        return batch

    async def _cancel(self, batch_id: str, tenant: str) -> dict:
        batch = await self._batch(batch_id, tenant)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in ("validating", "in_progress"):
            raise Conflict(f"batch {batch_id!r} is {batch['status']}; only a validating or "
                           "in_progress batch can be cancelled", param="batch_id")
        batch = await self._db(self.store.update_batch, batch_id, status="cancelling",
                               cancelling_at=int(time.time()))
        if batch_id in self._running:
            self._running[batch_id].stop()
        self._wake.set()
        return batch

    # --- the worker ------------------------------------------------------------------------------

    async def _work(self) -> None:
        """Keep the unfinished batches advancing: each in a task of its own, at most
        :data:`BATCHES_PER_TENANT` per tenant (its oldest) and :data:`MAX_BATCHES_RUNNING` in
        all, taken a tenant at a time so that no tenant's queue holds another's."""
        while True:
            self._wake.clear()
            try:
                pending = await self._db(self.store.unfinished_batches)
            except Exception:  # the store could not be read: tried again after a pause
                logger.exception("the unfinished batches could not be listed")
                await asyncio.sleep(BUG_PAUSE_S)
                continue
            for batch_id, tenant in _next_to_run(pending, self._running):
                running = _Running(batch_id, tenant)
                self._running[batch_id] = running
                running.task = asyncio.create_task(self._drive(running),
                                                   name=f"batch-{batch_id[-8:]}")
            await self._wake.wait()

    async def _drive(self, running: _Running) -> None:
        """Advance one batch until it is final (or the service stops)."""
        try:
            while not self._closing:
                batch = await self._db(self.store.batch, running.batch_id)
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
            self._running.pop(running.batch_id, None)
            self._wake.set()  # a place for the next batch

    async def _advance(self, batch: dict, running: _Running) -> None:
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
        row = await self._db(self.store.file, batch["input_file_id"], hidden=True)
        if row is None:
            return None
        return await self._db(sealed.open_sealed, self.store.path(row.id), row.data_key,
                              row.id, row.bytes)

    async def _validate(self, batch: dict) -> None:
        reader = await self._input(batch)
        if reader is None:
            errors = [_error("missing_file", "the input file was deleted before the batch "
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
            await self._db(self.store.update_batch, batch["id"], status="failed", failed_at=now,
                           errors={"object": "list", "data": errors})
        elif batch["status"] == "validating":
            current = await self._db(self.store.batch, batch["id"])
            if current["status"] == "validating":  # not cancelled meanwhile
                await self._db(self.store.update_batch, batch["id"], status="in_progress",
                               in_progress_at=now,
                               request_counts={"total": total, "completed": 0, "failed": 0})

    async def _open_log(self, batch: dict) -> SplitLog:
        tenant, out_id, err_id = await self._db(self.store.batch_files, batch["id"])
        writers = []
        for file_id in (out_id, err_id):
            row = await self._db(self.store.file, file_id, hidden=True)
            if row is None:  # first start of this batch
                row = await self._db(self.store.add_file, file_id, tenant, "batch_output",
                                     f"{batch['id']}_{'output' if file_id == out_id else 'error'}.jsonl",
                                     0, sealed.new_data_key(), None, visible=False)
            writers.append(await self._db(sealed.SealedWriter, self.store.path(file_id),
                                          row.data_key, file_id, append=True))
        return SplitLog(*writers)

    async def _execute(self, batch: dict, running: _Running) -> None:
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
            else:  # still failing after every pass: recorded, so the batch can finish
                if not await self._healthy():
                    return  # the server is going down or its engine died: resumed on restart
                for custom_id in summary.failed:
                    await self._db(log.write_record, response_record(
                        custom_id, 500, InternalError(
                            f"the request failed {MAX_PASSES} times with a server error"
                        ).to_dict()))
            if self._closing:
                return
            current = await self._db(self.store.batch, batch["id"])
            if current["status"] == "cancelling":
                outcome = "cancelling"
            elif time.time() >= batch["expires_at"]:
                outcome = "expired"
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            await self._save_counts(batch, log)
            await self._db(log.close)
        if outcome == "cancelling":
            return  # _advance finalizes it as cancelled
        now = int(time.time())
        fields = {"status": "finalizing", "finalizing_at": now}
        if outcome == "expired":
            fields["expired_at"] = now
        await self._db(self.store.update_batch, batch["id"], **fields)

    async def _pass(self, batch: dict, log: SplitLog, engine: AppEngine, running: _Running,
                    share) -> Any:
        """One pass of the runner over the input, its requests taking their places from the
        tenant's ``share``; None when it was stopped (cancel, expiry, shutdown)."""
        current = await self._db(self.store.batch, batch["id"])
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
            if self._closing or running.woken.is_set():
                return None
            summary = await run.run_stream(reader)
        finally:
            expiry.cancel()
            running.run = None
            reader.close()
        return None if run.stopping else summary

    async def _healthy(self) -> bool:

        if self._closing:
            return False
        scope = dict(sub_scope(self.template or {}, "/health", b""), method="GET")
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
        current = await self._db(self.store.batch, batch["id"])
        counts = dict(current["request_counts"], completed=log.completed, failed=log.failed)
        if counts != current["request_counts"]:
            await self._db(self.store.update_batch, batch["id"], request_counts=counts)

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
            await self._db(out.sync)
            await self._db(err.sync)
        finally:
            await self._db(log.close)
        tenant, out_id, err_id = await self._db(self.store.batch_files, batch["id"])
        files = {}
        now = int(time.time())
        expires_at = now + int(self.policy.file_retention_hours * 3600)
        for name, file_id, writer in (("output_file_id", out_id, out), ("error_file_id", err_id, err)):
            if writer.frames:
                await self._db(self.store.show_file, file_id, writer.plain_bytes, expires_at)
                files[name] = file_id
            else:
                await self._db(self.store.delete_file, file_id)
        current = await self._db(self.store.batch, batch["id"])
        counts = dict(current["request_counts"], completed=log.completed, failed=log.failed)
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}[status]
        await self._db(self.store.update_batch, batch["id"], status=status, request_counts=counts,
                       **{stamp: current.get(stamp) or now}, **files)

    # --- expiry --------------------------------------------------------------------------------

    async def _expire(self) -> None:
        """Delete files past their retention (checked every minute, or more often for short
        retentions), unless a running batch still uses them."""
        every = min(60.0, max(1.0, self.policy.file_retention_hours * 3600 / 10))
        while True:
            for file_id in await self._db(self.store.expired_files, time.time()):
                if not await self._db(self.store.file_in_use, file_id):
                    await self._db(self.store.delete_file, file_id)
            await asyncio.sleep(every)


def _next_to_run(pending: list[tuple[str, str]],
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


def _no_route(method: str, path: str) -> ServingError:
    if path.rstrip("/").count("/") <= 3:
        return MethodNotAllowed(f"{method} is not allowed on {path}")
    return NotFound(f"{method} {path} is not served here")


def _error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def _batch_request(body: Any) -> dict:
    """The fields of ``POST /v1/batches``, checked."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    allowed = ("input_file_id", "endpoint", "completion_window", "metadata")
    for key in body:
        if key not in allowed:
            raise InvalidRequest(f"unknown field {key!r}; a batch takes {', '.join(allowed)}",
                                 param=str(key))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("input_file_id is required: the id of a file uploaded with "
                             "purpose batch", param="input_file_id")
    if body.get("endpoint") not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    if body.get("completion_window") != COMPLETION_WINDOW:
        raise InvalidRequest(f"completion_window must be {COMPLETION_WINDOW!r}",
                             param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None:
        if (not isinstance(metadata, dict) or len(metadata) > METADATA_KEYS
                or any(not isinstance(k, str) or len(k) > METADATA_KEY_CHARS
                       or not isinstance(v, str) or len(v) > METADATA_VALUE_CHARS
                       for k, v in metadata.items())):
            raise InvalidRequest(
                f"metadata must map at most {METADATA_KEYS} keys of up to {METADATA_KEY_CHARS} "
                f"characters to strings of up to {METADATA_VALUE_CHARS}", param="metadata")
    return {"input_file_id": file_id, "endpoint": body["endpoint"], "metadata": metadata}


def validate_lines(reader: io.BufferedReader, endpoint: str,
                   policy: ServePolicy) -> tuple[list[dict], int]:
    """A batch file's errors as OpenAI lists them (``{code, message, param, line}``, at most
    :data:`MAX_VALIDATION_ERRORS`) and its number of requests. Each line must be a JSON object
    with a unique ``custom_id``, ``method`` POST, ``url`` the batch's endpoint and a ``body``,
    and fit the request size limit; at most ``max_batch_lines`` lines."""
    errors: list[dict] = []
    seen: dict[str, int] = {}
    total = 0

    def add(error: dict) -> None:
        if len(errors) < MAX_VALIDATION_ERRORS:
            errors.append(error)

    try:
        for number, raw in read_lines(reader, policy.max_body_bytes):
            if isinstance(raw, bytes) and not raw.strip():
                continue
            total += 1
            if total > policy.max_batch_lines:
                add(_error("too_many_requests", f"the file has more than "
                           f"{policy.max_batch_lines} requests, the most one batch takes; split "
                           "it", line=number))
                break
            if isinstance(raw, TooLarge):
                add(_error("line_too_large", f"line {number} is {raw.size} bytes; the limit "
                           f"is {policy.max_body_bytes} bytes", line=number))
                continue
            parsed = parse_line(number, raw)
            if isinstance(parsed, LineError):
                add(_error(parsed.code, parsed.message, parsed.param, number))
                continue
            first = seen.setdefault(parsed.custom_id, number)
            if first != number:
                duplicate = duplicate_line(parsed, first)
                add(_error(duplicate.code, duplicate.message, duplicate.param, number))
            elif parsed.refusal is not None:
                add(_error(parsed.refusal.code, f"line {number}: {parsed.refusal.message}",
                           parsed.refusal.param, number))
            elif parsed.route != endpoint:
                add(_error("mismatched_url", f"line {number}: url {parsed.route} differs from "
                           f"the batch's endpoint {endpoint}; every line of a batch calls its "
                           "endpoint", "url", number))
    except sealed.SealedError as exc:
        add(_error("unreadable_file", f"the input file cannot be read: {exc}"))
    if not total and not errors:
        add(_error("empty_file", "the input file holds no requests"))
    return errors, total


def record_unrun(reader: io.BufferedReader, log: SplitLog, status: str,
                 policy: ServePolicy) -> None:
    """A ``batch_cancelled`` / ``batch_expired`` error record for every request of the input
    that has none yet."""
    code = "batch_cancelled" if status == "cancelled" else "batch_expired"
    message = ("the batch was cancelled before this request ran" if status == "cancelled" else
               "this request could not be run before the batch's completion window ended")
    for number, raw in read_lines(reader, policy.max_body_bytes):
        if isinstance(raw, TooLarge) or not raw.strip():
            continue
        parsed = parse_line(number, raw)
        if isinstance(parsed, BatchLine) and parsed.custom_id not in log.done_ids:
            log.write_record({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": parsed.custom_id,
                              "response": None, "error": {"code": code, "message": message}})


class _Form:
    """The fields of a file upload as a streaming multipart parser finds them: ``purpose``,
    ``file`` (sealed as it arrives), ``expires_after[anchor]`` and ``expires_after[seconds]``;
    and how far the body got (``ended``: its closing boundary was read; ``in_headers``,
    ``_name``: inside a part's headers, or a part's data)."""

    TEXT_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")

    def __init__(self, max_bytes: int, quota_bytes: int, writer: sealed.SealedWriter) -> None:
        self.max_bytes, self.quota_bytes, self.writer = max_bytes, quota_bytes, writer
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.size = 0
        self._buffer = bytearray()
        self._name: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.ended = False
        self.in_headers = False
        self.parts = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._finished}

    def _begin(self) -> None:
        self._headers, self._name = {}, None
        self.in_headers = True
        self.parts += 1

    def _finished(self) -> None:
        self.ended = True

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        self.in_headers = False
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name != "file" and name not in self.TEXT_FIELDS:
            raise InvalidRequest(f"unknown form field {name[:64]!r}; an upload has purpose and "
                                 "file (and optionally expires_after)", param=name[:64] or None)
        if name in self.fields or (name == "file" and self.filename is not None):
            raise InvalidRequest(f"the form field {name!r} is given twice", param=name)
        self._name = name
        if name == "file":
            raw = params.get(b"filename", b"upload.jsonl")
            self.filename = raw.decode("utf-8", "replace")[:255] or "upload.jsonl"
        else:
            self.fields[name] = bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.size += end - start
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the file exceeds the limit of {self.max_bytes} bytes "
                                      f"({self.max_bytes // 2**20} MiB)")
            if self.size > self.quota_bytes:
                raise QuotaExceeded("this file would take the API key past its storage limit; "
                                    "delete some files first")
            self._buffer += data[start:end]
            while len(self._buffer) >= sealed.FRAME_BYTES:
                self.writer.write(self._buffer[:sealed.FRAME_BYTES])
                del self._buffer[:sealed.FRAME_BYTES]
        elif self._name is not None:
            field = self.fields[self._name]
            field += data[start:end]
            if len(field) > MAX_FORM_FIELD:
                raise InvalidRequest(f"the form field {self._name!r} is too long",
                                     param=self._name)

    def _end(self) -> None:
        if self._name == "file" and self._buffer:
            self.writer.write(self._buffer)
            self._buffer = bytearray()
        self._name = None

    def cut_short(self, boundary: bytes) -> InvalidRequest:
        """Why a body that ended without its closing boundary is refused."""
        closing = "--" + boundary[:70].decode("latin-1") + "--"
        if self.in_headers:
            where = "inside the headers of a form part"
        elif self._name == "file":
            where = f"inside the file part, after {self.size} bytes of the file,"
        elif self._name is not None:
            where = f"inside the form field {self._name!r}"
        elif self.parts:
            where = "between form parts"
        else:
            where = "before its first form part"
        return InvalidRequest(f"the upload ends {where} without the closing boundary "
                              f"{closing}: it was cut short, and nothing of it was stored; "
                              "send the whole file again")

    def result(self, retention_s: float) -> tuple[str, str, int]:
        """(purpose, filename, seconds until it expires) of a whole upload."""
        purpose = bytes(self.fields.get("purpose", b"")).decode("utf-8", "replace")
        if purpose != "batch":
            raise InvalidRequest(f"purpose must be 'batch' (got {purpose[:32]!r}); this server "
                                 "stores files for the Batch API only", param="purpose")
        if self.filename is None:
            raise InvalidRequest("the upload has no file field", param="file")
        expires = int(retention_s)
        if "expires_after[seconds]" in self.fields:
            anchor = bytes(self.fields.get("expires_after[anchor]", b"created_at")).decode()
            seconds = bytes(self.fields["expires_after[seconds]"]).decode()
            if anchor != "created_at" or not seconds.isdigit() or not 3600 <= int(seconds) <= 2592000:
                raise InvalidRequest("expires_after takes anchor created_at and seconds from "
                                     "3600 to 2592000", param="expires_after")
            expires = min(expires, int(seconds))
        return purpose, self.filename, expires


async def _read_form(receive, boundary: bytes, clock, form: _Form) -> None:
    """Feed the upload's body to a streaming multipart parser as it arrives, within the
    clock's deadlines."""
    from python_multipart.multipart import MultipartParser

    parser = MultipartParser(boundary, form.callbacks())
    while True:
        message = await next_message(receive, clock)
        chunk = message.get("body", b"")
        clock.received += len(chunk)
        received = clock.received
        try:
            parser.write(chunk)
        except ServingError:
            raise
        except Exception as exc:  # the parser's own errors: a malformed form
            raise InvalidRequest(f"the upload is not valid multipart/form-data ({exc})") from None
        if not message.get("more_body", False):
            clock.complete = True
            break
    if clock.declared is not None and received != clock.declared:
        short = ": it was cut short" if received < clock.declared else ""
        raise InvalidRequest(f"the upload has {received} bytes; its Content-Length declares "
                             f"{clock.declared}{short}, and nothing of it was stored")
    try:
        parser.finalize()
    except Exception as exc:
        raise InvalidRequest(f"the upload is not valid multipart/form-data ({exc})") from None
    if not form.ended:  # the parser takes a body that stops anywhere as a whole one
        raise form.cut_short(boundary)
