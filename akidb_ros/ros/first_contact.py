"""Service calls that survive DDS's first-contact race (client side).

``wait_for_service`` (rmw_fastrtps) turns true once *this client's* request writer has matched
the service's request reader. Each side matches on its own, though: the service's reader may
match the writer a moment later, and a volatile reader keeps only what is written after its
own match. A request sent in that gap never reaches the service, and the caller waits out its
whole timeout for an answer nobody computes (seen in a full test run on the 2-core machine: 16
clients started together, the node counted 63 calls where they had sent 64, and the one lost
was a client's first). The reverse direction, a reply sent before the service's writer has
matched the client's reader, is the service's to repair (``akidb_ros.ros.replies``).

:class:`FirstContact` wraps one rclpy client: until the service has answered it once, a call
with no answer after ``resend_s`` is sent again (the same request with a new sequence number,
the gap doubling up to ``MAX_GAP_S``) until an answer arrives or the caller withdraws it; the
first answer wins and rclpy forgets the other copies. The node's services are safe to call
twice: a model load is deduplicated by the engine, and the node joins an ``embed`` copy to
the identical call still in flight when the call carries a ``request_id`` (without one, each
copy is computed). After one answer the
service has matched this client: calls go out once, as plain rclpy calls, with nothing added.
Wrap only a client whose calls are safe to repeat: a copy of a lifecycle ``change_state``
arrives while the first one runs and is refused, and that refusal would win (a successful
``configure`` answered ``success=false``). ``EmbeddingClient.call_service`` therefore re-sends
only for the node's own services and ROS's read-only ones (``akidb_ros.ros.cli.repeatable``);
``resend_s=0`` makes a FirstContact a plain client behind the same interface.
:meth:`FirstContact.reset` re-arms it where the service may be a new one (it left the graph;
the sidecar's ``RosBackend`` does so).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional

from rclpy.client import Client
from rclpy.task import Future

from akidb_ros.engine.deadlines import DeadlineWatcher

RESEND_S = 0.5          # a first call's first copy waits this long for its answer
MAX_GAP_S = 2.0

_watcher: Optional[DeadlineWatcher] = None
_watcher_lock = threading.Lock()


def _shared_watcher() -> DeadlineWatcher:
    """One thread for every client's re-sends in this process, started on first use."""
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = DeadlineWatcher(name='akidb-first-contact')
        return _watcher


class FirstContact:
    """An rclpy client whose calls are re-sent until the service has answered it once."""

    def __init__(self, client: Client, resend_s: float = RESEND_S,
                 watcher: Optional[DeadlineWatcher] = None):
        self.client = client
        self.resend_s = resend_s
        self.answered = False       # the service has answered this client: it matched us
        self.copies_sent = 0        # re-sent copies (tests, diagnostics)
        self._watcher = watcher
        self._lock = threading.Lock()
        self._calls: Dict[int, _FirstCall] = {}

    def call_async(self, request) -> Future:
        """``client.call_async``, re-sent while the service may not have matched us yet."""
        if self.answered or self.resend_s <= 0:
            return self.client.call_async(request)
        call = _FirstCall(self, request, self._watcher or _shared_watcher())
        return call.out

    def forget(self, future: Future) -> None:
        """Withdraw ``future`` (the caller gave up): no more copies, rclpy forgets all of them."""
        with self._lock:
            call = self._calls.pop(id(future), None)
        if call is None:
            self.client.remove_pending_request(future)
        else:
            call.withdraw()

    def reset(self) -> None:
        """Re-arm: the next calls may meet a new service (the old one left the graph)."""
        self.answered = False

    def service_is_ready(self) -> bool:
        return self.client.service_is_ready()

    def wait_for_service(self, timeout_sec: Optional[float] = None) -> bool:
        return self.client.wait_for_service(timeout_sec=timeout_sec)

    @property
    def srv_name(self) -> str:
        return self.client.srv_name


class _FirstCall:
    """One call before first contact: its copies, and the next re-send (a watcher item)."""

    __slots__ = ('owner', 'request', 'out', 'copies', 'gap', 'deadline', 'withdrawn', 'settled',
                 '_lock', '_watcher')

    def __init__(self, owner: FirstContact, request, watcher: DeadlineWatcher):
        self.owner, self.request, self._watcher = owner, request, watcher
        self.out: Future = Future()
        self.copies: List[Future] = []
        self.gap = owner.resend_s
        self.withdrawn = False
        self.settled = False
        self._lock = threading.Lock()
        with owner._lock:
            owner._calls[id(self.out)] = self
        try:
            self._send()
        except BaseException:   # not sent at all (a destroyed client): the caller hears of it
            with owner._lock:
                owner._calls.pop(id(self.out), None)
            raise
        self.deadline = time.monotonic() + self.gap
        watcher.watch(self)

    @property
    def done(self) -> bool:
        return self.withdrawn or self.settled

    def _send(self) -> None:
        copy = self.owner.client.call_async(self.request)
        with self._lock:
            self.copies.append(copy)
        copy.add_done_callback(self._answered)

    def expire(self, now: float) -> None:
        """No answer yet: send another copy and wait twice as long for the next look."""
        # Once any call of this client was answered the service has matched it: the copies in
        # flight will be delivered, and more of them would only add load to a slow service.
        if self.done or self.owner.answered:
            return
        try:
            self._send()
        except Exception:   # the client was destroyed meanwhile: the caller's timeout decides
            return
        self.owner.copies_sent += 1
        self.gap = min(self.gap * 2, MAX_GAP_S)
        self.deadline = now + self.gap
        self._watcher.watch(self)

    def _answered(self, copy: Future) -> None:
        with self._lock:    # the first copy to answer claims the call; later ones find it taken
            if self.settled or self.withdrawn:
                return
            self.settled = True
            others = [c for c in self.copies if c is not copy]
        self._drop(others)
        # outside the lock: the caller's done-callbacks may call again (a closed-loop client)
        if copy.cancelled():
            self.out.cancel()
        elif copy.exception() is not None:
            self.out.set_exception(copy.exception())
        else:
            self.owner.answered = True
            self.out.set_result(copy.result())

    def withdraw(self) -> None:
        with self._lock:
            self.withdrawn = True
            copies = list(self.copies)
        self._drop(copies)

    def _drop(self, copies: List[Future]) -> None:
        with self.owner._lock:
            self.owner._calls.pop(id(self.out), None)
        for c in copies:
            if not c.done():
                self.owner.client.remove_pending_request(c)
