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


def test_a_body_reservation_grows_in_steps_with_the_bytes_received_and_is_released_whole():
    from serving.api.admission import BODY_STEP, BodyReservation

    async def scenario():
        adm = Admission(max_bytes=BODY_COST_FACTOR * 4 * BODY_STEP, max_decodes=1, queue_size=8,
                        timeout_s=5)
        chunked = BodyReservation(adm)
        assert adm.free_bytes == adm.max_bytes  # nothing held before a byte arrives
        await chunked.cover(10)
        assert chunked.held == BODY_COST_FACTOR * BODY_STEP  # up to the step's end
        await chunked.cover(BODY_STEP)
        assert chunked.held == BODY_COST_FACTOR * BODY_STEP  # still inside the step
        await chunked.cover(BODY_STEP + 20)
        assert chunked.held == BODY_COST_FACTOR * 2 * BODY_STEP
        declared = BodyReservation(adm, declared=BODY_STEP // 2)
        await declared.cover(10)
        assert declared.held == BODY_COST_FACTOR * (BODY_STEP // 2)  # never past the declared size
        assert adm.free_bytes == adm.max_bytes - chunked.held - declared.held
        chunked.release()
        chunked.release()  # once only
        declared.release()
        assert adm.free_bytes == adm.max_bytes

    run(scenario())


def test_bodies_that_all_hold_part_of_the_budget_and_wait_for_more_do_not_deadlock():
    """Hold-and-wait: three bodies of three steps arrive together and each holds a step of a
    budget that fits four. The moment all of them wait for more, the newest gives way (503,
    its bytes back) and the two older ones finish; nobody waits for the timeout."""
    from serving.api.admission import BODY_STEP, BodyReservation

    async def scenario():
        adm = Admission(max_bytes=BODY_COST_FACTOR * 4 * BODY_STEP, max_decodes=1, queue_size=8,
                        timeout_s=30)
        size = 3 * BODY_STEP
        bodies = [BodyReservation(adm, declared=size) for _ in range(3)]
        results = {}

        async def upload(i, body):
            try:
                for received in (1, BODY_STEP + 1, 2 * BODY_STEP + 1, size):
                    await body.cover(received)
                    await asyncio.sleep(0)  # the next chunk comes later: the others run
                results[i] = "whole"
            except ServerBusy as busy:
                results[i] = str(busy)
            finally:
                await asyncio.sleep(0.01)
                body.release()

        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(upload(i, b) for i, b in enumerate(bodies)))
        assert asyncio.get_running_loop().time() - started < 1
        assert results[0] == "whole" and results[1] == "whole", results
        assert "busy" in results[2] and "earlier uploads" in results[2], results
        assert adm.free_bytes == adm.max_bytes and adm.waiting == 0 and adm.gave_way == 1

    run(scenario())


def test_bodies_waiting_behind_a_slow_upload_wait_instead_of_giving_way():
    """A body that holds budget and is not waiting (still receiving, or being checked) will free
    it: the others wait for it (here until the admission timeout, a 503) rather than being
    refused at once; a new request does not take budget ahead of a waiting body that already
    holds some."""
    from serving.api.admission import BODY_STEP, BodyReservation

    async def scenario():
        step = BODY_COST_FACTOR * BODY_STEP
        adm = Admission(max_bytes=4 * step, max_decodes=1, queue_size=8, timeout_s=0.5)
        slow = BodyReservation(adm, declared=3 * BODY_STEP)
        await slow.cover(3 * BODY_STEP)  # whole: 3 of the 4 steps
        waiting = BodyReservation(adm, declared=2 * BODY_STEP)
        await waiting.cover(1)  # the last step
        grow = asyncio.create_task(waiting.cover(BODY_STEP + 1))
        await asyncio.sleep(0.01)
        assert adm.waiting == 1 and adm.gave_way == 0
        adm.release(step // 2)  # half a step freed elsewhere: fits a newcomer, not the holder
        newcomer = asyncio.create_task(adm.reserve(step // 4, adm.deadline()))
        await asyncio.sleep(0.01)
        assert not newcomer.done()  # it fits, but a body that holds budget waits first
        slow.release()
        await grow
        await newcomer
        assert waiting.held == 2 * step
        with pytest.raises(ServerBusy, match="waited too long"):
            await BodyReservation(adm, declared=4 * BODY_STEP).cover(4 * BODY_STEP)
        assert adm.gave_way == 0

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
