"""Tracing: W3C context from HTTP headers and gRPC metadata, spans in an in-memory exporter,
and once end to end: a real server process exporting OTLP to a real collector (rotel)."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import requests

import akidb_ros
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc

from bridge_support import ROOT, free_port, refusing_listener


def _traceparent():
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, parent_id, f'00-{trace_id}-{parent_id}-01'


def _spans(exporter, trace_id):
    return [s for s in exporter.get_finished_spans()
            if format(s.context.trace_id, '032x') == trace_id]


def test_rest_span_continues_caller_trace(rest_url, span_exporter):
    trace_id, parent_id, tp = _traceparent()
    r = requests.post(rest_url + '/api/v1/embed', json={'inputs': ['trace me']}, timeout=10,
                      headers={'traceparent': tp, 'X-Request-ID': 'trace-rest-1'})
    assert r.status_code == 200
    spans = _spans(span_exporter, trace_id)
    server = next(s for s in spans if s.name == 'POST /api/v1/embed')
    assert format(server.parent.span_id, '016x') == parent_id
    assert server.kind.name == 'SERVER'
    assert server.attributes['akidb.request_id'] == 'trace-rest-1'
    # the model that served it, as on the metrics (it was what the caller sent: 'default')
    assert server.attributes['akidb.model'] == r.json()['model'] == 'all-minilm-l6-v2'
    assert server.attributes['http.response.status_code'] == 200


def test_rest_error_marks_span(rest_url, span_exporter):
    trace_id, _, tp = _traceparent()
    requests.post(rest_url + '/api/v1/embed', json={'inputs': ['x'], 'model': 'nope'},
                  headers={'traceparent': tp}, timeout=10)
    server = next(s for s in _spans(span_exporter, trace_id) if s.name == 'POST /api/v1/embed')
    assert server.status.status_code.name == 'ERROR'
    assert server.attributes['akidb.error_code'] == 'MODEL_NOT_FOUND'
    assert server.attributes['akidb.model'] == 'unknown'     # bounded, as the metric label


def test_grpc_error_marks_span_with_its_code_and_no_traceback(grpc_target, span_exporter):
    """As on REST: the table code as the span's status, and none of the caller's text. grpc's
    abort() raised a bare Exception inside the span: its status read "Exception: " and an
    exception event carried a traceback quoting the bad model name."""
    trace_id, _, tp = _traceparent()
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(inputs=['x'], model='caller-secret-text'), timeout=10,
                   metadata=[('traceparent', tp)])
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    server = next(s for s in _spans(span_exporter, trace_id)
                  if s.name == 'akidb.embedding.v1.EmbeddingService/Embed')
    assert (server.status.status_code.name, server.status.description) == \
        ('ERROR', 'MODEL_NOT_FOUND')
    assert server.attributes['akidb.error_code'] == 'MODEL_NOT_FOUND'
    assert not server.events
    assert 'caller-secret-text' not in server.to_json()


def test_grpc_span_continues_caller_trace(grpc_target, span_exporter):
    trace_id, parent_id, tp = _traceparent()
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    stub.Embed(pb.EmbedRequest(inputs=['trace me too']), timeout=10,
               metadata=[('traceparent', tp)])
    server = next(s for s in _spans(span_exporter, trace_id)
                  if s.name == 'akidb.embedding.v1.EmbeddingService/Embed')
    assert format(server.parent.span_id, '016x') == parent_id
    assert server.attributes['rpc.system'] == 'grpc'
    assert server.attributes['akidb.model'] == 'all-minilm-l6-v2'
    assert server.attributes['akidb.transport'] == 'grpc'


def test_embed_stream_spans_carry_the_request_attributes(grpc_target, span_exporter):
    """Each EmbedStream request's span names its transport, model and inputs like a unary
    call's (it had only the stream index and request id)."""
    trace_id, _, tp = _traceparent()
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    answers = list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=['one', 'two']),
                                          pb.EmbedRequest(inputs=['three'])]),
                                    timeout=10, metadata=[('traceparent', tp)]))
    assert len(answers) == 2
    spans = sorted((s for s in _spans(span_exporter, trace_id)
                    if s.name == 'akidb.embedding.v1.EmbeddingService/EmbedStream'),
                   key=lambda s: s.attributes['akidb.stream_index'])
    assert [(s.attributes['akidb.transport'], s.attributes['akidb.model'],
             s.attributes['akidb.inputs']) for s in spans] == \
        [('grpc', 'all-minilm-l6-v2', 2), ('grpc', 'all-minilm-l6-v2', 1)]


def test_no_caller_context_starts_new_trace(rest_url, span_exporter):
    span_exporter.clear()
    requests.post(rest_url + '/api/v1/embed', json={'inputs': ['fresh']}, timeout=10)
    server = [s for s in span_exporter.get_finished_spans() if s.name == 'POST /api/v1/embed']
    assert server and server[-1].parent is None


def test_engine_spans_under_transport_span(rest_url, span_exporter):
    trace_id, _, tp = _traceparent()
    requests.post(rest_url + '/api/v1/embed', json={'inputs': ['deep trace']}, timeout=10,
                  headers={'traceparent': tp})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        names = {s.name for s in _spans(span_exporter, trace_id)}
        if {'queue wait', 'batch', 'inference'} <= names:
            break
        time.sleep(0.05)
    spans = {s.name: s for s in _spans(span_exporter, trace_id)}
    assert {'POST /api/v1/embed', 'queue wait', 'batch', 'inference'} <= set(spans)
    server = spans['POST /api/v1/embed']
    assert spans['queue wait'].parent.span_id == server.context.span_id
    assert spans['inference'].parent.span_id == spans['batch'].context.span_id


def test_without_exporter_spans_carry_ids_but_record_nothing(rest_url, span_exporter,
                                                             monkeypatch):
    """Our provider with no exporter attached: nothing is recorded (no SDK span would reach
    anyone), but the transport span still carries the caller's trace id, a span id of its own and
    the sampler's flag, so the ids reach the access log and propagate downstream."""
    from opentelemetry import trace
    from akidb_ros.observability import tracing
    from akidb_ros.observability.logs import ACCESS_LOGGER, JsonFormatter
    monkeypatch.setattr(tracing, '_provider', trace.get_tracer_provider())
    monkeypatch.setattr(tracing, '_exporting', False)
    assert not tracing.spans_exported()
    trace_id, parent_id, tp = _traceparent()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())     # adds the ids of the span current when logging
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        r = requests.post(rest_url + '/api/v1/embed', json={'inputs': ['quiet trace']},
                          timeout=10, headers={'traceparent': tp, 'X-Request-ID': 'quiet-1'})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert r.status_code == 200
    time.sleep(0.3)   # the engine's spans, were they recorded, follow the answer closely
    assert _spans(span_exporter, trace_id) == []
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    line = next(x for x in lines if x.get('request_id') == 'quiet-1')
    assert line['trace_id'] == trace_id and line['span_id'] not in ('', parent_id)

    # in-process: the id-only span continues a caller's trace or starts a sampled one
    t = tracing.tracer()
    with t.start_as_current_span('child', context=tracing.extract_traceparent(tp)) as span:
        ctx = span.get_span_context()
        assert not span.is_recording()
        assert format(ctx.trace_id, '032x') == trace_id and ctx.trace_flags.sampled
        assert tracing.inject_carrier()['traceparent'].startswith(f'00-{trace_id}-')
    with t.start_as_current_span('root') as span:
        assert span.get_span_context().is_valid and span.get_span_context().trace_flags.sampled
    assert tracing.capture_context() is None    # no engine spans either


def test_tracer_is_cached_per_provider():
    from akidb_ros.observability import tracing
    assert tracing.tracer() is tracing.tracer()


# --- end to end: OTLP to a real collector ---------------------------------------------------

def _wait_port(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _rotel_binary() -> Path:
    import rotel
    return Path(rotel.__file__).resolve().parent / 'rotel-agent'


def test_otlp_end_to_end_with_rotel(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    collector_out = tmp_path / 'collector.out'
    with open(collector_out, 'wb') as out:
        collector = subprocess.Popen(
            [str(_rotel_binary()), 'start', '--otlp-grpc-endpoint', f'127.0.0.1:{grpc_port}',
             '--otlp-http-endpoint', f'127.0.0.1:{http_port}', '--exporter', 'blackhole',
             '--debug-log', 'traces', '--debug-log-verbosity', 'detailed',
             '--pid-file', str(tmp_path / 'rotel.pid'), '--log-file', str(tmp_path / 'rotel.log')],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = None
    try:
        assert _wait_port(grpc_port, 15), 'collector did not start'
        ready = tmp_path / 'ready.json'
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f'http://127.0.0.1:{grpc_port}',
                   OTEL_SERVICE_NAME='akidb-e2e-test', OTEL_BSP_SCHEDULE_DELAY='200')
        env.pop('OTEL_SDK_DISABLED', None)
        server = subprocess.Popen(
            [sys.executable, '-m', 'akidb_ros.server', '--mode', 'inprocess', '--no-ros',
             '--host', '127.0.0.1', '--rest-port', '0', '--grpc-port', '0',
             '--ready-file', str(ready)], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / 'server.log', 'wb'))
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / 'server.log').read_text()[-2000:]
        ports = json.loads(ready.read_text())
        trace_id, _, tp = _traceparent()
        r = requests.post(f'http://127.0.0.1:{ports["rest_port"]}/api/v1/embed',
                          json={'inputs': ['to the collector']}, headers={'traceparent': tp},
                          timeout=20)
        assert r.status_code == 200
        server.send_signal(signal.SIGTERM)        # graceful stop flushes the batch exporter
        assert server.wait(30) == 0
        deadline = time.monotonic() + 10
        text = ''
        while time.monotonic() < deadline:
            text = collector_out.read_text(errors='replace')
            if trace_id in text and 'POST /api/v1/embed' in text:
                break
            time.sleep(0.2)
        assert 'akidb-e2e-test' in text
        assert 'service.version' in text and akidb_ros.__version__ in text, text[-3000:]
        assert 'POST /api/v1/embed' in text and trace_id in text, text[-3000:]
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(10)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait(5)


_UNREACHABLE_COLLECTOR = r'''
import sys, time
from akidb_ros.observability.tracing import setup_tracing, shutdown_tracing, tracer
setup_tracing('akidb-test')
with tracer().start_as_current_span('never exported'):
    pass
t0 = time.monotonic()
done = shutdown_tracing(timeout_s=1.0)
print(done, round(time.monotonic() - t0, 2), flush=True)
sys.stdout.write('exiting\n')
'''


def test_an_unreachable_collector_does_not_hold_the_exit():
    """The OTLP exporter retries an unreachable collector for seconds, in shutdown_tracing and
    again in the SDK's own atexit shutdown: a stop that answered every call in time could be
    SIGKILLed by its supervisor. The wait is bounded, spans dropped with a warning."""
    env = dict(os.environ, OTEL_TRACES_EXPORTER='otlp',
               OTEL_EXPORTER_OTLP_ENDPOINT=f'http://127.0.0.1:{free_port()}',
               OTEL_EXPORTER_OTLP_PROTOCOL='grpc', OTEL_BSP_SCHEDULE_DELAY='100')
    env.pop('OTEL_SDK_DISABLED', None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, '-c', _UNREACHABLE_COLLECTOR], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    done, waited = out.stdout.split()[:2]
    assert out.returncode == 0, out.stderr[-2000:]
    assert done == 'False' and float(waited) < 1.5, out.stdout
    assert 'spans not exported within 1 s' in out.stderr
    assert took < 5.0, f'the process took {took:.1f} s to exit'


def _server(env_extra, *args):
    env = dict(os.environ, **env_extra)
    env.pop('OTEL_SDK_DISABLED', None)
    return [sys.executable, '-m', 'akidb_ros.server', '--no-ros', '--rest-port', '0',
            '--grpc-port', '0', '--probe-port', 'off', *args], env


def test_a_bad_otel_setting_stops_the_start_in_one_line():
    """A value the tracing set-up (ours, or the SDK's: OTEL_BSP_*, the exporter's timeout)
    cannot take ended the server's start in a traceback, exit 1, after the security profile
    had loaded; the node went on without tracing. Both now refuse it in one line, exit 2, as
    a bad AKIDB_LOG_* value; the protocol's letter case does not matter."""
    endpoint = f'http://127.0.0.1:{free_port()}'
    for extra in ({'OTEL_TRACES_EXPORTER': 'zipkin'}, {'OTEL_BSP_MAX_QUEUE_SIZE': '0'},
                  {'OTEL_EXPORTER_OTLP_PROTOCOL': 'http/json'}):
        cmd, env = _server(dict(extra, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert 'akidb-server: error: tracing (OTEL_* variables): ' in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr
    r = subprocess.run([sys.executable, '-m', 'akidb_ros.ros.node'], cwd=ROOT, timeout=60,
                       env=dict(env, OTEL_TRACES_EXPORTER='zipkin'), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "embedding_node: tracing (OTEL_* variables): " \
        "OTEL_TRACES_EXPORTER='zipkin'" in r.stderr, r.stderr[-2000:]
    from akidb_ros.observability import tracing
    with_case = dict(os.environ, OTEL_EXPORTER_OTLP_PROTOCOL='HTTP/Protobuf')
    old = os.environ.copy()
    try:
        os.environ.update(with_case, OTEL_TRACES_EXPORTER='otlp')
        (exporter,) = tracing._exporters_from_env()
        assert 'proto.http' in type(exporter).__module__
        os.environ['OTEL_TRACES_EXPORTER'] = 'console'
        (console,) = tracing._exporters_from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    # the console exporter writes one line per span (it wrote indented JSON, 100+ lines a call)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    console.out = io.StringIO()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(console))
    with provider.get_tracer('t').start_as_current_span('one'):
        pass
    lines = console.out.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])['name'] == 'one', lines


def test_a_host_without_tls_leaves_grpc_tls_1_2_open_and_logs_only_json(tmp_path):
    """The server closed TLS 1.2 in gRPC for the whole process on every host (its doors need it
    closed only where they serve TLS), so the OTLP exporter could not reach a TLS 1.2
    collector; and gRPC's C core wrote each failed handshake to the collector as a plain-text
    line on stderr, which is JSON lines. A dev host leaves TLS 1.2 open, and the log stays
    JSON (GRPC_VERBOSITY=ERROR unless set)."""
    # not TLS: every handshake fails
    listener = refusing_listener(b'HTTP/1.1 400 Bad Request\r\n\r\n')
    port = listener.getsockname()[1]
    ready = tmp_path / 'ready.json'
    cmd, env = _server({'OTEL_EXPORTER_OTLP_ENDPOINT': f'https://127.0.0.1:{port}',
                        'OTEL_BSP_SCHEDULE_DELAY': '100', 'AKIDB_LOG_FORMAT': 'json'},
                       '--ready-file', str(ready))
    env.pop('GRPC_VERBOSITY', None)
    env.pop('GRPC_SSL_CIPHER_SUITES', None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        for _ in range(5):
            requests.post(f'http://127.0.0.1:{info["rest_port"]}/api/v1/embed',
                          json={'inputs': ['hello']}, timeout=30).raise_for_status()
            time.sleep(0.4)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        listener.close()
    assert proc.returncode == 0, err[-2000:]
    plain = [line for line in err.splitlines() if line and not line.startswith('{')]
    assert not plain, plain[:5]
    from akidb_ros import server
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv('GRPC_SSL_CIPHER_SUITES', raising=False)
        mp.setenv('AKIDB_SECURITY_PROFILE', 'dev')
        mp.setattr('akidb_ros.guard.mtls.prepare_grpc_tls13', lambda: calls.append(1))
        server.load_security(server.parse_args(['--no-ros']))
    assert calls == []      # dev: no TLS doors, gRPC's TLS 1.2 left to its other clients
