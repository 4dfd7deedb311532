"""Fair share of the Batch API's in-flight limit between tenants.

Batches of different tenants (API keys) run side by side; :class:`FairShare` decides whose line
takes the next of the ``batch_max_inflight`` places. A place that frees goes to the tenant that
holds the fewest places now (ties: the one served longest ago), and within that tenant to its
oldest batch. So tenants take turns and end up holding equal shares; a tenant's many batches
count as one tenant; a tenant alone takes every place; and a place never stays free while a
line waits. A place is held from the moment a line is handed to the engine's route until its
answer is recorded; lines already recorded (a resumed batch) and refused lines take none.
Live traffic still comes first: a line holding a place also waits for
:meth:`serving.api.admission.LiveTraffic.batch_slot`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any


class _Wait:
    __slots__ = ("share", "order", "future")

    def __init__(self, share: Share, order: int, future: asyncio.Future) -> None:
        self.share, self.order, self.future = share, order, future


class FairShare:
    """``size`` places shared among tenants; one :meth:`share` per running batch."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.held: collections.Counter[str] = collections.Counter()  # places per tenant
        self._waits: list[_Wait] = []
        self._turns = itertools.count()
        self._last_turn: dict[str, int] = {}  # tenant -> when it last got a place

    def share(self, tenant: str, rank: Any) -> Share:
        """The places one batch of ``tenant`` asks for; ``rank`` orders a tenant's batches
        (lower first: its creation time and id)."""
        return Share(self, tenant, rank)

    def waiting(self, tenant: str | None = None) -> int:
        return sum(1 for w in self._waits if tenant is None or w.share.tenant == tenant)

    def _grant(self) -> None:
        self._waits = [w for w in self._waits if not w.future.done()]
        while self.free and self._waits:
            tenants = {w.share.tenant for w in self._waits}
            tenant = min(tenants, key=lambda t: (self.held[t], self._last_turn.get(t, -1), t))
            wait = min((w for w in self._waits if w.share.tenant == tenant),
                       key=lambda w: (w.share.rank, w.order))
            self._waits.remove(wait)
            self.free -= 1
            self.held[tenant] += 1
            wait.share.held += 1
            self._last_turn[tenant] = next(self._turns)
            wait.future.set_result(None)

    def _release(self, share: Share) -> None:
        if share.held <= 0:
            raise RuntimeError("a batch released a place it does not hold")
        share.held -= 1
        self.held[share.tenant] -= 1
        if not self.held[share.tenant]:
            del self.held[share.tenant]
        self.free += 1
        self._grant()


class Share:
    """One batch's claim on the places: :meth:`acquire` one (waiting its turn), :meth:`release`
    it. The interface of an ``asyncio.Semaphore``, so a :class:`serving.api.batch_api.runner.BatchRun`
    takes either."""

    def __init__(self, pool: FairShare, tenant: str, rank: Any) -> None:
        self.pool, self.tenant, self.rank = pool, tenant, rank
        self.held = 0

    async def acquire(self) -> bool:
        pool = self.pool
        wait = _Wait(self, next(pool._turns), asyncio.get_running_loop().create_future())
        pool._waits.append(wait)
        pool._grant()
        try:
            await asyncio.shield(wait.future)
        except asyncio.CancelledError:
            if wait.future.done() and not wait.future.cancelled():
                pool._release(self)  # granted just as the wait was cancelled: hand it on
            else:
                wait.future.cancel()
                pool._grant()
            raise
        return True

    def release(self) -> None:
        self.pool._release(self)
