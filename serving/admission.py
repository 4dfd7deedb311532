"""Admission control: the API server holds only as much request work as fits in memory.

Two bounds, both in :class:`serving.policy.ServePolicy`:

- ``max_inflight_bytes``: a byte budget for the request bodies being read, parsed and checked.
  A body costs ``BODY_COST_FACTOR`` times its size while it is read and parsed (the raw bytes,
  their decoded text and the parsed strings) and is reserved before the first byte is read,
  from ``Content-Length`` (or the body limit when the length is not declared).
- ``max_concurrent_decodes``: photos decoded at once (decoding is CPU-bound: more at once only
  adds memory). Each decode holds one full-size photo in memory for a moment.

A request that does not fit waits in a bounded FIFO queue (``admission_queue_size`` waiters, at
most ``admission_timeout_s``); past that it gets a 503 with ``Retry-After``. The policy makes
sure the largest body allowed fits the budget on its own, so every request can be admitted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from serving.errors import ServerBusy
from serving.policy import BODY_COST_FACTOR, ServePolicy


class Admission:
    """A FIFO byte budget and a bounded pool of decode slots for one event loop."""

    def __init__(self, max_bytes: int, max_decodes: int, queue_size: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_decodes = max_decodes
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.free_bytes = max_bytes
        self.free_decodes = max_decodes
        self._byte_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._decode_waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._byte_waiters) + len(self._decode_waiters)

    @classmethod
    def from_policy(cls, policy: ServePolicy) -> Admission:
        return cls(policy.max_inflight_bytes, policy.max_concurrent_decodes,
                   policy.admission_queue_size, policy.admission_timeout_s)

    @staticmethod
    def body_cost(declared: int | None, max_body_bytes: int) -> int:
        """Bytes a body holds while read and parsed; the body limit when not declared."""
        return BODY_COST_FACTOR * min(declared if declared is not None else max_body_bytes,
                                      max_body_bytes)

    @contextlib.asynccontextmanager
    async def bytes(self, nbytes: int, deadline: float) -> AsyncIterator[None]:
        await self._acquire("bytes", nbytes, deadline)
        try:
            yield
        finally:
            self._release("bytes", nbytes)

    @contextlib.asynccontextmanager
    async def decode_slot(self, deadline: float) -> AsyncIterator[None]:
        await self._acquire("decodes", 1, deadline)
        try:
            yield
        finally:
            self._release("decodes", 1)

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    # -- internals ---------------------------------------------------------------------------

    def _pool(self, kind: str):
        waiters = self._byte_waiters if kind == "bytes" else self._decode_waiters
        return waiters, "free_" + kind

    async def _acquire(self, kind: str, amount: int, deadline: float) -> None:
        waiters, attr = self._pool(kind)
        if not waiters and getattr(self, attr) >= amount:
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
        waiters, attr = self._pool(kind)
        while waiters:
            amount, future = waiters[0]
            if future.done():
                waiters.popleft()
                continue
            if getattr(self, attr) < amount:
                return  # first come, first served: nobody overtakes the head of the queue
            waiters.popleft()
            setattr(self, attr, getattr(self, attr) - amount)
            future.set_result(None)

    def _busy(self, why: str) -> ServerBusy:
        retry = max(1, round(self.timeout_s / 2))
        return ServerBusy(f"the server is busy ({why}); retry in {retry} s", retry_after_s=retry)
