"""The loop dispatcher (server/dispatch.py): items put from other threads reach their asyncio
queues in the order they were put, and a burst of puts costs one wake-up of the loop."""

import asyncio
import threading

import pytest

from falcon_mamba.server.dispatch import dispatcher_for


def _count_wakeups(loop) -> list:
    calls = []
    real = loop.call_soon_threadsafe

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    loop.call_soon_threadsafe = counting
    return calls


def test_a_burst_of_puts_is_one_wake_up_and_keeps_each_queues_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = _count_wakeups(loop)
        d = dispatcher_for(loop)
        assert dispatcher_for(loop) is d
        queues = [asyncio.Queue() for _ in range(16)]
        for k in range(1000):  # the loop cannot run in between: one step's sinks, all at once
            d.put(queues[k % 16], k)
        assert len(wakeups) == 1 and all(q.empty() for q in queues)
        await asyncio.sleep(0)
        for i, q in enumerate(queues):
            assert [q.get_nowait() for _ in range(q.qsize())] == list(range(i, 1000, 16))
        d.put(queues[0], "next")  # the flush ran: the next burst schedules its own
        assert len(wakeups) == 2
        assert await asyncio.wait_for(queues[0].get(), 5) == "next"

    asyncio.run(main())


def test_puts_from_a_thread_arrive_in_order_with_fewer_wake_ups():
    streams, steps = 64, 200

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = _count_wakeups(loop)
        d = dispatcher_for(loop)
        queues = [asyncio.Queue() for _ in range(streams)]

        def engine():
            for k in range(steps):
                for q in queues:
                    d.put(q, k)

        async def consume(q):
            return [await q.get() for _ in range(steps)]

        th = threading.Thread(target=engine)
        th.start()
        got = await asyncio.wait_for(asyncio.gather(*(consume(q) for q in queues)), 60)
        th.join()
        assert all(g == list(range(steps)) for g in got)
        assert 1 <= len(wakeups) < streams * steps // 10, len(wakeups)

    asyncio.run(main())


def test_a_closed_loop_raises_as_call_soon_threadsafe_did():
    """The engine cancels a request whose sink raises; so put must raise once nobody listens."""
    loop = asyncio.new_event_loop()
    d = dispatcher_for(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        d.put(asyncio.Queue(), 1)
    with pytest.raises(RuntimeError):  # and again: not stuck believing a flush is scheduled
        d.put(asyncio.Queue(), 2)
