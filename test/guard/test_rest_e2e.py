"""The chain in the real REST door (akidb_ros.rest.app + LocalBackend + EmbeddingEngine) with a
model whose file is really corrupt: 401/403/429 and the breaker opening after the PRD's
"50 % of the last 10 calls", then failing fast with 503 CIRCUIT_OPEN without touching the model."""

import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_engine(tmp_path, queue=None):
    """A real engine whose only model file is corrupt (ONNX Runtime refuses to load it);
    ``queue``: its admission settings (``capacity``, ``shed_threshold``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from akidb_ros.engine import EmbeddingEngine
    from akidb_ros.engine import config as engine_config

    mdir = tmp_path / 'models' / 'sick'
    mdir.mkdir(parents=True)
    vocab = {'[UNK]': 0, '[CLS]': 1, '[SEP]': 2, '[PAD]': 3, 'hello': 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(mdir / 'tokenizer.json'))
    (mdir / 'model.onnx').write_bytes(b'\x08\x07\x12\x04junk' + b'\xff' * 64)  # corrupt protobuf
    cfg = engine_config.build(
        {
            'default_model': 'sick',
            'models_dir': str(tmp_path / 'models'),
            'engine': {'device': 'cpu', **({'queue': queue} if queue else {})},
            'models': [
                {
                    'id': 'sick',
                    'name': 'test/sick',
                    'path': 'sick/model.onnx',
                    'tokenizer': 'sick/tokenizer.json',
                    'dimension': 8,
                    'max_tokens': 16,
                }
            ],
        },
        tmp_path,
    )
    return EmbeddingEngine(cfg)


@pytest.fixture
def rest(tmp_path, clock):
    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard import Guard, install_flask
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.rest.app import create_app

    engine = build_engine(tmp_path)
    keys = str(tmp_path / 'keys.yaml')
    made = {r: create_key(keys, Role(r), f'{r}-svc')[1] for r in ('viewer', 'developer', 'admin')}
    guard = Guard(
        {
            'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
            'rate_limit': {'roles': {'viewer': {'rate': 1, 'burst': 3}}},
            'audit': {'enabled': False},
        },
        clock=clock,
    )
    app = create_app(LocalBackend(engine), guard=guard.door_hook)
    install_flask(app, guard)       # as akidb_ros.server wires it: every route guarded
    yield app.test_client(), made, guard
    engine.close()


def test_auth_codes_through_rest(rest):
    client, keys, _ = rest
    assert client.get('/health/live').status_code == 200
    r = client.post('/api/v1/embed', json={'inputs': ['hello']})
    assert r.status_code == 401 and r.get_json()['code'] == 'UNAUTHENTICATED'
    r = client.post(
        '/api/v1/embed', json={'inputs': ['hello']}, headers={'X-API-Key': keys['viewer']}
    )
    assert r.status_code == 403 and r.get_json()['code'] == 'PERMISSION_DENIED'
    r = client.post(
        '/v1/embeddings',
        json={'input': 'hello', 'model': 'sick'},
        headers={'Authorization': 'Bearer not-a-jwt'},
    )
    assert r.status_code == 401
    assert client.get('/metrics', headers={'X-API-Key': keys['viewer']}).status_code == 200
    # PRD: a viewer reads health and metrics, not the models (operator and up)
    assert client.get('/models', headers={'X-API-Key': keys['viewer']}).status_code == 403
    assert client.get('/models', headers={'X-API-Key': keys['developer']}).status_code == 200


def test_rate_limit_through_rest(rest):
    from prometheus_client import REGISTRY

    def refused():
        labels = {'transport': 'rest', 'code': 'RATE_LIMITED'}
        return REGISTRY.get_sample_value('akidb_request_errors_total', labels) or 0.0

    client, keys, _ = rest
    before = refused()
    codes = [
        client.get('/metrics', headers={'X-API-Key': keys['viewer']}).status_code for _ in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    assert refused() == before + 2      # every failed call, by its code (audit, stop 24)
    r = client.get('/metrics', headers={'X-API-Key': keys['viewer']})
    assert r.get_json()['code'] == 'RATE_LIMITED' and int(r.headers['Retry-After']) >= 1


def test_breaker_opens_on_a_really_corrupt_model(rest):
    client, keys, guard = rest
    hdr = {'X-API-Key': keys['developer']}
    codes = []
    for _ in range(10):
        r = client.post('/api/v1/embed', json={'inputs': ['hello'], 'model': 'sick'}, headers=hdr)
        codes.append((r.status_code, r.get_json()['code']))
    assert codes == [(503, 'MODEL_LOAD_FAILED')] * 10
    t0 = time.perf_counter()
    r = client.post('/api/v1/embed', json={'inputs': ['hello'], 'model': 'sick'}, headers=hdr)
    fast = time.perf_counter() - t0
    assert (r.status_code, r.get_json()['code']) == (503, 'CIRCUIT_OPEN')
    assert r.headers['Retry-After'] == '30'
    assert guard.breaker_for('sick').snapshot()['state'] == 'open'
    assert fast < 0.5


def test_a_model_an_admin_loads_again_once_mended_is_served_at_once(tmp_path, clock):
    """A successful admin load of a model whose breaker is open lets its probes through at
    once: the model served again only when the 30 s were over (CIRCUIT_OPEN meanwhile)."""
    import shutil
    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine import EmbeddingEngine
    from akidb_ros.engine import config as engine_config
    from akidb_ros.guard import Guard, install_flask
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.rest.app import create_app

    mdir = tmp_path / 'models' / 'mended'
    shutil.copytree(os.path.join(ROOT, 'models', 'all-MiniLM-L6-v2'), mdir)
    good = (mdir / 'model.onnx').read_bytes()
    (mdir / 'model.onnx').write_bytes(b'\x08\x07\x12\x04junk' + b'\xff' * 64)
    engine = EmbeddingEngine(engine_config.build({
        'default_model': 'mended', 'models_dir': str(tmp_path / 'models'),
        'engine': {'device': 'cpu'},
        'models': [{'id': 'mended', 'name': 'test/mended', 'path': 'mended/model.onnx',
                    'tokenizer': 'mended/tokenizer.json', 'dimension': 384,
                    'max_tokens': 256}]}, tmp_path))
    keys = str(tmp_path / 'keys.yaml')
    made = {r: create_key(keys, Role(r), f'{r}-svc')[1] for r in ('developer', 'admin')}
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'audit': {'enabled': False}}, clock=clock)
    app = create_app(LocalBackend(engine), guard=guard.door_hook)
    install_flask(app, guard)
    client, dev = app.test_client(), {'X-API-Key': made['developer']}
    try:
        for _ in range(10):
            client.post('/api/v1/embed', json={'inputs': ['hello']}, headers=dev)
        r = client.post('/api/v1/embed', json={'inputs': ['hello']}, headers=dev)
        assert r.get_json()['code'] == 'CIRCUIT_OPEN'
        (mdir / 'model.onnx').write_bytes(good)
        r = client.post('/admin/models/load', json={'model': 'mended'},
                        headers={'X-API-Key': made['admin']})
        assert r.status_code == 200, r.get_json()
        r = client.post('/api/v1/embed', json={'inputs': ['hello']}, headers=dev)
        assert r.status_code == 200, r.get_json()
        assert len(r.get_json()['embeddings'][0]) == 384
    finally:
        engine.close()


def test_admin_callers_take_the_priority_lane(tmp_path):
    """Guard.door_hook marks admins; the REST door copies it into EmbedRequest.priority (the
    engine's admin lane) and keys the breaker by the resolved default model when none is named."""
    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine.types import Priority
    from akidb_ros.guard import Guard
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.rest.app import create_app

    class SeenBackend(LocalBackend):   # the real backend; remembers what the door submitted
        seen = []

        def submit(self, req, caller_waits=False):
            self.seen.append((req.priority, req.model))
            return super().submit(req, caller_waits=caller_waits)

    engine = build_engine(tmp_path)
    keys = str(tmp_path / 'keys.yaml')
    made = {r: create_key(keys, Role(r), f'{r}-svc')[1] for r in ('developer', 'admin')}
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'audit': {'enabled': False}})
    backend = SeenBackend(engine)
    try:
        client = create_app(backend, guard=guard.door_hook).test_client()
        for role in ('developer', 'admin'):
            r = client.post('/api/v1/embed', json={'inputs': ['hello']},
                            headers={'X-API-Key': made[role]})
            assert r.status_code == 503
        assert backend.seen == [(Priority.NORMAL, ''), (Priority.ADMIN, '')]
        snap = guard.breakers.snapshot()     # keyed by the default model 'sick', not 'default'
        assert set(snap) == {'sick'} and snap['sick']['window_calls'] == 2
    finally:
        engine.close()


def test_dev_profile_callers_are_shed_at_the_threshold_admins_keep_their_lane(tmp_path):
    """Authentication off (make run's profile): every caller's role is admin, but the engine's
    admin lane is for authenticated admins only, so the dev caller is shed OVERLOADED at the
    configured threshold (50 % of 4 here) like any normal work, and the message names that
    threshold; an API-key admin is still admitted past it. Over real HTTP, wired by Bridges."""
    import requests

    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine.types import Priority
    from akidb_ros.guard import Guard
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.observability import metrics
    from akidb_ros.server import Bridges

    engine = build_engine(tmp_path, queue={'capacity': 4, 'shed_threshold': 0.5})
    keys = str(tmp_path / 'keys.yaml')
    admin_key = create_key(keys, Role.ADMIN, 'admin-svc')[1]
    guards = {'dev': Guard({'audit': {'enabled': False}}),
              'prod': Guard({'auth': {'enabled': True,
                                      'api_keys': {'enabled': True, 'file': keys}},
                             'audit': {'enabled': False}, 'breaker': {'enabled': False}})}
    doors = {k: Bridges(LocalBackend(engine), host='127.0.0.1', rest_port=0, grpc_port=None,
                        security=g).start() for k, g in guards.items()}
    shed = metrics.LOAD_SHED.labels(reason='shed')
    try:
        for _ in range(2):      # two normal requests pending: the queue is at its threshold
            engine.admission.admit(Priority.NORMAL)
        before = shed._value.get()
        r = requests.post(f'http://127.0.0.1:{doors["dev"].rest_port}/api/v1/embed',
                          json={'inputs': ['hello']}, timeout=30)
        assert (r.status_code, r.json()['code']) == (503, 'OVERLOADED'), r.text
        assert 'shed threshold (50% full)' in r.json()['error'] and '95' not in r.text
        assert shed._value.get() == before + 1
        # an authenticated admin passes the threshold (then meets the corrupt model)
        r = requests.post(f'http://127.0.0.1:{doors["prod"].rest_port}/api/v1/embed',
                          json={'inputs': ['hello']}, headers={'X-API-Key': admin_key},
                          timeout=30)
        assert (r.status_code, r.json()['code']) == (503, 'MODEL_LOAD_FAILED'), r.text
        assert shed._value.get() == before + 1
    finally:
        for b in doors.values():
            b.stop(grace_s=1)
        while engine.admission.pending:
            engine.admission.release()
        engine.close()


# --- the guard over real HTTP (akidb_ros.server.Bridges wires it as in production) ----------

@pytest.fixture
def served(tmp_path, clock):
    """The guarded REST door on a real loopback port, wired by Bridges(security=guard)."""
    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard import Guard
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    from akidb_ros.server import Bridges

    engine = build_engine(tmp_path)
    keys = str(tmp_path / 'keys.yaml')
    made = {r: create_key(keys, Role(r), f'{r}-svc')[1] for r in ('viewer', 'developer')}
    guard = Guard(
        {
            'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
            'rate_limit': {'roles': {'developer': {'rate': 1, 'burst': 2}}},
            'breaker': {'enabled': False},
            'audit': {'enabled': False},
        },
        clock=clock,
    )
    bridges = Bridges(LocalBackend(engine), host='127.0.0.1', rest_port=0, grpc_port=None,
                      security=guard).start()
    yield f'http://127.0.0.1:{bridges.rest_port}', bridges.rest_port, made
    bridges.stop(grace_s=1)
    engine.close()


def _openai_error(r, status, code, kind):
    body = r.json()
    assert r.status_code == status, r.text
    assert body['code'] == code and set(body['error']) == {'message', 'type', 'param', 'code'}
    assert body['error']['code'] == code and body['error']['type'] == kind, body
    return body


def test_guard_refusals_on_the_openai_route_have_openai_shape(served):
    import requests

    url, _port, keys = served
    body = {'input': 'hello', 'model': 'sick'}
    r = requests.post(url + '/v1/embeddings', json=body, timeout=10)
    _openai_error(r, 401, 'UNAUTHENTICATED', 'authentication_error')
    assert r.headers['WWW-Authenticate'].startswith('Bearer')
    r = requests.post(url + '/v1/embeddings', json=body, headers={'X-API-Key': keys['viewer']},
                      timeout=10)
    _openai_error(r, 403, 'PERMISSION_DENIED', 'permission_error')
    dev = {'X-API-Key': keys['developer']}
    for _ in range(2):      # the burst (the corrupt model answers 503, in the same shape)
        r = requests.post(url + '/v1/embeddings', json=body, headers=dev, timeout=30)
        _openai_error(r, 503, 'MODEL_LOAD_FAILED', 'server_error')
    r = requests.post(url + '/v1/embeddings', json=body, headers=dev, timeout=10)
    _openai_error(r, 429, 'RATE_LIMITED', 'rate_limit_error')
    assert int(r.headers['Retry-After']) >= 1 and r.headers['X-RateLimit-Remaining'] == '0'
    # the native route keeps {error, code}
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['hello']}, timeout=10)
    assert r.status_code == 401 and r.json() == {'error': 'authentication required',
                                                 'code': 'UNAUTHENTICATED'}


def _head_only(port, head: bytes, timeout: float = 3.0) -> bytes:
    """Send a request head (and no body); what the server answers within ``timeout``."""
    import socket

    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        s.sendall(head)
        out = b''
        try:
            while b'\r\n\r\n' not in out or not out.rstrip().endswith(b'}'):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def test_a_refused_caller_is_answered_before_its_body_is_read(served):
    """No credentials (or not enough): 401/403 on the head alone, with the route's error shape,
    the connection closed; the 30 MB the head announces are never waited for nor buffered."""
    import json

    _url, port, keys = served
    t0 = time.perf_counter()
    out = _head_only(port, b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n'
                           b'Content-Type: application/json\r\nContent-Length: 30000000\r\n\r\n')
    assert time.perf_counter() - t0 < 2.5, 'the server waited for the body'
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 401 '), head
    assert b'WWW-Authenticate: Bearer' in head and b'Connection: close' in head
    assert b'X-Content-Type-Options: nosniff' in head and b'X-Request-ID: ' in head
    got = json.loads(body)
    assert got['code'] == 'UNAUTHENTICATED' and got['error']['type'] == 'authentication_error'
    # a known caller without the permission, native route, Expect: 100-continue: 403, no 100
    out = _head_only(port, b'POST /api/v1/embed HTTP/1.1\r\nHost: x\r\n'
                           b'X-API-Key: ' + keys['viewer'].encode() + b'\r\n'
                           b'Content-Type: application/json\r\nExpect: 100-continue\r\n'
                           b'Content-Length: 30000000\r\n\r\n')
    assert out.startswith(b'HTTP/1.1 403 '), out[:200]
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['code'] == 'PERMISSION_DENIED'


def test_the_early_check_takes_no_rate_limit_token(served):
    """An accepted caller's request with a body is checked twice (head, then the full chain in
    Flask) but takes one token: a burst of 2 serves 2 requests, the 3rd is 429."""
    import requests

    url, _port, keys = served
    dev = {'X-API-Key': keys['developer']}
    remaining = []
    for _ in range(3):
        r = requests.post(url + '/api/v1/embed', json={'inputs': ['hello'], 'model': 'sick'},
                          headers=dev, timeout=30)
        remaining.append((r.status_code, r.headers.get('X-RateLimit-Remaining')))
    assert remaining == [(503, '1'), (503, '0'), (429, '0')], remaining
