"""One thread that fires deadlines: the engine's jobs and the sidecar bridge's DDS calls.

Most requests are answered within milliseconds, long before their deadline, so the request path
must pay next to nothing for arming one, and the thread must not run while they do: ``watch``
appends to a deque (atomic under the GIL: no lock) and wakes the thread only when the new
deadline falls before the thread's next planned look. The thread sleeps until the earliest
deadline it holds, or at most ``sweep_s``, when it moves the arrivals still unanswered into its
heap and lets the answered ones go; a deadline fires on time, not a tick late. With the default
timeouts (every new deadline later than the planned look) a request wakes nothing.

Measured on the 2-core CPU: a watcher that woke for each idle-time arrival and then every 10 ms
cost a lone caller 0.1-0.2 ms at the median and up to 0.8 ms at the upper quartile (it took a
core from ONNX Runtime's two threads mid-run);
a heap push under a lock shared with the thread cost the GIL-bound engine ~8 % of its throughput
(``bench/python_limit.py``); a ``threading.Timer`` per call (the bridge's first design) costs a
thread start and exit, ~0.18 ms of CPU, and holds one thread per call in flight.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from typing import List, Protocol


class Expirable(Protocol):
    """What the watcher needs of an item."""

    deadline: float          # time.monotonic() at which it expires

    @property
    def done(self) -> bool:
        """Answered already: nothing to fire."""

    def expire(self, now: float) -> None:
        """Answer it with a timeout (a no-op if it was answered meanwhile)."""


_ENGINE_THREAD = threading.local()


def mark_engine_thread() -> None:
    """Mark the calling thread as one of the engine's own (its runners, its deadline watcher):
    the threads that answer its futures, and so run their done-callbacks."""
    _ENGINE_THREAD.on = True


def on_engine_thread() -> bool:
    """Whether the calling thread is one of the engine's own (``mark_engine_thread``)."""
    return getattr(_ENGINE_THREAD, 'on', False)


class DeadlineWatcher:
    """Calls ``item.expire(now)`` for each watched item still unanswered at its deadline.

    ``engine_thread``: its thread is one of an engine's own (``mark_engine_thread``); a
    bridge's or a ROS client's watcher is not.
    """

    def __init__(self, sweep_s: float = 1.0, name: str = 'akidb-deadlines',
                 engine_thread: bool = False):
        self.sweep_s = sweep_s            # longest sleep: answered arrivals are let go this often
        self._incoming: collections.deque = collections.deque()
        self._heap: list = []             # (deadline, seq, item); this thread's alone
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._wake_at = 0.0               # the sleeping thread's next look (time.monotonic())
        self.wakeups = 0                  # times the thread looked (tests, diagnostics)
        self._stopped = False
        self._engine_thread = engine_thread
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def watch(self, item: Expirable) -> None:
        self._incoming.append(item)
        # Read after the append: the thread looks at the arrivals once more before it sleeps.
        if item.deadline < self._wake_at:
            with self._cond:
                self._cond.notify()

    def stop(self) -> List[Expirable]:
        """End the thread; return the items still unanswered (the caller settles them)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2)
        pending = [item for _, _, item in self._heap] + list(self._incoming)
        self._heap.clear()
        self._incoming.clear()
        return [item for item in pending if not item.done]

    def _sweep(self) -> None:
        heap, incoming = self._heap, self._incoming
        while incoming:
            item = incoming.popleft()
            if not item.done:
                heapq.heappush(heap, (item.deadline, next(self._seq), item))
        # Drop answered items from the top so the heap does not hold them till expiry.
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, item = heapq.heappop(heap)
            if not item.done:
                item.expire(now)

    def _loop(self) -> None:
        if self._engine_thread:
            mark_engine_thread()
        while True:
            self.wakeups += 1
            self._sweep()
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                wake = now + self.sweep_s
                if self._heap:
                    wake = min(wake, self._heap[0][0])
                # Publish the plan before looking at the arrivals since the sweep: one that
                # lands after this look reads it (and wakes us if due sooner), one before it is
                # in the list below.
                self._wake_at = wake
                for item in list(self._incoming):
                    wake = min(wake, item.deadline)
                self._wake_at = wake
                self._cond.wait(timeout=max(0.0, wake - now))
