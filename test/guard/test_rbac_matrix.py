"""The full RBAC matrix: (4 roles + anonymous) x every REST route and gRPC method x every way of
authenticating, through the real guard chain with real API keys, RS256 tokens and certificates,
asserting the exact HTTP status and gRPC status. The expected matrix is written out here by
hand from the PRD (it is NOT derived from the permission table under test)."""

import itertools

import pytest

from akidb_ros.engine.errors import EngineError
from akidb_ros.guard import Credentials, Guard, rbac
from akidb_ros.guard.apikeys import create_key
from akidb_ros.guard.identity import Role
from akidb_ros.guard.jwt import issue_token

ROLES = ('viewer', 'operator', 'developer', 'admin')
ALL = set(ROLES)
PUBLIC = 'public'
SVC = '/akidb.embedding.v1.EmbeddingService/'

# PRD (week 6): viewer "read-only (health, metrics)"; operator "viewer + operational tasks"
# (models read); developer "operator + embedding generation"; admin full access. Liveness open.
EXPECTED = {
    # REST
    'GET /health/live': PUBLIC,
    'GET /health/ready': ALL,
    'GET /health': ALL,
    'POST /api/v1/embed': {'developer', 'admin'},
    'POST /v1/embeddings': {'developer', 'admin'},
    'GET /models': {'operator', 'developer', 'admin'},
    'POST /admin/models/load': {'admin'},
    'POST /admin/models/unload': {'admin'},
    'GET /metrics': ALL,
    'GET /openapi.json': ALL,
    # gRPC
    SVC + 'Embed': {'developer', 'admin'},
    SVC + 'EmbedStream': {'developer', 'admin'},
    SVC + 'Health': ALL,
    SVC + 'ListModels': {'operator', 'developer', 'admin'},
    '/grpc.health.v1.Health/Check': PUBLIC,
    '/grpc.health.v1.Health/Watch': ALL,
    '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo': ALL,
    '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo': ALL,
}
ISS, AUD = 'https://auth.test/', 'akidb'


@pytest.fixture(scope='module')
def world(tmp_path_factory, pki, rsa_keys):
    d = tmp_path_factory.mktemp('rbac')
    keys_file = str(d / 'keys.yaml')
    api_keys = {r: create_key(keys_file, Role(r), f'{r}-svc')[1] for r in ROLES}
    tokens = {
        r: issue_token(
            rsa_keys['good'],
            subject=f'{r}-user',
            role=r,
            issuer=ISS,
            audience=AUD,
            lifetime_s=3600,
        )
        for r in ROLES
    }
    certs = {r: open(pki['clients'][r][0]).read() for r in ROLES}
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
                'mtls': {'enabled': True},
            },
            'tls': {
                'enabled': True,
                'cert_file': pki['server'][0],
                'key_file': pki['server'][1],
                'ca_file': pki['ca'].path,
            },
            'rate_limit': {'enabled': False},
            'audit': {'enabled': False},
        }
    )
    return guard, {
        'api_key': {r: Credentials(api_key=api_keys[r], peer='10.0.0.1') for r in ROLES},
        'jwt': {r: Credentials(bearer=tokens[r], peer='10.0.0.2') for r in ROLES},
        'mtls': {r: Credentials(peer_cert=certs[r], peer='10.0.0.3') for r in ROLES},
    }


def outcome(guard, key, creds):
    """(HTTP status, gRPC status name) the door would answer."""
    try:
        guard.check(key, creds, transport='grpc' if key.startswith('/') else 'rest')
    except EngineError as exc:
        return exc.code.http_status, exc.code.grpc_status
    return 200, 'OK'


def expected(key, role):
    allowed = EXPECTED[key]
    if allowed == PUBLIC:
        return 200, 'OK'
    if role is None:
        return 401, 'UNAUTHENTICATED'
    return (200, 'OK') if role in allowed else (403, 'PERMISSION_DENIED')


CASES = [
    (key, method, role)
    for key in EXPECTED
    for method in ('api_key', 'jwt', 'mtls')
    for role in ROLES
] + [(key, 'anonymous', None) for key in EXPECTED]


@pytest.mark.parametrize(
    'key,method,role', CASES, ids=[f'{k}|{m}|{r or "anon"}' for k, m, r in CASES]
)
def test_matrix(world, key, method, role):
    guard, creds = world
    c = Credentials(peer='10.0.0.9') if role is None else creds[method][role]
    assert outcome(guard, key, c) == expected(key, role)


def test_matrix_size():
    assert len(CASES) == len(EXPECTED) * (3 * 4 + 1) == 18 * 13


@pytest.mark.parametrize('key', [k for k, v in EXPECTED.items() if v != PUBLIC])
def test_invalid_credentials_are_401_everywhere(world, key):
    guard, _ = world
    for creds in (
        Credentials(api_key='akidb.k000000000000.' + 'A' * 43),
        Credentials(bearer='eyJhbGciOiJub25lIn0.eyJyb2xlIjoiYWRtaW4ifQ.'),
        Credentials(malformed=('authorization',)),
    ):
        assert outcome(guard, key, creds)[0] == 401


def test_liveness_open_even_with_garbage_credentials(world):
    guard, _ = world
    junk = Credentials(api_key='nonsense', bearer='x.y.z', malformed=('api_key',))
    assert outcome(guard, 'GET /health/live', junk) == (200, 'OK')
    assert outcome(guard, '/grpc.health.v1.Health/Check', junk) == (200, 'OK')


def test_certificate_without_role_is_403_not_401(world, pki):
    guard, _ = world
    c = Credentials(peer_cert=open(pki['norole'][0]).read())
    assert outcome(guard, 'GET /health', c) == (403, 'PERMISSION_DENIED')


def test_undeclared_routes_are_admin_only(world):
    guard, creds = world
    for key in (
        'DELETE /models',
        'POST /health/live',
        'GET /static/<path:filename>',
        'GET /secret',
        SVC + 'LoadModel',
        '/other.Service/Method',
    ):
        assert rbac.lookup(key) is None
        assert outcome(guard, key, Credentials()) == (401, 'UNAUTHENTICATED')
        for r in ('viewer', 'operator', 'developer'):
            assert outcome(guard, key, creds['api_key'][r]) == (403, 'PERMISSION_DENIED')
        assert outcome(guard, key, creds['api_key']['admin']) == (200, 'OK')


def test_head_follows_get_and_flask_params_normalise():
    assert rbac.permission_for('HEAD /metrics') is rbac.Permission.METRICS_READ
    assert rbac.permission_for('GET /metrics/') is rbac.Permission.METRICS_READ
    assert rbac.permission_for('get /models') is rbac.Permission.MODELS_READ


def test_table_is_exactly_the_expected_matrix():
    assert set(rbac.PERMISSION_TABLE) == set(EXPECTED)


def test_operations_agree_with_routes():
    """The door seam names operations; each must carry the same permission as its route."""
    pairs = {
        'live': 'GET /health/live',
        'health': 'GET /health',
        'ready': 'GET /health/ready',
        'embed': 'POST /api/v1/embed',
        'list_models': 'GET /models',
        'load_model': 'POST /admin/models/load',
        'unload_model': 'POST /admin/models/unload',
        'metrics': 'GET /metrics',
        'openapi': 'GET /openapi.json',
        'reflection': '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
    }
    assert set(pairs) == set(rbac.OPERATION_PERMISSIONS)
    for op, key in pairs.items():
        assert rbac.operation_permission(op) is rbac.permission_for(key), op
    assert rbac.operation_permission('something_new') is rbac.DEFAULT_PERMISSION


def test_every_live_rest_route_is_declared():
    """Fails when a route is added to the Flask app without a permission-table entry."""
    from akidb_ros.rest.app import create_app

    app = create_app(None)
    missing = []
    for rule, method in itertools.chain.from_iterable(
        ((r, m) for m in r.methods - {'HEAD', 'OPTIONS'}) for r in app.url_map.iter_rules()
    ):
        if rule.endpoint == 'static':
            continue
        if rbac.lookup(f'{method} {rule.rule}') is None:
            missing.append(f'{method} {rule.rule}')
    assert not missing, f'routes without a permission: {missing}'


def test_every_grpc_method_is_declared():
    from akidb_ros.grpc_api import embedding_pb2

    methods = [
        f'/{s.full_name}/{m.name}'
        for s in embedding_pb2.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    ]
    assert methods and all(rbac.lookup(m) is not None for m in methods), methods
