"""The consistent-hash ring behind consult affinity: a consult's session id -> its replica.

Each replica owns ``virtual_nodes`` points on a 64-bit ring (BLAKE2b of ``"<replica>:<i>"``, the
same in every process); a key goes to the replica owning the first point after the key's hash,
then, as fallbacks, to the next distinct replicas clockwise. Adding or removing a replica moves
only the keys of the points it owns, so the other consults keep their replica (and its prefix
cache). No Ray import: :class:`serving.cluster.routers.SessionAffinityRouter` uses it with Ray's
replica ids.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Hashable, Iterable


def ring_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def replica_key(replica_id: Hashable) -> str:
    """A replica's name on the ring: Ray's ``ReplicaID.unique_id`` (stable across controller
    restarts), else its text."""
    return str(getattr(replica_id, "unique_id", replica_id))


class ConsultRing:
    def __init__(self, virtual_nodes: int = 100, fallbacks: int = 2) -> None:
        self.virtual_nodes = virtual_nodes
        self.fallbacks = fallbacks
        self.members: frozenset = frozenset()
        self._hashes: list[int] = []
        self._owners: list[Hashable] = []

    def update(self, replica_ids: Iterable[Hashable]) -> bool:
        """Rebuild for these replicas; False when they are the ones the ring already has."""
        members = frozenset(replica_ids)
        if members == self.members:
            return False
        points = sorted((ring_hash(f"{replica_key(r)}:{i}"), r)
                        for r in members for i in range(self.virtual_nodes))
        self._hashes = [h for h, _ in points]
        self._owners = [r for _, r in points]
        self.members = members
        return True

    def ranked(self, key: str) -> list[Hashable]:
        """The replica for ``key``, then up to ``fallbacks`` other replicas, clockwise."""
        if not self._hashes:
            return []
        start = bisect.bisect_right(self._hashes, ring_hash(key)) % len(self._hashes)
        wanted = min(1 + self.fallbacks, len(self.members))
        ranked: list[Hashable] = []
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in ranked:
                ranked.append(owner)
                if len(ranked) == wanted:
                    break
        return ranked
