"""gRPC bridge: ``akidb.embedding.v1.EmbeddingService`` + ``grpc.health.v1`` + reflection.

* status codes from the one error table (``code.grpc_status``), the code name in the trailing
  metadata ``akidb-error-code`` and ``retry-after`` (seconds) for retryable errors;
* the client's deadline becomes the engine request's timeout;
* message-size limits on both directions;
* no caller starves the others: long-lived streams (EmbedStream, reflection, a blocking health
  Watch) hold at most ``max_streams`` of the handler threads, the excess is refused at once
  (``RESOURCE_EXHAUSTED``, ``OVERLOADED``); an EmbedStream that sends nothing for
  ``stream_idle_timeout_s`` ends ``TIMEOUT``; ``grpc.health.v1`` Check runs on threads of its own;
* bytes that do not decode as the method's message are ``INVALID_INPUT``, not INTERNAL;
* metadata that is not UTF-8 (HTTP/2 allows it; grpcio reads it as latin-1) is a caller's
  quirk logged at info, not grpcio's error-level traceback on every such call;
* ``stop(grace)`` stops accepting and lets in-flight calls finish; an open EmbedStream takes no
  more requests, answers those it took and ends ``UNAVAILABLE`` at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import queue
import threading
import time
from concurrent import futures
from typing import Callable, Iterable, Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from akidb_ros.backends import Backend, wait_result
from akidb_ros.doors import (BindError, DoorCall, GuardHook, ModelLabels, caller_deadline,
                             record, record_refusal, request_id_from, run_guard, server_cut)
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import EmbedRequest, InputType, ModelStatus
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
from akidb_ros.grpc_api.interceptor_base import WrappingInterceptor, is_non_blocking, \
    with_conventions
from akidb_ros.observability import metrics as m
from akidb_ros.observability.tracing import extract_from_metadata, tracer

log = logging.getLogger('akidb_ros.grpc')

TRANSPORT = 'grpc'
_INFLIGHT = m.INFLIGHT_REQUESTS.labels(TRANSPORT)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name['EmbeddingService'].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
STREAM_WINDOW = 64        # EmbedStream: requests in flight per stream before reading pauses
DEFAULT_STREAM_IDLE_S = 60.0   # EmbedStream: nothing in flight and nothing sent for this long
HEALTH_CHECK_METHOD = '/grpc.health.v1.Health/Check'
HEALTH_CHECK_THREADS = 2
# methods that answer an undecodable request themselves (metrics, x-request-id, stream index)
_SELF_CHECKED = frozenset(f'/{SERVICE_NAME}/{m}' for m in ('Embed', 'EmbedStream'))
_IDLE = object()          # EmbedStream: the stream went idle (see _take)
_DRAIN = object()         # EmbedStream: the server is stopping (see EmbeddingServicer.drain)
# a call cancelled this close to the end of a stop's grace is taken as cut off by it (gRPC
# cancels the calls left at that moment; our clock and its own differ by a little)
CUT_LEAD_S = 0.05


def _metadata(context) -> dict:
    return {k.lower(): (v if isinstance(v, str) else '<binary>')
            for k, v in (context.invocation_metadata() or ())}


def _abort(context, err: EngineError, extra=()):
    md = [('akidb-error-code', err.code.name)]
    hdrs = {k.lower(): str(v) for k, v in (getattr(err, 'headers', None) or {}).items()}
    if err.code.retryable or err.retry_after_s is not None:     # as REST's Retry-After
        md.append(('retry-after', hdrs.pop('retry-after', None)
                   or str(max(1, math.ceil(err.retry_after_s or 1)))))
    hdrs.pop('retry-after', None)
    md.extend(sorted(hdrs.items()))       # x-ratelimit-* on RESOURCE_EXHAUSTED
    md.extend(extra)
    context.set_trailing_metadata(tuple(md))
    context.abort(getattr(grpc.StatusCode, err.code.grpc_status), err.message)


def _callers_budget(context) -> Optional[float]:
    """The time the client's deadline leaves, uncapped (``_timeout`` reads a far one as none,
    and caps a longer one to the server's): EmbedRequest.caller_budget_s."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and 0 < remaining <= 1e6 else None


def _timeout(context, default: Optional[float]) -> Optional[float]:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:
        return default
    if remaining <= 0:
        raise EngineError(ErrorCode.TIMEOUT, 'deadline already exceeded')
    # the client's deadline may be shorter than the server's per-request budget, never longer
    return remaining if default is None else min(remaining, default)


# REST's `truncate` and `input_type`, which the PRD's EmbedRequest has no field for, as request
# metadata (the whole call: every message of an EmbedStream); the count of truncated inputs goes
# back as trailing metadata
TRUNCATE_MD = 'akidb-truncate'
INPUT_TYPE_MD = 'akidb-input-type'
TRUNCATED_MD = 'akidb-truncated-inputs'
_TRUNCATE_VALUES = {'true': True, 'false': False}
_INPUT_TYPES = {t.value: t for t in InputType}


def _options(md: dict, metadata=()):
    """``(truncate, input_type)`` from a call's metadata; INVALID_INPUT for a bad value, or for
    an option sent twice with different values (``md`` keeps one, gRPC keeps both apart)."""
    for key in (TRUNCATE_MD, INPUT_TYPE_MD):
        values = {v for k, v in metadata if k.lower() == key}
        if len(values) > 1:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'metadata {key} sent with different values '
                              f'({", ".join(sorted(repr(v[:40]) for v in values))}): send it once')
    truncate, input_type = True, InputType.NONE
    raw = md.get(TRUNCATE_MD)
    if raw is not None:
        truncate = _TRUNCATE_VALUES.get(raw.strip().lower())
        if truncate is None:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'metadata {TRUNCATE_MD} must be true or false, not {raw[:40]!r}')
    raw = md.get(INPUT_TYPE_MD)
    if raw is not None:
        input_type = _INPUT_TYPES.get(raw)      # exact, as REST's schema and ROS take it
        if input_type is None:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'metadata {INPUT_TYPE_MD} must be none, query or passage, '
                              f'not {raw[:40]!r}')
    return truncate, input_type


def _response(res) -> pb.EmbedResponse:
    resp = pb.EmbedResponse(model=res.model, usage=pb.Usage(
        total_tokens=int(res.total_tokens), duration_ms=int(round(res.duration_ms))))
    vecs = resp.embeddings
    for row in res.embeddings:
        vecs.add().values.extend(row.tolist())
    return resp


class Undecodable:
    """What the door's deserializer yields for bytes that are not the method's message.

    gRPC's own answer to a deserializer that raises is INTERNAL "Exception deserializing
    request!" before any handler runs (and, in a stream, before the requests read earlier are
    answered); a value instead reaches the handler, which answers it as the bad request it is:
    ``INVALID_INPUT`` from the error table.
    """

    __slots__ = ('reason',)

    def __init__(self, reason: str):
        self.reason = reason

    def error(self) -> EngineError:
        return EngineError(ErrorCode.INVALID_INPUT, f'cannot decode the request: {self.reason}')


def _safe_deserializer(deserialize):
    """``deserialize``, returning an :class:`Undecodable` where it would raise."""
    if deserialize is None:
        return None

    def decode(data):
        try:
            return deserialize(data)
        except Exception as exc:      # protobuf DecodeError: bad UTF-8, corrupt wire format
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


def _refuse(context, err: EngineError, request_id: Optional[str] = None, extra=(),
            started: Optional[float] = None) -> None:
    """Abort a call outside the doors' own accounting (refused before its handler ran, or a
    stream ended idle or by a graceful stop), counted like the doors' failed calls, with its
    access-log line; ``started``: the call's ``perf_counter`` start (default: now)."""
    rid = request_id or request_id_from(_metadata(context).get('x-request-id'))
    record_refusal(TRANSPORT, rid, err, time.perf_counter() if started is None else started)
    _abort(context, err, (('x-request-id', rid), *extra))


def _refusing_undecodable(behavior, request_streaming: bool):
    """Wrap a handler that does not expect :class:`Undecodable`: such a request is refused."""
    if request_streaming:
        def checked(requests, context):
            for request in requests:
                if isinstance(request, Undecodable):
                    _refuse(context, request.error())
                yield request

        def run(requests, context, *more):
            return behavior(checked(requests, context), context, *more)
    else:
        def run(request, context, *more):
            if isinstance(request, Undecodable):
                _refuse(context, request.error())
            return behavior(request, context, *more)
    return with_conventions(run, behavior)


def _release_after(responses, release):
    try:
        yield from responses
    finally:
        release()


class StreamSlots:
    """The long-lived streaming calls holding a handler thread now; at most ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def releaser(self):
        """Return a release that counts once, however many of its callers run."""
        held = [True]

        def release():
            try:
                held.pop()           # atomic: only the first caller gets the item
            except IndexError:
                return
            with self._lock:
                self.active -= 1

        return release


# The most metadata (headers) a call may carry, as the REST door's head limit
MAX_METADATA_BYTES = 64 * 1024
# At a graceful stop: an answer its client has not read for this long is not going to be read
STUCK_SEND_S = 1.0


class IdleReaper:
    """Ends request-streaming calls whose handler has waited for the client's next message
    longer than ``idle_s`` (EmbedStream aside: it ends itself ``TIMEOUT``), and EmbedStreams
    whose client has read no answer for ``idle_s`` (:meth:`sending`).

    gRPC's request iterator cannot time out, so one thread looks at the waiting calls a few
    times per ``idle_s`` and cancels those idle too long (the client hears ``CANCELLED``): an
    idle reflection stream gives its slot back like an idle EmbedStream.
    """

    def __init__(self, idle_s: Optional[float]):
        self.idle_s = idle_s or None
        self._waiting: dict = {}        # key -> (monotonic time the wait began, context)
        self._sending: dict = {}        # key -> (monotonic time the answer was handed over, ..)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _start(self) -> None:   # lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name='akidb-grpc-idle',
                                            daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def sending(self, context):
        """Watch a streamed answer handed to gRPC (a ``yield`` of the handler) until gRPC asks
        for the next one: a client that reads nothing blocks that send in flow control, and
        would hold its stream slot and a handler thread for ever. Past ``idle_s`` the call is
        cancelled (counted ``TIMEOUT``)."""
        if self.idle_s is None:
            yield
            return
        key = object()
        with self._lock:
            self._sending[key] = (time.monotonic(), context)
            self._start()
        try:
            yield
        finally:
            with self._lock:
                self._sending.pop(key, None)

    def watch(self, requests, context):
        """``requests``, with each wait for the next message watched."""
        if self.idle_s is None:
            return requests
        key = object()
        it = iter(requests)

        def watched():
            try:
                while True:
                    with self._lock:
                        self._waiting[key] = (time.monotonic(), context)
                        self._start()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        with self._lock:
                            self._waiting.pop(key, None)
                    yield item
            finally:
                with self._lock:
                    self._waiting.pop(key, None)

        return watched()

    @staticmethod
    def _older(table: dict, age: float, now: float) -> list:   # lock held
        """Take the contexts of ``table`` older than ``age`` out of it."""
        old = [(k, ctx) for k, (since, ctx) in table.items() if now - since >= age]
        for k, _ in old:
            del table[k]
        return [ctx for _, ctx in old]

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = self._older(self._waiting, self.idle_s, now)
                unread = self._older(self._sending, self.idle_s, now)
            for ctx in idle:
                log.info('gRPC stream idle for %.0f s: cancelled', self.idle_s)
                m.REQUEST_ERRORS.labels(TRANSPORT, ErrorCode.TIMEOUT.name).inc()
                ctx.cancel()
            for ctx in unread:
                log.info('EmbedStream: its client read no answer for %.0f s: cancelled',
                         self.idle_s)
                m.REQUEST_ERRORS.labels(TRANSPORT, ErrorCode.TIMEOUT.name).inc()
                ctx.cancel()

    def stop(self) -> None:
        """Stop watching, and cancel now the calls waiting for their next message (they have
        nothing in flight, and a graceful stop would otherwise wait its whole grace for them)
        and the streams whose client has not read an answer for ``STUCK_SEND_S``."""
        self._stop.set()
        with self._lock:
            waiting = [ctx for _, ctx in self._waiting.values()]
            self._waiting.clear()
            stuck = self._older(self._sending, STUCK_SEND_S, time.monotonic())
        for ctx in waiting + stuck:
            ctx.cancel()


_METHOD_HANDLERS = {
    'unary_unary': grpc.unary_unary_rpc_method_handler,
    'unary_stream': grpc.unary_stream_rpc_method_handler,
    'stream_unary': grpc.stream_unary_rpc_method_handler,
    'stream_stream': grpc.stream_stream_rpc_method_handler,
}


def _method_kind(handler) -> str:
    return ('stream' if handler.request_streaming else 'unary') + '_' + \
        ('stream' if handler.response_streaming else 'unary')


class UndecodableRefusal(WrappingInterceptor):
    """The innermost interceptor: refuse an :class:`Undecodable` request ``INVALID_INPUT``.

    Every method but ``Embed`` and ``EmbedStream`` (which answer it themselves) refuses it here,
    after the guard's checks, like any other bad request.
    """

    def _wrap(self, method: str, handler):
        if method in _SELF_CHECKED:
            return handler
        kind = _method_kind(handler)
        return _METHOD_HANDLERS[kind](
            _refusing_undecodable(getattr(handler, kind), handler.request_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class DoorInterceptor(WrappingInterceptor):
    """The door's own rules for every RPC of the server; the outermost interceptor.

    * Request deserializers yield :class:`Undecodable` instead of raising (gRPC decodes with
      the outermost handler's); ``inner`` (an :class:`UndecodableRefusal`, to be the
      innermost interceptor) refuses it where the handler would not.
    * The sync server runs each call on a pool thread for as long as the call lasts, so a
      streaming call whose handler blocks (EmbedStream, reflection, a health Watch behind an
      interceptor that hides its non-blocking form) takes one of ``slots`` or is refused at
      once, ``OVERLOADED``: streams never hold more than that share of the pool, and unary
      calls and health checks always find threads.
    * ``grpc.health.v1`` Check runs on ``health_pool`` (it only reads a dict), so a probe is
      answered even while every handler thread is busy with slow unary calls.
    * ``checks``: the guard chain's ``admit(method, context)`` (e.g. ``GuardInterceptor``),
      run before a stream is refused for want of a slot, so that the chain's order holds
      there too (a caller without credentials hears UNAUTHENTICATED, not OVERLOADED).
    """

    def __init__(self, slots: StreamSlots, health_pool=None, checks: Sequence = (),
                 reaper: Optional[IdleReaper] = None):
        super().__init__()
        self.slots = slots
        self.health_pool = health_pool
        self.checks = tuple(checks)
        self.reaper = reaper
        self.inner = UndecodableRefusal()

    def _wrap(self, method: str, handler):
        kind = _method_kind(handler)
        behavior = getattr(handler, kind)
        streaming = handler.request_streaming or handler.response_streaming
        if streaming and not is_non_blocking(behavior):
            behavior = self._limited(method, behavior, handler.response_streaming,
                                     handler.request_streaming and method not in _SELF_CHECKED)
        elif method == HEALTH_CHECK_METHOD and self.health_pool is not None:
            inner = behavior

            def check(request, context):      # the caller's request id on it, like every RPC
                context.set_trailing_metadata((('x-request-id', request_id_from(
                    _metadata(context).get('x-request-id'))),))
                return inner(request, context)

            behavior = with_conventions(check, inner)
            behavior.experimental_thread_pool = self.health_pool
        return _METHOD_HANDLERS[kind](
            behavior, request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer)

    def _limited(self, method: str, behavior, response_streaming: bool, watch_idle: bool):
        slots, checks = self.slots, self.checks
        reaper = self.reaper if watch_idle else None

        def run(arg, context):
            if not slots.try_acquire():
                for admit in checks:        # aborts the call if the guard refuses it
                    admit(method, context)
                log.warning('gRPC streaming call refused: %d streams at once is the limit',
                            slots.limit)
                _refuse(context, EngineError(
                    ErrorCode.OVERLOADED, f'too many streaming calls at once (limit '
                    f'{slots.limit}); retry later or use Embed', retry_after_s=1.0))
            release = slots.releaser()
            # the slot is given back when the handler ends, or at the latest when the call does
            if not context.add_callback(release):
                release()
            if reaper is not None:
                arg = reaper.watch(arg, context)
            try:
                result = behavior(arg, context)
            except BaseException:
                release()
                raise
            if not response_streaming:
                release()
                return result
            return _release_after(result, release)

        return run


def _take(pending: 'queue.Queue', last: list, idle_s: Optional[float]):
    """Return the next item of an EmbedStream, or ``_IDLE`` when it went idle.

    Idle: nothing read or answered (and nothing queued) for ``idle_s``; ``last[0]`` is the
    monotonic time of the latest read or answer.
    """
    if not idle_s:
        return pending.get()
    while True:
        wait = last[0] + idle_s - time.monotonic()
        try:
            return pending.get(timeout=wait) if wait > 0 else pending.get_nowait()
        except queue.Empty:
            if time.monotonic() - last[0] >= idle_s:    # the reader may have moved it since
                return _IDLE


def _as_heard(context, err: EngineError, cut_at: float = math.inf) -> EngineError:
    """The error a call is counted and logged by: the one its caller heard.

    A call cut off by its own deadline hears DEADLINE_EXCEEDED from gRPC itself. Its work is
    withdrawn at that moment (``_cancel_with``), and a backend that answers a withdrawal
    ``CANCELLED`` (a sidecar's node, over ``cancel_embed``) may do so before its own deadline
    answers ``TIMEOUT``: such a call is a TIMEOUT, as it is in-process (the SLO rules and the
    TIMEOUT alert count that code; a call its client cancelled stays CANCELLED). One cancelled
    once the server's stop has run out of grace (``cut_at``, monotonic; gRPC cancels every call
    left then) was cut off by the server: ``UNAVAILABLE`` (``doors.server_cut``).
    """
    if err.code is ErrorCode.CANCELLED:
        if time.monotonic() >= cut_at - CUT_LEAD_S:
            return server_cut()
        left = context.time_remaining()
        if left is not None and left <= 0:
            return EngineError(ErrorCode.TIMEOUT, 'the call\'s deadline passed before its answer',
                               retry_after_s=err.retry_after_s)
    return err


def _record_in(span, call: DoorCall, label: str, err: Optional[EngineError], **fields) -> None:
    """``record`` an EmbedStream request's answer in its span (its trace and span ids on the
    access-log line, as a unary call's), then end the span."""
    with trace.use_span(span, end_on_exit=True):
        if err is not None:
            span.set_attribute('akidb.error_code', err.code.name)
            span.set_status(trace.StatusCode.ERROR, err.code.name)
        record(call, label, err, **fields)


def _end_stopping(context, call: DoorCall, index: int, truncated: int) -> None:
    """End an EmbedStream that a graceful stop drained: ``UNAVAILABLE`` (retryable), with
    ``akidb-stream-index`` = the first request it did not take."""
    _refuse(context, EngineError(
        ErrorCode.UNAVAILABLE, f'the server is stopping: this stream took no request from index '
        f'{index} on; send them again', retry_after_s=1.0), call.request_id,
        (('akidb-stream-index', str(index)), (TRUNCATED_MD, str(truncated))), call.started)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, backend: Backend, guard: Optional[GuardHook] = None,
                 default_timeout_s: Optional[float] = None,
                 stream_idle_timeout_s: Optional[float] = DEFAULT_STREAM_IDLE_S,
                 reaper: Optional[IdleReaper] = None):
        """Serve the EmbeddingService RPCs on ``backend``.

        ``stream_idle_timeout_s``: an EmbedStream with nothing in flight that sends nothing
        for this long ends ``TIMEOUT`` (None or 0: never). ``reaper``: cancels an EmbedStream
        whose client reads no answer for its ``idle_s`` (:meth:`IdleReaper.sending`).
        """
        self.backend = backend
        self.guard = guard
        self.default_timeout_s = default_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._reaper = reaper
        self.labels = ModelLabels(backend)
        self._draining = threading.Event()
        self.cut_at = math.inf      # when a stop's grace runs out (GrpcServer.stop)
        self._streams_lock = threading.Lock()
        self._streams: set = set()      # the request queues of the open EmbedStreams

    def drain(self) -> None:
        """A graceful stop: each open EmbedStream takes no more requests, answers those it
        took, then ends ``UNAVAILABLE`` with ``akidb-stream-index`` = the first request it did
        not take (to be sent again elsewhere). An open stream otherwise held the stop for its
        whole grace, and was cut off there with a request taken, answered and logged, but never
        sent."""
        self._draining.set()
        with self._streams_lock:
            streams = list(self._streams)
        for pending in streams:
            try:
                pending.put_nowait(_DRAIN)      # wake a stream waiting for its next request
            except queue.Full:
                pass        # busy: it looks at the flag again before it waits

    # -- helpers ------------------------------------------------------------------------------
    def _call(self, context, operation: str) -> DoorCall:
        md = _metadata(context)
        try:
            cert = (context.auth_context() or {}).get('x509_pem_cert') or [None]
        except Exception:
            cert = [None]
        return DoorCall(transport=TRANSPORT, operation=operation,
                        request_id=request_id_from(md.get('x-request-id')), headers=md,
                        peer=context.peer() or '', peer_cert=cert[0])

    def _prepare(self, request: pb.EmbedRequest, call: DoorCall, context) -> EmbedRequest:
        if isinstance(request, Undecodable):
            raise request.error()
        # the texts are checked by the engine (the sidecar: before the DDS hop too), count first,
        # so every door answers a request with the same code
        texts = list(request.inputs)
        truncate, input_type = _options(call.headers, context.invocation_metadata() or ())
        model = self.labels.resolve(request.model)
        # the breaker is keyed by the model that will really serve the call ('unknown' for a
        # name the backend does not know: bounded, whatever callers send)
        call.model = self.labels.breaker_key(model, self._default_model())
        call.n_inputs, call.n_bytes = len(texts), sum(len(t) for t in texts)
        timeout = _timeout(context, self.default_timeout_s)
        call.caller_deadline = (timeout is not None
                                and caller_deadline(timeout, self.default_timeout_s))
        # proto3 bool has no "unset": the PRD field is taken literally (false = raw vectors)
        return EmbedRequest(inputs=texts, model=model, normalize=bool(request.normalize),
                            truncate=truncate, input_type=input_type, timeout_s=timeout,
                            caller_budget_s=_callers_budget(context),
                            request_id=call.request_id, transport=TRANSPORT)

    def _default_model(self) -> str:
        try:
            return self.backend.default_model() or ''
        except Exception:   # backend unreachable: the call itself will say so
            return ''

    def _admit(self, context, operation: str):
        """A unary RPC other than Embed: the caller's request id on its answer, then the guard
        (a refusal aborts with it). Returns the request-id trailing metadata."""
        call = self._call(context, operation)
        rid = (('x-request-id', call.request_id),)
        context.set_trailing_metadata(rid)
        try:
            done = run_guard(self.guard, call)
            if callable(done):
                done(None)
        except EngineError as e:
            _abort(context, e, rid)
        return rid

    def _submit(self, call: DoorCall, req: EmbedRequest, caller_waits: bool = False):
        """Run the guard, then backend.submit; returns (future, completion callback)."""
        done = run_guard(self.guard, call)
        if call.priority is not None:
            req.priority = call.priority      # admin callers: the engine's priority lane
        try:
            return self.backend.submit(req, caller_waits=caller_waits), done
        except EngineError as e:
            if callable(done):
                done(e)
            raise

    def _cancel_with(self, context,
                     futures_of: Callable[[], Iterable[futures.Future]]) -> None:
        """When the call ends, cancel the backend work still in ``futures_of()``: a caller
        that cancels (or drops its connection) frees the model for the others at once, its
        wait ends ``CANCELLED`` instead of running to the budget and being counted a TIMEOUT.
        (gRPC runs the callback at every call's end: for finished work it does nothing.)"""
        cancel = getattr(self.backend, 'cancel', None)
        if cancel is None:
            return

        def on_end() -> None:
            for fut in futures_of():
                if fut is not None and not fut.done():
                    cancel(fut)
        if not context.add_callback(on_end):
            on_end()        # the call had already ended

    def _span(self, context, method: str, call: DoorCall):
        # The status is set from the error table; grpc's abort() ends a failed call by raising
        # a bare Exception inside the span, which by default overwrote it ("Exception: ") and
        # recorded a traceback quoting the caller's text.
        ctx = extract_from_metadata(context.invocation_metadata())
        return ctx, tracer().start_as_current_span(
            f'{SERVICE_NAME}/{method}', context=ctx, kind=trace.SpanKind.SERVER, attributes={
                'rpc.system': 'grpc', 'rpc.service': SERVICE_NAME, 'rpc.method': method,
                'akidb.transport': TRANSPORT, 'akidb.request_id': call.request_id},
            record_exception=False, set_status_on_exception=False)

    # -- RPCs ---------------------------------------------------------------------------------
    def Embed(self, request, context):
        call = self._call(context, 'embed')
        context.set_trailing_metadata((('x-request-id', call.request_id),))
        _INFLIGHT.inc()
        label = self.labels.label('')       # until the request names a model: the default's
        ctx, span_cm = self._span(context, 'Embed', call)
        token = otel_context.attach(ctx)
        try:
            with span_cm as span:
                try:
                    req = self._prepare(request, call, context)
                    label = self.labels.label(req.model)
                    # the model that will serve it (bounded, as on the metrics), then the one
                    # that did
                    span.set_attribute('akidb.model', label)
                    span.set_attribute('akidb.inputs', len(req.inputs))
                    fut, done = self._submit(call, req, caller_waits=True)   # unary: waits
                    self._cancel_with(context, lambda: (fut,))
                    err = None
                    try:
                        res = wait_result(fut, req.timeout_s)
                    except EngineError as e:
                        err = _as_heard(context, e, self.cut_at)
                        raise err from None
                    finally:
                        if callable(done):
                            done(err)
                    label = self.labels.label(res.model)
                    span.set_attribute('akidb.model', res.model)
                    out = _response(res)
                except EngineError as e:
                    span.set_attribute('akidb.error_code', e.code.name)
                    span.set_status(trace.StatusCode.ERROR, e.code.name)
                    record(call, label, e)
                    _abort(context, e, (('x-request-id', call.request_id),))
                except Exception as exc:        # a bug: INTERNAL from the interceptor
                    span.record_exception(exc)
                    span.set_status(trace.StatusCode.ERROR, ErrorCode.INTERNAL.name)
                    raise
                record(call, label, None, tokens=int(res.total_tokens))
                context.set_trailing_metadata((('x-request-id', call.request_id),
                                               (TRUNCATED_MD, str(int(res.truncated_inputs)))))
                return out
        finally:
            otel_context.detach(token)
            _INFLIGHT.dec()

    def EmbedStream(self, request_iterator, context):
        """Each request answered in order; requests pipelined (up to STREAM_WINDOW in flight).

        A request that cannot be decoded or is invalid ends the stream with its error (and
        ``akidb-stream-index``) after the requests before it are answered; a stream with nothing
        in flight that sends nothing for ``stream_idle_timeout_s`` ends ``TIMEOUT``; a graceful
        stop ends it ``UNAVAILABLE`` once the requests it took are answered (:meth:`drain`).
        """
        call0 = self._call(context, 'embed')
        ctx = extract_from_metadata(context.invocation_metadata())
        pending: 'queue.Queue' = queue.Queue(maxsize=STREAM_WINDOW)
        stop = threading.Event()
        # held by the reader from a request's arrival until it is queued, so that a stream a
        # graceful stop ends has no request taken and not answered
        taking = threading.Lock()
        last = [time.monotonic()]       # latest request read or answered (idle timeout)
        _INFLIGHT.inc()

        def offer(item) -> bool:
            while not stop.is_set():    # give up once the consumer is gone
                try:
                    pending.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        cancel = getattr(self.backend, 'cancel', None)

        def forsake(item) -> None:
            """A request taken that will not be answered (the stream ended first): drop its
            work, end its span, free its guard permit once the backend is done with it (not
            counted as a failure)."""
            _, _, _, _, fut, done, _, span = item
            span.end()
            if fut is not None:
                if cancel is not None:
                    cancel(fut)
                if callable(done):
                    fut.add_done_callback(lambda _f: done(None))

        def reader():
            token = otel_context.attach(ctx)
            try:
                for i, request in enumerate(request_iterator):
                    last[0] = time.monotonic()
                    with taking:
                        if stop.is_set():
                            break
                        if self._draining.is_set():
                            offer(i)        # the server is stopping: the first request not taken
                            break
                        call = DoorCall(transport=TRANSPORT, operation='embed',
                                        request_id=f'{call0.request_id}-{i}',
                                        headers=call0.headers, peer=call0.peer,
                                        peer_cert=call0.peer_cert)
                        label = self.labels.label('')
                        # the request's span lasts until it is answered (_record_in ends it)
                        with tracer().start_as_current_span(
                                f'{SERVICE_NAME}/EmbedStream', kind=trace.SpanKind.SERVER,
                                attributes={'rpc.system': 'grpc', 'rpc.service': SERVICE_NAME,
                                            'rpc.method': 'EmbedStream',
                                            'akidb.transport': TRANSPORT,
                                            'akidb.stream_index': i,
                                            'akidb.request_id': call.request_id},
                                end_on_exit=False) as span:
                            try:
                                req = self._prepare(request, call, context)
                                label = self.labels.label(req.model)
                                span.set_attribute('akidb.model', label)
                                span.set_attribute('akidb.inputs', len(req.inputs))
                                fut, done = self._submit(call, req)
                                item = (i, call, label, req, fut, done, None, span)
                            except EngineError as e:
                                item = (i, call, label, None, None, None, e, span)
                        if not offer(item):     # the stream ended while it was taken
                            forsake(item)
                            log.info('EmbedStream ended as request %s was taken: not answered',
                                     call.request_id, extra={'request_id': call0.request_id})
                            break
                    if item[6] is not None:
                        break
            except Exception as exc:  # client cancelled / stream broken
                if not stop.is_set():
                    log.debug('EmbedStream reader ended: %s', exc)
            finally:
                otel_context.detach(token)
                offer(None)     # end marker

        # the reader runs in the handler's context (e.g. a guard decision kept in a ContextVar)
        t = threading.Thread(target=contextvars.copy_context().run, args=(reader,),
                             name='akidb-grpc-stream', daemon=True)
        t.start()
        truncated = 0       # the PRD's EmbedResponse has no field for it: the stream's total
        answered = 0        # the index of the next request to answer
        waiting_on = [None]     # the future of the request being answered
        cut_short = []          # its request id, when the stream's end cancelled it

        def in_flight():
            with pending.mutex:
                queued = [it[4] for it in pending.queue if isinstance(it, tuple)]
            return [waiting_on[0], *queued]
        self._cancel_with(context, in_flight)
        with self._streams_lock:
            self._streams.add(pending)
        try:
            while True:
                if self._draining.is_set() and pending.empty():
                    with taking:        # nor a request between its arrival and the queue
                        if pending.empty():
                            stop.set()
                            _end_stopping(context, call0, answered, truncated)
                item = _take(pending, last, self.stream_idle_timeout_s)
                if item is _DRAIN:
                    continue        # woken by a graceful stop: look again
                if isinstance(item, int):     # the reader took no more: the server is stopping
                    stop.set()
                    _end_stopping(context, call0, item, truncated)
                if item is None:
                    context.set_trailing_metadata((('x-request-id', call0.request_id),
                                                   (TRUNCATED_MD, str(truncated))))
                    return
                if item is _IDLE:
                    stop.set()
                    err = EngineError(ErrorCode.TIMEOUT, 'EmbedStream idle: no request for '
                                      f'{self.stream_idle_timeout_s:g} s')
                    log.info('EmbedStream closed after %g s idle', self.stream_idle_timeout_s,
                             extra={'request_id': call0.request_id})
                    _refuse(context, err, call0.request_id, started=call0.started)
                i, call, label, req, fut, done, err, span = item
                # the stream's end withdrew it while it waited
                withdrawn = err is not None and err.code is ErrorCode.CANCELLED
                if err is None:
                    waiting_on[0] = fut
                    try:
                        res = wait_result(fut, req.timeout_s)
                        label = self.labels.label(res.model)
                        span.set_attribute('akidb.model', res.model)
                    except EngineError as e:
                        withdrawn = e.code is ErrorCode.CANCELLED
                        err = _as_heard(context, e, self.cut_at)
                    finally:
                        if callable(done):
                            done(err)
                if err is not None:
                    _record_in(span, call, label, err)
                    stop.set()
                    if withdrawn:
                        cut_short.append(call.request_id)
                    _abort(context, err, (('x-request-id', call0.request_id),
                                          ('akidb-stream-index', str(i)),
                                          (TRUNCATED_MD, str(truncated))))
                _record_in(span, call, label, None, tokens=int(res.total_tokens))
                truncated += int(res.truncated_inputs)
                answered = i + 1
                last[0] = time.monotonic()
                with (self._reaper.sending(context) if self._reaper is not None
                      else contextlib.nullcontext()):
                    yield _response(res)
        finally:
            stop.set()
            with self._streams_lock:
                self._streams.discard(pending)
            # the reader is then done with a request it was taking: queued, or forsaken by it
            with taking:
                pass
            # requests accepted but never answered (stream cancelled or failed): drop them and
            # say which they were: the client never saw their answers
            unanswered = cut_short
            while True:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(item, tuple):
                    continue
                unanswered.append(item[1].request_id)
                forsake(item)
            if unanswered:
                log.info('EmbedStream ended (cancelled by the client or failed) with %d '
                         'request(s) taken and not answered: %s', len(unanswered),
                         ', '.join(unanswered), extra={'request_id': call0.request_id})
            _INFLIGHT.dec()

    def Health(self, request, context):
        self._admit(context, 'health')
        try:
            h = self.backend.health()
        except EngineError as e:
            return pb.HealthResponse(status=pb.HealthResponse.UNHEALTHY,
                                     checks={'embedding_provider': e.message}, version='')
        status = (pb.HealthResponse.UNHEALTHY if h.status == 'unhealthy'
                  else pb.HealthResponse.HEALTHY)
        checks = dict(h.checks)
        checks.setdefault('status_detail', h.status)
        return pb.HealthResponse(status=status, checks=checks, version=h.version or '')

    def ListModels(self, request, context):
        rid = self._admit(context, 'list_models')
        try:
            infos = self.backend.list_models()
        except EngineError as e:
            _abort(context, e, rid)
        out = pb.ListModelsResponse()
        for mi in infos:
            status = mi.status.value if isinstance(mi.status, ModelStatus) else str(mi.status)
            out.models.add(id=mi.id, name=mi.name, dimension=int(mi.dimension),
                           params=int(mi.params), memory_mb=int(mi.memory_mb),
                           latency_p95_ms=int(round(mi.latency_p95_ms or 0)),
                           throughput_qps=int(round(mi.throughput_qps or 0)), status=status)
        return out


class _HealthServicer(health.HealthServicer):
    """grpc_health's servicer with non-blocking Watches that sends outside its lock.

    Upstream sends each Watch update holding its lock and waits there for gRPC to complete the
    send; the completion comes from gRPC's polling thread, which may meanwhile be running the
    close callback of a cancelled Watch, which takes that lock: both wait for good (seen as
    ``GrpcServer.stop`` hanging in ``enter_graceful_shutdown``). Here the lock only guards the
    table of watchers; sends happen after it is released, one at a time per Watch.

    A graceful stop sends every Watch ``NOT_SERVING`` and then ends it (OK): the server's stop
    waits for every call, and one open Watch held it for the whole grace.
    """

    def __init__(self):
        super().__init__(experimental_non_blocking=True)

    def _send(self, callbacks, status) -> None:
        response = health_pb2.HealthCheckResponse(status=status)
        for send in callbacks:
            send(response)

    def set(self, service, status):
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            callbacks = list(self._send_response_callbacks.get(service, ()))
        self._send(callbacks, status)

    def enter_graceful_shutdown(self):
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._gracefully_shutting_down = True
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            sends = []
            for service in self._server_status:
                self._server_status[service] = not_serving
                sends.append(list(self._send_response_callbacks.get(service, ())))
            watches = [send for callbacks in self._send_response_callbacks.values()
                       for send in callbacks]
        for callbacks in sends:
            self._send(callbacks, not_serving)
        for send in watches:
            getattr(send, 'finish', lambda: None)()

    def Watch(self, request, context, send_response_callback=None):   # noqa: N802 (gRPC's)
        if send_response_callback is None:      # blocking form: upstream's own
            return super().Watch(request, context)
        service = request.service
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        one_at_a_time = threading.Lock()
        open_call = [True]

        def send(response):
            # gRPC allows one send in flight per call (a second one kills its polling thread);
            # the end of the call (None) never waits, since it runs on that polling thread
            if response is None:
                return end()
            with one_at_a_time:
                return send_response_callback(response)

        def end():
            try:
                open_call.pop()     # once: a stop's finish() and the call's close both end it
            except IndexError:
                return None
            return send_response_callback(None)

        def finish():       # a graceful stop: end the call after the status it sent last
            with one_at_a_time:
                end()

        send.finish = finish
        with self._lock:
            status = self._server_status.get(service, unknown)
            self._send_response_callbacks.setdefault(service, set()).add(send)
            context.add_callback(self._on_close_callback(send, service))
        while True:     # a set() between the lock and this send may have sent a newer status
            self._send([send], status)
            with self._lock:
                latest = self._server_status.get(service, unknown)
            if latest == status:
                break
            status = latest
        if self._gracefully_shutting_down:      # began while this Watch was being set up
            finish()
        return None


class _MetadataEncodingNote(logging.Filter):
    """grpcio logs metadata that is not UTF-8 with ``exception()`` (error level, traceback) on
    the call's thread, then reads it as latin-1 and serves the call: any caller could fill the
    log with error lines and fire alerts. Such a record is rewritten to one info line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == 'Invalid encoding on %s':
            record.levelno, record.levelname = logging.INFO, 'INFO'
            record.msg = 'a caller sent gRPC metadata that is not UTF-8 (read as latin-1): %s'
            record.exc_info = record.exc_text = None
        return True


_CYGRPC_LOG = logging.getLogger('grpc._cython.cygrpc')
if not any(isinstance(f, _MetadataEncodingNote) for f in _CYGRPC_LOG.filters):
    _CYGRPC_LOG.addFilter(_MetadataEncodingNote())


class GrpcServer:
    """The gRPC server (EmbeddingService + health + reflection). ``port=0`` picks a free port."""

    def __init__(self, backend: Backend, host: str = '127.0.0.1', port: int = 9090,
                 guard: Optional[GuardHook] = None, max_workers: int = 64,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 default_timeout_s: Optional[float] = None, health_poll_s: float = 1.0,
                 interceptors: Sequence = (), credentials=None,
                 max_streams: Optional[int] = None,
                 stream_idle_timeout_s: Optional[float] = DEFAULT_STREAM_IDLE_S):
        """Build the server, not yet started.

        ``interceptors``: e.g. ``[GuardInterceptor(guard)]``; ``credentials``: a
        ``grpc.ServerCredentials`` (``akidb_ros.guard.grpc_server_credentials``) for TLS,
        None for a plaintext port (loopback development only).

        ``max_streams``: long-lived streaming calls (each holds one of the ``max_workers``
        handler threads while it lasts) served at once, the excess refused ``OVERLOADED``;
        fewer than ``max_workers`` (default: half of them), so unary calls always have threads.
        ``stream_idle_timeout_s``: see :class:`EmbeddingServicer` (None or 0: never).
        ``max_message_bytes``: the largest request message (replies: that or 16 MiB, the larger).
        """
        if max_streams is None:
            max_streams = max_workers // 2
        if not 0 <= max_streams < max_workers:
            raise ValueError(f'gRPC max_streams={max_streams} must be at least 0 and less than '
                             f'max_workers={max_workers}: unary calls and health need threads')
        if stream_idle_timeout_s is not None and stream_idle_timeout_s < 0:
            raise ValueError(f'gRPC stream_idle_timeout_s={stream_idle_timeout_s} is negative')
        self.backend = backend
        options = [
            ('grpc.max_receive_message_length', max_message_bytes),
            # replies are not the caller's to size: a low request limit must not refuse them
            ('grpc.max_send_message_length', max(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)),
            # a call's metadata: one limit, as REST's 64 KiB head (between gRPC's own soft
            # 8 KiB and hard 16 KiB limits calls were refused at random)
            ('grpc.max_metadata_size', MAX_METADATA_BYTES),
            ('grpc.absolute_max_metadata_size', MAX_METADATA_BYTES),
            ('grpc.so_reuseport', 0),
            ('grpc.keepalive_permit_without_calls', 1),
            ('grpc.http2.min_ping_interval_without_data_ms', 10_000),
        ]
        self.stream_slots = StreamSlots(max_streams)
        self._health_pool = futures.ThreadPoolExecutor(
            max_workers=HEALTH_CHECK_THREADS, thread_name_prefix='akidb-grpc-health-check')
        # the door's interceptor outermost: it sees every handler as the others (the guard)
        # left it; its refusal of undecodable requests innermost: after the guard's checks
        self._reaper = IdleReaper(stream_idle_timeout_s)
        door = DoorInterceptor(self.stream_slots, self._health_pool, checks=[
            i.admit for i in interceptors if callable(getattr(i, 'admit', None))],
            reaper=self._reaper)
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix='akidb-grpc'), options=options,
            maximum_concurrent_rpcs=max_workers * 4,
            interceptors=[door, *interceptors, door.inner])
        self.servicer = EmbeddingServicer(backend, guard, default_timeout_s,
                                          stream_idle_timeout_s=stream_idle_timeout_s,
                                          reaper=self._reaper)
        pb_grpc.add_EmbeddingServiceServicer_to_server(self.servicer, self._server)
        self.health = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        addr = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
        try:    # gRPC says "Failed to bind" (RuntimeError) or returns 0, never why
            self.port = (self._server.add_secure_port(addr, credentials)
                         if credentials is not None else self._server.add_insecure_port(addr))
        except RuntimeError:
            self.port = 0
        self.tls = credentials is not None
        if self.port == 0:
            raise BindError(f'cannot bind gRPC to {addr}: the port is in use or the address '
                            'is not one of this host')
        self.host = host
        self._health_poll_s = health_poll_s
        self._health_status = None      # the status last set (Watch hears only changes)
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None

    def _set_health(self) -> None:
        try:
            ok = self.backend.ready()
        except Exception:
            ok = False
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status == self._health_status:
            return        # every set() sends to each Watch: send only a change
        self._health_status = status
        self.health.set('', status)
        self.health.set(SERVICE_NAME, status)

    def _poll(self) -> None:
        while not self._stop.wait(self._health_poll_s):
            self._set_health()

    def start(self) -> 'GrpcServer':
        self._set_health()
        self._server.start()
        self._poller = threading.Thread(target=self._poll, name='akidb-grpc-health',
                                        daemon=True)
        self._poller.start()
        log.info('gRPC bridge listening', extra={'host': self.host, 'port': self.port})
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, finish in-flight ones (up to ``grace_s``), then close."""
        self._stop.set()
        self.health.enter_graceful_shutdown()     # NOT_SERVING first, then the Watches end
        self._reaper.stop()
        self.servicer.drain()
        t0 = time.monotonic()
        self.servicer.cut_at = t0 + grace_s
        self._server.stop(grace_s).wait(grace_s + 1)
        self._health_pool.shutdown(wait=False)
        log.info('gRPC bridge stopped', extra={'seconds': round(time.monotonic() - t0, 3)})
        if self._poller is not None:
            self._poller.join(timeout=2)
