"""Sending service replies: deferred answers, and sending again what DDS dropped.

Deferred answers: a service callback may return a :class:`Deferred` (the engine's future plus how
to build the response from it); :class:`DeferringService` hands it to the :class:`Responder`,
whose thread sends the reply when the future resolves, so callbacks never block the executor.

Dropped replies: rmw_fastrtps sends a reply only once the service's reply writer has matched the
client's reply reader. It waits the writer's ``max_blocking_time`` (100 ms by default) for that
match, then drops the reply and returns a timeout, which rclpy reports only as a
``RuntimeWarning('failed to send response (timeout)...')``. That happens on first contact: a new
client's request can arrive before discovery has matched its reply reader (it also happens for
a client whose QoS can never match). The client would then wait out its own timeout for an
answer that was computed. So every reply of our services goes through :func:`send_reply`, which
turns that one warning into a ``False`` result, and the responder sends the reply again, with
backoff, until it is delivered or ``resend_window_s`` has passed. A reply given up is logged as
an error and counted (``akidb_ros_replies_undelivered_total``), never lost silently; so is one
that cannot be sent at all (a service handle already destroyed): a failed send never raises
into the executor.

Deadlines: :meth:`Responder.expire` answers every deferred call whose future has not resolved
yet with an error (the node's shutdown budget); the future's own answer, if it comes later, is
dropped, so each call is answered exactly once.
"""
from __future__ import annotations

import heapq
import itertools
import queue
import re
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Callable, Optional

from rclpy.service import Service

from akidb_ros.observability import metrics as M

DROPPED_REPLY = 'failed to send response (timeout)'
# 'error' for this warning, only where this module makes the call: rclpy's own services
# (parameters, lifecycle) keep the default behaviour, as does everything else in the process.
_FILTER = ('error', re.compile(re.escape(DROPPED_REPLY), re.I), RuntimeWarning,
           re.compile(re.escape(__name__) + r'\Z'), 0)
FIRST_RESEND_S = 0.05       # backoff between tries doubles from here, up to MAX_RESEND_GAP_S
MAX_RESEND_GAP_S = 0.5


def send_reply(service: Service, response, header) -> bool:
    """Send one reply; ``False`` when DDS dropped it (the client's reader is not matched yet).

    Same checks as rclpy's ``Service.send_response``; other send failures raise as there.
    """
    if _FILTER not in warnings.filters:     # pytest and other hosts reset the filters
        warnings.filterwarnings(_FILTER[0], message=_FILTER[1].pattern, category=_FILTER[2],
                                module=_FILTER[3].pattern)
    if not isinstance(response, service.srv_type.Response):
        raise TypeError(f'{type(response).__name__} is not a {service.srv_type.__name__} '
                        'Response')
    # an rmw_service_info_t carries the rmw_request_id_t; the binding type-checks the rest
    header = getattr(header, 'request_id', header)
    try:
        with service.handle:
            service.handle.service_send_response(response, header)
    except (SystemError, RuntimeWarning) as exc:
        # the pybind11 call returns with the warning (raised as an error) pending: SystemError
        warning = exc if isinstance(exc, RuntimeWarning) else exc.__cause__
        if isinstance(warning, RuntimeWarning) and DROPPED_REPLY in str(warning):
            return False
        raise
    return True


def _service_name(service: Service) -> str:
    try:
        return service.service_name       # resolved (namespace, remaps)
    except Exception:                     # a destroyed service
        return service.srv_name


class Deferred:
    """What a service callback returns when its answer is not ready yet.

    ``future`` resolves to the engine's answer; ``build(future)`` turns it into the filled
    ``Response`` (it must not raise).
    """

    __slots__ = ('future', 'build')

    def __init__(self, future: Future, build: Callable[[Future], object]):
        self.future = future
        self.build = build


class _Call:
    """A deferred call: what to build and where to send it."""

    __slots__ = ('deferred', 'header', 'service')

    def __init__(self, deferred: Deferred, header, service: Service):
        self.deferred, self.header, self.service = deferred, header, service


class _Resend:
    __slots__ = ('service', 'name', 'response', 'header', 'give_up_at', 'gap', 'tries')

    def __init__(self, service, response, header, window_s: float):
        self.service, self.response, self.header = service, response, header
        self.name = _service_name(service)
        self.give_up_at = time.monotonic() + window_s
        self.gap = FIRST_RESEND_S
        self.tries = 1


class Responder:
    """Sends deferred replies from one thread, in completion order, and re-sends dropped ones.

    The engine resolves futures in its batcher threads; building and sending the ROS reply here
    keeps that work off both the batcher and the executor. Dropped replies are retried by a
    second thread, so one unmatched client does not hold up everybody else's replies (each try
    can block up to the reply writer's ``max_blocking_time`` inside rmw).
    """

    def __init__(self, logger, resend_window_s: float = 2.0):
        self._q: 'queue.SimpleQueue' = queue.SimpleQueue()
        self._logger = logger
        self.resend_window_s = resend_window_s
        self._lock = threading.Condition()
        self._outstanding = 0
        self._waiting: set = set()      # deferred calls whose future has not resolved yet
        self._resends: list = []        # heap of (due, seq, _Resend)
        self._seq = itertools.count()
        self._stopping = False
        self.resent = 0                 # replies delivered on a later try
        self.undelivered = 0            # replies given up, or that could not be sent at all
        self._thread = threading.Thread(target=self._run, name='akidb-ros-responder',
                                        daemon=True)
        self._resender = threading.Thread(target=self._run_resends,
                                          name='akidb-ros-resender', daemon=True)
        self._thread.start()
        self._resender.start()

    @property
    def outstanding(self) -> int:
        """Accepted calls whose reply has not been sent (or given up) yet."""
        return self._outstanding

    def defer(self, deferred: Deferred, header, service: Service) -> None:
        """Send ``deferred``'s reply once its future resolves (or :meth:`expire` answers it)."""
        call = _Call(deferred, header, service)
        with self._lock:
            self._outstanding += 1
            self._waiting.add(call)
        deferred.future.add_done_callback(lambda f: self._resolved(call, f))

    def _resolved(self, call: _Call, future: Future) -> None:
        with self._lock:
            if call not in self._waiting:
                return                  # already answered by expire()
            self._waiting.discard(call)
        self._q.put((call, future))

    def expire(self, error: BaseException) -> int:
        """Answer every deferred call still waiting for its future with ``error``.

        Each call's own ``build`` turns the error into its response (as if its future had
        failed with it); the replies are sent by the responder thread, after those already
        queued. Returns how many calls were expired.
        """
        with self._lock:
            calls = list(self._waiting)
            self._waiting.clear()
        for call in calls:
            failed: Future = Future()
            failed.set_exception(error)
            self._q.put((call, failed))
        return len(calls)

    def send_now(self, service: Service, response, header) -> None:
        """Send a reply that is ready (on the caller's thread); re-send it later if dropped.

        Never raises: a reply that cannot be sent at all is logged and counted as undelivered.
        """
        try:
            delivered = send_reply(service, response, header)
        except Exception as exc:  # a destroyed service handle, a vanished client
            self.undeliverable(service, exc)
            return
        if not delivered:
            with self._lock:
                self._outstanding += 1
            self._dropped(service, response, header)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted call's reply has been sent (or given up)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def stop(self) -> None:
        """Stop both threads; replies still waiting for a re-send are given up (and logged)."""
        self._q.put(None)
        self._thread.join(timeout=5.0)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._resender.join(timeout=5.0)

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            call, future = item
            try:
                response = call.deferred.build(future)
                if not send_reply(call.service, response, call.header):
                    self._dropped(call.service, response, call.header)
                    continue                    # _dropped ends it, now or after re-sends
            except Exception as exc:  # a vanished client or a destroyed service
                self.undeliverable(call.service, exc)
            self._done()

    def undeliverable(self, service: Service, exc: BaseException) -> None:
        """Report a reply that could not be sent at all: logged and counted, never raised."""
        self._count_undelivered(_service_name(service), f': could not send it: {exc!r}')

    def _count_undelivered(self, name: str, detail: str) -> None:
        """One reply lost for good: counted (attribute and metric) and logged as an error."""
        with self._lock:
            self.undelivered += 1
        try:
            M.ROS_REPLIES_UNDELIVERED.labels(name).inc()
        except Exception:  # metrics must never fail a reply
            pass
        self._logger.error(f'{name}: reply not delivered{detail}')

    def _dropped(self, service: Service, response, header) -> None:
        item = _Resend(service, response, header, self.resend_window_s)
        if self.resend_window_s > 0:
            self._schedule(item)
        else:
            self._give_up(item, 'resend_window_s is 0')

    def _schedule(self, item: _Resend) -> None:
        with self._lock:
            stopping = self._stopping
            if not stopping:
                heapq.heappush(self._resends,
                               (time.monotonic() + item.gap, next(self._seq), item))
                self._lock.notify_all()
        if stopping:
            self._give_up(item, 'the node stopped')

    def _run_resends(self) -> None:
        while (item := self._next_resend()) is not None:
            self._try_again(item)

    def _next_resend(self) -> Optional[_Resend]:
        """Wait for the next re-send that is due; None once stopping (the rest are given up)."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                if self._resends and self._resends[0][0] <= now:
                    return heapq.heappop(self._resends)[2]
                self._lock.wait(self._resends[0][0] - now if self._resends else None)
            abandoned = [entry[2] for entry in self._resends]
            self._resends.clear()
        for item in abandoned:
            self._give_up(item, 'the node stopped')
        return None

    def _try_again(self, item: _Resend) -> None:
        item.tries += 1
        try:
            delivered = send_reply(item.service, item.response, item.header)
        except Exception as exc:  # a destroyed service
            self.undeliverable(item.service, exc)
            self._done()
            return
        name = item.name
        if delivered:
            self.resent += 1
            M.ROS_REPLIES_RESENT.labels(name).inc()
            self._logger.info(f'{name}: reply delivered on try {item.tries} (the client had '
                              'not been matched by discovery yet)')
            self._done()
        elif time.monotonic() >= item.give_up_at:
            self._give_up(item, f'the client was not matched within {self.resend_window_s} s')
        else:
            item.gap = min(item.gap * 2, MAX_RESEND_GAP_S)
            self._schedule(item)

    def _give_up(self, item: _Resend, why: str) -> None:
        self._count_undelivered(item.name, f' after {item.tries} tries: {why} (a client whose '
                                'reply QoS cannot match, or one still being discovered)')
        self._done()


class DeferringService(Service):
    """A Service whose callback may return a :class:`Deferred` instead of a Response.

    rclpy's executor takes the request, calls the callback, then calls
    ``send_response(response, header)``; for a Deferred the reply is sent later by the node's
    responder, with the same header. Every reply goes through :func:`send_reply`, so a dropped
    one is sent again.
    """

    responder: Optional[Responder] = None

    def send_response(self, response, header) -> None:
        # Called by the executor: nothing may raise out of here (it would end the spin loop).
        try:
            if isinstance(response, Deferred):
                self.responder.defer(response, header, self)
            else:
                self.responder.send_now(self, response, header)
        except Exception as exc:
            self.responder.undeliverable(self, exc)
