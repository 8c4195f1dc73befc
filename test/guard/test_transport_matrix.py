"""The RBAC matrix over the real transports: helper-2's Flask app (with install_flask) around a
real engine, and a real gRPC server with GuardInterceptor; 4 roles + anonymous x every route
and method, asserting the exact HTTP status / gRPC status code of a refusal."""

import time

import pytest
from test_rbac_matrix import EXPECTED, ISS, AUD, PUBLIC, ROLES

from akidb_ros.guard import Guard
from akidb_ros.guard.apikeys import create_key
from akidb_ros.guard.identity import Role
from akidb_ros.guard.jwt import issue_token

import grpc
from prometheus_client import REGISTRY

REST_KEYS = [k for k in EXPECTED if not k.startswith('/')]
GRPC_KEYS = [k for k in EXPECTED if k.startswith('/')]


@pytest.fixture(scope='module')
def creds(tmp_path_factory, rsa_keys):
    d = tmp_path_factory.mktemp('tm')
    keys_file = str(d / 'keys.yaml')
    api = {r: create_key(keys_file, Role(r), f'{r}-svc')[1] for r in ROLES}
    jwt = {
        r: issue_token(rsa_keys['good'], subject=f'{r}-u', role=r, issuer=ISS, audience=AUD)
        for r in ROLES
    }
    guard = Guard(
        {
            'auth': {
                'enabled': True,
                'api_keys': {'enabled': True, 'file': keys_file},
                'jwt': {
                    'enabled': True,
                    'public_key_file': rsa_keys['pem'],
                    'issuer': ISS,
                    'audience': AUD,
                },
            },
            'rate_limit': {'enabled': False},
            'audit': {'enabled': False},
        }
    )
    return guard, api, jwt


def expect_refusal(key, role):
    allowed = EXPECTED[key]
    if allowed == PUBLIC:
        return None
    if role is None:
        return 'UNAUTHENTICATED'
    return None if role in allowed else 'PERMISSION_DENIED'


# ------------------------------------------------------------------------------- REST
@pytest.fixture(scope='module')
def rest_client(creds, tmp_path_factory):
    from test_rest_e2e import build_engine

    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard.integrations import install_flask
    from akidb_ros.rest.app import create_app

    guard = creds[0]
    engine = build_engine(tmp_path_factory.mktemp('eng'))
    app = create_app(LocalBackend(engine), guard=guard.door_hook)
    install_flask(app, guard)
    yield app.test_client()
    engine.close()


def rest_call(client, key, headers):
    method, path = key.split(' ', 1)
    body = {'inputs': ['hello']} if 'embed' in path else {'model': 'sick'}
    if path == '/v1/embeddings':
        body = {'input': 'hello', 'model': 'sick'}
    if method == 'GET':
        return client.get(path, headers=headers)
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize('key', REST_KEYS)
def test_rest_matrix(rest_client, creds, key):
    _, api, jwt = creds
    cases = [(None, {})]
    cases += [(r, {'X-API-Key': api[r]}) for r in ROLES]
    cases += [(r, {'Authorization': f'Bearer {jwt[r]}'}) for r in ROLES]
    for role, headers in cases:
        r = rest_call(rest_client, key, headers)
        want = expect_refusal(key, role)
        if want is None:
            assert r.status_code not in (401, 403), (key, role, r.status_code, r.data[:200])
        else:
            assert r.status_code == {'UNAUTHENTICATED': 401, 'PERMISSION_DENIED': 403}[want], (
                key,
                role,
                r.status_code,
            )
            assert r.get_json()['code'] == want
            if want == 'UNAUTHENTICATED':
                assert 'WWW-Authenticate' in r.headers
        assert r.headers['X-Content-Type-Options'] == 'nosniff'


def test_rest_success_carries_rate_limit_headers(creds, tmp_path, clock):
    from test_rest_e2e import build_engine

    from akidb_ros.backends import LocalBackend
    from akidb_ros.guard.integrations import install_flask
    from akidb_ros.rest.app import create_app

    guard = Guard(
        {
            'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': creds[0].keys.path}},
            'rate_limit': {'per_client': {'rate': 100, 'burst': 20}},
            'audit': {'enabled': False},
        },
        clock=clock,
    )
    engine = build_engine(tmp_path)
    try:
        app = create_app(LocalBackend(engine), guard=guard.door_hook)
        install_flask(app, guard)
        c = app.test_client()
        hdr = {'X-API-Key': creds[1]['viewer']}
        r = c.get('/health', headers=hdr)
        assert r.status_code == 200 and r.headers['X-RateLimit-Limit'] == '100'
        assert r.headers['X-RateLimit-Remaining'] == '19'  # ONE token per request, not two
        for _ in range(19):
            c.get('/health', headers=hdr)
        r = c.get('/openapi.json', headers=hdr)
        assert r.status_code == 429 and r.get_json()['code'] == 'RATE_LIMITED'
        assert r.headers['Retry-After'] == '1' and r.headers['X-RateLimit-Remaining'] == '0'
        assert c.get('/health/live').status_code == 200  # probes are never limited
    finally:
        engine.close()


# ------------------------------------------------------------------------------- gRPC
@pytest.fixture(scope='module')
def grpc_port(creds):
    from concurrent import futures

    from akidb_ros.guard.integrations import GuardInterceptor

    guard = creds[0]
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[GuardInterceptor(guard)])
    handlers = {}
    for key in GRPC_KEYS:
        svc, name = key[1:].rsplit('/', 1)
        if name in ('Watch',):
            h = grpc.unary_stream_rpc_method_handler(lambda req, ctx: iter([b'one', b'two']))
        elif name in ('EmbedStream', 'ServerReflectionInfo'):
            h = grpc.stream_stream_rpc_method_handler(lambda it, ctx: (b'ok:' + x for x in it))
        else:
            h = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b'ok')
        handlers.setdefault(svc, {})[name] = h
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(s, m) for s, m in handlers.items())
    )
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    yield port
    server.stop(0)


def grpc_call(channel, key, metadata):
    name = key.rsplit('/', 1)[1]
    if name == 'Watch':
        return list(channel.unary_stream(key)(b'', metadata=metadata, timeout=10))
    if name in ('EmbedStream', 'ServerReflectionInfo'):
        return list(channel.stream_stream(key)(iter([b'a', b'b']), metadata=metadata, timeout=10))
    return channel.unary_unary(key)(b'', metadata=metadata, timeout=10)


@pytest.mark.parametrize('key', GRPC_KEYS)
def test_grpc_matrix(grpc_port, creds, key):
    _, api, jwt = creds
    cases = [(None, ())]
    cases += [(r, (('x-api-key', api[r]),)) for r in ROLES]
    cases += [(r, (('authorization', f'Bearer {jwt[r]}'),)) for r in ROLES]
    with grpc.insecure_channel(f'127.0.0.1:{grpc_port}') as ch:
        for role, md in cases:
            want = expect_refusal(key, role)
            if want is None:
                out = grpc_call(ch, key, md)
                assert out in (b'ok', [b'one', b'two'], [b'ok:a', b'ok:b']), (key, role, out)
            else:
                with pytest.raises(grpc.RpcError) as e:
                    grpc_call(ch, key, md)
                assert e.value.code() is getattr(grpc.StatusCode, want), (key, role)
                trailing = dict(e.value.trailing_metadata() or ())
                assert trailing.get('akidb-error-code') == want


def test_grpc_rate_limit_is_resource_exhausted(creds):
    from concurrent import futures

    from akidb_ros.guard.integrations import GuardInterceptor

    guard = Guard(
        {
            'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': creds[0].keys.path}},
            'rate_limit': {'per_client': {'rate': 1, 'burst': 2}},
            'audit': {'enabled': False},
        }
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[GuardInterceptor(guard)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                'akidb.embedding.v1.EmbeddingService',
                {'ListModels': grpc.unary_unary_rpc_method_handler(lambda r, c: b'ok')},
            ),
        )
    )
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    try:
        with grpc.insecure_channel(f'127.0.0.1:{port}') as ch:
            call = ch.unary_unary('/akidb.embedding.v1.EmbeddingService/ListModels')
            md = (('x-api-key', creds[1]['operator']),)
            assert call(b'', metadata=md, timeout=5) == b'ok'
            assert call(b'', metadata=md, timeout=5) == b'ok'
            labels = {'transport': 'grpc', 'code': 'RATE_LIMITED'}
            before = REGISTRY.get_sample_value('akidb_request_errors_total', labels) or 0.0
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                call(b'', metadata=md, timeout=5)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(e.value.trailing_metadata())
            assert (
                trailing['akidb-error-code'] == 'RATE_LIMITED' and trailing['retry-after'] == '1'
            )
            assert time.perf_counter() - t0 < 1.0
            after = REGISTRY.get_sample_value('akidb_request_errors_total', labels)
            assert after == before + 1      # refusals before the handler are counted too
    finally:
        server.stop(0)


# ------------------------------------------------------------------------------- key header
def test_the_configured_api_key_header_is_read_by_both_doors(tmp_path):
    """``auth.api_keys.header: X-Akidb-Key``: REST and gRPC (each EmbedStream message too) take
    the key from that header only, and a 401 names it. (gRPC read x-api-key whatever the config
    said: the configured header was refused, and x-api-key passed the door but cut an
    EmbedStream at its first message.)"""
    import requests

    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine import EmbeddingEngine, load_config
    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.server import Bridges

    keys_file = str(tmp_path / 'keys.yaml')
    key = create_key(keys_file, Role('developer'), 'dev-svc')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {
        'enabled': True, 'file': keys_file, 'header': 'X-Akidb-Key'}},
        'rate_limit': {'enabled': False}, 'audit': {'enabled': False}})
    engine = EmbeddingEngine(load_config())
    engine.start()
    bridges = Bridges(LocalBackend(engine), security=guard, timeout_s=20).start()
    try:
        url = f'http://127.0.0.1:{bridges.rest_port}/api/v1/embed'
        ok = requests.post(url, json={'inputs': ['hi']}, headers={'X-Akidb-Key': key}, timeout=20)
        other = requests.post(url, json={'inputs': ['hi']}, headers={'X-API-Key': key},
                              timeout=20)
        assert ok.status_code == 200 and other.status_code == 401, (ok.text, other.text)
        assert other.headers['WWW-Authenticate'] == \
            'Bearer realm="akidb", ApiKey header="X-Akidb-Key"'
        svc = '/akidb.embedding.v1.EmbeddingService/'
        with grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}') as ch:
            embed = ch.unary_unary(svc + 'Embed', pb.EmbedRequest.SerializeToString,
                                   pb.EmbedResponse.FromString)
            stream = ch.stream_stream(svc + 'EmbedStream', pb.EmbedRequest.SerializeToString,
                                      pb.EmbedResponse.FromString)
            md = (('x-akidb-key', key),)
            assert len(embed(pb.EmbedRequest(inputs=['hi']), metadata=md, timeout=20)
                       .embeddings) == 1
            answers = list(stream(iter([pb.EmbedRequest(inputs=['a'])] * 3), metadata=md,
                                  timeout=20))
            assert len(answers) == 3
            for call in (lambda m: embed(pb.EmbedRequest(inputs=['hi']), metadata=m, timeout=20),
                         lambda m: list(stream(iter([pb.EmbedRequest(inputs=['a'])]),
                                               metadata=m, timeout=20))):
                with pytest.raises(grpc.RpcError) as e:
                    call((('x-api-key', key),))
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        bridges.stop(grace_s=1)
        engine.close()


@pytest.mark.parametrize('header', ['', 'X Key', 'x_api_key', 'Authorization', 'k"ey', 'é'])
def test_an_api_key_header_both_doors_cannot_carry_is_a_config_error(header):
    from akidb_ros.guard.config import SecurityConfigError, from_dict
    with pytest.raises(SecurityConfigError, match='header'):
        from_dict({'auth': {'enabled': True, 'api_keys': {'file': 'k.yaml', 'header': header}}})
