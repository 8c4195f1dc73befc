"""Audit log (JSON lines, no secrets, rotation) and the security config (profiles, bind rule)."""

import json
import os
import stat

import pytest

from akidb_ros.guard import apikeys, config
from akidb_ros.guard.audit import REDACTED, AuditLog, scrub
from akidb_ros.guard.config import SecurityConfigError, check_bind, from_dict, load, startup_banner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_audit_lines_are_json_and_secret_free(tmp_path):
    path = str(tmp_path / 'a' / 'audit.jsonl')
    log = AuditLog(path)
    _, key = apikeys.generate_key()
    jwt = 'eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl'
    log.record(
        'auth_failure',
        outcome='denied',
        actor={'peer': '1.2.3.4', 'api_key': key},
        action='POST /api/v1/embed',
        request_id='r1',
        reason='unknown_key',
        detail=f'got {key} and Bearer {jwt}',
        authorization=f'Bearer {jwt}',
        nested={'list': [key, {'token': 'abc'}]},
        key_id='k0123456789ab',
    )
    log.record('key_created', outcome='success', actor={'cli': 'x'}, key_id='k0123456789ab')
    log.close()
    text = open(path).read()
    assert key not in text and jwt not in text and 'abc' not in text
    lines = [json.loads(x) for x in text.splitlines()]
    assert len(lines) == 2 and lines[0]['event'] == 'auth_failure' and lines[0]['ts'].endswith('Z')
    assert lines[0]['actor']['api_key'] == REDACTED and lines[0]['authorization'] == REDACTED
    assert lines[0]['key_id'] == 'k0123456789ab' and lines[0]['request_id'] == 'r1'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_audit_appends_and_rotates_by_size(tmp_path):
    path = str(tmp_path / 'audit.jsonl')
    AuditLog(path).record('first', outcome='success')
    log = AuditLog(path, max_bytes=2048, backups=2)  # a restart appends, never truncates
    for i in range(100):
        log.record('admin_action', outcome='success', action=f'load model-{i}', pad='x' * 50)
    log.close()
    files = sorted(os.listdir(tmp_path))
    assert files == ['audit.jsonl', 'audit.jsonl.1', 'audit.jsonl.2']
    for f in files:
        assert os.path.getsize(tmp_path / f) <= 2048
        for line in open(tmp_path / f):
            json.loads(line)
    last = [json.loads(x) for x in open(path)][-1]
    assert last['action'] == 'load model-99'


def test_scrub_private_key_pem():
    assert 'PRIVATE KEY' not in json.dumps(scrub({'x': '-----BEGIN PRIVATE KEY-----\nMII...'}))


def test_profiles_load_and_validate():
    dev = load(env={'AKIDB_SECURITY_PROFILE': 'dev'})
    assert not dev.auth_enabled and not dev.tls_enabled
    assert dev['rate_limit']['per_client'] == {'rate': 100, 'burst': 20}
    assert dev['rate_limit']['global'] == {'rate': 1000, 'burst': 200}
    assert dev['breaker']['open_s'] == 30 and dev['breaker']['half_open_probes'] == 3
    prod = load(env={'AKIDB_SECURITY_PROFILE': 'prod'})
    assert prod.auth_enabled and prod.tls_enabled and prod['tls']['require_client_cert']
    assert prod['auth']['jwt']['max_lifetime_s'] == 3600
    assert prod['auth']['api_keys']['file'] == os.path.join(ROOT, 'config', 'api_keys.yaml')
    assert load(env={}).source.endswith('security.dev.yaml')


@pytest.mark.parametrize('rate_limit, name', [
    ({'roles': {'admin': {'rate': 1000, 'burst': 200}}}, 'roles.admin'),     # the old default
    ({'roles': {'developer': {'rate': 10, 'burst': 500}}}, 'roles.developer'),
    ({'per_client': {'rate': 2000, 'burst': 20}}, 'per_client'),
])
def test_a_client_bucket_as_large_as_the_global_one_is_refused(rate_limit, name):
    """One admin client at its override (1000/200, the global's own) spent the whole global
    budget: every other client was answered 429."""
    with pytest.raises(SecurityConfigError, match=f'rate_limit.{name} .* must stay below '
                                                  r'rate_limit.global \(1000/s, burst 200\)'):
        from_dict({'rate_limit': rate_limit})
    from_dict({'rate_limit': dict(rate_limit, enabled=False)})     # no limits: no check
    from_dict({'rate_limit': {'roles': {'admin': {'rate': 999, 'burst': 199}}}})


def test_unknown_keys_and_inconsistent_settings_rejected():
    with pytest.raises(SecurityConfigError, match='rate_limit'):
        from_dict({'rate_limit': {'per_clinet': {'rate': 1, 'burst': 1}}})
    with pytest.raises(SecurityConfigError):
        from_dict({'rate_limit': {'per_client': {'rate': 0, 'burst': 1}}})
    with pytest.raises(SecurityConfigError, match='at least one'):
        from_dict({'auth': {'enabled': True, 'api_keys': {'enabled': False}}})
    with pytest.raises(SecurityConfigError, match='jwt'):
        from_dict(
            {'auth': {'enabled': True, 'api_keys': {'enabled': False}, 'jwt': {'enabled': True}}}
        )
    with pytest.raises(SecurityConfigError, match='mtls'):
        from_dict(
            {'auth': {'enabled': True, 'api_keys': {'enabled': False}, 'mtls': {'enabled': True}}}
        )
    with pytest.raises(SecurityConfigError, match='ca_file'):
        from_dict({'tls': {'enabled': True, 'cert_file': 'a', 'key_file': 'b'}})
    with pytest.raises(SecurityConfigError):
        from_dict(
            {'auth': {'enabled': True, 'api_keys': {'file': 'k.yaml'}, 'disabled_role': 'root'}}
        )
    with pytest.raises(SecurityConfigError):
        load(env={'AKIDB_SECURITY_PROFILE': '../../etc/passwd'})


def test_tls_files_from_the_prd_env_vars(tmp_path, monkeypatch):
    """AKIDB_TLS_CERT/KEY/CA override the chosen file's tls paths and turn TLS on."""
    monkeypatch.chdir(tmp_path)
    env = {'AKIDB_SECURITY_PROFILE': 'dev', 'AKIDB_TLS_CERT': 'tls/tls.crt',
           'AKIDB_TLS_KEY': '/etc/tls/tls.key', 'AKIDB_TLS_CA': '/etc/tls/ca.crt'}
    dev = load(env=env)
    assert dev.tls_enabled and not dev.auth_enabled
    assert dev['tls']['cert_file'] == str(tmp_path / 'tls' / 'tls.crt')   # from the cwd
    assert (dev['tls']['key_file'], dev['tls']['ca_file']) == ('/etc/tls/tls.key',
                                                               '/etc/tls/ca.crt')
    assert 'AKIDB_TLS_CERT' in dev.source and dev.source.startswith(ROOT)
    prod = load(env={**env, 'AKIDB_SECURITY_PROFILE': 'prod'})
    assert prod['tls']['cert_file'] == str(tmp_path / 'tls' / 'tls.crt')
    assert prod['tls']['require_client_cert'] and prod.auth_enabled
    # only the CA: the profile's certificate and key stay, TLS must already be on
    only_ca = load(env={'AKIDB_SECURITY_PROFILE': 'prod', 'AKIDB_TLS_CA': '/x/ca.crt'})
    assert only_ca['tls']['ca_file'] == '/x/ca.crt'
    assert only_ca['tls']['cert_file'] == os.path.join(ROOT, 'build', 'certs', 'server.crt')
    assert not load(env={'AKIDB_SECURITY_PROFILE': 'dev', 'AKIDB_TLS_CERT': ''}).tls_enabled


@pytest.mark.parametrize('env,match', [
    ({'AKIDB_TLS_CERT': '/a.crt'}, 'AKIDB_TLS_KEY is required with AKIDB_TLS_CERT'),
    ({'AKIDB_TLS_KEY': '/a.key', 'AKIDB_TLS_CA': '/ca'}, 'AKIDB_TLS_CERT is required'),
    ({'AKIDB_TLS_CA': '/ca.crt'}, 'AKIDB_TLS_CA is set but TLS is off'),
    # client certificates are required by default: without a CA there is nothing to check
    ({'AKIDB_TLS_CERT': '/a.crt', 'AKIDB_TLS_KEY': '/a.key'}, 'needs tls.ca_file'),
])
def test_tls_env_vars_refused_when_incomplete(env, match):
    with pytest.raises(SecurityConfigError, match=match):
        load(env={'AKIDB_SECURITY_PROFILE': 'dev', **env})


@pytest.mark.parametrize(
    'host,ok',
    [
        ('127.0.0.1', True),
        ('::1', True),
        ('localhost', True),
        ('127.0.0.53', True),
        ('0.0.0.0', False),
        ('::', False),
        ('10.0.0.5', False),
        ('example.com', False),
        ('', False),
    ],
)
def test_no_auth_means_loopback_only(host, ok):
    dev = from_dict({})
    if ok:
        check_bind(dev, host)
    else:
        with pytest.raises(SecurityConfigError, match='refusing to bind'):
            check_bind(dev, host)
    check_bind(from_dict({'auth': {'enabled': True, 'api_keys': {'file': 'k.yaml'}}}), host)


def test_startup_banner_says_what_is_on():
    assert 'authentication OFF' in startup_banner(from_dict({}), '127.0.0.1', 8080)
    prod = config.load(env={'AKIDB_SECURITY_PROFILE': 'prod'})
    b = startup_banner(prod, '0.0.0.0', 8443)
    assert 'api_keys+jwt+mtls' in b and 'TLS 1.3 + client certificates' in b


def test_scrub_keeps_ids_and_redacts_secrets():
    """Key ids are not secrets (rotation records must name the old key); secrets stay hidden."""
    _, key = apikeys.generate_key()
    ids = {'key_id': 'k0123456789ab', 'previous_key_id': 'k111111111111',
           'new_key_id': 'k222222222222', 'key_ids': ['k333333333333'], 'api_key_id': 'k4'}
    secrets = {'key': 'a', 'api_key': 'b', 'previous_key': 'c', 'new_api_key': 'd',
               'secret_key': 'e', 'private_key': 'f', 'token': 'g', 'key_secret': 'h'}
    out = scrub({**ids, **secrets, 'actor': {'key_id': 'k5'}})
    assert {k: out[k] for k in ids} == ids and out['actor'] == {'key_id': 'k5'}
    assert all(out[k] == REDACTED for k in secrets)
    # an id field holding a key by mistake is still caught by its shape
    assert scrub({'previous_key_id': key})['previous_key_id'] == REDACTED


def test_blank_security_variables_count_as_unset():
    """``AKIDB_SECURITY_CONFIG=`` opened the file '' (exit 1), ``AKIDB_SECURITY_PROFILE=`` was
    a 'bad profile'; blank means unset, as for every other AKIDB_* variable."""
    unset = load(env={})
    for env in ({'AKIDB_SECURITY_CONFIG': ''}, {'AKIDB_SECURITY_PROFILE': '  '},
                {'AKIDB_SECURITY_CONFIG': ' ', 'AKIDB_SECURITY_PROFILE': '',
                 'AKIDB_TLS_CERT': ' ', 'AKIDB_TLS_CA': ''}):
        cfg = load(env=env)
        assert (cfg['profile'], cfg.auth_enabled, cfg.tls_enabled) == (
            unset['profile'], unset.auth_enabled, unset.tls_enabled), env
