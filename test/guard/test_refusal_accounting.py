"""Calls refused before a handler runs are accounted for like every other request: the guard's
401/403/429 on REST and gRPC, and the REST server's 413 on a body over the limit by its
declared length. Each answer echoes the request id, and each writes its one JSON access-log
line (docs/api.md, Logs); the 413 is counted as the app counts its own 413.

Real components: the guard, Bridges (REST server + gRPC server) around a real engine whose
only model file is corrupt (nothing here needs a model to run)."""

import io
import json
import logging
import re
import socket

import grpc
import pytest
import requests
from prometheus_client import REGISTRY
from test_rest_e2e import build_engine

from akidb_ros.observability.logs import ACCESS_LOGGER, JsonFormatter

EMBED = '/akidb.embedding.v1.EmbeddingService/Embed'


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard import Guard
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.server import Bridges

    tmp = tmp_path_factory.mktemp('refusals')
    engine = build_engine(tmp)
    keys = str(tmp / 'keys.yaml')
    made = {r: create_key(keys, Role(r), f'{r}-svc')[1] for r in ('viewer', 'developer')}
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'roles': {'viewer': {'rate': 0.001, 'burst': 1}}},
                   'breaker': {'enabled': False}, 'audit': {'enabled': False}})
    bridges = Bridges(LocalBackend(engine), host='127.0.0.1', rest_port=0, grpc_port=0,
                      security=guard).start()
    yield bridges, made
    bridges.stop(grace_s=1)
    engine.close()


@pytest.fixture
def access_log():
    """The access logger's lines, as the JSON objects the servers write on stderr."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(x) for x in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def the_line(lines, request_id):
    (line,) = [x for x in lines if x.get('request_id') == request_id]
    return line


def errors(transport, code):
    labels = {'transport': transport, 'code': code}
    return REGISTRY.get_sample_value('akidb_request_errors_total', labels) or 0.0


def test_grpc_refusals_echo_the_request_id_and_are_logged(served, access_log):
    bridges, keys = served
    with grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}') as ch:
        embed = ch.unary_unary(EMBED)
        cases = [('rid-anon-1', (), 'UNAUTHENTICATED'),
                 ('rid-badkey-1', (('x-api-key', 'akidb.kdeadbeef0000.' + 'x' * 43),),
                  'UNAUTHENTICATED'),
                 ('rid-viewer-1', (('x-api-key', keys['viewer']),), 'PERMISSION_DENIED')]
        for rid, md, code in cases:
            with pytest.raises(grpc.RpcError) as e:
                embed(b'', metadata=(*md, ('x-request-id', rid)), timeout=5)
            trailing = dict(e.value.trailing_metadata() or ())
            assert trailing['akidb-error-code'] == code, rid
            assert trailing.get('x-request-id') == rid, (rid, trailing)
        # a method the viewer may call: its bucket (burst 1, next token in 1000 s) is spent
        # by the first call, the second is RATE_LIMITED
        health = ch.unary_unary('/akidb.embedding.v1.EmbeddingService/Health')
        health(b'', metadata=(('x-api-key', keys['viewer']),), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            health(b'', metadata=(('x-api-key', keys['viewer']),
                                  ('x-request-id', 'rid-429-1')), timeout=5)
        trailing = dict(e.value.trailing_metadata() or ())
        assert trailing['akidb-error-code'] == 'RATE_LIMITED'
        assert trailing.get('x-request-id') == 'rid-429-1', trailing
        # one that is not sane (over 128 characters): a fresh one, as the servicer gives
        with pytest.raises(grpc.RpcError) as e:
            embed(b'', metadata=(('x-request-id', 'y' * 200),), timeout=5)
        fresh = dict(e.value.trailing_metadata() or ()).get('x-request-id', '')
        assert re.fullmatch(r'[0-9a-f]{32}', fresh), fresh
    lines = access_log()
    for rid, code in (('rid-anon-1', 'UNAUTHENTICATED'), ('rid-badkey-1', 'UNAUTHENTICATED'),
                      ('rid-viewer-1', 'PERMISSION_DENIED'), (fresh, 'UNAUTHENTICATED')):
        line = the_line(lines, rid)
        assert (line['transport'], line['outcome'], line['code']) == ('grpc', 'error', code)
        assert line['route'] == EMBED and line['latency_ms'] >= 0 and 'model' in line
        assert line['level'] == 'warning', line        # the table's level for 401/403
    line = the_line(lines, 'rid-429-1')
    assert (line['code'], line['level']) == ('RATE_LIMITED', 'info')


def test_rest_refusals_are_logged(served, access_log):
    bridges, keys = served
    url = f'http://127.0.0.1:{bridges.rest_port}'
    # a body follows: refused on the head (the early check)
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['hi']},
                      headers={'X-Request-ID': 'rid-rest-401'}, timeout=10)
    assert (r.status_code, r.headers['X-Request-ID']) == (401, 'rid-rest-401')
    # no body: refused in Flask (the chain's before_request)
    r = requests.get(url + '/models', headers={'X-API-Key': keys['viewer'],
                                               'X-Request-ID': 'rid-rest-403'}, timeout=10)
    assert (r.status_code, r.headers['X-Request-ID']) == (403, 'rid-rest-403')
    lines = access_log()
    line = the_line(lines, 'rid-rest-401')
    assert (line['transport'], line['outcome'], line['code']) == \
        ('rest', 'error', 'UNAUTHENTICATED')
    assert line['route'] == 'POST /api/v1/embed' and line['latency_ms'] >= 0
    line = the_line(lines, 'rid-rest-403')
    assert (line['code'], line['route']) == ('PERMISSION_DENIED', 'GET /models')


def test_a_body_refused_by_its_declared_length_is_accounted_for(served, access_log):
    """The REST server answers 413 before the app sees the request (its declared length is
    over the server's cap): it still gets its X-Request-ID, its log line, and is counted as
    the app's own 413 is: a failed embed call, labelled with the default model ('sick')."""
    bridges, _keys = served
    failed = {'model': 'sick', 'transport': 'rest', 'status': 'error'}
    before = (REGISTRY.get_sample_value('akidb_embed_requests_total', failed) or 0.0,
              errors('rest', 'INPUT_TOO_LARGE'))
    with socket.create_connection(('127.0.0.1', bridges.rest_port), timeout=5) as s:
        s.sendall(b'POST /api/v1/embed HTTP/1.1\r\nHost: x\r\n'
                  b'Content-Type: application/json\r\nX-Request-ID: big-declared-1\r\n'
                  b'Content-Length: 99999999999\r\n\r\n')
        out = b''
        while b'\r\n\r\n' not in out or not out.rstrip().endswith(b'}'):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 413 '), head
    assert b'\r\nX-Request-ID: big-declared-1\r\n' in head + b'\r\n', head
    assert json.loads(body)['code'] == 'INPUT_TOO_LARGE'
    after = (REGISTRY.get_sample_value('akidb_embed_requests_total', failed) or 0.0,
             errors('rest', 'INPUT_TOO_LARGE'))
    assert after == (before[0] + 1, before[1] + 1)
    line = the_line(access_log(), 'big-declared-1')
    assert (line['transport'], line['outcome'], line['code'], line['model']) == \
        ('rest', 'error', 'INPUT_TOO_LARGE', 'sick')
    # another route: its own log line and request id, counted by its code
    before = errors('rest', 'INPUT_TOO_LARGE')
    with socket.create_connection(('127.0.0.1', bridges.rest_port), timeout=5) as s:
        s.sendall(b'POST /admin/models/load HTTP/1.1\r\nHost: x\r\n'
                  b'Content-Length: 99999999999\r\n\r\n')
        head = s.recv(65536).split(b'\r\n\r\n', 1)[0]
    assert head.startswith(b'HTTP/1.1 413 ') and b'X-Request-ID: ' in head, head
    rid = re.search(rb'X-Request-ID: (\S+)', head).group(1).decode()
    assert errors('rest', 'INPUT_TOO_LARGE') == before + 1
    line = the_line(access_log(), rid)
    assert (line['code'], line['route']) == ('INPUT_TOO_LARGE', 'POST /admin/models/load')


def test_unknown_routes_and_methods_are_logged_and_counted(served, access_log):
    """A route or method that does not exist (a typo, a scanner) is answered 404/405 by
    routing, before any handler: it had neither an access-log line nor a count."""
    bridges, keys = served
    url = f'http://127.0.0.1:{bridges.rest_port}'
    before = (errors('rest', 'NOT_FOUND'), errors('rest', 'METHOD_NOT_ALLOWED'))
    who = {'X-API-Key': keys['developer']}
    r = requests.get(url + '/nope', headers={**who, 'X-Request-ID': 'rid-404'}, timeout=10)
    assert (r.status_code, r.json()['code']) == (404, 'NOT_FOUND')
    r = requests.delete(url + '/api/v1/embed', headers={**who, 'X-Request-ID': 'rid-405'},
                        timeout=10)
    assert (r.status_code, r.json()['code']) == (405, 'METHOD_NOT_ALLOWED')
    # refused before the request hooks (werkzeug would match it as /models)
    r = requests.get(url + '//models', headers={**who, 'X-Request-ID': 'rid-404-slashes'},
                     timeout=10)
    assert (r.status_code, r.headers['X-Request-ID']) == (404, 'rid-404-slashes')
    lines = access_log()
    line = the_line(lines, 'rid-404')
    assert (line['outcome'], line['code'], line['route']) == ('error', 'NOT_FOUND', 'GET /nope')
    assert line['level'] == 'info' and line['latency_ms'] >= 0
    line = the_line(lines, 'rid-405')
    assert (line['code'], line['route']) == ('METHOD_NOT_ALLOWED', 'DELETE /api/v1/embed')
    assert the_line(lines, 'rid-404-slashes')['route'] == 'GET //models'
    assert (errors('rest', 'NOT_FOUND'), errors('rest', 'METHOD_NOT_ALLOWED')) == \
        (before[0] + 2, before[1] + 1)
