"""Re-sending replies DDS dropped (akidb_ros.ros.replies), without a node.

The real drop (rmw_fastrtps + rclpy) is provoked end to end in test_node.py with a client whose
QoS can never match; here a service handle drops the first replies the way rclpy reports it
(a RuntimeWarning raised in the frame that called it), so the retry paths run deterministically.
"""
import contextlib
import time
import warnings
from concurrent.futures import Future

import pytest

from akidb_ros.ros import replies
from akidb_ros.ros.replies import Deferred, DeferringService, Responder, send_reply
from akidb_ros.srv import Embed

DROP = ('failed to send response (timeout): client will not receive response, at '
        'rmw_response.cpp')


class _Handle:
    """Service handle that drops the first ``drops`` replies as rclpy's binding reports it."""

    def __init__(self, drops: int):
        self.drops = drops
        self.tries = 0
        self.sent = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def service_send_response(self, response, header):
        self.tries += 1
        if self.drops:
            self.drops -= 1
            # the C++ binding warns with stack level 1: the frame that called it
            warnings.warn(DROP, RuntimeWarning, stacklevel=2)
            return
        self.sent.append((response, header))


class _Service:
    srv_type = Embed
    service_name = '/test/embed'

    def __init__(self, drops: int):
        self.handle = _Handle(drops)


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(('info', msg))

    def warning(self, msg):
        self.lines.append(('warning', msg))

    def error(self, msg):
        self.lines.append(('error', msg))


@pytest.fixture
def log():
    return _Log()


@contextlib.contextmanager
def _responder(log, window_s=5.0):
    responder = Responder(log, resend_window_s=window_s)
    try:
        yield responder
    finally:
        responder.stop()


def _answer(responder, srv, response) -> bool:
    """Defer a reply, resolve its future, wait until it is sent or given up."""
    fut = Future()
    responder.defer(Deferred(fut, lambda f: response), 'hdr', srv)
    fut.set_result(None)
    return responder.wait_idle(5.0)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_dropped_reply_is_reported_and_others_warn_as_before():
    assert send_reply(_Service(drops=1), Embed.Response(), 'hdr') is False
    srv = _Service(drops=0)
    assert send_reply(srv, Embed.Response(), 'hdr') is True and len(srv.handle.sent) == 1
    with pytest.raises(TypeError):
        send_reply(srv, Embed.Request(), 'hdr')
    # the same warning from rclpy's own services (parameters, lifecycle) stays a warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        send_reply(_Service(drops=0), Embed.Response(), 'hdr')     # re-installs the filter
        assert warnings.filters[0][0] == 'error'
        warnings.warn_explicit(DROP, RuntimeWarning, 'service.py', 85, module='rclpy.service')
    assert [str(w.message) for w in seen] == [DROP]


def test_a_deferred_reply_dropped_twice_is_delivered_once(log):
    with _responder(log) as responder:
        srv = _Service(drops=2)
        response = Embed.Response(model='m')
        assert _answer(responder, srv, response)
        assert srv.handle.sent == [(response, 'hdr')] and srv.handle.tries == 3
        assert (responder.resent, responder.undelivered) == (1, 0)
        assert any('delivered on try 3' in m for _, m in log.lines)


def test_a_ready_reply_dropped_once_is_resent_off_the_callers_thread(log):
    with _responder(log) as responder:
        srv = _Service(drops=1)
        t0 = time.monotonic()
        responder.send_now(srv, Embed.Response(), 'hdr')
        assert time.monotonic() - t0 < replies.FIRST_RESEND_S     # the caller did not wait
        assert responder.outstanding == 1 and not srv.handle.sent
        assert responder.wait_idle(5.0) and len(srv.handle.sent) == 1


def test_a_reply_that_never_gets_through_is_given_up_loudly(log):
    with _responder(log, window_s=0.3) as responder:
        srv = _Service(drops=10_000)
        assert _answer(responder, srv, Embed.Response())
        assert not srv.handle.sent and srv.handle.tries >= 3
        assert (responder.resent, responder.undelivered) == (0, 1)
        errors = [m for level, m in log.lines if level == 'error']
        assert len(errors) == 1 and 'not delivered' in errors[0] and '/test/embed' in errors[0]
        # backoff: the tries were spread over the window, not spun
        assert srv.handle.tries < 0.3 / replies.FIRST_RESEND_S + 2


def test_a_zero_window_gives_a_dropped_reply_up_at_once(log):
    with _responder(log, window_s=0.0) as responder:
        srv = _Service(drops=1)
        assert _answer(responder, srv, Embed.Response())
        assert srv.handle.tries == 1 and responder.undelivered == 1


def test_stopping_gives_up_pending_resends(log):
    responder = Responder(log, resend_window_s=30.0)
    srv = _Service(drops=10_000)
    responder.send_now(srv, Embed.Response(), 'hdr')
    assert _wait(lambda: srv.handle.tries >= 2)
    responder.stop()
    assert responder.outstanding == 0 and responder.undelivered == 1
    assert any('node stopped' in m for level, m in log.lines if level == 'error')
    assert not responder._resender.is_alive()


def test_deferring_service_routes_both_kinds_of_reply(log):
    with _responder(log) as responder:
        srv = _Service(drops=0)
        srv.responder = responder
        fut = Future()
        DeferringService.send_response(srv, Deferred(fut, lambda f: Embed.Response()), 'a')
        DeferringService.send_response(srv, Embed.Response(), 'b')
        assert [h for _, h in srv.handle.sent] == ['b']
        fut.set_result(None)
        assert responder.wait_idle(5.0)
        assert [h for _, h in srv.handle.sent] == ['b', 'a']


class _DestroyedHandle(_Handle):
    """A handle whose destruction was requested: rclpy refuses to use it (``InvalidHandle``)."""

    def __enter__(self):
        from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
        raise _rclpy.InvalidHandle('cannot use Destroyable because destruction was requested')


def _destroyed_service():
    srv = _Service(drops=0)
    srv.handle = _DestroyedHandle(0)
    return srv


def test_a_reply_to_a_destroyed_service_never_raises_and_is_counted(log):
    """The executor sends a ready reply for a request taken just before its service was
    destroyed: nothing may raise out of the executor (it ended the node's spin loop)."""
    with _responder(log) as responder:
        srv = _destroyed_service()
        srv.responder = responder
        DeferringService.send_response(srv, Embed.Response(), 'a')          # ready reply
        fut = Future()
        DeferringService.send_response(srv, Deferred(fut, lambda f: Embed.Response()), 'b')
        fut.set_result(None)                                                 # deferred reply
        assert responder.wait_idle(5.0)
        assert responder.undelivered == 2
        errors = [m for level, m in log.lines if level == 'error']
        assert len(errors) == 2 and all('not delivered' in m and 'InvalidHandle' in m
                                        for m in errors), errors


def test_expire_answers_unfinished_calls_once_with_the_error(log):
    with _responder(log) as responder:
        srv = _Service(drops=0)
        built = []

        def build(f):
            try:
                f.result()
                built.append('result')
                return Embed.Response(success=True)
            except Exception as exc:
                built.append(str(exc))
                return Embed.Response(success=False, error_code='UNAVAILABLE')
        done, pending = Future(), Future()
        responder.defer(Deferred(done, build), 'done', srv)
        responder.defer(Deferred(pending, build), 'pending', srv)
        done.set_result(None)
        assert _wait(lambda: len(srv.handle.sent) == 1)
        assert responder.expire(RuntimeError('stopped')) == 1        # only the unfinished one
        assert responder.wait_idle(5.0)
        pending.set_result(None)                 # its late answer is not sent a second time
        time.sleep(0.1)
        assert [(h, r.success) for r, h in srv.handle.sent] == [('done', True),
                                                                ('pending', False)]
        assert built == ['result', 'stopped'] and responder.outstanding == 0
        assert responder.expire(RuntimeError('again')) == 0
