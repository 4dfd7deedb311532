"""Admission control: the API server holds only as much request work as fits in memory.

Two bounds, both in :class:`serving.api.policy.ServePolicy`:

- ``max_inflight_bytes``: a byte budget for the request bodies being read, parsed and checked.
  A body costs ``BODY_COST_FACTOR`` times its size while it is read and parsed (the raw bytes,
  their decoded text and the parsed strings). It is reserved as the bytes arrive
  (:class:`BodyReservation`), so a declared ``Content-Length`` holds nothing until it is sent.
- ``max_concurrent_decodes``: photos decoded at once (decoding is CPU-bound: more at once only
  adds memory). Each decode holds one full-size photo in memory for a moment, in a worker
  process (:attr:`Admission.photo_workers`) that is stopped when it runs past its time.
- Schema compiles run in workers of their own (:attr:`Admission.schema_workers`), at most
  :data:`SCHEMA_WORKERS` at once, at a lower CPU priority than photos. A schema worker loads
  xgrammar, which loads torch (about 650 MB): it starts with the first schema a server checks,
  not before, and compiled verdicts are cached, so one is enough.

A request that does not fit waits in a bounded queue (``admission_queue_size`` waiters, at most
``admission_timeout_s``); past that it gets a 503 with ``Retry-After``. Waiters are served in
arrival order among those that fit: one that fits the free budget is never held behind a larger
one that does not. The policy makes sure the largest body allowed fits the budget on its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from serving.api.errors import ServerBusy
from serving.api.policy import BODY_COST_FACTOR, ServePolicy
from serving.api.workers import WorkerPool

SCHEMA_WORKERS = 1
SCHEMA_WORKER_NICE = 10


class Admission:
    """A byte budget, a bounded pool of decode slots and the worker processes behind them, for
    one event loop."""

    def __init__(self, max_bytes: int, max_decodes: int, queue_size: int, timeout_s: float,
                 policy: ServePolicy | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_decodes = max_decodes
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.free_bytes = max_bytes
        self.free_decodes = max_decodes
        self._byte_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._decode_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        policy = policy or ServePolicy.model_construct()  # the defaults of its timeouts
        self.photo_workers = WorkerPool("photo", max_decodes, policy.decode_timeout_s)
        self.schema_workers = WorkerPool(
            "schema", SCHEMA_WORKERS, policy.schema_compile_timeout_s,
            memory_mb=policy.schema_compile_memory_mb, nice=SCHEMA_WORKER_NICE,
        )
        self.schema_slots = asyncio.Semaphore(SCHEMA_WORKERS)

    @property
    def waiting(self) -> int:
        return len(self._byte_waiters) + len(self._decode_waiters)

    @classmethod
    def from_policy(cls, policy: ServePolicy) -> Admission:
        return cls(policy.max_inflight_bytes, policy.max_concurrent_decodes,
                   policy.admission_queue_size, policy.admission_timeout_s, policy)

    async def reserve(self, nbytes: int, deadline: float) -> None:
        """Take ``nbytes`` of the budget, waiting until ``deadline`` (then 503)."""
        await self._acquire("bytes", nbytes, deadline)

    def release(self, nbytes: int) -> None:
        self._release("bytes", nbytes)

    @contextlib.asynccontextmanager
    async def bytes(self, nbytes: int, deadline: float) -> AsyncIterator[None]:
        await self.reserve(nbytes, deadline)
        try:
            yield
        finally:
            self.release(nbytes)

    @contextlib.asynccontextmanager
    async def decode_slot(self, deadline: float) -> AsyncIterator[None]:
        await self._acquire("decodes", 1, deadline)
        try:
            yield
        finally:
            self._release("decodes", 1)

    async def close(self) -> None:
        """Stop the worker processes (a server's last for its lifetime; their stdin closing
        with the server stops them too)."""
        await self.photo_workers.close()
        await self.schema_workers.close()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    # -- internals ---------------------------------------------------------------------------

    def _pool(self, kind: str):
        waiters = self._byte_waiters if kind == "bytes" else self._decode_waiters
        return waiters, "free_" + kind

    async def _acquire(self, kind: str, amount: int, deadline: float) -> None:
        waiters, attr = self._pool(kind)
        if getattr(self, attr) >= amount:
            setattr(self, attr, getattr(self, attr) - amount)
            return
        if self.waiting >= self.queue_size:
            raise self._busy("its admission queue is full")
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():
                self._release(kind, amount)  # granted just as we gave up: hand it back
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(entry)
                self._wake(kind)  # a smaller request behind this one may fit now
            if isinstance(exc, asyncio.CancelledError):
                raise
            waited_for = "memory to be free" if kind == "bytes" else "a photo decoder"
            raise self._busy(f"the request waited too long for {waited_for}") from None

    def _release(self, kind: str, amount: int) -> None:
        _, attr = self._pool(kind)
        setattr(self, attr, getattr(self, attr) + amount)
        self._wake(kind)

    def _wake(self, kind: str) -> None:
        """Grant, in arrival order, every waiter that fits what is free now."""
        waiters, attr = self._pool(kind)
        for entry in list(waiters):
            amount, future = entry
            if future.done():
                waiters.remove(entry)
            elif getattr(self, attr) >= amount:
                waiters.remove(entry)
                setattr(self, attr, getattr(self, attr) - amount)
                future.set_result(None)

    def _busy(self, why: str) -> ServerBusy:
        retry = max(1, round(self.timeout_s / 2))
        return ServerBusy(f"the server is busy ({why}); retry in {retry} s", retry_after_s=retry)


class BodyReservation:
    """The budget a request body holds: ``BODY_COST_FACTOR`` times the bytes received so far,
    grown as they arrive (a declared length holds nothing until it is sent), released once,
    whole, by :meth:`release`."""

    def __init__(self, admission: Admission, deadline: float) -> None:
        self.admission = admission
        self.deadline = deadline
        self.held = 0

    async def cover(self, body_bytes: int) -> None:
        """Hold the cost of the ``body_bytes`` received so far (waiting for budget if need be)."""
        need = BODY_COST_FACTOR * body_bytes - self.held
        if need > 0:
            await self.admission.reserve(need, self.deadline)
            self.held += need

    def release(self) -> None:
        if self.held:
            self.admission.release(self.held)
            self.held = 0


class LiveTraffic:
    """Live requests first: how many Batch API requests may be in the engine at once. While
    live requests are in flight, or one ended less than ``quiet_s`` ago, at most ``busy``
    (a trickle, so a batch still moves under steady live load); otherwise ``idle``."""

    def __init__(self, idle: int, busy: int = 1, quiet_s: float = 1.0) -> None:
        self.idle, self.busy, self.quiet_s = idle, busy, quiet_s
        self.live = 0
        self.last_live = float("-inf")
        self.batch = 0
        self._changed: asyncio.Event | None = None

    def limit(self) -> int:
        recent = self.live or time.monotonic() - self.last_live < self.quiet_s
        return self.busy if recent else self.idle

    def live_started(self) -> None:
        self.live += 1
        self.last_live = time.monotonic()

    def live_ended(self) -> None:
        self.live -= 1
        self.last_live = time.monotonic()

    @contextlib.asynccontextmanager
    async def batch_slot(self) -> AsyncIterator[None]:
        """Wait until one more batch request fits the limit (checked again as the quiet time
        passes), and hold its place while it runs."""
        while self.batch >= self.limit():
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), self.quiet_s / 4)
            except TimeoutError:
                pass
        self.batch += 1
        try:
            yield
        finally:
            self.batch -= 1
            if self._changed is not None:
                self._changed.set()
                self._changed = None
