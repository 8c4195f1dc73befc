"""The chain in the real REST door (akidb_ros.rest.app + LocalBackend + EmbeddingEngine) with a
model whose file is really corrupt: 401/403/429 and the breaker opening after the PRD's
"50 % of the last 10 calls", then failing fast with 503 CIRCUIT_OPEN without touching the model."""

import time

import pytest


def build_engine(tmp_path):
    """A real engine whose only model file is corrupt (ONNX Runtime refuses to load it)."""
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
            'engine': {'device': 'cpu'},
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
    assert client.get('/models', headers={'X-API-Key': keys['viewer']}).status_code == 200


def test_rate_limit_through_rest(rest):
    from prometheus_client import REGISTRY

    def refused():
        labels = {'transport': 'rest', 'code': 'RATE_LIMITED'}
        return REGISTRY.get_sample_value('akidb_request_errors_total', labels) or 0.0

    client, keys, _ = rest
    before = refused()
    codes = [
        client.get('/models', headers={'X-API-Key': keys['viewer']}).status_code for _ in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    assert refused() == before + 2      # every failed call, by its code (audit, stop 24)
    r = client.get('/models', headers={'X-API-Key': keys['viewer']})
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
