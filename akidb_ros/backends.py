"""The Backend protocol: the one seam between the doors (REST, gRPC) and the engine.

REST and gRPC take a :class:`Backend` and never know whether the engine runs in the same
process (:class:`LocalBackend`, in-process mode) or in the embedding node across DDS
(:class:`RosBackend`, sidecar mode). Both raise only :class:`EngineError`, so every door maps
failures through the one error table.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from concurrent.futures import CancelledError as FutureCancelled, Future, InvalidStateError, \
    TimeoutError as FutureTimeout
from typing import Callable, Dict, List, Optional, Protocol, runtime_checkable

import numpy as np

from akidb_ros.engine.deadlines import DeadlineWatcher
from akidb_ros.engine.engine import check_ros_strings
from akidb_ros.engine.errors import EngineError, ErrorCode, error_from_code
from akidb_ros.engine.types import (EmbedRequest, EmbedResult, HealthInfo, ModelInfo,
                                    ModelStatus, Priority)
from akidb_ros.observability import metrics as m

log = logging.getLogger('akidb_ros.backends')

# Extra seconds a door waits past the request's own timeout before it gives up on a future
# (the engine / node answer TIMEOUT themselves; this only guards against a lost answer).
WAIT_MARGIN_S = 2.0
GONE_CHECK_S = 0.2      # how often a waiting door looks whether its caller is still there
DEFAULT_TIMEOUT_S = 5.0
# A node absent from the DDS graph this long makes the bridge rejoin with a new participant, and
# again every REJOIN_EVERY_S while it stays absent: a node that froze past the DDS lease (SIGSTOP,
# CPU starvation) and resumed was, in 5 of 6 tries here, never rediscovered by the old
# participant, while a fresh one found it within 0.6 s. A restarted node needs none of this.
REJOIN_AFTER_S = 4.0
REJOIN_EVERY_S = 10.0
PRESENCE_CHECK_S = 0.25    # how often the sidecar looks whether the node is still in the graph
DISCOVERY_POLL_S = 0.1     # how often a call in the start-up grace looks for the node


@runtime_checkable
class Backend(Protocol):
    """What every door needs. All methods are thread-safe; failures raise EngineError."""

    name: str           # 'inprocess' | 'sidecar' (metrics label, /health)

    def submit(self, req: EmbedRequest, caller_waits: bool = False) -> 'Future[EmbedResult]':
        """Start an embedding; the future resolves to EmbedResult or raises EngineError.

        Called in the door's thread with the door's span current: the engine captures that
        OpenTelemetry context, the sidecar's DDS client injects it into the request.
        ``caller_waits``: the calling thread will block on the future, so an in-process engine
        may run the job in it (``EmbeddingEngine.submit``); never from an event loop.
        """

    def cancel(self, fut: 'Future[EmbedResult]') -> None:
        """The caller of ``submit`` gave up on ``fut`` (a cancelled gRPC call): drop its work
        if this backend can; its waiter then gets ``CANCELLED``. A no-op for a finished one."""

    def embed(self, req: EmbedRequest) -> EmbedResult:
        """Embed and wait for the answer (honours ``req.timeout_s``)."""

    def list_models(self) -> List[ModelInfo]:
        ...

    def load_model(self, model_id: str) -> ModelInfo:
        ...

    def unload_model(self, model_id: str) -> ModelInfo:
        ...

    def health(self) -> HealthInfo:
        ...

    def default_model(self) -> str:
        ...

    def ready(self) -> bool:
        """Tell whether the default model is loaded and requests can be served."""

    def close(self, timeout: Optional[float] = None) -> None:
        """Answer what was accepted and let go; ``timeout``: at most this long (a stop's grace
        left), else the backend's own bound."""


def wait_result(fut: 'Future[EmbedResult]', timeout_s: Optional[float],
                caller_gone: Optional[Callable[[], bool]] = None,
                cancel: Optional[Callable[[Future], None]] = None) -> EmbedResult:
    """Wait for a backend future, turning a lost answer into TIMEOUT and stray errors INTERNAL.

    ``caller_gone``: asked every ``GONE_CHECK_S`` while the answer is awaited (a REST client
    that closed its connection); once it says so, ``cancel(fut)`` drops the work and the wait
    ends ``CANCELLED``, so an abandoned call does not hold its thread and the model for its
    whole budget.
    """
    limit = (timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S) + WAIT_MARGIN_S
    try:
        if caller_gone is None:
            return fut.result(timeout=limit)
        end = time.monotonic() + limit
        while True:
            try:
                return fut.result(timeout=max(0.0, min(GONE_CHECK_S, end - time.monotonic())))
            except FutureTimeout:
                if time.monotonic() >= end:
                    raise
                if caller_gone():
                    if cancel is not None:
                        cancel(fut)
                    raise EngineError(ErrorCode.CANCELLED,
                                      'the caller closed its connection') from None
    except EngineError:
        raise
    except FutureTimeout:
        fut.cancel()
        raise EngineError(ErrorCode.TIMEOUT, f'no answer within {limit:.1f} s') from None
    except FutureCancelled:
        raise EngineError(ErrorCode.CANCELLED, 'the caller cancelled the call') from None
    except Exception as exc:  # a bug below the seam must still map through the table
        log.exception('backend failed unexpectedly')
        raise EngineError(ErrorCode.INTERNAL, f'internal error: {type(exc).__name__}') from exc


def normalise_checks(checks: Dict[str, str], provider: str, note: str = '') -> Dict[str, str]:
    """Make sure the PRD's three checks are present; say plainly when no GPU is used."""
    out = dict(checks or {})
    out.setdefault('embedding_provider', 'ok' if provider else 'unknown')
    out.setdefault('model_cache', 'ok')
    if 'gpu' not in out:
        if provider and provider not in ('CPUExecutionProvider', ''):
            out['gpu'] = 'ok'
        else:
            out['gpu'] = 'unavailable: ' + (note or provider or 'CPUExecutionProvider')
    return out


# ---------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------

# every LocalBackend of this process (one in a server; tests make several): backend_up is 1
# while one of them serves
_LOCAL_BACKENDS: 'weakref.WeakSet[LocalBackend]' = weakref.WeakSet()


def _any_local_backend_up() -> float:
    return max((b._up() for b in list(_LOCAL_BACKENDS)), default=0.0)


class LocalBackend:
    """The engine in this process (in-process mode). Shared by the node, REST and gRPC."""

    name = 'inprocess'

    def __init__(self, engine, own_engine: bool = False):
        self.engine = engine
        self._own = own_engine
        self._latency = m.BACKEND_LATENCY.labels(self.name)
        # read at each scrape, so the series exists from the start and follows the engine
        # (set only by health() before: probes that ask /health/ready never made it appear)
        _LOCAL_BACKENDS.add(self)
        m.BACKEND_UP.labels(self.name).set_function(_any_local_backend_up)

    def _up(self) -> float:
        """1 while the engine serves: not closed, its default model not failed (as health()
        says: only 'unhealthy' is down); without health()'s side effect of loading it."""
        eng = self.engine
        if eng.closed:
            return 0.0
        info, _ = eng.manager.describe(eng.config.model(eng.default_model))
        return 0.0 if info.status is ModelStatus.FAILED else 1.0

    def submit(self, req: EmbedRequest, caller_waits: bool = False) -> Future:
        t0 = time.perf_counter()
        try:
            fut = self.engine.submit(req, caller_waits=caller_waits)
        except EngineError:
            raise
        except Exception as exc:
            log.exception('engine.submit failed unexpectedly')
            raise EngineError(ErrorCode.INTERNAL, f'internal error: {type(exc).__name__}') from exc
        fut.add_done_callback(lambda _f: self._latency.observe(time.perf_counter() - t0))
        return fut

    def cancel(self, fut: Future) -> None:
        fut.cancel()        # the engine's job is settled: its sentences not yet run are skipped

    def embed(self, req: EmbedRequest) -> EmbedResult:
        return wait_result(self.submit(req, caller_waits=True), req.timeout_s)

    def list_models(self) -> List[ModelInfo]:
        return list(self.engine.list_models())

    def load_model(self, model_id: str) -> ModelInfo:
        return self.engine.load_model(model_id)

    def unload_model(self, model_id: str) -> ModelInfo:
        return self.engine.unload_model(model_id)

    def health(self) -> HealthInfo:
        h = self.engine.health()
        h.checks = normalise_checks(h.checks, h.provider, h.provider_note)
        return h

    def default_model(self) -> str:
        return self.engine.default_model

    def ready(self) -> bool:
        try:
            return self.engine.keep_default_loaded() and not self.engine.closed
        except Exception:
            return False

    def close(self, timeout: Optional[float] = None) -> None:
        if self._own:
            # within the stop's grace: the engine kept computing the calls the doors had cut off
            # at its end for up to 10 s more (an in-process stop took 5 s with --grace 1)
            if timeout is None:
                self.engine.close()
            else:
                self.engine.close(max(0.0, timeout))


def _status(mi: ModelInfo) -> str:
    s = mi.status
    return s.value if isinstance(s, ModelStatus) else str(s)


# ---------------------------------------------------------------------------------------------
# Sidecar: forward to the embedding node over DDS
# ---------------------------------------------------------------------------------------------

class RosBackend:
    """Forwards to the embedding node's services over DDS (sidecar mode).

    * node down (no server for the service): UNAVAILABLE at once, retryable — except within
      ``discovery_timeout_s`` of the bridge's start, when a call waits (within its budget) for
      discovery to find the node: the constructor does not block, so the doors bind at once;
    * node leaving the graph (killed, frozen past its lease) with calls in flight: those calls
      UNAVAILABLE as soon as the bridge sees it (within ``PRESENCE_CHECK_S``), and a call that
      outlives a departure and return of the node is UNAVAILABLE too, never TIMEOUT (its request
      may never have reached the node; TIMEOUT would count against the model's breaker), and
      so is one sent to a node process that has since been replaced (``node_instance`` of
      ``ListModels``: a node killed and restarted at once never leaves the graph's view);
    * node slow (no answer within the request's timeout): TIMEOUT, the pending request dropped;
    * the node coming back is picked up by DDS discovery: no restart of the bridge needed.

    W3C trace context is injected into the request's ``traceparent`` field when the Embed
    service defines one (and the request id into ``request_id``), so the node continues the
    trace across the DDS hop.
    """

    name = 'sidecar'

    def __init__(self, prefix: str = '', node_name: str = '', timeout_s: float = DEFAULT_TIMEOUT_S,
                 discovery_timeout_s: float = 0.0, qos_depth: int = 1000,
                 executor: str = 'events'):
        import rclpy
        from rclpy.context import Context
        from rclpy.qos import QoSProfile
        from std_msgs.msg import String
        from akidb_ros.ros.cli import client_executor
        from akidb_ros.ros.conversions import CANCEL_TOPIC
        from akidb_ros.ros.first_contact import FirstContact
        from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

        self._srv = {'Embed': Embed, 'ListModels': ListModels, 'LoadModel': LoadModel,
                     'UnloadModel': UnloadModel}
        self.timeout_s = timeout_s
        self._latency = m.BACKEND_LATENCY.labels(self.name)
        self._deadlines = DeadlineWatcher(name='akidb-bridge-deadlines')
        # Embed calls in flight, at most the service's history depth: DDS keeps the last
        # qos_depth requests a server has not taken yet (and replies a client has not) and drops
        # older ones silently, so a bridge with more in flight than the node's depth lost calls
        # (each a TIMEOUT after its budget). The node's default qos_depth is the same, 1000.
        self._max_embeds = qos_depth
        self._embed_slots = threading.BoundedSemaphore(qos_depth)
        base = prefix.rstrip('/')
        qos = QoSProfile(depth=qos_depth)
        node_name = node_name or f'akidb_bridge_{os.getpid()}_{uuid.uuid4().hex[:6]}'

        joins = itertools.count()

        def connect() -> _RosLink:
            """A DDS participant of our own: context, node, clients, executor."""
            ctx = Context()
            rclpy.init(context=ctx, args=[])
            # a rejoin's node gets a name of its own (one name twice in a process: rosout warns)
            k = next(joins)
            node = rclpy.create_node(node_name if k == 0 else f'{node_name}_rejoin{k}',
                                     context=ctx)
            # FirstContact: a request sent before a (new) node has matched our client is sent
            # again instead of timing out (akidb_ros.ros.first_contact)
            clients = {
                name: FirstContact(node.create_client(srv, f'{base}/{name}', qos_profile=qos),
                                   watcher=self._deadlines)
                for name, srv in (('embed', Embed), ('list_models', ListModels),
                                  ('load_model', LoadModel), ('unload_model', UnloadModel))}
            # rclpy's C++ EventsExecutor by default: the Python wait-set executor rebuilds its
            # wait set on every wake-up, about a third of the bridge's GIL time under 16 clients.
            ex = client_executor(executor, ctx)
            ex.add_node(node)
            # the node's cancel_embed topic: how a call whose caller gave up is withdrawn
            cancel_pub = node.create_publisher(String, f'{base}/{CANCEL_TOPIC}',
                                               QoSProfile(depth=qos_depth))
            return _RosLink(ctx, node, clients, ex, cancel_pub)
        self._connect = connect
        self._link = connect()
        self._pending: set = set()          # _PendingCall in flight
        self._pending_lock = threading.Lock()
        self._presence = True               # the node's embed server seen at the last check
        self._instance = ''                 # the node process last heard of (ListModels)
        self._departures = 0                # times the node left the graph since start
        self._presence_checked = 0.0
        self._retired: List[_RosLink] = []     # replaced links, disposed by the spin thread
        self._rejoin_lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._last_rejoin = 0.0
        fields = Embed.Request.get_fields_and_field_types()
        self._has_traceparent = 'traceparent' in fields
        self._has_request_id = 'request_id' in fields
        self._has_timeout = 'timeout_s' in fields
        self._has_input_type = 'input_type' in fields
        self._has_admin_lane = 'admin_lane' in fields
        self._running = True
        self._stopping = False              # fail_waiting: a graceful stop's grace is over
        self._spin_thread = threading.Thread(target=self._spin, name='akidb-ros-bridge',
                                             daemon=True)
        self._spin_thread.start()
        self._health_cache = (0.0, None)
        self._health_lock = threading.Lock()
        self._default = ''
        # Start-up grace: the bridge serves (and binds its ports) at once; a call made before
        # discovery has matched a node that is already running waits for it, within its own
        # budget, instead of being refused UNAVAILABLE. Readiness stays false until then.
        self._discovery_until = time.monotonic() + max(0.0, discovery_timeout_s)

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def _clients(self) -> Dict[str, object]:
        return self._link.clients

    def _spin(self) -> None:
        while self._running:
            link = self._link
            if not link.ctx.ok():
                break
            try:
                link.executor.spin_once(timeout_sec=0.1)
            except Exception:  # keep serving; an executor hiccup must not kill the bridge
                if self._running and link is self._link:
                    log.exception('ROS executor error')
                    time.sleep(0.05)
            while self._retired:          # here, so no spin_once runs on a link being closed
                self._retired.pop().close()
            now = time.monotonic()
            if now - self._presence_checked >= PRESENCE_CHECK_S:
                self._presence_checked = now
                self._check_presence()

    def _check_presence(self) -> None:
        """Fail the calls in flight at once when the node leaves the graph (they cannot be
        answered: their request or its reply died with the node's participant)."""
        try:
            up = self._clients['embed'].service_is_ready()
        except Exception:   # a link being replaced: look again next time
            return
        if up or not self._presence:
            self._presence = up
            return
        self._presence = False
        self._departures += 1
        with self._pending_lock:
            calls = list(self._pending)
        if calls:
            log.warning('embedding node left the DDS graph: %d calls in flight answered '
                        'UNAVAILABLE', len(calls))
        for call in calls:
            call.settle(EngineError(
                ErrorCode.UNAVAILABLE, f'embedding node left the DDS graph with '
                f'{call.client.srv_name} in flight', retry_after_s=1.0))

    def _up(self, service: str) -> bool:
        client = self._clients[service]
        try:
            up = client.service_is_ready()
        except Exception:   # its link was retired this instant (a rejoin): ask the new one
            client = self._clients[service]
            up = client.service_is_ready()
        if not up:
            client.reset()      # the node that comes back is a new first contact
            self._absent()
        else:
            self._down_since = None
        if service == 'embed':
            m.BACKEND_UP.labels(self.name).set(1 if up else 0)
        return up

    def _absent(self) -> None:
        """The node is not in the graph: after REJOIN_AFTER_S, rejoin with a new participant."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            return
        if now - self._down_since < REJOIN_AFTER_S or now - self._last_rejoin < REJOIN_EVERY_S \
                or not self._running or not self._rejoin_lock.acquire(blocking=False):
            return
        try:
            self._last_rejoin = now
            log.info('embedding node absent from the DDS graph for %.1f s: rejoining with a '
                     'new participant', now - self._down_since)
            old, self._link = self._link, self._connect()
            self._retired.append(old)
        except Exception:   # keep the old link; the next check tries again
            log.exception('could not rejoin the DDS graph')
        finally:
            self._rejoin_lock.release()

    def _call(self, service: str, request, timeout_s: float) -> Future:
        """call_async → concurrent Future with a deadline. UNAVAILABLE when no server;
        ``embed``: OVERLOADED when ``qos_depth`` calls already wait on the node (one more could
        push an unanswered request out of the node's request history: lost, not refused)."""
        if service != 'embed':
            return self._send(service, request, timeout_s)
        if not self._embed_slots.acquire(blocking=False):
            m.LOAD_SHED.labels(reason='bridge').inc()       # an OVERLOADED like the engine's
            raise EngineError(ErrorCode.OVERLOADED,
                              f'{self._max_embeds} calls already wait on the embedding node, '
                              'the most its DDS service carries without dropping one',
                              retry_after_s=1.0)
        try:
            out = self._send(service, request, timeout_s)
        except BaseException:
            self._embed_slots.release()
            raise
        out.add_done_callback(lambda _f: self._embed_slots.release())
        return out

    def _send(self, service: str, request, timeout_s: float) -> Future:
        if not self._running or self._stopping:
            raise EngineError(ErrorCode.UNAVAILABLE, 'bridge is shutting down')
        up = self._up(service)
        if not up and time.monotonic() < self._discovery_until:
            up = self._await_discovery(service, timeout_s)
        client = self._clients[service]     # read after _up: a rejoin there replaces the link
        if not up:
            raise EngineError(ErrorCode.UNAVAILABLE,
                              f'embedding node not reachable over DDS ({client.srv_name} '
                              f'has no server)', retry_after_s=1.0)
        out: Future = Future()
        try:
            ros_future = client.call_async(request)
        except Exception as exc:   # its link was retired this instant (a rejoin)
            raise EngineError(ErrorCode.UNAVAILABLE, f'DDS call failed: {exc}',
                              retry_after_s=1.0) from None

        def on_done(f):
            if out.done():
                return
            try:
                exc = f.exception()
                if exc is not None:
                    out.set_exception(EngineError(ErrorCode.UNAVAILABLE,
                                                  f'DDS call failed: {exc}'))
                elif f.cancelled():
                    out.set_exception(EngineError(ErrorCode.UNAVAILABLE, 'DDS call cancelled'))
                else:
                    out.set_result(f.result())
            except Exception as e:  # pragma: no cover - defensive
                if not out.done():
                    out.set_exception(EngineError(ErrorCode.INTERNAL, str(e)))

        ros_future.add_done_callback(on_done)
        # A little past the node's own deadline, so that its TIMEOUT answer (if any) wins.
        call = _PendingCall(self, service, client, ros_future, out,
                            time.monotonic() + timeout_s + 0.25, timeout_s)
        with self._pending_lock:
            self._pending.add(call)
        out.add_done_callback(lambda _f: self._forget(call))
        self._deadlines.watch(call)
        return out

    def _await_discovery(self, service: str, timeout_s: float) -> bool:
        """Within the start-up grace: wait for the node's server (at most the call's budget).

        Looks at the current link every ``DISCOVERY_POLL_S`` instead of blocking in one
        client's ``wait_for_service``: a node still absent after ``REJOIN_AFTER_S`` makes the
        bridge rejoin with a new participant and close the old one, and a call waiting on the
        old client then failed with rclpy's ``InvalidHandle`` (a 500 ``INTERNAL``).
        """
        until = time.monotonic() + min(self._discovery_until - time.monotonic(), timeout_s)
        while not self._up(service):
            left = until - time.monotonic()
            if left <= 0 or not self._running or self._stopping:
                return False
            time.sleep(min(DISCOVERY_POLL_S, left))
        return True

    def _forget(self, call: '_PendingCall') -> None:
        with self._pending_lock:
            self._pending.discard(call)

    def _call_sync(self, service: str, request, timeout_s: Optional[float] = None):
        t = timeout_s or self.timeout_s
        return wait_result(self._call(service, request, t), t)

    # -- Backend ------------------------------------------------------------------------------
    def submit(self, req: EmbedRequest,
               caller_waits: bool = False) -> Future:   # a DDS call: nothing to run here
        from akidb_ros.observability.tracing import inject_carrier, tracer
        from akidb_ros.ros.conversions import mark_forwarded
        from opentelemetry import trace

        # a ROS string ends at its first NUL (silently) and cannot hold a lone surrogate:
        # refused here, as the engine refuses them, instead of the node embedding a cut text
        check_ros_strings(req.inputs, req.model or '')
        Embed = self._srv['Embed']
        r = Embed.Request()
        r.model = req.model or ''
        r.inputs = list(req.inputs)
        r.normalize = True if req.normalize is None else bool(req.normalize)
        r.truncate = bool(req.truncate)
        timeout_s = req.timeout_s if req.timeout_s is not None else self.timeout_s
        if self._has_request_id:
            # marked as forwarded: the node counts it under transport 'sidecar', since this
            # bridge's door counted it already (akidb_ros.ros.conversions.FORWARDED_MARK)
            # never empty: calls with one request id are joined, and withdrawn, together
            r.request_id = mark_forwarded(req.request_id or f'bridge-{uuid.uuid4().hex[:16]}')
        if self._has_timeout:
            r.timeout_s = float(timeout_s)
        if self._has_input_type:
            it = req.input_type
            r.input_type = it.value if hasattr(it, 'value') else str(it or '')
        if self._has_admin_lane:
            r.admin_lane = req.priority is Priority.ADMIN   # granted by this bridge's guard
        span = tracer().start_span('ros /embed', kind=trace.SpanKind.CLIENT, attributes={
            'rpc.system': 'ros2', 'rpc.service': 'akidb_ros/srv/Embed',
            'akidb.model': req.model or '', 'akidb.inputs': len(req.inputs)})
        if self._has_traceparent:
            carrier = inject_carrier(trace.set_span_in_context(span))
            r.traceparent = carrier.get('traceparent', '')
        t0 = time.perf_counter()
        try:
            raw = self._call('embed', r, timeout_s)
        except EngineError as e:
            span.set_attribute('akidb.error_code', e.code.name)
            span.set_status(trace.StatusCode.ERROR, e.code.name)
            span.end()
            raise
        out: Future = Future()

        def convert(f):
            try:
                try:
                    resp = f.result()
                except EngineError as e:
                    raise e
                if not resp.success:
                    raise error_from_code(resp.error_code or 'INTERNAL', resp.message or
                                          'embedding node reported a failure',
                                          getattr(resp, 'retry_after_s', None))
                dim = int(resp.dimension)
                vecs = [np.frombuffer(memoryview(e.values).cast('B'), dtype=np.float32)
                        if len(e.values) else np.zeros(0, np.float32) for e in resp.embeddings]
                emb = (np.stack(vecs) if vecs else np.zeros((0, dim), np.float32))
                out.set_result(EmbedResult(
                    embeddings=emb, model=resp.model, dimension=dim or emb.shape[1],
                    total_tokens=int(resp.total_tokens),
                    truncated_inputs=int(resp.truncated_inputs),
                    duration_ms=float(resp.duration_ms), provider=''))
            except EngineError as e:
                span.set_attribute('akidb.error_code', e.code.name)
                span.set_status(trace.StatusCode.ERROR, e.code.name)
                out.set_exception(e)
            except Exception as e:
                log.exception('bad response from the embedding node')
                out.set_exception(EngineError(ErrorCode.INTERNAL, f'bad node response: {e}'))
            finally:
                self._latency.observe(time.perf_counter() - t0)
                span.end()

        raw.add_done_callback(convert)
        out.akidb_node_request_id = r.request_id if self._has_request_id else ''
        return out

    def cancel(self, fut: Future) -> None:
        """Withdraw the node's work for ``fut``: a ROS service call cannot be withdrawn, so its
        request id goes out on the node's ``cancel_embed`` topic; the node drops the engine
        work and answers the call ``CANCELLED`` (dropped here when it comes). The call keeps
        its DDS slot until that answer, so the node never holds more calls than its request
        queue carries. A node without the topic (an older one) computes the call as before."""
        request_id = getattr(fut, 'akidb_node_request_id', '')
        if fut.done() or not request_id:
            return
        from std_msgs.msg import String
        try:
            self._link.cancel_pub.publish(String(data=request_id))
        except Exception:   # a link being replaced, or closed: the node computes it then
            log.debug('could not publish the cancel of %s', request_id, exc_info=True)

    def embed(self, req: EmbedRequest) -> EmbedResult:
        return wait_result(self.submit(req), req.timeout_s or self.timeout_s)

    def _list(self, timeout_s: Optional[float] = None):
        resp = self._call_sync('list_models', self._srv['ListModels'].Request(), timeout_s)
        self._default = resp.default_model or self._default
        self._instance = getattr(resp, 'node_instance', '') or self._instance
        return resp

    def list_models(self) -> List[ModelInfo]:
        return [_model_from_msg(mi) for mi in self._list().models]

    def _admin(self, service: str, srv: str, model_id: str) -> ModelInfo:
        check_ros_strings((), model_id)     # a NUL would reach the node as a cut name
        r = self._srv[srv].Request()
        r.model = model_id
        # a cold load can take long: use the engine's model-load budget, not the embed timeout
        resp = self._call_sync(service, r, timeout_s=max(60.0, self.timeout_s))
        if not resp.success:
            raise error_from_code(resp.error_code or 'INTERNAL', resp.message,
                                  getattr(resp, 'retry_after_s', None))
        return _model_from_msg(resp.model_info)

    def load_model(self, model_id: str) -> ModelInfo:
        return self._admin('load_model', 'LoadModel', model_id)

    def unload_model(self, model_id: str) -> ModelInfo:
        return self._admin('unload_model', 'UnloadModel', model_id)

    def health(self) -> HealthInfo:
        with self._health_lock:
            ts, cached = self._health_cache
            # cached for 1 s (probes hit it often), but a node that left the graph shows at once
            if cached is not None and time.monotonic() - ts < 1.0 and self._up('list_models'):
                return cached
            h = self._health_uncached()
            self._health_cache = (time.monotonic(), h)
            return h

    def _health_uncached(self) -> HealthInfo:
        try:
            resp = self._list(timeout_s=2.0)
        except EngineError as e:
            return HealthInfo(status='unhealthy', checks={
                'embedding_provider': f'unreachable: {e.message}', 'model_cache': 'unknown',
                'gpu': 'unknown', 'node': f'{e.code.name}: {e.message}'},
                version=_version(), default_model=self._default)
        models = [_model_from_msg(mi) for mi in resp.models]
        default = next((mi for mi in models if mi.id == resp.default_model), None)
        provider = default.provider if default else ''
        loaded = default is not None and _status(default) == ModelStatus.LOADED.value
        state = getattr(resp, 'node_state', '') or 'active'   # (a node built before the field)
        serving = state == 'active'
        checks = normalise_checks({
            'embedding_provider': 'ok' if loaded else 'default model not loaded',
            # the PRD's value, as the in-process engine reports it
            'model_cache': 'failed' if default is not None
            and _status(default) == ModelStatus.FAILED.value else 'ok',
            'node': 'ok' if serving else f'{state}: not serving'}, provider)
        status = ('unhealthy' if not serving else 'healthy' if loaded else 'degraded')
        return HealthInfo(status=status, checks=checks, version=_version(), provider=provider,
                          default_model=resp.default_model)

    def default_model(self) -> str:
        if not self._default:
            try:
                self._list(timeout_s=2.0)
            except EngineError:
                pass
        return self._default

    def ready(self) -> bool:
        if not self._up('embed'):
            return False
        return self.health().status == 'healthy'

    def fail_waiting(self) -> None:
        """A graceful stop's grace is over: take no more calls and answer the calls still waiting
        on the node UNAVAILABLE now, while the doors can send those answers (``close`` comes
        after the doors have closed their connections)."""
        self._stopping = True
        with self._pending_lock:
            calls = list(self._pending)
        for call in calls:
            call.settle(EngineError(ErrorCode.UNAVAILABLE, 'bridge shut down before the '
                                    'embedding node answered', retry_after_s=1.0))

    def close(self, timeout: Optional[float] = None) -> None:
        # its calls waiting on the node were answered at the grace's end (fail_waiting)
        if not self._running:
            return
        self._running = False
        self._spin_thread.join(timeout=5)
        for call in self._deadlines.stop():   # no answer can arrive any more: say so
            if isinstance(call, _PendingCall):   # (the rest are first-contact re-sends)
                call.settle(EngineError(ErrorCode.UNAVAILABLE,
                                        'bridge shut down before the embedding node answered'))
        for link in self._retired + [self._link]:
            link.close()
        self._retired.clear()


class _RosLink:
    """One DDS participant of the bridge: its context, node, service clients and executor."""

    __slots__ = ('ctx', 'node', 'clients', 'executor', 'cancel_pub')

    def __init__(self, ctx, node, clients: Dict[str, object], executor, cancel_pub):
        self.ctx, self.node, self.clients, self.executor = ctx, node, clients, executor
        self.cancel_pub = cancel_pub

    def close(self) -> None:
        import rclpy
        for step in (lambda: self.executor.shutdown(timeout_sec=1), self.node.destroy_node,
                     lambda: rclpy.try_shutdown(context=self.ctx)):
            try:
                step()
            except Exception:   # closing anyway: nothing left to serve on it
                pass


class _PendingCall:
    """One DDS call in flight, watched for its deadline (``deadlines.DeadlineWatcher``)."""

    __slots__ = ('backend', 'service', 'client', 'ros_future', 'out', 'deadline', 'timeout_s',
                 'departures', 'instance')

    def __init__(self, backend: RosBackend, service: str, client, ros_future, out: Future,
                 deadline: float, timeout_s: float):
        self.backend, self.service, self.client = backend, service, client
        self.ros_future, self.out = ros_future, out
        self.deadline, self.timeout_s = deadline, timeout_s
        # what the backend knew at sending: node departures so far, the node process in use
        self.departures, self.instance = backend._departures, backend._instance

    @property
    def done(self) -> bool:
        return self.out.done()

    def settle(self, error: EngineError) -> None:
        """Give up on the call: forget it in rclpy, fail the caller's future (once)."""
        try:
            self.client.forget(self.ros_future)     # the link it was sent on, maybe retired
        except Exception:
            pass
        try:
            self.out.set_exception(error)
        except InvalidStateError:
            pass  # answered in between

    def expire(self, now: float) -> None:
        # A node that left the DDS graph while the call was in flight (killed, or frozen past
        # the lease) is UNAVAILABLE, not a slow model: the per-model breaker must not hold the
        # model open after the node is back.
        client = self.client
        try:
            b = self.backend
            gone = (not b._up(self.service)
                    or b._departures != self.departures     # left the graph and came back
                    or b._instance != self.instance)        # killed and restarted at once
        except Exception:   # context already shut down
            gone = True
        self.settle(EngineError(
            ErrorCode.UNAVAILABLE if gone else ErrorCode.TIMEOUT,
            f'embedding node left the DDS graph with {client.srv_name} in flight' if gone else
            f'embedding node did not answer {client.srv_name} within {self.timeout_s:.2f} s',
            retry_after_s=1.0))


def _model_from_msg(mi) -> ModelInfo:
    try:
        status = ModelStatus(mi.status)
    except ValueError:
        status = ModelStatus.AVAILABLE
    return ModelInfo(
        id=mi.id, name=mi.name, dimension=int(mi.dimension), params=int(mi.params),
        memory_mb=int(mi.memory_mb), max_tokens=int(mi.max_tokens),
        latency_p95_ms=float(mi.latency_p95_ms), throughput_qps=float(mi.throughput_qps),
        status=status, provider=mi.provider, pooling=mi.pooling, is_default=bool(mi.is_default),
        error=mi.error, in_flight=int(mi.in_flight))


def _version() -> str:
    from akidb_ros import __version__
    return __version__
