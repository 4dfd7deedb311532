"""Admission control: the API server holds only as much request work as fits in memory.

Two bounds, both in :class:`serving.api.policy.ServePolicy`:

- ``max_inflight_bytes``: a byte budget for the request bodies being read, parsed and checked.
  A body costs ``BODY_COST_FACTOR`` times its size while it is read and parsed (the raw bytes,
  their decoded text and the parsed strings). It is reserved as the bytes arrive, a step at a
  time (:class:`BodyReservation`), so a declared ``Content-Length`` holds nothing until it is
  sent and a stalled upload holds only what it sent.
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
one that does not, except behind a body that already holds part of the budget (it frees memory
only once it is whole, so it goes first). The policy makes sure the largest body allowed fits
the budget on its own.

Growing reservations could deadlock: many large bodies arriving at once each hold part of the
budget and wait for more (hold-and-wait). :meth:`Admission._give_way` breaks that circle
the moment it closes, when every byte held belongs to a waiting body: the newest of them gives
way (a 503, its bytes back), so the oldest always finishes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from serving.api.errors import ServerBusy
from serving.api.metrics import metrics
from serving.api.policy import BODY_COST_FACTOR, ServePolicy
from serving.api.workers import WorkerPool

SCHEMA_WORKERS = 1
# A body reserves its cost in steps of this many bytes (fewer waits than one per network chunk).
BODY_STEP = 2**20
SCHEMA_WORKER_NICE = 10


class _Wait:
    """One request waiting for bytes of the budget: ``body`` is the body it belongs to (a request
    body growing as it arrives, or a Batch API line reserved whole), or None for a fixed
    reservation (:meth:`Admission.reserve`)."""

    __slots__ = ("amount", "future", "body")

    def __init__(self, amount: int, future: asyncio.Future, body: BodyReservation | None) -> None:
        self.amount, self.future, self.body = amount, future, body

    def holds(self) -> int:
        return self.body.held if self.body is not None else 0


class Admission:
    """A byte budget, a bounded pool of decode slots and the worker processes behind them, for
    one event loop."""

    def __init__(self, max_bytes: int, max_decodes: int, queue_size: int, timeout_s: float,
                 policy: ServePolicy | None = None, *,
                 workers_of: Admission | None = None) -> None:
        """``workers_of``: another admission whose photo and schema worker processes (and
        schema slots) this one shares, with a byte budget and decode slots of its own."""
        self.max_bytes = max_bytes
        self.max_decodes = max_decodes
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.free_bytes = max_bytes
        self.free_decodes = max_decodes
        self.gave_way = 0  # bodies refused to break a hold-and-wait (see _give_way)
        # The server's admission counts its 503s in the metrics; one that shares another's
        # workers (the Batch API's checks) does not: a line it refuses is tried again.
        self.reports = workers_of is None
        self._byte_waiters: collections.deque[_Wait] = collections.deque()
        self._decode_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._arrivals = itertools.count()  # the age of each body, for "the newest gives way"
        if workers_of is not None:
            self.photo_workers = workers_of.photo_workers
            self.schema_workers = workers_of.schema_workers
            self.schema_slots = workers_of.schema_slots
        else:
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

    def body(self, declared: int | None = None, limit: int | None = None) -> BodyReservation:
        """The reservation of one request body, grown as its bytes arrive."""
        return BodyReservation(self, declared, limit)

    async def reserve(self, nbytes: int, deadline: float) -> None:
        """Take ``nbytes`` of the budget, waiting until ``deadline`` (then 503)."""
        await self._acquire_bytes(nbytes, deadline, None)

    def release(self, nbytes: int) -> None:
        self.free_bytes += nbytes
        self._wake_bytes()

    @contextlib.asynccontextmanager
    async def bytes(self, nbytes: int, deadline: float) -> AsyncIterator[None]:
        await self.reserve(nbytes, deadline)
        try:
            yield
        finally:
            self.release(nbytes)

    @contextlib.asynccontextmanager
    async def decode_slot(self, deadline: float) -> AsyncIterator[None]:
        await self._acquire_decode(deadline)
        try:
            yield
        finally:
            self.free_decodes += 1
            self._wake_decodes()

    async def close(self) -> None:
        """Stop the worker processes (a server's last for its lifetime; their stdin closing
        with the server stops them too)."""
        await self.photo_workers.close()
        await self.schema_workers.close()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    # -- the byte budget ---------------------------------------------------------------------

    def _holder_waiting(self) -> bool:
        return any(w.holds() for w in self._byte_waiters)

    async def _acquire_bytes(self, amount: int, deadline: float, body: BodyReservation | None) -> None:
        # A body that already holds part of the budget may take what is free at once; anything
        # else queues behind a waiting holder, whose body is half read and only frees memory
        # once it is whole.
        if self.free_bytes >= amount and ((body is not None and body.held) or not self._holder_waiting()):
            self.free_bytes -= amount
            return
        if self.waiting >= self.queue_size:
            raise self.busy("its admission queue is full", "queue_full")
        wait = _Wait(amount, asyncio.get_running_loop().create_future(), body)
        self._byte_waiters.append(wait)
        self._wake_bytes()  # this wait may close a hold-and-wait circle: break it now
        try:
            await asyncio.wait_for(asyncio.shield(wait.future), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if wait.future.done() and not wait.future.cancelled() and wait.future.exception() is None:
                self.release(amount)  # granted just as we gave up: hand it back
            elif not wait.future.done():
                wait.future.cancel()
                with contextlib.suppress(ValueError):
                    self._byte_waiters.remove(wait)
                self._wake_bytes()  # a smaller request behind this one may fit now
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self.busy("the request waited too long for memory to be free",
                             "timeout") from None

    def _grant(self, wait: _Wait) -> None:
        self._byte_waiters.remove(wait)
        self.free_bytes -= wait.amount
        wait.future.set_result(None)

    def _wake_bytes(self) -> None:
        """Grant every waiter that fits what is free now: first the bodies that already hold part
        of the budget, oldest first; then, if none of those is left waiting, the others in
        arrival order. Then break a hold-and-wait if one has formed, and grant again."""
        while True:
            for wait in [w for w in self._byte_waiters if w.future.done()]:
                self._byte_waiters.remove(wait)
            holders = sorted((w for w in self._byte_waiters if w.holds()),
                             key=lambda w: w.body.arrival)
            for wait in holders:
                if self.free_bytes >= wait.amount:
                    self._grant(wait)
            if not self._holder_waiting():
                for wait in list(self._byte_waiters):
                    if self.free_bytes >= wait.amount:
                        self._grant(wait)
            if not self._give_way():
                return

    def _give_way(self) -> bool:
        """When every byte held belongs to a body that is waiting for more, nobody will free
        any: the newest of those bodies gives way (a 503 and its bytes back; True), so that the
        others can go on. The oldest never gives way, and it fits the budget alone (the policy
        makes sure the largest body does), so some body always makes progress."""
        holders = [w for w in self._byte_waiters if w.holds()]
        held = self.max_bytes - self.free_bytes
        if not holders or held != sum(w.holds() for w in holders):
            return False  # some holder is reading, checking or answering: it will free its bytes
        victim = max(holders, key=lambda w: w.body.arrival)
        self._byte_waiters.remove(victim)
        self.free_bytes += victim.body.held
        victim.body.held = 0
        self.gave_way += 1
        victim.future.set_exception(self.busy(
            "its memory was needed to finish earlier uploads that arrived at the same time",
            "gave_way"))
        return True

    # -- decode slots ------------------------------------------------------------------------

    async def _acquire_decode(self, deadline: float) -> None:
        if self.free_decodes >= 1:
            self.free_decodes -= 1
            return
        if self.waiting >= self.queue_size:
            raise self.busy("its admission queue is full", "queue_full")
        future = asyncio.get_running_loop().create_future()
        self._decode_waiters.append((1, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():
                self.free_decodes += 1  # granted just as we gave up: hand it back
                self._wake_decodes()
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._decode_waiters.remove((1, future))
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self.busy("the request waited too long for a photo decoder",
                             "timeout") from None

    def _wake_decodes(self) -> None:
        for entry in list(self._decode_waiters):
            _, future = entry
            if future.done():
                self._decode_waiters.remove(entry)
            elif self.free_decodes >= 1:
                self._decode_waiters.remove(entry)
                self.free_decodes -= 1
                future.set_result(None)

    def busy(self, why: str, reason: str) -> ServerBusy:
        """The 503 of a request that does not fit; ``reason``: its metrics label."""
        if self.reports:
            metrics().admission_refusals.inc((reason,))
        retry = max(1, round(self.timeout_s / 2))
        return ServerBusy(f"the server is busy ({why}); retry in {retry} s", retry_after_s=retry)


class BodyReservation:
    """The budget a request body holds: ``BODY_COST_FACTOR`` times its bytes, reserved as they
    arrive up to the next multiple of :data:`BODY_STEP` (never past a declared ``Content-Length`` or the body
    limit), so a stalled upload holds no more than it sent. Its waits for budget add up to at
    most the admission timeout. Released once, whole, by :meth:`release`; taken back early, with
    a 503, when it must give way (:meth:`Admission._give_way`)."""

    def __init__(self, admission: Admission, declared: int | None = None,
                 limit: int | None = None) -> None:
        self.admission = admission
        self.arrival = next(admission._arrivals)
        self.held = 0
        largest = admission.max_bytes // BODY_COST_FACTOR
        self.limit = min(limit or largest, largest)
        if declared is not None:
            self.limit = min(self.limit, declared)
        self.wait_left_s = admission.timeout_s

    @property
    def waited_s(self) -> float:
        """Time this body has waited for the budget so far."""
        return max(0.0, self.admission.timeout_s - self.wait_left_s)

    async def cover(self, body_bytes: int) -> None:
        """Hold the cost of the ``body_bytes`` received so far (waiting for budget if need be)."""
        if BODY_COST_FACTOR * body_bytes <= self.held:
            return
        steps = -(-body_bytes // BODY_STEP)  # up to the next step boundary
        target = BODY_COST_FACTOR * max(body_bytes, min(steps * BODY_STEP, self.limit))
        started = time.monotonic()
        try:
            await self.admission._acquire_bytes(target - self.held, started + self.wait_left_s, self)
        finally:
            self.wait_left_s -= time.monotonic() - started
        self.held = target

    def release(self) -> None:
        if self.held:
            held, self.held = self.held, 0
            self.admission.release(held)


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
        started = time.monotonic()
        while self.batch >= self.limit():
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), self.quiet_s / 4)
            except TimeoutError:
                pass
        metrics().batch_gate_wait.observe(time.monotonic() - started)
        self.batch += 1
        try:
            yield
        finally:
            self.batch -= 1
            if self._changed is not None:
                self._changed.set()
                self._changed = None
