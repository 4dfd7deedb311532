"""The OpenAI Files and Batch API over HTTP: ``/v1/files`` and ``/v1/batches``.

A platform uploads a JSONL file of requests (``client.files.create(purpose="batch")``), starts a
batch over it (``client.batches.create``), polls it (``client.batches.retrieve``) and downloads
the answers (``client.files.content(batch.output_file_id)``), with the unmodified ``openai``
SDK. :class:`BatchService` serves those routes for :class:`serving.api.middleware.
RequestPolicyMiddleware`, on the embedded server and on the Ray ingress alike (docs/batch.md).
It puts together, by role:

- the HTTP routes (:class:`serving.api.batch_api.routes.JobsRoutes`), with the multipart upload
  read as it streams in (:mod:`serving.api.batch_api.form`);
- the worker that takes each batch from ``validating`` to its final status
  (:class:`serving.api.batch_api.worker.BatchWorker`), with what its files hold
  (:mod:`serving.api.batch_api.records`) and the tenants' fair share (:mod:`serving.api.batch_api.share`);
- the store, awaited (:class:`serving.api.batch_api.async_store.AsyncStore` over
  :class:`serving.api.batch_api.store.Store`).

- **The same answers.** A batch runs through :class:`serving.api.batch_api.runner.BatchRun`, the pass
  ``skingpt4 batch`` makes: the same line checks, request pipeline and records. Each checked
  request then goes through the app in this process (:class:`serving.api.batch_api.worker.AppEngine`),
  the route a live request takes after the middleware, so its body is the server's.
- **Live traffic first.** Batch requests run at vLLM priority
  :data:`serving.api.batch_api.worker.BATCH_PRIORITY` (live requests have 0 and are scheduled
  first), at most ``batch_max_inflight`` being checked or answered at once, and only one while
  live requests are in flight or were a moment ago (:class:`serving.api.admission.LiveTraffic`),
  so a batch's photo decodes do not hold the photo workers either; their photos are checked one
  at a time, within a byte budget of their own.
- **Tenants side by side.** Batches of different API keys run at once, each tenant's oldest
  :data:`serving.api.batch_api.worker.BATCHES_PER_TENANT`; the ``batch_max_inflight`` places go to
  the tenants in turn (:class:`serving.api.batch_api.share.FairShare`), so one tenant's big batch, or
  many, do not hold another tenant's small one.
- **Durable.** Records go to the batch's output and error files as each request finishes,
  one sealed frame each, synced. A server killed mid-batch resumes it on its next start
  (:meth:`BatchService.start`): lines with a record are skipped, so every ``custom_id`` gets
  exactly one record. Lines that failed with a server error (a 5xx, a photo worker that
  died under them) are tried again (at most :data:`serving.api.batch_api.worker.MAX_PASSES`
  passes) before they are recorded as failed; only refusals that belong to the line (4xx) are
  recorded at once.
- **Private.** Files are encrypted at rest (:mod:`serving.api.batch_api.sealed`); a delete removes
  the bytes and the key; files expire after ``file_retention_hours``; no request content is
  logged. Each API key is a tenant: another key's ids answer 404.
- **Bounded.** Upload size, lines per batch, files and bytes per key, free disk; uploads are
  encrypted as they stream in, never held whole.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving.api.admission import Admission, LiveTraffic
from serving.api.batch_api.async_store import AsyncStore
from serving.api.batch_api.routes import JobsRoutes
from serving.api.batch_api.runner import ADMISSION_TIMEOUT_S
from serving.api.batch_api.share import FairShare
from serving.api.batch_api.store import Store, tenant_key_id
from serving.api.batch_api.worker import MAX_BATCHES_RUNNING, BatchWorker
from serving.api.metrics import Metrics
from serving.api.policy import ServePolicy

CENSUS_EVERY = 5  # samples between two counts of the store (a sample a second)


class BatchService:
    """``/v1/files`` and ``/v1/batches`` over one store, and the worker that runs the batches
    (tenants side by side, each tenant's oldest first)."""

    def __init__(self, policy: ServePolicy, app, admission: Admission, max_tokens,
                 live: LiveTraffic) -> None:
        self.policy = policy
        # Batch checks share the server's photo and schema worker processes, one decode at a
        # time, with a byte budget of their own (an eighth of the server's, at least one
        # largest body), so they never take the budget live requests wait for.
        self.admission = Admission(
            max(policy.max_inflight_bytes // 8, 3 * policy.max_body_bytes), 1,
            # the lines in flight, and one line read ahead by each running batch
            queue_size=policy.batch_max_inflight * policy.max_images_per_request
            + MAX_BATCHES_RUNNING,
            timeout_s=ADMISSION_TIMEOUT_S, policy=policy, workers_of=admission,
        )
        self.share = FairShare(policy.batch_max_inflight)
        self.db = AsyncStore()
        self.worker = BatchWorker(policy, app, max_tokens, live, self.admission, self.share,
                                  self.db)
        # the server's admission, for the API's own small request bodies
        self.routes = JobsRoutes(policy, self.db, self.worker, admission, self.start)
        self._start_lock = asyncio.Lock()
        self._samples = 0
        self._reported: set[tuple[object, tuple[str, ...]]] = set()

    @property
    def store(self) -> Store | None:
        """The blocking store (None until :meth:`start` opens it)."""
        return self.db.store

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

    async def sample(self, m: Metrics) -> None:
        """The Batch API's gauges: lines waiting for a place and in flight (every call), and
        what the store holds (every :data:`CENSUS_EVERY`th call, once it is open)."""
        m.batch_lines.set(self.share.waiting(), ("waiting",))
        m.batch_lines.set(self.share.size - self.share.free, ("in_flight",))
        self._samples += 1
        if not self.db.opened or self._samples % CENSUS_EVERY != 1:
            return
        batches, files = await self.db.run(self.db.store.census)
        now: dict[tuple[object, tuple[str, ...]], float] = {}
        for status, tenant, count in batches:
            now[(m.batches, (status, tenant_key_id(tenant)))] = count
        for tenant, count, size in files:
            now[(m.stored_files, (tenant_key_id(tenant),))] = count
            now[(m.stored_bytes, (tenant_key_id(tenant),))] = size
        for gauge, labels in self._reported - now.keys():  # gone since: back to 0
            gauge.set(0, labels)
        for (gauge, labels), value in now.items():
            gauge.set(value, labels)
        self._reported = set(now)

    async def start(self, scope: dict) -> None:
        """Open the store and start the worker (once; later calls only note the scope)."""
        async with self._start_lock:
            template = self.worker.template
            if template is None or "app" not in template:
                self.worker.template = {k: scope[k] for k in ("app", "state", "server", "asgi")
                                        if k in scope}
            if self.db.opened:
                return
            key_file = Path(self.policy.data_key_file) if self.policy.data_key_file else None
            await self.db.open(Path(self.policy.data_dir), key_file)
            self.worker.start()

    async def stop(self) -> None:
        """Stop the running batches where they are (nothing more is recorded; the next start
        resumes them) and close the store."""
        await self.worker.stop()
        await self.db.close()

    async def handle(self, scope, receive, send, key: str | None, clock=None) -> None:
        """One request to ``/v1/files...`` or ``/v1/batches...`` (the API key already checked);
        ``clock``: the upload clock of a POST's body (:class:`serving.api.http.UploadClock`)."""
        await self.routes.handle(scope, receive, send, key, clock)
