"""The chain as the doors use it: Guard.check / door_hook with akidb_ros.doors.DoorCall."""

import json

import pytest
from prometheus_client import REGISTRY

from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import Priority
from akidb_ros.guard import AuditLog, Credentials, Guard, Permission
from akidb_ros.guard.apikeys import create_key, revoke_key
from akidb_ros.guard.breaker import State
from akidb_ros.guard.identity import AuthMethod, Role


def sample(name, labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def setup(tmp_path, clock):
    keys = str(tmp_path / 'keys.yaml')
    audit_path = str(tmp_path / 'audit.jsonl')
    made = {r: create_key(keys, Role(r), f'{r}-svc') for r in ('viewer', 'developer', 'admin')}
    guard = Guard(
        {
            'auth': {
                'enabled': True,
                'api_keys': {'enabled': True, 'file': keys, 'reload_interval_s': 0},
            },
            'rate_limit': {
                'per_client': {'rate': 100, 'burst': 20},
                'roles': {'admin': {'rate': 500, 'burst': 100}},
            },
            'breaker': {'open_s': 30},
            'audit': {'file': audit_path},
        },
        clock=clock,
    )
    return (
        guard,
        {r: v[1] for r, v in made.items()},
        {r: v[0] for r, v in made.items()},
        audit_path,
        keys,
    )


def door_call(op, headers=None, model='', transport='rest'):
    from akidb_ros.doors import DoorCall

    return DoorCall(
        transport=transport,
        operation=op,
        request_id='req-1',
        headers=headers or {},
        peer='10.1.2.3',
        model=model,
    )


def test_door_hook_happy_path_sets_principal_and_headers(setup):
    guard, keys, recs, _, _ = setup
    call = door_call('embed', {'x-api-key': keys['developer']}, model='m1')
    done = guard.door_hook(call)
    assert call.principal.role is Role.DEVELOPER and call.principal.key_id == recs['developer'].id
    assert call.response_headers['X-RateLimit-Limit'] == '100'
    assert call.response_headers['X-RateLimit-Remaining'] == '19'
    done(None)
    assert guard.breaker_for('m1').snapshot()['window_calls'] == 1


def test_401_403_codes_audit_and_metrics(setup):
    guard, keys, recs, audit_path, _ = setup
    before = sample(
        'akidb_auth_failures_total',
        {'method': 'api_key', 'reason': 'unknown_key', 'transport': 'rest'},
    )
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', {}))
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', {'x-api-key': 'akidb.k0123456789ab.' + 'B' * 43}))
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', {'x-api-key': keys['viewer']}))
    assert e.value.code is ErrorCode.PERMISSION_DENIED
    after = sample(
        'akidb_auth_failures_total',
        {'method': 'api_key', 'reason': 'unknown_key', 'transport': 'rest'},
    )
    assert after == before + 1
    lines = [json.loads(x) for x in open(audit_path)]
    events = [(x['event'], x.get('reason')) for x in lines]
    assert ('auth_failure', 'unauthenticated') in events
    assert ('auth_failure', 'unknown_key') in events
    assert ('permission_denied', 'forbidden') in events
    denied = [x for x in lines if x['event'] == 'permission_denied'][0]
    assert denied['actor']['key_id'] == recs['viewer'].id and denied['actor']['role'] == 'viewer'
    assert denied['request_id'] == 'req-1' and denied['transport'] == 'rest'
    text = open(audit_path).read()
    assert all(k not in text for k in keys.values())


def test_a_refused_route_is_audited_by_its_name(setup):
    """A 403's audit line names the route or RPC tried (as a 401's does), not the permission
    it lacked: ``POST /admin/models/load``, not ``models:admin``."""
    guard, keys, _, audit_path, _ = setup
    creds = Credentials(api_key=keys['viewer'], peer='ipv4:127.0.0.1:5000')
    for what in ('POST /admin/models/load', '/akidb.embedding.v1.EmbeddingService/Embed'):
        with pytest.raises(EngineError) as e:
            guard.check(what, creds, transport='rest', request_id='r-403')
        assert e.value.code is ErrorCode.PERMISSION_DENIED, what
    denied = [json.loads(x) for x in open(audit_path) if 'permission_denied' in x]
    assert [x['action'] for x in denied[-2:]] == [
        'POST /admin/models/load', '/akidb.embedding.v1.EmbeddingService/Embed']


def test_revoked_key_refused_on_next_request_without_restart(setup):
    guard, keys, recs, _, key_file = setup
    guard.door_hook(door_call('health', {'x-api-key': keys['viewer']}))
    revoke_key(key_file, recs['viewer'].id)
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('health', {'x-api-key': keys['viewer']}))
    assert e.value.code is ErrorCode.UNAUTHENTICATED and 'revoked' in e.value.message


def test_rate_limit_429_with_headers_and_metric(setup):
    guard, keys, _, _, _ = setup
    before = sample('akidb_rate_limited_total', {'scope': 'client', 'transport': 'rest'})
    for _ in range(20):
        guard.door_hook(door_call('list_models', {'x-api-key': keys['developer']}))
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('list_models', {'x-api-key': keys['developer']}))
    err = e.value
    assert err.code is ErrorCode.RATE_LIMITED and err.code.http_status == 429
    assert err.headers['Retry-After'] == '1' and err.headers['X-RateLimit-Remaining'] == '0'
    assert (
        sample('akidb_rate_limited_total', {'scope': 'client', 'transport': 'rest'}) == before + 1
    )
    # admin has its own, larger bucket (per-role override)
    for _ in range(50):
        guard.door_hook(door_call('list_models', {'x-api-key': keys['admin']}))


def test_breaker_through_the_hook(setup, clock):
    guard, keys, _, audit_path, _ = setup
    hdr = {'x-api-key': keys['admin']}
    for _ in range(10):
        guard.door_hook(door_call('embed', hdr, model='sick'))(EngineError(ErrorCode.TIMEOUT, 't'))
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', hdr, model='sick'))
    assert e.value.code is ErrorCode.CIRCUIT_OPEN and e.value.retry_after_s == pytest.approx(30)
    guard.door_hook(door_call('embed', hdr, model='healthy'))(None)  # other models unaffected
    assert sample('akidb_circuit_breaker_state', {'model': 'sick'}) == 2
    clock.advance(30)
    for _ in range(3):
        guard.door_hook(door_call('embed', hdr, model='sick'))(None)
    assert guard.breaker_for('sick').state is State.CLOSED
    trans = [json.loads(x) for x in open(audit_path) if 'breaker_transition' in x]
    assert [t['outcome'] for t in trans] == ['open', 'half_open', 'closed']


def test_timeouts_of_a_callers_own_short_budget_are_neutral(setup):
    """One client asking for 1 ms must not open the breaker for everyone (audit, stop 24)."""
    guard, keys, _, _, _ = setup
    hdr = {'x-api-key': keys['admin']}
    for _ in range(20):
        call = door_call('embed', hdr, model='m1')
        call.caller_deadline = True
        guard.door_hook(call)(EngineError(ErrorCode.TIMEOUT, 'caller budget'))
    assert guard.breaker_for('m1').state is State.CLOSED
    assert guard.breaker_for('m1').snapshot()['window_calls'] == 0
    for _ in range(10):     # the server's own budget ran out: the model is sick
        guard.door_hook(door_call('embed', hdr, model='m1'))(EngineError(ErrorCode.TIMEOUT, 't'))
    assert guard.breaker_for('m1').state is State.OPEN


def test_admin_actions_are_audited(setup):
    guard, keys, _, audit_path, _ = setup
    call = door_call('load_model', {'x-api-key': keys['admin']}, model='all-mpnet-base-v2')
    guard.door_hook(call)(None)
    call = door_call('unload_model', {'x-api-key': keys['admin']}, model='x')
    guard.door_hook(call)(EngineError(ErrorCode.MODEL_NOT_FOUND, 'nope'))
    acts = [json.loads(x) for x in open(audit_path) if 'admin_action' in x]
    assert [(a['action'], a['outcome']) for a in acts] == [
        ('load_model all-mpnet-base-v2', 'success'),
        ('unload_model x', 'failure'),
    ]
    assert acts[1]['code'] == 'MODEL_NOT_FOUND' and acts[0]['actor']['role'] == 'admin'


def test_public_liveness_needs_nothing(setup):
    guard, _, _, _, _ = setup
    d = guard.check('GET /health/live', Credentials())
    assert d.permission is Permission.PUBLIC and d.headers == {}
    assert guard.door_hook(door_call('live')) is not None


def test_ambiguous_and_disabled_methods(setup):
    guard, keys, _, _, _ = setup
    with pytest.raises(EngineError) as e:
        guard.check('GET /models', Credentials(api_key=keys['admin'], bearer='a.b.c'))
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    with pytest.raises(EngineError) as e:  # JWT not configured in this guard
        guard.check('GET /models', Credentials(bearer='a.b.c'))
    assert e.value.code is ErrorCode.UNAUTHENTICATED and 'not accepted' in e.value.message


def test_priority_lane_for_admin(setup):
    guard, keys, _, _, _ = setup
    assert (
        guard.check('POST /api/v1/embed', Credentials(api_key=keys['admin'])).priority
        is Priority.ADMIN
    )
    assert (
        guard.check('POST /api/v1/embed', Credentials(api_key=keys['developer'])).priority
        is Priority.NORMAL
    )


def test_dev_profile_everyone_is_the_disabled_role(clock):
    guard = Guard({}, clock=clock, audit=AuditLog(None))
    d = guard.check('POST /admin/models/load', Credentials(peer='ipv4:127.0.0.1:5000'))
    assert d.identity.method is AuthMethod.DISABLED and d.identity.role is Role.ADMIN
    assert d.identity.client_id == 'peer:127.0.0.1'
    # admin in RBAC, not in the engine's queue: that lane would hold every caller's work
    assert d.priority is Priority.NORMAL
    for _ in range(19):
        guard.check('GET /models', Credentials(peer='127.0.0.1'))
    with pytest.raises(EngineError) as e:  # rate limits still apply, per peer
        guard.check('GET /models', Credentials(peer='127.0.0.1'))
    assert e.value.code is ErrorCode.RATE_LIMITED
    guard.check('GET /models', Credentials(peer='127.0.0.2'))


def test_jwt_and_mtls_through_the_chain(tmp_path, rsa_keys, pki, clock):
    from akidb_ros.guard.jwt import issue_token

    guard = Guard(
        {
            'auth': {
                'enabled': True,
                'api_keys': {'enabled': False},
                'jwt': {
                    'enabled': True,
                    'public_key_file': rsa_keys['pem'],
                    'issuer': 'i',
                    'audience': 'a',
                },
                'mtls': {'enabled': True},
            },
            'tls': {
                'enabled': True,
                'cert_file': pki['server'][0],
                'key_file': pki['server'][1],
                'ca_file': pki['ca'].path,
            },
            'audit': {'enabled': False},
        },
        clock=clock,
    )
    tok = issue_token(rsa_keys['good'], subject='svc', role='operator', issuer='i', audience='a')
    from akidb_ros.doors import DoorCall

    call = DoorCall(
        transport='grpc',
        operation='metrics',
        request_id='r',
        headers={'authorization': f'Bearer {tok}'},
        peer='ipv4:10.0.0.1:4444',
    )
    guard.door_hook(call)
    assert call.principal.subject == 'svc' and call.principal.role is Role.OPERATOR
    with pytest.raises(EngineError) as e:  # API keys switched off here
        guard.check('GET /metrics', Credentials(api_key='akidb.k0123456789ab.' + 'A' * 43))
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    cert = open(pki['clients']['operator'][0]).read()
    call = DoorCall(transport='grpc', operation='metrics', request_id='r', headers={}, peer='p')
    call.peer_cert = cert
    guard.door_hook(call)
    assert call.principal.method is AuthMethod.MTLS and call.principal.subject == 'operator-client'


def test_refused_credentials_are_rate_limited_per_peer(setup, clock):
    """A flood of bad keys from one host: past the auth-failure burst it hears 429 and writes
    no audit line per refusal (the trail is not rotated away); other hosts, and good keys
    from that host, are unaffected."""
    guard, keys, _, audit_path, _ = setup
    bad = {'x-api-key': 'akidb.k0123456789ab.' + 'B' * 43}
    codes = []
    for _ in range(30):
        try:
            guard.door_hook(door_call('embed', bad))
        except EngineError as exc:
            codes.append(exc.code)
    assert codes == [ErrorCode.UNAUTHENTICATED] * 20 + [ErrorCode.RATE_LIMITED] * 10
    lines = [json.loads(x) for x in open(audit_path)]
    assert sum(x['event'] == 'auth_failure' for x in lines) == 20
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', bad))
    assert e.value.headers['Retry-After'] == '1'
    guard.door_hook(door_call('embed', {'x-api-key': keys['developer']}))    # still served
    from akidb_ros.doors import DoorCall
    other = DoorCall(transport='rest', operation='embed', request_id='r', headers=bad,
                     peer='10.9.9.9')
    with pytest.raises(EngineError) as e:
        guard.door_hook(other)
    assert e.value.code is ErrorCode.UNAUTHENTICATED
    clock.advance(1.0)          # 1 refusal a second refills
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', bad))
    assert e.value.code is ErrorCode.UNAUTHENTICATED


def test_refusals_from_one_ipv6_host_share_its_bucket_whatever_the_port(setup):
    """gRPC names an IPv6 peer ``ipv6:%5B<address>%5D:<port>`` (the brackets percent-encoded):
    the auth-failure limit is per host, so a new connection (a new port) gets no fresh bucket,
    and the audit names the host."""
    from akidb_ros.guard.chain import peer_host
    assert peer_host('ipv6:%5B2001:db8::7%5D:40001') == '2001:db8::7'
    assert peer_host('ipv6:[2001:db8::7]:40001') == '2001:db8::7'
    guard, _, _, audit_path, _ = setup
    bad = 'akidb.k0123456789ab.' + 'B' * 43
    codes = []
    for port in range(40000, 40030):        # a connection of its own for each attempt
        creds = Credentials(api_key=bad, peer=f'ipv6:%5B2001:db8::7%5D:{port}')
        try:
            guard.check('/akidb.embedding.v1.EmbeddingService/Embed', creds, transport='grpc')
        except EngineError as exc:
            codes.append(exc.code)
    assert codes == [ErrorCode.UNAUTHENTICATED] * 20 + [ErrorCode.RATE_LIMITED] * 10
    lines = [json.loads(x) for x in open(audit_path)]
    assert {x['peer'] for x in lines if x['event'] == 'auth_failure'} == {'2001:db8::7'}


def test_each_request_of_one_guarded_call_takes_a_token(setup):
    """A stream's first message uses the transport's decision (one check per call), and each
    later one takes a rate-limit token of its own: a stream cannot go past the limit."""
    from akidb_ros.guard.integrations import _CURRENT
    guard, keys, _, _, _ = setup
    from akidb_ros.guard.identity import credentials_from_headers
    md = {'x-api-key': keys['developer']}       # every message's DoorCall carries the call's
    pre = guard.check('/akidb.embedding.v1.EmbeddingService/EmbedStream',
                      credentials_from_headers(md, peer='p'), transport='grpc')
    token = _CURRENT.set(pre)
    try:
        served = 0
        with pytest.raises(EngineError) as e:
            for _ in range(40):
                guard.door_hook(door_call('embed', md, transport='grpc'))
                served += 1
    finally:
        _CURRENT.reset(token)
    assert served == 20 and e.value.code is ErrorCode.RATE_LIMITED    # the burst, 20 in all


def test_a_key_revoked_while_its_stream_is_open_stops_the_stream(setup):
    """Revocation applies within reload_interval_s to a call already open too: each later
    message of an EmbedStream is authenticated again, so a leaked key cannot keep a stream
    opened before its revocation (or a token one opened before its ``exp``) alive; the refusal
    is audited like any other."""
    from akidb_ros.guard.identity import credentials_from_headers
    from akidb_ros.guard.integrations import _CURRENT
    guard, keys, recs, audit_path, key_path = setup
    md = {'x-api-key': keys['developer']}
    pre = guard.check('/akidb.embedding.v1.EmbeddingService/EmbedStream',
                      credentials_from_headers(md, peer='p'), transport='grpc')
    token = _CURRENT.set(pre)
    try:
        guard.door_hook(door_call('embed', md, transport='grpc'))      # the call's decision
        guard.door_hook(door_call('embed', md, transport='grpc'))      # checked again: fine
        revoke_key(key_path, recs['developer'].id)
        with pytest.raises(EngineError) as e:
            guard.door_hook(door_call('embed', md, transport='grpc'))
    finally:
        _CURRENT.reset(token)
    assert e.value.code is ErrorCode.UNAUTHENTICATED and e.value.message == 'API key revoked'
    last = [json.loads(x) for x in open(audit_path)][-1]
    assert last['event'] == 'auth_failure' and last['reason'] == 'revoked'
    assert last['actor']['key_id'] == recs['developer'].id


@pytest.mark.parametrize('name', ['x-api-key', 'authorization'])
def test_a_credential_sent_twice_is_malformed(setup, name):
    """gRPC keeps repeated metadata apart (WSGI joins them): neither copy may win."""
    from akidb_ros.guard.identity import credentials_from_headers
    guard, keys, _, _, _ = setup
    value = keys['developer'] if name == 'x-api-key' else 'Bearer a.b.c'
    creds = credentials_from_headers([(name, value), (name.upper(), value)], peer='p')
    assert creds.malformed == ('api_key' if name == 'x-api-key' else 'authorization',)
    with pytest.raises(EngineError) as e:
        guard.check('/akidb.embedding.v1.EmbeddingService/Embed', creds, transport='grpc')
    assert e.value.code is ErrorCode.UNAUTHENTICATED and 'malformed' in e.value.message


def test_a_wrong_secret_for_a_real_key_id_is_audited_with_that_id(setup):
    """The caller hears the same 401 as for an unknown key; the audit names the key id."""
    guard, keys, recs, audit_path, _ = setup
    kid = recs['developer'].id
    forged = f'akidb.{kid}.' + 'A' * 43
    with pytest.raises(EngineError) as e:
        guard.door_hook(door_call('embed', {'x-api-key': forged}))
    assert e.value.code is ErrorCode.UNAUTHENTICATED and e.value.message == 'invalid API key'
    last = [json.loads(x) for x in open(audit_path)][-1]
    assert last['event'] == 'auth_failure' and last['actor']['key_id'] == kid
