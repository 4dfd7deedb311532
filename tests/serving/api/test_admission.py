"""Admission control on its own: the byte budget, the decode slots, the queue and the timeouts."""

from __future__ import annotations

import asyncio

import pytest

from serving.api.admission import Admission
from serving.api.errors import ServerBusy
from serving.api.policy import BODY_COST_FACTOR, ServePolicy, default_inflight_bytes, machine_memory_bytes


def run(coro):
    return asyncio.run(coro)


def test_a_request_that_fits_is_not_held_behind_a_larger_one_and_nothing_is_lost():
    async def scenario():
        adm = Admission(max_bytes=100, max_decodes=1, queue_size=8, timeout_s=5)
        order = []

        async def job(name, nbytes, hold):
            async with adm.bytes(nbytes, adm.deadline()):
                order.append(name)
                await hold.wait()

        holds = {name: asyncio.Event() for name in "abcd"}
        a = asyncio.create_task(job("a", 60, holds["a"]))
        await asyncio.sleep(0.01)
        b = asyncio.create_task(job("b", 60, holds["b"]))  # does not fit beside a: waits
        await asyncio.sleep(0.01)
        c = asyncio.create_task(job("c", 10, holds["c"]))  # fits now: not held behind b
        await asyncio.sleep(0.01)
        assert order == ["a", "c"] and adm.waiting == 1
        d = asyncio.create_task(job("d", 40, holds["d"]))  # 60 + 10 + 40 > 100: waits too
        await asyncio.sleep(0.01)
        holds["a"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "c", "b"]  # b first in arrival order; d does not fit beside b + c
        holds["c"].set()
        await asyncio.sleep(0.01)
        assert order == ["a", "c", "b", "d"]
        holds["b"].set(), holds["d"].set()
        await asyncio.gather(a, b, c, d)
        assert adm.free_bytes == 100 and adm.waiting == 0

    run(scenario())


def test_a_body_reservation_grows_with_the_bytes_received_and_is_released_whole():
    from serving.api.admission import BodyReservation

    async def scenario():
        adm = Admission(max_bytes=BODY_COST_FACTOR * 100, max_decodes=1, queue_size=8, timeout_s=5)
        held = BodyReservation(adm, adm.deadline())
        assert adm.free_bytes == adm.max_bytes  # nothing held before a byte arrives
        await held.cover(10)
        assert held.held == BODY_COST_FACTOR * 10
        await held.cover(10)
        await held.cover(60)
        assert held.held == BODY_COST_FACTOR * 60
        assert adm.free_bytes == BODY_COST_FACTOR * 40
        held.release()
        held.release()  # once only
        assert adm.free_bytes == adm.max_bytes

    run(scenario())


def test_timeout_gives_a_busy_error_with_retry_after_and_returns_the_budget():
    async def scenario():
        adm = Admission(max_bytes=100, max_decodes=1, queue_size=8, timeout_s=0.05)
        async with adm.bytes(80, adm.deadline()):
            with pytest.raises(ServerBusy) as info:
                async with adm.bytes(30, adm.deadline()):
                    pass
            assert adm.waiting == 0
        assert adm.free_bytes == 100
        return info.value

    err = run(scenario())
    assert err.status == 503 and "busy" in err.message
    assert dict(err.headers())[b"retry-after"] == b"1"


def test_a_full_queue_refuses_at_once():
    async def scenario():
        adm = Admission(max_bytes=10, max_decodes=1, queue_size=1, timeout_s=5)
        async with adm.bytes(10, adm.deadline()):
            waiter = asyncio.create_task(adm.bytes(5, adm.deadline()).__aenter__())
            await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ServerBusy, match="queue is full"):
                async with adm.bytes(5, adm.deadline()):
                    pass
            assert loop.time() - start < 0.5
        await waiter  # granted once the first holder left
        assert adm.free_bytes == 5

    run(scenario())


def test_a_cancelled_waiter_leaves_no_trace():
    async def scenario():
        adm = Admission(max_bytes=10, max_decodes=1, queue_size=4, timeout_s=5)
        async with adm.bytes(10, adm.deadline()):
            waiter = asyncio.create_task(adm.bytes(10, adm.deadline()).__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert adm.waiting == 0
        assert adm.free_bytes == 10

    run(scenario())


def test_decode_slots_bound_concurrent_decodes():
    async def scenario():
        adm = Admission(max_bytes=10, max_decodes=2, queue_size=16, timeout_s=5)
        active = peak = 0

        async def decode():
            nonlocal active, peak
            async with adm.decode_slot(adm.deadline()):
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.01)
                active -= 1

        await asyncio.gather(*(decode() for _ in range(7)))
        assert adm.free_decodes == 2
        return peak

    assert run(scenario()) == 2


def test_policy_keeps_the_largest_body_admissible():
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        ServePolicy(max_body_bytes=10 * 2**20, max_inflight_bytes=2 * 10 * 2**20)
    policy = ServePolicy(max_body_bytes=10 * 2**20, max_inflight_bytes=BODY_COST_FACTOR * 10 * 2**20)
    assert policy.max_inflight_bytes == BODY_COST_FACTOR * policy.max_body_bytes  # one largest body


def test_defaults_follow_the_machine():
    default = ServePolicy()
    assert default.max_inflight_bytes == default_inflight_bytes()
    assert BODY_COST_FACTOR * default.max_body_bytes <= default.max_inflight_bytes <= 8 * 2**30
    assert default.max_inflight_bytes >= min(machine_memory_bytes() // 16, 8 * 2**30)
    assert 1 <= default.max_concurrent_decodes <= 8
