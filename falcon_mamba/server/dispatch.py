"""Items from other threads into an event loop's asyncio queues, one wake-up for many.

The engine thread hands every stream its deltas once per step. One ``loop.call_soon_threadsafe``
per stream is a write to the loop's self-pipe and a wake-up each (256 streams: 256 per step, all
fighting the engine thread for the interpreter lock). The dispatcher instead queues (queue, item)
pairs under a lock and schedules one flush on the loop when none is scheduled yet: a step's sinks
then cost one wake-up (a few when the loop happens to run a flush while the step is still handing
out), and each queue still gets its items in the order they were put.

    d = dispatcher_for(loop)   # one per loop
    d.put(queue, item)         # any thread; the item reaches queue.put_nowait on the loop
"""

from __future__ import annotations

import asyncio
import threading
import weakref


class LoopDispatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # not a strong one: the loop is the key of _dispatchers
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        """Queue item for queue (callable from any thread, the loop's own included)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("Event loop is closed")
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: nobody will read these queues again
            with self._lock:
                self._items.clear()
                self._scheduled = False
            raise

    def _flush(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_dispatchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def dispatcher_for(loop: asyncio.AbstractEventLoop) -> LoopDispatcher:
    """The loop's dispatcher (made on first use, gone with the loop)."""
    with _lock:
        d = _dispatchers.get(loop)
        if d is None:
            d = _dispatchers[loop] = LoopDispatcher(loop)
        return d
