"""The consult ring: the same replica for a session in every process, fallbacks distinct, and
few sessions moved when a replica joins."""

from __future__ import annotations

from serving.cluster.routing import ConsultRing


def test_a_session_keeps_its_replica_and_gets_distinct_fallbacks():
    ring = ConsultRing(virtual_nodes=100, fallbacks=2)
    assert ring.ranked("consult-1") == []
    assert ring.update(["r0", "r1", "r2", "r3"]) and not ring.update(["r3", "r2", "r1", "r0"])
    again = ConsultRing(100, 2)
    again.update(["r3", "r1", "r0", "r2"])
    for i in range(50):
        ranked = ring.ranked(f"consult-{i}")
        assert len(ranked) == 3 == len(set(ranked))
        assert again.ranked(f"consult-{i}") == ranked  # no per-process hash seed
    assert len({ring.ranked(f"consult-{i}")[0] for i in range(50)}) == 4


def test_a_new_replica_takes_only_its_share_of_the_sessions():
    ring = ConsultRing(100, 0)
    ring.update(["r0", "r1", "r2"])
    before = {f"c{i}": ring.ranked(f"c{i}")[0] for i in range(400)}
    ring.update(["r0", "r1", "r2", "r3"])
    moved = [k for k, r in before.items() if ring.ranked(k)[0] != r]
    assert all(ring.ranked(k)[0] == "r3" for k in moved)
    assert 40 <= len(moved) <= 160  # about a quarter
    single = ConsultRing(10, 5)
    single.update(["only"])
    assert single.ranked("x") == ["only"]  # fallbacks never repeat a replica
