"""JWT bearer tokens: RS256 only, verified with PyJWT against keys from a PEM or JWKS file.

Checked: signature (RS256 only: ``alg: none``, HS256 - including HS256 keyed with our public
key - and every other algorithm are refused before any key is used), ``exp`` (required),
``nbf``, ``iat``, ``iss``, ``aud``, a maximum lifetime (``exp - iat``, default 1 h as in the
PRD), and the role claim (one of the four roles). The key file reloads when it changes, so
signing keys rotate without a restart (publish the new key in the JWKS before signing with it).
A JWKS with every signing key removed trusts none from then on; a file that does not load (not
JSON, a private part, a weak key) keeps the previous keys.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .identity import AuthMethod, Identity, Role

log = logging.getLogger(__name__)

ALGORITHM = 'RS256'
MIN_RSA_BITS = 2048


class NoSigningKeysError(ValueError):
    """A well-formed JWKS without one RS256 signing key: every token is to be refused."""


class TokenError(Exception):
    """A refused token; ``reason`` is a short label for metrics and the audit log."""

    def __init__(self, reason: str, detail: str = ''):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class JwtSettings:
    issuer: str
    audience: str
    public_key_file: Optional[str] = None  # PEM (a public key or a certificate)
    jwks_file: Optional[str] = None  # {"keys": [{"kty": "RSA", "kid": ..., "n", "e"}]}
    role_claim: str = 'role'
    client_claim: str = 'sub'
    leeway_s: float = 30.0
    max_lifetime_s: Optional[float] = 3600.0
    reload_interval_s: float = 1.0
    required_claims: Sequence[str] = field(
        default_factory=lambda: ('exp', 'iat', 'iss', 'aud', 'sub')
    )


def _check_rsa(key: Any, where: str) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f'{where}: not an RSA public key')
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f'{where}: RSA key of {key.key_size} bits (< {MIN_RSA_BITS})')
    return key


def load_pem_keys(path: str) -> Dict[Optional[str], rsa.RSAPublicKey]:
    with open(path, 'rb') as fh:
        data = fh.read()
    if b'BEGIN CERTIFICATE' in data:
        from cryptography import x509

        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    return {None: _check_rsa(key, path)}


def load_jwks_keys(path: str) -> Dict[Optional[str], rsa.RSAPublicKey]:
    with open(path, 'r', encoding='utf-8') as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get('keys'), list):
        raise ValueError(f'{path}: not a JWKS (an object with a "keys" list)')
    keys: Dict[Optional[str], rsa.RSAPublicKey] = {}
    for i, jwk in enumerate(doc['keys']):
        if not isinstance(jwk, dict):
            raise ValueError(f'{path}: key {i} is not a JSON object')
        if jwk.get('kty') != 'RSA' or jwk.get('use', 'sig') != 'sig':
            continue
        if jwk.get('alg', ALGORITHM) != ALGORITHM:
            continue
        if 'd' in jwk:
            raise ValueError(f'{path}: key {i} contains a private part; publish public keys only')
        try:
            key = pyjwt.PyJWK(jwk, algorithm=ALGORITHM).key
        except pyjwt.PyJWTError as exc:     # a key without n or e, say
            raise ValueError(f'{path}: key {i}: {exc}') from None
        keys[jwk.get('kid')] = _check_rsa(key, f'{path} key {i}')
    if not keys:
        raise NoSigningKeysError(f'{path}: no RS256 signing keys')
    return keys


class JwtVerifier:
    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.monotonic):
        if not (settings.public_key_file or settings.jwks_file):
            raise ValueError('jwt: set public_key_file or jwks_file')
        if not settings.issuer or not settings.audience:
            raise ValueError('jwt: issuer and audience are required')
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Dict[Optional[str], rsa.RSAPublicKey] = {}
        self._sig = None
        self._next_check = 0.0
        self.reload(force=True)

    @property
    def _path(self) -> str:
        return self.settings.jwks_file or self.settings.public_key_file

    def reload(self, force: bool = False) -> bool:
        try:
            st = os.stat(self._path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if not force and sig == self._sig:
            return False
        try:
            keys = (
                load_jwks_keys(self._path)
                if self.settings.jwks_file
                else load_pem_keys(self._path)
            )
        except NoSigningKeysError as exc:
            if force and not self._keys:
                raise
            # every key was taken out (all of them distrusted): keeping the old ones would
            # keep honouring tokens signed with a key its owner withdrew
            log.error('JWT key file %s: %s; every token is refused until one is published',
                      self._path, exc)
            keys = {}
        except (OSError, ValueError) as exc:
            if force and not self._keys:
                raise
            log.error('JWT key file %s not reloaded (keeping old keys): %s', self._path, exc)
            return False
        with self._lock:
            self._keys, self._sig = keys, sig
        return True

    def _key_for(self, kid: Optional[str]) -> rsa.RSAPublicKey:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.settings.reload_interval_s
            self.reload()
        with self._lock:
            keys = dict(self._keys)
        if kid is not None and kid in keys:
            return keys[kid]
        if len(keys) == 1 and (kid is None or None in keys):
            return next(iter(keys.values()))
        raise TokenError('unknown_kid', 'no signing key for this token')

    def verify(self, token: str) -> Dict[str, Any]:
        """The verified claims, or TokenError."""
        s = self.settings
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise TokenError('malformed', 'malformed token') from None
        if header.get('alg') != ALGORITHM:
            raise TokenError(
                'bad_algorithm', f'algorithm {str(header.get("alg"))[:16]!r} not accepted'
            )
        if 'jku' in header or 'jwk' in header or 'x5u' in header:
            raise TokenError('bad_header', 'embedded or remote keys are not accepted')
        key = self._key_for(header.get('kid'))
        try:
            claims = pyjwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={
                    'require': list(s.required_claims),
                    'verify_signature': True,
                    'verify_exp': True,
                    'verify_nbf': True,
                    'verify_iat': True,
                    'verify_aud': True,
                    'verify_iss': True,
                },
            )
        except pyjwt.ExpiredSignatureError:
            raise TokenError('expired', 'token expired') from None
        except pyjwt.ImmatureSignatureError:
            raise TokenError('not_yet_valid', 'token not yet valid') from None
        except pyjwt.InvalidAudienceError:
            raise TokenError('bad_audience', 'wrong audience') from None
        except pyjwt.InvalidIssuerError:
            raise TokenError('bad_issuer', 'wrong issuer') from None
        except pyjwt.MissingRequiredClaimError as exc:
            raise TokenError('missing_claim', f'missing claim {exc.claim}') from None
        except pyjwt.InvalidSignatureError:
            raise TokenError('bad_signature', 'signature verification failed') from None
        except pyjwt.PyJWTError:
            raise TokenError('invalid', 'invalid token') from None
        if s.max_lifetime_s is not None:
            try:
                # exact: pyjwt takes integers of any size, which float() cannot hold
                lifetime = claims['exp'] - claims['iat']
            except (KeyError, TypeError):
                raise TokenError('missing_claim', 'exp and iat required') from None
            if lifetime > s.max_lifetime_s + s.leeway_s:
                raise TokenError('lifetime_too_long', 'token lifetime exceeds the maximum')
        return claims

    def identity(self, token: str) -> Identity:
        claims = self.verify(token)
        s = self.settings
        role_raw = claims.get(s.role_claim)
        role = Role.parse(role_raw)
        if role is None:
            raise TokenError('bad_role', 'role claim missing or unknown')
        subject = claims.get('sub')
        if not isinstance(subject, str) or not subject:
            raise TokenError('missing_claim', 'sub must be a non-empty string')
        client = claims.get(s.client_claim, subject)
        return Identity(
            subject=subject,
            role=role,
            method=AuthMethod.JWT,
            client=f'jwt:{client}',
            claims=claims,
        )


# ---- helpers for issuing tokens (development, tests, tooling; not used by the server) ----


def public_jwk(public_key: rsa.RSAPublicKey, kid: str) -> dict:
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    jwk.update({'kid': kid, 'use': 'sig', 'alg': ALGORITHM})
    return jwk


def write_jwks(path: str, public_keys: Dict[str, rsa.RSAPublicKey]) -> None:
    doc = {'keys': [public_jwk(k, kid) for kid, k in public_keys.items()]}
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def issue_token(
    private_key: Any,
    *,
    subject: str,
    role: str,
    issuer: str,
    audience: str,
    lifetime_s: float = 3600,
    kid: Optional[str] = None,
    now: Optional[float] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    now = int(time.time() if now is None else now)
    claims: Dict[str, Any] = {
        'sub': subject,
        'role': role,
        'iss': issuer,
        'aud': audience,
        'iat': now,
        'nbf': now,
        'exp': now + int(lifetime_s),
    }
    claims.update(extra or {})
    headers: Dict[str, Any] = {'kid': kid} if kid else {}
    return pyjwt.encode(claims, private_key, algorithm=ALGORITHM, headers=headers)


def known_roles() -> List[str]:
    return [r.value for r in Role]
