"""The Files and Batch API's HTTP routes: ``/v1/files`` (upload, list, retrieve, delete,
content) and ``/v1/batches`` (create, list, retrieve, cancel), for one tenant a request (each
API key is a tenant: another key's ids answer 404). Uploads are read as they stream in
(:mod:`serving.api.batch_api.form`); a created or cancelled batch is the worker's to advance
(:class:`serving.api.batch_api.worker.BatchWorker`)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from serving.api.admission import Admission
from serving.api.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    QuotaExceeded,
    ServerBusy,
    ServingError,
    UnsupportedMediaType,
)
from serving.api.http import (
    check_content_type,
    check_declared_size,
    header,
    read_body,
    refuse,
    send_json,
)
from serving.api.batch_api import sealed
from serving.api.batch_api.async_store import AsyncStore
from serving.api.batch_api.form import UploadForm, read_form
from serving.api.batch_api.store import FileRow, new_batch_id, new_file_id, tenant_of
from serving.api.batch_api.worker import BatchWorker
from serving.api.policy import ServePolicy
from serving.api.routes import BATCH_ROUTES
from serving.api.strict_json import parse_json

logger = logging.getLogger("skingpt4.batches")

COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600
MAX_CREATE_BODY = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries around the file
MAX_UPLOADS = 16  # uploads read at once
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
LIST_LIMIT = (1, 100)
FILE_LIST_LIMIT = (1, 10_000)


class JobsRoutes:
    """``/v1/files`` and ``/v1/batches`` over one store. ``ready``: awaited with each request's
    scope before it is served (it opens the store and starts the worker, once); ``admission``:
    the server's, for the API's own small request bodies."""

    def __init__(self, policy: ServePolicy, store: AsyncStore, worker: BatchWorker,
                 admission: Admission, ready: Callable[[dict], Awaitable[None]]) -> None:
        self.policy, self.store, self.worker = policy, store, worker
        self.admission, self.ready = admission, ready
        self._uploads = 0

    async def handle(self, scope, receive, send, key: str | None, clock=None) -> None:
        """One request to ``/v1/files...`` or ``/v1/batches...`` (the API key already checked);
        ``clock``: the upload clock of a POST's body (:class:`serving.api.http.UploadClock`)."""
        tenant = tenant_of(key)
        method, parts = scope.get("method"), scope["path"].rstrip("/").split("/")[2:]
        try:
            await self.ready(scope)
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

    async def _file(self, file_id: str, tenant: str) -> FileRow:
        row = await self.store.file(file_id, tenant)
        if row is None:
            raise NotFound(f"no file {file_id!r}", param="file_id")
        return row

    async def _list_files(self, scope, tenant: str) -> dict:
        query = _query(scope)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", param="order")
        rows, more = await self.store.list_files(
            tenant, query.get("purpose"), query.get("after"),
            _limit(query, FILE_LIST_LIMIT, 10_000), order)
        return _page([r.to_dict() for r in rows], more)

    async def _delete_file(self, file_id: str, tenant: str) -> dict:
        await self._file(file_id, tenant)
        if await self.store.file_in_use(file_id):
            raise Conflict(f"file {file_id!r} belongs to a batch that is still running; cancel "
                           "the batch or wait for it to finish", param="file_id")
        await self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def _content(self, send, row: FileRow) -> None:
        reader = await self.store.open_file(row)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(row.bytes).encode()),
            ]})
            while chunk := await self.store.run(reader.read, sealed.FRAME_BYTES):
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
        count, used = await self.store.tenant_usage(tenant)
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
            form = UploadForm(p.max_file_bytes, p.max_tenant_bytes - used,
                              sealed.SealedWriter(path, data_key, file_id))
            free = shutil.disk_usage(self.store.data_dir).free
            if declared is not None and free - declared < p.min_free_disk_bytes:
                raise QuotaExceeded("the server's disk is too full to take this file; try a "
                                    "smaller file later")
            await read_form(receive, params[b"boundary"], clock, form)
            purpose, filename, expires_s = form.result(p.file_retention_hours * 3600)
            await self.store.run(form.writer.sync)
            form.writer.close()
            now = int(time.time())
            row = await self.store.add_file(file_id, tenant, purpose, filename,
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
        batch = await self.store.batch(batch_id, tenant)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        return batch

    async def _list_batches(self, scope, tenant: str) -> dict:
        query = _query(scope)
        batches, more = await self.store.list_batches(tenant, query.get("after"),
                                                      _limit(query, LIST_LIMIT, 20))
        return _page(batches, more)

    async def _create(self, scope, receive, tenant: str, clock) -> dict:
        check_content_type(scope)
        reservation = self.admission.body(clock.declared, MAX_CREATE_BODY)
        try:
            body = parse_json(await read_body(receive, MAX_CREATE_BODY, clock, reservation))
        finally:
            reservation.release()
        request = _batch_request(body)
        source = await self.store.file(request["input_file_id"], tenant)
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
        await self.store.add_batch(tenant, batch, new_file_id(), new_file_id())
        self.worker.wake()
        return batch

    async def _cancel(self, batch_id: str, tenant: str) -> dict:
        batch = await self._batch(batch_id, tenant)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in ("validating", "in_progress"):
            raise Conflict(f"batch {batch_id!r} is {batch['status']}; only a validating or "
                           "in_progress batch can be cancelled", param="batch_id")
        batch = await self.store.update_batch(batch_id, status="cancelling",
                                              cancelling_at=int(time.time()))
        self.worker.cancelled(batch_id)
        return batch


# --- the requests' fields ---------------------------------------------------------------------


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


def _no_route(method: str, path: str) -> ServingError:
    if path.rstrip("/").count("/") <= 3:
        return MethodNotAllowed(f"{method} is not allowed on {path}")
    return NotFound(f"{method} {path} is not served here")


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
    if body.get("endpoint") not in BATCH_ROUTES:
        raise InvalidRequest(f"endpoint must be one of {', '.join(BATCH_ROUTES)}",
                             param="endpoint")
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
