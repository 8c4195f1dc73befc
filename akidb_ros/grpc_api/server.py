"""gRPC bridge: ``akidb.embedding.v1.EmbeddingService`` + ``grpc.health.v1`` + reflection.

* status codes from the one error table (``code.grpc_status``), the code name in the trailing
  metadata ``akidb-error-code`` and ``retry-after`` (seconds) for retryable errors;
* the client's deadline becomes the engine request's timeout;
* message-size limits on both directions;
* ``stop(grace)`` stops accepting and lets in-flight calls finish.
"""
from __future__ import annotations

import contextvars
import logging
import math
import queue
import threading
import time
from concurrent import futures
from typing import Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from akidb_ros.backends import Backend, wait_result
from akidb_ros.doors import DoorCall, GuardHook, ModelLabels, record, request_id_from, run_guard
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import EmbedRequest, ModelStatus
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
from akidb_ros.observability import metrics as m
from akidb_ros.observability.tracing import extract_from_metadata, tracer

log = logging.getLogger('akidb_ros.grpc')

TRANSPORT = 'grpc'
_INFLIGHT = m.INFLIGHT_REQUESTS.labels(TRANSPORT)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name['EmbeddingService'].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
STREAM_WINDOW = 64        # EmbedStream: requests in flight per stream before reading pauses


def _metadata(context) -> dict:
    return {k.lower(): (v if isinstance(v, str) else '<binary>')
            for k, v in (context.invocation_metadata() or ())}


def _abort(context, err: EngineError, extra=()):
    md = [('akidb-error-code', err.code.name)]
    hdrs = {k.lower(): str(v) for k, v in (getattr(err, 'headers', None) or {}).items()}
    if err.code.retryable:
        md.append(('retry-after', hdrs.pop('retry-after', None)
                   or str(max(1, math.ceil(err.retry_after_s or 1)))))
    hdrs.pop('retry-after', None)
    md.extend(sorted(hdrs.items()))       # x-ratelimit-* on RESOURCE_EXHAUSTED
    md.extend(extra)
    context.set_trailing_metadata(tuple(md))
    context.abort(getattr(grpc.StatusCode, err.code.grpc_status), err.message)


def _timeout(context, default: Optional[float]) -> Optional[float]:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:
        return default
    if remaining <= 0:
        raise EngineError(ErrorCode.TIMEOUT, 'deadline already exceeded')
    # the client's deadline may be shorter than the server's per-request budget, never longer
    return remaining if default is None else min(remaining, default)


def _response(res) -> pb.EmbedResponse:
    resp = pb.EmbedResponse(model=res.model, usage=pb.Usage(
        total_tokens=int(res.total_tokens), duration_ms=int(round(res.duration_ms))))
    vecs = resp.embeddings
    for row in res.embeddings:
        vecs.add().values.extend(row.tolist())
    return resp


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, backend: Backend, guard: Optional[GuardHook] = None,
                 default_timeout_s: Optional[float] = None):
        self.backend = backend
        self.guard = guard
        self.default_timeout_s = default_timeout_s
        self.labels = ModelLabels(backend)

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
        texts = list(request.inputs)
        if not texts:
            raise EngineError(ErrorCode.INVALID_INPUT, 'inputs: at least one text is required')
        for i, t in enumerate(texts):
            if not t:
                raise EngineError(ErrorCode.INVALID_INPUT, f'inputs[{i}]: empty text')
        model = self.labels.resolve(request.model)
        # the breaker is keyed by the model that will really serve the call
        call.model, call.n_inputs = model or self._default_model(), len(texts)
        call.n_bytes = sum(len(t) for t in texts)
        # proto3 bool has no "unset": the PRD field is taken literally (false = raw vectors)
        return EmbedRequest(inputs=texts, model=model, normalize=bool(request.normalize),
                            timeout_s=_timeout(context, self.default_timeout_s),
                            request_id=call.request_id, transport=TRANSPORT)

    def _default_model(self) -> str:
        try:
            return self.backend.default_model() or ''
        except Exception:   # backend unreachable: the call itself will say so
            return ''

    def _simple_guard(self, context, operation: str) -> None:
        if self.guard is None:
            return
        done = run_guard(self.guard, self._call(context, operation))
        if callable(done):
            done(None)

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

    def _span(self, context, method: str, call: DoorCall):
        ctx = extract_from_metadata(context.invocation_metadata())
        return ctx, tracer().start_as_current_span(
            f'{SERVICE_NAME}/{method}', context=ctx, kind=trace.SpanKind.SERVER, attributes={
                'rpc.system': 'grpc', 'rpc.service': SERVICE_NAME, 'rpc.method': method,
                'akidb.transport': TRANSPORT, 'akidb.request_id': call.request_id})

    # -- RPCs ---------------------------------------------------------------------------------
    def Embed(self, request, context):
        call = self._call(context, 'embed')
        context.set_trailing_metadata((('x-request-id', call.request_id),))
        _INFLIGHT.inc()
        label = 'default'
        ctx, span_cm = self._span(context, 'Embed', call)
        token = otel_context.attach(ctx)
        try:
            with span_cm as span:
                try:
                    req = self._prepare(request, call, context)
                    label = self.labels.label(req.model)
                    span.set_attribute('akidb.model', req.model or 'default')
                    span.set_attribute('akidb.inputs', len(req.inputs))
                    fut, done = self._submit(call, req, caller_waits=True)   # unary: waits
                    err = None
                    try:
                        res = wait_result(fut, req.timeout_s)
                    except EngineError as e:
                        err = e
                        raise
                    finally:
                        if callable(done):
                            done(err)
                    label = self.labels.label(res.model)
                    out = _response(res)
                except EngineError as e:
                    span.set_attribute('akidb.error_code', e.code.name)
                    span.set_status(trace.StatusCode.ERROR, e.code.name)
                    record(call, label, e)
                    _abort(context, e, (('x-request-id', call.request_id),))
                record(call, label, None, tokens=int(res.total_tokens))
                return out
        finally:
            otel_context.detach(token)
            _INFLIGHT.dec()

    def EmbedStream(self, request_iterator, context):
        """Each request answered in order; requests pipelined (up to STREAM_WINDOW in flight)."""
        call0 = self._call(context, 'embed')
        ctx = extract_from_metadata(context.invocation_metadata())
        pending: 'queue.Queue' = queue.Queue(maxsize=STREAM_WINDOW)
        stop = threading.Event()
        _INFLIGHT.inc()

        def reader():
            token = otel_context.attach(ctx)
            try:
                for i, request in enumerate(request_iterator):
                    if stop.is_set():
                        break
                    call = DoorCall(transport=TRANSPORT, operation='embed',
                                    request_id=f'{call0.request_id}-{i}', headers=call0.headers,
                                    peer=call0.peer, peer_cert=call0.peer_cert)
                    label = 'default'
                    with tracer().start_as_current_span(
                            f'{SERVICE_NAME}/EmbedStream', kind=trace.SpanKind.SERVER,
                            attributes={'rpc.system': 'grpc', 'rpc.method': 'EmbedStream',
                                        'akidb.stream_index': i,
                                        'akidb.request_id': call.request_id}):
                        try:
                            req = self._prepare(request, call, context)
                            label = self.labels.label(req.model)
                            fut, done = self._submit(call, req)
                            item = (i, call, label, req, fut, done, None)
                        except EngineError as e:
                            item = (i, call, label, None, None, None, e)
                    while not stop.is_set():
                        try:
                            pending.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if item[-1] is not None:
                        break
            except Exception as exc:  # client cancelled / stream broken
                if not stop.is_set():
                    log.debug('EmbedStream reader ended: %s', exc)
            finally:
                otel_context.detach(token)
                while True:     # end marker; give up once the consumer is gone
                    try:
                        pending.put(None, timeout=0.1)
                        break
                    except queue.Full:
                        if stop.is_set():
                            break

        # the reader runs in the handler's context (e.g. a guard decision kept in a ContextVar)
        t = threading.Thread(target=contextvars.copy_context().run, args=(reader,),
                             name='akidb-grpc-stream', daemon=True)
        t.start()
        try:
            while True:
                item = pending.get()
                if item is None:
                    return
                i, call, label, req, fut, done, err = item
                if err is None:
                    try:
                        res = wait_result(fut, req.timeout_s)
                        label = self.labels.label(res.model)
                    except EngineError as e:
                        err = e
                    finally:
                        if callable(done):
                            done(err)
                if err is not None:
                    record(call, label, err)
                    stop.set()
                    _abort(context, err, (('akidb-stream-index', str(i)),))
                record(call, label, None, tokens=int(res.total_tokens))
                yield _response(res)
        finally:
            stop.set()
            # requests accepted but never answered (stream cancelled or failed): release their
            # guard permits once the engine is done with them (not counted as failures)
            while True:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if item is not None and callable(item[5]) and item[4] is not None:
                    item[4].add_done_callback(lambda _f, done=item[5]: done(None))
            _INFLIGHT.dec()

    def Health(self, request, context):
        try:
            self._simple_guard(context, 'health')
        except EngineError as e:
            _abort(context, e)
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
        call = self._call(context, 'list_models')
        try:
            done = run_guard(self.guard, call)
            if callable(done):
                done(None)
            infos = self.backend.list_models()
        except EngineError as e:
            _abort(context, e)
        out = pb.ListModelsResponse()
        for mi in infos:
            status = mi.status.value if isinstance(mi.status, ModelStatus) else str(mi.status)
            out.models.add(id=mi.id, name=mi.name, dimension=int(mi.dimension),
                           params=int(mi.params), memory_mb=int(mi.memory_mb),
                           latency_p95_ms=int(round(mi.latency_p95_ms or 0)),
                           throughput_qps=int(round(mi.throughput_qps or 0)), status=status)
        return out


class GrpcServer:
    """The gRPC server (EmbeddingService + health + reflection). ``port=0`` picks a free port."""

    def __init__(self, backend: Backend, host: str = '127.0.0.1', port: int = 9090,
                 guard: Optional[GuardHook] = None, max_workers: int = 64,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 default_timeout_s: Optional[float] = None, health_poll_s: float = 1.0,
                 interceptors: Sequence = (), credentials=None):
        """``interceptors``: e.g. ``[GuardInterceptor(guard)]``; ``credentials``: a
        ``grpc.ServerCredentials`` (``akidb_ros.guard.grpc_server_credentials``) for TLS,
        None for a plaintext port (loopback development only)."""
        self.backend = backend
        options = [
            ('grpc.max_receive_message_length', max_message_bytes),
            ('grpc.max_send_message_length', max_message_bytes),
            ('grpc.so_reuseport', 0),
            ('grpc.keepalive_permit_without_calls', 1),
            ('grpc.http2.min_ping_interval_without_data_ms', 10_000),
        ]
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix='akidb-grpc'), options=options,
            maximum_concurrent_rpcs=max_workers * 4, interceptors=list(interceptors))
        self.servicer = EmbeddingServicer(backend, guard, default_timeout_s)
        pb_grpc.add_EmbeddingServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        addr = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
        self.port = (self._server.add_secure_port(addr, credentials) if credentials is not None
                     else self._server.add_insecure_port(addr))
        self.tls = credentials is not None
        if self.port == 0:
            raise OSError(f'cannot bind gRPC to {addr}')
        self.host = host
        self._health_poll_s = health_poll_s
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None

    def _set_health(self) -> None:
        try:
            ok = self.backend.ready()
        except Exception:
            ok = False
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
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
        self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        self._server.stop(grace_s).wait(grace_s + 1)
        log.info('gRPC bridge stopped', extra={'seconds': round(time.monotonic() - t0, 3)})
        if self._poller is not None:
            self._poller.join(timeout=2)
