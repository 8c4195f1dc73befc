"""akidb_ros.client against real misbehaving servers (small socket/HTTP/gRPC listeners written
here), the real in-process bridges and real TLS 1.3 doors with client certificates: the overall
budget, header caps, message limits, TLS options and failures, caller mistakes, lifecycle."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from bridge_support import Scripted, refusing_listener
from akidb_ros.client import (NO_RETRY, AkidbError, DeadlineExceededError, GrpcClient,
                              InvalidRequestError, OverloadedError, ProtocolError,
                              RateLimitedError, RestClient, RetryPolicy, ServerError,
                              ServiceUnavailableError, TLSError)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'guard'))
from certs import make_ca, make_leaf  # noqa: E402

OK_BODY = {'embeddings': [[1.0, 0.0]], 'model': 'm',
           'usage': {'total_tokens': 1, 'duration_ms': 1}}
SVC = '/akidb.embedding.v1.EmbeddingService/'


# -- small real servers ---------------------------------------------------------------------------
class Listener:
    """A raw TCP listener on 127.0.0.1; ``serve(conn)`` runs per connection (None: read and
    never answer)."""

    def __init__(self, serve=None):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.serve = serve
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.serve is not None:
                threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def _trickle(gap_s):
    body = json.dumps(OK_BODY).encode()

    def serve(conn):
        try:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                         b'Content-Length: %d\r\n\r\n' % len(body))
            for b in body:
                time.sleep(gap_s)
                conn.sendall(bytes([b]))
        except OSError:
            pass
    return serve


def _json(status, body, **headers):
    return (status, {'Content-Type': 'application/json', **headers}, body)


# -- 1. the overall budget ------------------------------------------------------------------------
def test_rest_budget_holds_against_a_trickling_body():
    srv = Listener(_trickle(0.2))     # ~90 bytes at 0.2 s each: ~18 s to answer
    try:
        c = RestClient(f'http://127.0.0.1:{srv.port}', timeout_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError) as ei:
            c.embed(['x'])
        assert time.monotonic() - t0 < 2.5
        assert ei.value.code == 'TIMEOUT' and ei.value.request_id
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            c.embed(['x'], timeout_s=0.6)
        assert time.monotonic() - t0 < 1.5
    finally:
        srv.close()


def test_rest_budget_still_reads_a_whole_body(rest):
    out = rest.embed(['a fairly long sentence to embed'] * 64)
    assert out.embeddings.shape == (64, 384)


# -- 2. the gRPC stream's deadline ----------------------------------------------------------------
def test_grpc_stream_falls_back_to_the_client_timeout():
    srv = Listener()                  # accepts, never speaks HTTP/2
    result = []

    def go():
        t0 = time.monotonic()
        try:
            list(GrpcClient(f'127.0.0.1:{srv.port}', timeout_s=1).embed_stream([['x']]))
            result.append(('ok', time.monotonic() - t0))
        except AkidbError as e:
            result.append((type(e), time.monotonic() - t0))
    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(6)
    srv.close()
    assert result, 'embed_stream ignored the client timeout_s'
    kind, took = result[0]
    assert kind is DeadlineExceededError and took < 3


# -- 3. budgets over the server's maximum ---------------------------------------------------------
def test_rest_timeout_header_capped_at_the_server_maximum(rest_url):
    out = RestClient(rest_url, timeout_s=900).embed(['a patient caller'])
    assert out.embeddings.shape == (1, 384)
    srv = Scripted([_json(200, OK_BODY)])
    try:
        RestClient(srv.url, timeout_s=3600).embed(['x'])
        RestClient(srv.url, timeout_s=5).embed(['x'])
        assert srv.log[0][3]['X-Request-Timeout-Ms'] == '600000'
        assert 4000 < int(srv.log[1][3]['X-Request-Timeout-Ms']) <= 5000
    finally:
        srv.close()


# -- 4. oversized gRPC messages -------------------------------------------------------------------
def test_grpc_message_over_the_limit_is_input_too_large_and_not_retried(grpc_target):
    texts = ['€' * 32000] * 200          # ~19 MB: over the server's 16 MiB
    slow_retry = RetryPolicy(max_attempts=4, initial_backoff_s=1.0, jitter=0)
    for c in (GrpcClient(grpc_target, timeout_s=30, retry=slow_retry,
                         max_message_bytes=64 << 20),      # the server refuses it
              GrpcClient(grpc_target, timeout_s=30, retry=slow_retry)):   # refused here
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError) as ei:
            c.embed(texts)
        assert ei.value.code == 'INPUT_TOO_LARGE' and not ei.value.retryable
        assert ei.value.status == 'RESOURCE_EXHAUSTED'
        assert time.monotonic() - t0 < 1.0 + 5      # no backoff of 1 s, 2 s, 4 s slept
        c.close()


def _grpc_server(handlers):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        'akidb.embedding.v1.EmbeddingService', handlers),))
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    return server, f'127.0.0.1:{port}'


def test_grpc_resource_exhausted_with_a_trailer_uses_the_trailer():
    calls = []

    def embed(request, context):
        calls.append(1)
        context.set_trailing_metadata((('akidb-error-code', 'OVERLOADED'),
                                       ('retry-after', '0')))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      'Received message larger than max (pretend)')
    server, target = _grpc_server({'Embed': grpc.unary_unary_rpc_method_handler(
        embed, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    try:
        c = GrpcClient(target, timeout_s=5, retry=RetryPolicy(max_attempts=2,
                                                              initial_backoff_s=0.01))
        with pytest.raises(OverloadedError) as ei:
            c.embed(['x'])
        assert ei.value.retryable and len(calls) == 2
    finally:
        server.stop(0)


# -- 5. TLS ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tls_doors(tmp_path_factory, inproc, local_backend):
    """The real REST bridge behind the real TLS 1.3 front, and a real gRPC bridge on a TLS port,
    both requiring client certificates signed by the test CA."""
    from akidb_ros.grpc_api.server import GrpcServer
    from akidb_ros.guard.mtls import ReloadingTLSContext, TLSSettings, grpc_server_credentials
    from akidb_ros.guard.tls_front import TLSFront
    d = str(tmp_path_factory.mktemp('client-pki'))
    ca, rogue = make_ca(d), make_ca(d, cn='rogue CA')
    server_cert, server_key, _ = make_leaf(d, ca, 'localhost', server=True, name='server')
    client_cert, client_key, _ = make_leaf(d, ca, 'robot', server=False, name='client')
    rogue_cert, rogue_key, _ = make_leaf(d, rogue, 'rogue', server=False, name='client-rogue')
    settings = TLSSettings(server_cert, server_key, ca.path, True, reload_interval_s=0)
    front = TLSFront(ReloadingTLSContext(settings), listen=('127.0.0.1', 0),
                     upstream=('127.0.0.1', inproc.rest.port)).start()
    gsrv = GrpcServer(local_backend, port=0,
                      credentials=grpc_server_credentials(settings, require_tls13=False),
                      stream_idle_timeout_s=0).start()
    yield dict(rest=f'https://127.0.0.1:{front.port}', grpc=f'127.0.0.1:{gsrv.port}',
               front=front, ca=ca.path, rogue_ca=rogue.path, cert=client_cert, key=client_key,
               rogue_cert=rogue_cert, rogue_key=rogue_key)
    front.stop()
    gsrv.stop(0)


def test_mtls_calls_succeed_with_both_clients(tls_doors):
    t = tls_doors
    with RestClient(t['rest'], timeout_s=20, ca_file=t['ca'], client_cert=t['cert'],
                    client_key=t['key']) as rest:
        assert rest.embed(['over tls']).embeddings.shape == (1, 384)
    with GrpcClient(t['grpc'], timeout_s=20, ca_file=t['ca'], client_cert=t['cert'],
                    client_key=t['key']) as g:
        assert g.embed(['over tls']).embeddings.shape == (1, 384)
        assert [a.embeddings.shape for a in g.embed_stream([['a'], ['b', 'c']])] == \
            [(1, 384), (2, 384)]


def test_untrusted_server_certificate_is_a_typed_error_and_not_retried(tls_doors):
    t = tls_doors
    slow_retry = RetryPolicy(max_attempts=4, initial_backoff_s=1.0, jitter=0)
    before = t['front'].stats['accepted']
    for rest in (RestClient(t['rest'], timeout_s=20, retry=slow_retry, ca_file=t['rogue_ca'],
                            client_cert=t['cert'], client_key=t['key']),
                 RestClient(t['rest'], timeout_s=20, retry=slow_retry)):   # system CAs
        t0 = time.monotonic()
        with pytest.raises(TLSError) as ei:
            rest.embed(['x'])
        assert not ei.value.retryable and time.monotonic() - t0 < 1.0
        assert 'certificate' in ei.value.message and ei.value.code == 'TLS_ERROR'
    assert t['front'].stats['accepted'] - before == 2        # one connection each
    g = GrpcClient(t['grpc'], timeout_s=20, retry=slow_retry, ca_file=t['rogue_ca'],
                   client_cert=t['cert'], client_key=t['key'])
    t0 = time.monotonic()
    with pytest.raises(TLSError) as ei:
        g.embed(['x'])
    assert not ei.value.retryable and time.monotonic() - t0 < 1.0
    g.close()


def test_grpc_certificate_for_another_host_name_is_a_typed_error_and_not_retried(tls_doors):
    t = tls_doors
    g = GrpcClient(t['grpc'], timeout_s=20, ca_file=t['ca'], client_cert=t['cert'],
                   client_key=t['key'], server_name='wrong.example',
                   retry=RetryPolicy(max_attempts=4, initial_backoff_s=1.0, jitter=0))
    t0 = time.monotonic()
    with pytest.raises(TLSError) as ei:
        g.embed(['x'])
    assert not ei.value.retryable and time.monotonic() - t0 < 1.0
    assert 'server_name' in ei.value.message and ei.value.code == 'TLS_ERROR'
    g.close()


def test_client_certificate_refused_by_the_server_is_a_typed_error(tls_doors):
    t = tls_doors
    slow_retry = RetryPolicy(max_attempts=4, initial_backoff_s=1.0, jitter=0)
    for kw in ({}, dict(client_cert=t['rogue_cert'], client_key=t['rogue_key'])):
        rest = RestClient(t['rest'], timeout_s=20, retry=slow_retry, ca_file=t['ca'], **kw)
        t0 = time.monotonic()
        with pytest.raises(TLSError) as ei:
            rest.embed(['x'])
        assert not ei.value.retryable and time.monotonic() - t0 < 1.0, ei.value
        g = GrpcClient(t['grpc'], timeout_s=20, retry=slow_retry, ca_file=t['ca'], **kw)
        t0 = time.monotonic()
        with pytest.raises(TLSError) as ei:
            g.embed(['x'])
        assert not ei.value.retryable and time.monotonic() - t0 < 1.0, ei.value
        g.close()


def test_tls_options_are_checked_at_construction(tls_doors, tmp_path):
    t = tls_doors
    with pytest.raises(ValueError, match='missing'):
        RestClient(t['rest'], ca_file=str(tmp_path / 'missing.crt'))
    with pytest.raises(ValueError, match='client_cert'):
        RestClient(t['rest'], ca_file=t['ca'], client_key=t['key'])
    with pytest.raises(ValueError, match='https'):
        RestClient('http://127.0.0.1:1', ca_file=t['ca'])
    with pytest.raises(ValueError, match='client_key'):
        GrpcClient(t['grpc'], ca_file=t['ca'], client_cert=t['cert'], client_key=t['ca'])
    with pytest.raises(ValueError, match='channel'):
        GrpcClient(t['grpc'], ca_file=t['ca'], channel=grpc.insecure_channel(t['grpc']))


# -- 6. untyped exceptions ------------------------------------------------------------------------
@pytest.mark.parametrize('answer', [
    (200, {'Content-Type': 'text/html'}, b'<html>captive portal</html>'),
    _json(200, {'foo': 1}),
    _json(200, [1, 2]),
    _json(200, {'embeddings': 'nope', 'model': 'm'}),
])
def test_bad_answers_are_typed_protocol_errors(answer):
    srv = Scripted([answer])
    try:
        c = RestClient(srv.url, timeout_s=5)
        with pytest.raises(ProtocolError) as ei:
            c.embed(['x'])
        assert isinstance(ei.value, ServerError) and not ei.value.retryable
        assert ei.value.status == 200 and ei.value.request_id
        with pytest.raises(ProtocolError):
            c.list_models()
        assert len(srv.log) == 2                          # not retried
    finally:
        srv.close()


def test_caller_mistakes_are_refused_at_once(grpc_target, rest_url):
    for cls, where in ((RestClient, rest_url), (GrpcClient, grpc_target)):
        # 1e10 s: urllib3's socket timeout overflowed (a bare OverflowError after the request
        # was sent), gRPC's deadline too (an instant, retried TIMEOUT)
        for bad in (None, 0, -1, float('nan'), float('inf'), '10', 1e10):
            with pytest.raises((ValueError, TypeError), match='timeout_s'):
                cls(where, timeout_s=bad)
        c = cls(where, timeout_s=5)
        with pytest.raises(ValueError, match='timeout_s must be at most'):
            c.embed(['x'], timeout_s=1e10)
        for bad in (b'bytes input', [b'x'], ['ok', 3], 42):
            with pytest.raises(TypeError, match='inputs'):
                c.embed(bad)
        with pytest.raises(ValueError, match='timeout_s'):
            c.embed(['x'], timeout_s=-1)
        c.close()
    with pytest.raises(ValueError, match='http'):
        RestClient('127.0.0.1:8080')
    with pytest.raises(ValueError, match='http'):
        RestClient('ftp://127.0.0.1:8080')


def test_clients_refuse_use_after_close(grpc_target, rest_url):
    g = GrpcClient(grpc_target, timeout_s=5)
    g.close()
    for call in (lambda: g.embed(['x']), lambda: list(g.embed_stream([['x']])), g.health,
                 g.list_models, g.serving):
        with pytest.raises(ValueError, match='GrpcClient is closed'):
            call()
    r = RestClient(rest_url, timeout_s=5)
    r.close()
    with pytest.raises(ValueError, match='RestClient is closed'):
        r.embed(['x'])


# -- 7. RestClient as a context manager -----------------------------------------------------------
def test_rest_client_is_a_context_manager(rest_url):
    with RestClient(rest_url, timeout_s=10) as c:
        assert c.embed(['managed']).embeddings.shape == (1, 384)
    with pytest.raises(ValueError, match='closed'):
        c.embed(['x'])


# -- 8. embed_stream takes batches ----------------------------------------------------------------
def test_embed_stream_takes_batches_and_reports_the_failing_index(grpc_client):
    for bad in (['hello', 'robot'], 'hello', [['ok'], 'robot'], [[b'x']]):
        with pytest.raises(TypeError, match='batch'):
            grpc_client.embed_stream(bad)

    def lazy():
        yield ['fine']
        yield 'not a batch'
    got = []
    with pytest.raises(TypeError, match='batch 1'):
        for answer in grpc_client.embed_stream(lazy()):
            got.append(answer.embeddings.shape)
    assert got == [(1, 384)]
    got = []
    with pytest.raises(InvalidRequestError) as ei:
        for answer in grpc_client.embed_stream([['a'], [''], ['c']]):
            got.append(answer.embeddings.shape)
    assert got == [(1, 384)] and ei.value.stream_index == 1
    assert [a.embeddings.shape for a in grpc_client.embed_stream((['a'], ('b', 'c')))] == \
        [(1, 384), (2, 384)]


# -- 9. a proxy's 502 -----------------------------------------------------------------------------
def test_bad_gateway_is_retried_like_503():
    srv = Scripted([(502, {'Content-Type': 'text/html'}, b'<html>bad gateway</html>'),
                    _json(200, OK_BODY)])
    try:
        out = RestClient(srv.url, timeout_s=5,
                         retry=RetryPolicy(initial_backoff_s=0.01)).embed(['x'])
        assert out.embeddings.shape == (1, 2) and len(srv.log) == 2
        rids = {h['X-Request-ID'] for _, _, _, h in srv.log}
        assert len(rids) == 1
    finally:
        srv.close()


@pytest.mark.parametrize('answer,retried', [
    (_json(503, {'error': 'breaker open', 'code': 'CIRCUIT_OPEN'}, **{'Retry-After': '1'}), False),
    (_json(500, {'error': 'bug', 'code': 'INTERNAL'}), True),
    ((500, {'Content-Type': 'text/html'}, b'<html>proxy error</html>'), True),
    (_json(503, {'error': 'a newer server', 'code': 'SOMETHING_NEW'}), True),
    (_json(409, {'error': 'a newer server', 'code': 'SOMETHING_NEW'}), False),
])
def test_retries_follow_the_prds_pattern(answer, retried):
    """The week-6 PRD: retry on 5xx, never on an open circuit breaker (CIRCUIT_OPEN was
    retried, INTERNAL was not)."""
    srv = Scripted([answer, _json(200, OK_BODY)])
    try:
        c = RestClient(srv.url, timeout_s=5, retry=RetryPolicy(initial_backoff_s=0.01))
        if retried:
            assert c.embed(['x']).embeddings.shape == (1, 2) and len(srv.log) == 2
        else:
            with pytest.raises(AkidbError) as ei:
                c.embed(['x'])
            assert not ei.value.retryable and len(srv.log) == 1
            if ei.value.code == 'CIRCUIT_OPEN':
                assert isinstance(ei.value, OverloadedError) and ei.value.retry_after_s == 1
    finally:
        srv.close()


# -- 10. health on an unhealthy server ------------------------------------------------------------
def test_health_503_is_one_request_with_the_request_id():
    srv = Scripted([_json(503, {'status': 'unhealthy', 'models': []})])
    try:
        doc = RestClient(srv.url, timeout_s=5).health()
        assert doc['status'] == 'unhealthy'
        assert len(srv.log) == 1 and srv.log[0][3].get('X-Request-ID')
    finally:
        srv.close()


# -- 11. redirects --------------------------------------------------------------------------------
def test_rest_redirects_are_not_followed():
    elsewhere = Scripted([_json(200, OK_BODY)])
    loop = Scripted([(302, {'Location': '/api/v1/embed'}, b'')])
    away = Scripted([(307, {'Location': elsewhere.url + '/api/v1/embed'}, b'')])
    try:
        for srv, status in ((loop, 302), (away, 307)):
            c = RestClient(srv.url, timeout_s=5, headers={'X-API-Key': 'secret'},
                           retry=RetryPolicy(initial_backoff_s=0.01))
            with pytest.raises(ProtocolError) as ei:
                c.embed(['x'])
            assert ei.value.status == status and not ei.value.retryable
            assert 'redirect' in ei.value.message and ei.value.request_id
            assert len(srv.log) == 1
        assert elsewhere.log == []          # the key never went to where the 307 pointed
    finally:
        for srv in (elsewhere, loop, away):
            srv.close()


# -- 12. an answer without end --------------------------------------------------------------------
def _endless(length):
    def serve(conn):
        try:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n' +
                         (b'Content-Length: %d\r\n' % length if length else
                          b'Connection: close\r\n') + b'\r\n[' + b'1.0,' * 1000)
            while True:
                conn.sendall(b'1.0,' * 16384)
        except OSError:
            pass
    return serve


@pytest.mark.parametrize('length', [None, 3 << 30])
def test_rest_answer_over_max_response_bytes_is_refused(length):
    assert RestClient('http://127.0.0.1:1').max_response_bytes == 64 << 20
    srv = Listener(_endless(length))
    try:
        c = RestClient(f'http://127.0.0.1:{srv.port}', timeout_s=10, max_response_bytes=1 << 20,
                       retry=RetryPolicy(initial_backoff_s=0.01))
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError) as ei:
            c.embed(['x'])
        assert ei.value.code == 'INPUT_TOO_LARGE' and not ei.value.retryable
        assert 'max_response_bytes' in ei.value.message and ei.value.request_id
        assert time.monotonic() - t0 < 5 and len(srv.conns) == 1
    finally:
        srv.close()
    with pytest.raises(ValueError, match='max_response_bytes'):
        RestClient('http://127.0.0.1:1', max_response_bytes=0)


# -- 13. answers that are not one vector per input ------------------------------------------------
@pytest.mark.parametrize('body', [
    {'embeddings': [[1.0, 0.0]], 'model': 'm'},               # one vector for two inputs
    {'embeddings': [], 'model': 'm'},
    {'embeddings': [[], []], 'model': 'm'},
    {'embeddings': [[1.0, 0.0], [1.0, 0.0]], 'model': 'm', 'usage': {'total_tokens': 1e400}},
])
def test_rest_answer_of_the_wrong_shape_is_a_protocol_error(body):
    srv = Scripted([_json(200, body)])
    try:
        with pytest.raises(ProtocolError) as ei:
            RestClient(srv.url, timeout_s=5).embed(['a', 'b'])
        assert ei.value.code == 'BAD_RESPONSE' and ei.value.request_id
    finally:
        srv.close()


def _answer(rows):
    from akidb_ros.grpc_api import embedding_pb2 as pb
    resp = pb.EmbedResponse(model='m')
    for row in rows:
        resp.embeddings.add(values=row)
    return resp.SerializeToString()


@pytest.mark.parametrize('rows', [[[1.0, 2.0], [1.0]], [[1.0, 2.0]], []])
def test_grpc_answer_of_the_wrong_shape_is_a_protocol_error(rows):
    def embed(request, context):
        return _answer(rows)

    def stream(requests, context):
        for _ in requests:
            yield _answer([[1.0, 2.0]])     # right for a batch of one only
    server, target = _grpc_server({
        'Embed': grpc.unary_unary_rpc_method_handler(
            embed, request_deserializer=lambda b: b, response_serializer=lambda b: b),
        'EmbedStream': grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    try:
        with GrpcClient(target, timeout_s=5) as c:
            with pytest.raises(ProtocolError) as ei:
                c.embed(['a', 'b'], request_id='rid-shape')
            assert ei.value.code == 'BAD_RESPONSE' and ei.value.request_id == 'rid-shape'
            got = []
            with pytest.raises(ProtocolError) as ei:
                for answer in c.embed_stream([['a'], ['b', 'c']]):
                    got.append(answer.embeddings.shape)
            assert got == [(1, 2)] and ei.value.stream_index == 1
    finally:
        server.stop(0)


def test_grpc_retry_after_is_read_as_rests_header():
    def embed(request, context):
        context.set_trailing_metadata((('akidb-error-code', 'UNAVAILABLE'),
                                       ('retry-after', '-5')))
        context.abort(grpc.StatusCode.UNAVAILABLE, 'draining')
    server, target = _grpc_server({'Embed': grpc.unary_unary_rpc_method_handler(
        embed, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    try:
        with GrpcClient(target, timeout_s=5, retry=NO_RETRY) as c:
            with pytest.raises(AkidbError) as ei:
                c.embed(['x'])
        assert ei.value.retryable and ei.value.retry_after_s == 0.0
    finally:
        server.stop(0)


# -- 14. answers too deeply nested to parse -------------------------------------------------------
DEEP = b'[' * 100000 + b']' * 100000      # json's parser recurses: RecursionError, not ValueError


def test_rest_answer_too_deep_to_parse_is_a_protocol_error():
    srv = Scripted([_json(200, DEEP)])
    try:
        c = RestClient(srv.url, timeout_s=5, retry=RetryPolicy(initial_backoff_s=0.01))
        for call in (lambda: c.embed(['x']), c.list_models, c.health,
                     lambda: c.openai_embeddings(['x'], 'm'), lambda: c.load_model('m')):
            with pytest.raises(ProtocolError) as ei:
                call()
            assert ei.value.code == 'BAD_RESPONSE' and not ei.value.retryable
            assert 'not JSON' in ei.value.message or 'health' in ei.value.message
        assert len(srv.log) == 5                          # none retried
    finally:
        srv.close()


@pytest.mark.parametrize('status,cls,retried', [
    (500, ServerError, True), (503, ServiceUnavailableError, True),
    (400, InvalidRequestError, False), (429, RateLimitedError, True),
])
def test_rest_error_too_deep_to_parse_is_typed_by_its_status(status, cls, retried):
    """An error status whose body cannot be parsed is that status' error, as an HTML page's
    is (a 5xx retried as the PRD says); its text, cut short, is the message."""
    srv = Scripted([_json(status, DEEP), _json(200, OK_BODY)])
    try:
        c = RestClient(srv.url, timeout_s=5, retry=RetryPolicy(initial_backoff_s=0.01))
        if retried:
            assert c.embed(['x']).embeddings.shape == (1, 2) and len(srv.log) == 2
            srv.script.insert(0, _json(status, DEEP))
        with pytest.raises(cls) as ei:
            c.embed(['x'], retry=NO_RETRY)
        assert ei.value.status == status and ei.value.message.startswith('[[[')
        assert len(ei.value.message) <= 500
        if status == 503:   # health() takes a 503 that is no health document as an error
            srv.script.insert(0, _json(status, DEEP))
            with pytest.raises(cls):
                c.health()
    finally:
        srv.close()


def test_grpc_client_reconnects_at_least_every_half_second_while_a_server_is_down():
    """A server that is down (here: a port that accepts and closes at once): the channel's own
    reconnect backoff grew to 120 s, and after a minute's outage our retries all failed inside
    it for ~45 s after the server was back (a fresh client worked at once). It then tried at
    least every second, which the default retries (~0.7 s in all) could still miss right after
    a restart; now every MAX_RECONNECT_BACKOFF_MS, 0.5 s: 4 connection attempts in 6.5 s at
    first, 6-7 with 1 s, more now."""
    from akidb_ros.client.grpc import MAX_RECONNECT_BACKOFF_MS
    assert MAX_RECONNECT_BACKOFF_MS <= 500      # within the default retries' ~0.7 s
    attempts = []
    listener = refusing_listener(accepted=attempts)
    client = GrpcClient(f'127.0.0.1:{listener.getsockname()[1]}', timeout_s=0.5, retry=NO_RETRY)
    try:
        t_end = time.monotonic() + 6.5
        while time.monotonic() < t_end:
            with pytest.raises(AkidbError):
                client.embed(['anyone there?'])
    finally:
        client.close()
        listener.close()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) >= 9 and max(gaps) < MAX_RECONNECT_BACKOFF_MS / 1000 * 1.5, gaps


def test_an_exception_from_the_callers_batches_reaches_the_caller(grpc_target):
    """A generator of batches that raises: gRPC's request thread swallowed the exception and the
    caller got a retryable ServerError INTERNAL ('Exception iterating requests!') for its own
    bug. It gets its own exception, after the answers to the batches before it."""
    def batches():
        yield ['first']
        raise RuntimeError('caller bug')
    with GrpcClient(grpc_target, timeout_s=30) as c:
        got = []
        with pytest.raises(RuntimeError, match='caller bug'):
            for answer in c.embed_stream(batches()):
                got.append(answer.embeddings.shape)
        assert got == [(1, 384)]
        assert c.embed(['still fine']).embeddings.shape == (1, 384)
