"""One thread that fires deadlines: the engine's jobs and the sidecar bridge's DDS calls.

Most requests are answered within milliseconds, long before their deadline, so the request path
must pay next to nothing for arming one: ``watch`` only appends to a deque (atomic under the
GIL: no lock, no wake-up). A heap push under a lock shared with the thread cost the GIL-bound
engine ~8 % of its throughput (``bench/python_limit.py``); a ``threading.Timer`` per call (the
bridge's first design) costs a thread start and exit, ~0.18 ms of CPU, and holds one thread per
call in flight. The thread owns the heap: every ``tick_s`` while items are pending it moves the
arrivals still unanswered into it, drops answered ones and expires due ones, so a deadline fires
at most ``tick_s`` late. With nothing pending it sleeps until the next arrival.
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


class DeadlineWatcher:
    """Calls ``item.expire(now)`` for each watched item still unanswered at its deadline."""

    def __init__(self, tick_s: float = 0.01, name: str = 'akidb-deadlines'):
        self.tick_s = tick_s
        self._incoming: collections.deque = collections.deque()
        self._heap: list = []             # (deadline, seq, item); this thread's alone
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._idle = False                # set under _cond when the thread waits for arrivals
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def watch(self, item: Expirable) -> None:
        self._incoming.append(item)
        if self._idle:   # read after the append: an idle thread re-checks before it sleeps
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
        while True:
            self._sweep()
            with self._cond:
                if self._stopped:
                    return
                if self._incoming:
                    continue
                if not self._heap:
                    self._idle = True
                    if not self._incoming:
                        self._cond.wait()
                    self._idle = False
                    continue
                left = self._heap[0][0] - time.monotonic()
                self._cond.wait(timeout=max(0.0, min(self.tick_s, left)))
