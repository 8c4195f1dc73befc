"""The circuit breaker as the doors key and feed it, on the real default model: a caller's own
short budget is neutral, and names the backend does not know share one bounded breaker (audit,
stop 24: 12 calls with a 1 ms budget opened the breaker for everyone; every unknown name became
a breaker and a metric series)."""

import grpc
import pytest
from prometheus_client import REGISTRY

MODEL = 'all-minilm-l6-v2'


@pytest.fixture(scope='module')
def engine():
    from akidb_ros.engine import EmbeddingEngine, load_config

    eng = EmbeddingEngine(load_config())
    eng.start()
    yield eng
    eng.close()


def make_guard(tmp_path, clock):
    from akidb_ros.guard import Guard
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role

    keys = str(tmp_path / 'keys.yaml')
    key = create_key(keys, Role.ADMIN, 'admin-svc')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'enabled': False}, 'audit': {'enabled': False}}, clock=clock)
    return guard, key


def breaker_series():
    return {s.labels['model'] for f in REGISTRY.collect()
            if f.name == 'akidb_circuit_breaker_state' for s in f.samples}


@pytest.fixture
def real_rest(engine, tmp_path, clock):
    """The guarded REST door as akidb_ros.server wires it (breakers on, auth by API key)."""
    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard import install_flask
    from akidb_ros.rest.app import create_app

    guard, key = make_guard(tmp_path, clock)
    app = create_app(LocalBackend(engine), guard=guard.door_hook)
    install_flask(app, guard)
    yield app.test_client(), {'X-API-Key': key}, guard


@pytest.fixture
def real_grpc(engine, tmp_path, clock):
    from akidb_ros.backends import LocalBackend
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    from akidb_ros.grpc_api.server import GrpcServer
    from akidb_ros.guard import GuardInterceptor

    guard, key = make_guard(tmp_path, clock)
    server = GrpcServer(LocalBackend(engine), port=0, guard=guard.door_hook,
                        interceptors=[GuardInterceptor(guard)], default_timeout_s=5.0).start()
    channel = grpc.insecure_channel(f'127.0.0.1:{server.port}')
    yield pb_grpc.EmbeddingServiceStub(channel), (('x-api-key', key),), guard
    channel.close()
    server.stop(0)


def test_a_callers_own_short_budget_cannot_open_the_breaker(real_rest):
    client, hdr, guard = real_rest
    body = {'inputs': ['hello world ' * 20] * 8}
    codes = [client.post('/api/v1/embed', json=body,
                         headers={**hdr, 'X-Request-Timeout-Ms': '1'}).status_code
             for _ in range(12)]
    assert codes == [504] * 12
    r = client.post('/api/v1/embed', json={'inputs': ['an innocent request']}, headers=hdr)
    assert r.status_code == 200
    assert guard.breaker_for(MODEL).snapshot()['state'] == 'closed'


def test_unknown_model_names_share_one_breaker(real_rest):
    client, hdr, guard = real_rest
    before = breaker_series()
    for i in range(40):
        r = client.post('/api/v1/embed', json={'inputs': ['x'], 'model': f'rand-{i}-' + '-' * 200},
                        headers=hdr)
        assert (r.status_code, r.get_json()['code']) == (400, 'MODEL_NOT_FOUND')
    assert set(guard.breakers.snapshot()) <= {'unknown', MODEL}
    assert breaker_series() - before <= {'unknown'}


def test_grpc_short_deadlines_and_unknown_names(real_grpc):
    from akidb_ros.grpc_api import embedding_pb2 as pb

    stub, md, guard = real_grpc
    for _ in range(12):
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(inputs=['hello world ' * 30] * 16), metadata=md,
                       timeout=0.02)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(stub.Embed(pb.EmbedRequest(inputs=['innocent']), metadata=md,
                          timeout=10).embeddings) == 1
    assert guard.breaker_for(MODEL).snapshot()['state'] == 'closed'
    before = breaker_series()
    for i, name in enumerate(('m%d-' + 'z' * 300, 'x\ny%d', '../../etc/passwd%d')):
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(inputs=['x'], model=name % i), metadata=md, timeout=10)
        code = dict(e.value.trailing_metadata())['akidb-error-code']
        assert code == ('INVALID_INPUT' if i == 0 else 'MODEL_NOT_FOUND')
        assert len(e.value.details()) < 400        # a name is never echoed whole
    assert set(guard.breakers.snapshot()) <= {'unknown', MODEL}
    assert breaker_series() - before <= {'unknown'}
