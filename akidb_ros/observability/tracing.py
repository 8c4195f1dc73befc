"""OpenTelemetry tracing: configured from the standard ``OTEL_*`` variables, exported over OTLP.

Spans (one trace per request):

    transport   ``POST /api/v1/embed`` (REST, SERVER) /
                ``akidb.embedding.v1.EmbeddingService/Embed``
                (gRPC, SERVER) / ``ros /embed`` (sidecar DDS hop, CLIENT)
      └ queue wait → batch → inference   (created by the engine from the propagated context)

W3C ``traceparent``/``tracestate`` are taken from HTTP headers and gRPC metadata, and injected
into the DDS request in sidecar mode (see ``akidb_ros.backends.RosBackend``).

Configuration (read once by :func:`setup_tracing`; all standard OpenTelemetry variables):

``OTEL_SDK_DISABLED=true``            tracing off (no-op tracer)
``OTEL_TRACES_EXPORTER``              ``otlp`` | ``console`` | ``none``; default ``otlp`` when an
                                      OTLP endpoint is set, otherwise ``none`` (transport spans
                                      are then id-only: trace ids propagate and appear in the
                                      logs, nothing is recorded; the engine's
                                      queue/batch/inference spans are skipped)
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``  ``grpc`` (default) |
                                      ``http/protobuf``
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``,
``OTEL_BSP_*`` (batch processor), ``OTEL_EXPORTER_OTLP_HEADERS``/``_TIMEOUT``/``_INSECURE``
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

log = logging.getLogger('akidb_ros.tracing')

TRACER_NAME = 'akidb_ros'
_lock = threading.Lock()
_provider = None  # the SDK TracerProvider this module installed, if any
# at exit, the most the exporters are waited for (see shutdown_tracing)
SHUTDOWN_WAIT_S = 3.0
_exporting = False  # whether that provider has a span processor (an exporter) attached
_tracer_for: Tuple[Any, Optional[trace.Tracer]] = (None, None)   # (provider, its tracer)


def _env_true(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def _exporters_from_env() -> List[Any]:
    names = os.environ.get('OTEL_TRACES_EXPORTER', '').strip().lower()
    has_endpoint = bool(os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT')
                        or os.environ.get('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT'))
    if not names:
        names = 'otlp' if has_endpoint else 'none'
    exporters = []
    for name in [n.strip() for n in names.split(',') if n.strip()]:
        if name == 'none':
            continue
        if name == 'console':
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            # one line per span: its default is indented JSON, 100+ lines per call in a log
            # that is otherwise one JSON object per line (docker and systemd merge stdout in)
            exporters.append(ConsoleSpanExporter(
                formatter=lambda span: span.to_json(indent=None) + os.linesep))
        elif name == 'otlp':
            protocol = (os.environ.get('OTEL_EXPORTER_OTLP_TRACES_PROTOCOL')
                        or os.environ.get('OTEL_EXPORTER_OTLP_PROTOCOL') or 'grpc').strip().lower()
            if protocol == 'grpc':
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            elif protocol in ('http/protobuf', 'http'):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                raise ValueError(f'OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or '
                                 f'http/protobuf')
            exporters.append(OTLPSpanExporter())
        else:
            raise ValueError(f'OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none')
    return exporters


def setup_tracing(service_name: str = 'akidb-ros', exporters: Optional[Iterable[Any]] = None,
                  simple: bool = False):
    """Install a global SDK TracerProvider once (idempotent); returns it (None when disabled).

    ``exporters`` overrides the environment (tests pass an InMemorySpanExporter); ``simple``
    uses a SimpleSpanProcessor (synchronous export) instead of the batch processor.
    """
    global _provider
    with _lock:
        if _provider is not None:
            if exporters:
                _add_exporters(_provider, exporters, simple)
            return _provider
        if _env_true('OTEL_SDK_DISABLED'):
            log.info('tracing disabled (OTEL_SDK_DISABLED)')
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from akidb_ros import __version__
        attributes = {}   # what OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES set stays theirs
        if not os.environ.get('OTEL_SERVICE_NAME'):
            attributes['service.name'] = service_name
        env_pairs = os.environ.get('OTEL_RESOURCE_ATTRIBUTES', '').split(',')
        env_keys = {kv.split('=', 1)[0].strip() for kv in env_pairs}
        if 'service.version' not in env_keys:   # ours would override the environment's
            attributes['service.version'] = __version__
        resource = Resource.create(attributes)
        # sampler from OTEL_TRACES_SAMPLER; shut down by shutdown_tracing, within its bound
        # (the SDK's own atexit shutdown waited for an unreachable collector's retries)
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        chosen = list(exporters) if exporters is not None else _exporters_from_env()
        _add_exporters(provider, chosen, simple)
        trace.set_tracer_provider(provider)
        _provider = provider
        log.info('tracing on', extra={'exporters': [type(e).__name__ for e in chosen]})
        return provider


def _add_exporters(provider, exporters: Iterable[Any], simple: bool) -> None:
    global _exporting
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    for exp in exporters:
        processor = SimpleSpanProcessor(exp) if simple else BatchSpanProcessor(exp)
        provider.add_span_processor(processor)
        _exporting = True


def shutdown_tracing(timeout_s: float = SHUTDOWN_WAIT_S) -> bool:
    """Flush and stop exporters (call at process exit), waiting at most ``timeout_s``.

    An unreachable collector made the OTLP exporters retry for 8-14 s here, so a stop that
    answered every call in time could still be SIGKILLed by its supervisor (systemd and
    compose allow the bridge 20 s, 10 of them for its grace): spans not exported by then are
    dropped with a warning. Returns whether the exporters finished.
    """
    with _lock:
        provider = _provider
    if provider is None:
        return True

    def flush_and_stop() -> None:
        try:
            provider.force_flush(int(timeout_s * 1000))
            provider.shutdown()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception('tracing shutdown failed')
    worker = threading.Thread(target=flush_and_stop, name='akidb-tracing-stop', daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning('tracing: spans not exported within %.0f s (is the collector reachable?): '
                    'dropped at exit', timeout_s)
        return False
    return True


def force_flush(timeout_ms: int = 5000) -> bool:
    return bool(_provider.force_flush(timeout_ms)) if _provider is not None else True


class _IdOnlyTracer(trace.Tracer):
    """Spans that carry ids and record nothing, for the provider installed here with no exporter.

    The SDK would build, time and process a full span that reaches nobody (~20 µs a request, 2x
    this). These spans keep what still matters: the caller's trace id (or a fresh one), a new
    span id, and the sampled flag the provider's sampler gives it, so the ids reach the logs and
    propagate downstream (the DDS hop) exactly as the SDK's would.
    """

    def __init__(self, provider):
        self._sampler = provider.sampler
        self._ids = provider.id_generator

    def start_span(self, name, context=None, kind=trace.SpanKind.INTERNAL, attributes=None,
                   links=None, start_time=None, record_exception=True,
                   set_status_on_exception=True) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else self._ids.generate_trace_id()
        decision = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if decision.decision.is_sampled()
                                 else trace.TraceFlags.DEFAULT)
        return trace.NonRecordingSpan(trace.SpanContext(
            trace_id, self._ids.generate_span_id(), is_remote=False, trace_flags=flags,
            trace_state=decision.trace_state))

    @contextmanager
    def start_as_current_span(self, name, context=None, kind=trace.SpanKind.INTERNAL,
                              attributes=None, links=None, start_time=None,
                              record_exception=True, set_status_on_exception=True,
                              end_on_exit=True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links)
        with trace.use_span(span, end_on_exit=end_on_exit) as current:
            yield current


def tracer() -> trace.Tracer:
    """This package's tracer, cached per global provider (``get_tracer`` builds a new tracer
    and instrumentation scope on every call: a measurable cost on every request); an id-only
    tracer while the provider installed here has no exporter (:func:`spans_exported`)."""
    global _tracer_for
    provider = trace.get_tracer_provider()
    cached_provider, cached = _tracer_for
    exported = spans_exported()
    if cached is None or cached_provider is not provider or \
            isinstance(cached, _IdOnlyTracer) == exported:
        cached = trace.get_tracer(TRACER_NAME) if exported else _IdOnlyTracer(provider)
        _tracer_for = (provider, cached)
    return cached


def spans_exported() -> bool:
    """False only when the active provider is the one installed here with no exporter, so a
    span recorded now would reach nobody (a provider installed by the host application counts
    as exporting: its processors are its own business)."""
    return _exporting or _provider is None or trace.get_tracer_provider() is not _provider


# --- propagation helpers -------------------------------------------------------------------

class _MetadataGetter(Getter):
    """gRPC invocation metadata (a sequence of (key, value)) as a carrier."""

    def get(self, carrier, key):
        values = [v for k, v in carrier if k.lower() == key.lower()]
        return [v if isinstance(v, str) else v.decode('latin-1') for v in values] or None

    def keys(self, carrier):
        return [k for k, _ in carrier]


_METADATA_GETTER = _MetadataGetter()


def extract_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """Context from W3C headers (``traceparent``/``tracestate``) of an HTTP request."""
    carrier = {k.lower(): v for k, v in headers.items()
               if k.lower() in ('traceparent', 'tracestate', 'baggage')}
    return propagate.extract(carrier)


def extract_from_metadata(metadata: Iterable[Tuple[str, Any]]) -> otel_context.Context:
    """Context from gRPC invocation metadata."""
    return propagate.extract(list(metadata or ()), getter=_METADATA_GETTER)


def extract_traceparent(traceparent: str, tracestate: str = '') -> otel_context.Context:
    """Return the context of a bare W3C ``traceparent`` (the ``Embed.srv`` field over DDS)."""
    carrier = {'traceparent': traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier['tracestate'] = tracestate
    return propagate.extract(carrier)


def inject_carrier(ctx: Optional[otel_context.Context] = None) -> Dict[str, str]:
    """Return the current (or given) context as a W3C carrier, e.g. ``{'traceparent': ...}``."""
    carrier: Dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def current_trace_ids() -> Tuple[str, str]:
    """(trace_id, span_id) hex of the current span, or ('', '')."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return '', ''
    return format(ctx.trace_id, '032x'), format(ctx.span_id, '016x')


# --- engine-side spans -----------------------------------------------------------------------
# The engine runs a request's work on its batcher thread, so it cannot rely on the implicit
# "current span". It captures ``capture_context()`` in ``submit()`` (the door's thread, where the
# transport span is current) and, once the batch ran, calls ``record_engine_spans`` with the
# time.monotonic() stamps it already keeps. The spans are created after the fact with explicit
# start/end times, so the batcher's hot loop pays nothing while no tracer is installed.

def capture_context() -> Optional[otel_context.Context]:
    """Return the caller's context when a real (sampled or not) span is current and engine
    spans would be exported, else None."""
    if not spans_exported():
        return None
    ctx = otel_context.get_current()
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _mono_to_ns(mono: float, now_mono: float, now_ns: int) -> int:
    return now_ns - int((now_mono - mono) * 1e9)


def record_engine_spans(parent: Optional[otel_context.Context], model: str, enqueued: float,
                        batch_start: float, infer_start: float, infer_end: float,
                        batch_size: int, tokens: int = 0, provider: str = '') -> None:
    """Record queue wait → batch → inference spans under ``parent`` (monotonic seconds).

    ``parent`` comes from :func:`capture_context`, which already returns None when nothing
    would receive the spans."""
    if parent is None:
        return
    import time as _time
    now_mono, now_ns = _time.monotonic(), _time.time_ns()
    t = tracer()
    attrs = {'akidb.model': model, 'akidb.batch_size': batch_size}
    q = t.start_span('queue wait', context=parent, attributes=attrs,
                     start_time=_mono_to_ns(enqueued, now_mono, now_ns))
    q.end(end_time=_mono_to_ns(batch_start, now_mono, now_ns))
    b = t.start_span('batch', context=parent, attributes={**attrs, 'akidb.tokens': tokens},
                     start_time=_mono_to_ns(batch_start, now_mono, now_ns))
    i = t.start_span('inference', context=trace.set_span_in_context(b, parent),
                     attributes={**attrs, 'akidb.provider': provider},
                     start_time=_mono_to_ns(infer_start, now_mono, now_ns))
    i.end(end_time=_mono_to_ns(infer_end, now_mono, now_ns))
    b.end(end_time=_mono_to_ns(infer_end, now_mono, now_ns))
