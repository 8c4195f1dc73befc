"""JWT (RS256 only) and the classic attacks against it, with real keys and real signatures."""

import base64
import hashlib
import hmac
import json
import time

import jwt as pyjwt
import pytest
from certs import make_rsa_key, public_pem

from akidb_ros.guard.identity import AuthMethod, Role
from akidb_ros.guard.jwt import JwtSettings, JwtVerifier, TokenError, issue_token, write_jwks

ISS, AUD = 'https://auth.test/', 'akidb'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def raw_token(header: dict, claims: dict, sign=lambda signing_input: b'') -> str:
    si = f'{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}'
    return f'{si}.{b64(sign(si.encode()))}'


def claims(**over):
    now = int(time.time())
    c = {
        'sub': 'robot-7',
        'role': 'developer',
        'iss': ISS,
        'aud': AUD,
        'iat': now,
        'nbf': now,
        'exp': now + 600,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture
def verifier(rsa_keys, clock):
    return JwtVerifier(
        JwtSettings(issuer=ISS, audience=AUD, public_key_file=rsa_keys['pem']), clock=clock
    )


def sign(key, c, **kw):
    return pyjwt.encode(c, key, algorithm='RS256', **kw)


def test_valid_token_gives_identity(verifier, rsa_keys):
    ident = verifier.identity(sign(rsa_keys['good'], claims()))
    assert ident.subject == 'robot-7' and ident.role is Role.DEVELOPER
    assert ident.method is AuthMethod.JWT and ident.client_id == 'jwt:robot-7'


def test_alg_none_rejected(verifier):
    tok = raw_token({'alg': 'none', 'typ': 'JWT'}, claims(role='admin'))
    with pytest.raises(TokenError) as e:
        verifier.verify(tok)
    assert e.value.reason == 'bad_algorithm'
    for alg in ('None', 'NONE', 'nOnE'):
        with pytest.raises(TokenError):
            verifier.verify(raw_token({'alg': alg}, claims(role='admin')))


def test_hs256_keyed_with_the_public_key_rejected(verifier, rsa_keys):
    """The key-confusion attack: HMAC over the token with the server's public PEM as secret."""
    secret = public_pem(rsa_keys['good'])
    tok = raw_token(
        {'alg': 'HS256', 'typ': 'JWT'},
        claims(role='admin'),
        lambda si: hmac.new(secret, si, hashlib.sha256).digest(),
    )
    with pytest.raises(TokenError) as e:
        verifier.verify(tok)
    assert e.value.reason == 'bad_algorithm'
    # and even if the header lies about the algorithm the RSA check fails
    tok2 = raw_token(
        {'alg': 'RS256', 'typ': 'JWT'},
        claims(role='admin'),
        lambda si: hmac.new(secret, si, hashlib.sha256).digest(),
    )
    with pytest.raises(TokenError) as e:
        verifier.verify(tok2)
    assert e.value.reason in ('bad_signature', 'invalid')


@pytest.mark.parametrize('alg', ['RS384', 'RS512', 'PS256', 'ES256', 'HS512'])
def test_other_algorithms_rejected(verifier, alg):
    with pytest.raises(TokenError) as e:
        verifier.verify(raw_token({'alg': alg}, claims(), lambda si: b'x' * 256))
    assert e.value.reason == 'bad_algorithm'


def test_forged_and_tampered_tokens_rejected(verifier, rsa_keys):
    forged = sign(rsa_keys['other'], claims(role='admin'))  # attacker's own key
    with pytest.raises(TokenError) as e:
        verifier.verify(forged)
    assert e.value.reason == 'bad_signature'
    good = sign(rsa_keys['good'], claims(role='viewer'))
    h, p, s = good.split('.')
    evil_payload = b64(json.dumps(claims(role='admin')).encode())
    with pytest.raises(TokenError) as e:
        verifier.verify(f'{h}.{evil_payload}.{s}')  # payload swapped
    assert e.value.reason == 'bad_signature'
    with pytest.raises(TokenError):
        verifier.verify(f'{h}.{p}.')  # signature stripped
    with pytest.raises(TokenError):
        verifier.verify(f'{h}.{p}')  # two segments


@pytest.mark.parametrize(
    'over,reason',
    [
        (
            {
                'exp': int(time.time()) - 120,
                'iat': int(time.time()) - 600,
                'nbf': int(time.time()) - 600,
            },
            'expired',
        ),
        ({'nbf': int(time.time()) + 600}, 'not_yet_valid'),
        ({'iss': 'https://evil.test/'}, 'bad_issuer'),
        ({'aud': 'someone-else'}, 'bad_audience'),
        ({'exp': None}, 'missing_claim'),
        ({'iss': None}, 'missing_claim'),
        ({'aud': None}, 'missing_claim'),
        ({'sub': None}, 'missing_claim'),
        ({'exp': int(time.time()) + 7200}, 'lifetime_too_long'),  # > PRD's 1 h
        ({'exp': 10 ** 400}, 'lifetime_too_long'),     # float() of it raised OverflowError: a 500
        ({'iat': -10 ** 400}, 'lifetime_too_long'),
    ],
)
def test_claim_checks(verifier, rsa_keys, over, reason):
    with pytest.raises(TokenError) as e:
        verifier.verify(sign(rsa_keys['good'], claims(**over)))
    assert e.value.reason == reason


def test_leeway_is_bounded(verifier, rsa_keys):
    now = int(time.time())
    ok = sign(rsa_keys['good'], claims(exp=now - 10, iat=now - 600, nbf=now - 600))  # within 30 s
    assert verifier.verify(ok)['sub'] == 'robot-7'
    late = sign(rsa_keys['good'], claims(exp=now - 40, iat=now - 600, nbf=now - 600))
    with pytest.raises(TokenError):
        verifier.verify(late)


@pytest.mark.parametrize('role', ['root', '', 'Admin ', None, ['admin'], 7])
def test_role_claim_must_be_one_of_the_four(verifier, rsa_keys, role):
    c = claims()
    c['role'] = role
    if role == 'Admin ':
        assert verifier.identity(sign(rsa_keys['good'], c)).role is Role.ADMIN  # normalised
        return
    with pytest.raises(TokenError) as e:
        verifier.identity(sign(rsa_keys['good'], c))
    assert e.value.reason == 'bad_role'


def test_embedded_key_headers_rejected(verifier, rsa_keys):
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_keys['other'].public_key()))
    tok = sign(rsa_keys['other'], claims(role='admin'), headers={'jwk': jwk})
    with pytest.raises(TokenError) as e:
        verifier.verify(tok)
    assert e.value.reason == 'bad_header'
    tok = sign(rsa_keys['other'], claims(role='admin'), headers={'jku': 'https://evil.test/jwks'})
    with pytest.raises(TokenError):
        verifier.verify(tok)


def test_jwks_kid_selection_and_rotation_without_restart(tmp_path, rsa_keys, clock):
    path = str(tmp_path / 'jwks.json')
    k1, k2 = rsa_keys['good'], rsa_keys['other']
    write_jwks(path, {'k1': k1.public_key()})
    v = JwtVerifier(
        JwtSettings(issuer=ISS, audience=AUD, jwks_file=path, reload_interval_s=1.0), clock=clock
    )
    t1 = issue_token(
        k1, subject='a', role='viewer', issuer=ISS, audience=AUD, kid='k1', lifetime_s=600
    )
    t2 = issue_token(
        k2, subject='b', role='admin', issuer=ISS, audience=AUD, kid='k2', lifetime_s=600
    )
    assert v.identity(t1).role is Role.VIEWER
    with pytest.raises(TokenError) as e:
        v.verify(t2)
    assert e.value.reason == 'unknown_kid'
    write_jwks(path, {'k1': k1.public_key(), 'k2': k2.public_key()})  # publish the new key
    clock.advance(1.01)
    assert v.identity(t2).role is Role.ADMIN and v.identity(t1).role is Role.VIEWER
    write_jwks(path, {'k2': k2.public_key()})  # retire the old one
    clock.advance(1.01)
    with pytest.raises(TokenError):
        v.verify(t1)
    # a token claiming kid k2 but signed by k1 fails the signature check
    t3 = issue_token(
        k1, subject='c', role='admin', issuer=ISS, audience=AUD, kid='k2', lifetime_s=600
    )
    with pytest.raises(TokenError) as e:
        v.verify(t3)
    assert e.value.reason == 'bad_signature'


def _one_key_jwks(tmp_path, key, clock):
    """(JWKS path holding ``key`` as k1, a verifier reloading it each second, an admin token)."""
    path = str(tmp_path / 'jwks.json')
    write_jwks(path, {'k1': key.public_key()})
    v = JwtVerifier(
        JwtSettings(issuer=ISS, audience=AUD, jwks_file=path, reload_interval_s=1.0), clock=clock
    )
    return path, v, issue_token(key, subject='a', role='admin', issuer=ISS, audience=AUD,
                                kid='k1')


def test_a_jwks_with_every_key_removed_refuses_every_token(tmp_path, rsa_keys, clock):
    """Taking the last key out of the JWKS (a leaked signing key, say) distrusts it at the next
    reload, as taking one of several out does; only a file that does not load keeps the keys
    the verifier had (a half-written file must not lock everyone out)."""
    k1 = rsa_keys['good']
    path, v, tok = _one_key_jwks(tmp_path, k1, clock)
    assert v.identity(tok).role is Role.ADMIN
    for junk in ('{"keys": [', '[]', '{}'):      # not JSON, not a JWKS: the old keys stay
        with open(path, 'w') as fh:
            fh.write(junk)
        clock.advance(1.01)
        assert v.identity(tok).role is Role.ADMIN
    write_jwks(path, {})                          # {"keys": []}: every key withdrawn
    clock.advance(1.01)
    with pytest.raises(TokenError) as e:
        v.verify(tok)
    assert e.value.reason == 'unknown_kid'
    write_jwks(path, {'k1': k1.public_key()})     # published again: trusted again
    clock.advance(1.01)
    assert v.identity(tok).role is Role.ADMIN
    write_jwks(path, {})
    with pytest.raises(ValueError):               # at start, no key is a configuration error
        JwtVerifier(JwtSettings(issuer=ISS, audience=AUD, jwks_file=path))


@pytest.mark.parametrize('bad', [{'kty': 'RSA', 'kid': 'k9'}, 'not an object', None])
def test_a_jwks_entry_that_does_not_load_keeps_the_old_keys(tmp_path, rsa_keys, clock, bad):
    """A key entry PyJWK cannot build (no ``n``/``e``), or one that is not an object, makes
    the file one that does not load: the previous keys stay and tokens are still answered
    (before, the exception escaped ``verify``: a 500 for the caller once a reload interval);
    at start it stops the server with the file named."""
    path, v, tok = _one_key_jwks(tmp_path, rsa_keys['good'], clock)
    with open(path) as fh:
        doc = json.load(fh)
    doc['keys'].append(bad)
    with open(path, 'w') as fh:
        json.dump(doc, fh)
    for _ in range(2):
        clock.advance(1.01)
        assert v.identity(tok).role is Role.ADMIN
    with pytest.raises(ValueError, match='jwks.json: key 1'):
        JwtVerifier(JwtSettings(issuer=ISS, audience=AUD, jwks_file=path))


def test_weak_or_private_keys_refused_at_load(tmp_path):
    weak = make_rsa_key(1024)
    p = tmp_path / 'weak.pem'
    p.write_bytes(public_pem(weak))
    with pytest.raises(ValueError):
        JwtVerifier(JwtSettings(issuer=ISS, audience=AUD, public_key_file=str(p)))
    priv = make_rsa_key()
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(priv))  # includes 'd'
    q = tmp_path / 'priv.json'
    q.write_text(json.dumps({'keys': [jwk]}))
    with pytest.raises(ValueError):
        JwtVerifier(JwtSettings(issuer=ISS, audience=AUD, jwks_file=str(q)))


@pytest.mark.parametrize(
    'junk', ['', 'a', 'a.b', 'a.b.c', '....', 'eyJhbGciOiJSUzI1NiJ9.e30.', 'eyJ' + 'A' * 5000]
)
def test_junk_tokens_are_refused_not_crashing(verifier, junk):
    with pytest.raises(TokenError):
        verifier.verify(junk)
