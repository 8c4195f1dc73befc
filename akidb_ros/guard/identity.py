"""Who is calling: roles, identities and the raw credentials a door hands to the guard.

A door never decides anything here; it only copies what arrived on the wire into
:class:`Credentials` (an ``X-API-Key`` header, an ``Authorization: Bearer`` header or gRPC
metadata, and the peer certificate the TLS layer verified) and passes it to the guard.
The parsers below are total: any header value, however malformed, yields either a
credential or ``None`` and never raises.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Tuple, Union


class Role(str, enum.Enum):
    """The PRD's four application roles (least to most privileged)."""

    VIEWER = 'viewer'  # read-only: models, health, API description
    OPERATOR = 'operator'  # health checks + metrics
    DEVELOPER = 'developer'  # read + embeddings
    ADMIN = 'admin'  # everything, incl. model load/unload

    @classmethod
    def parse(cls, value: Any) -> Optional['Role']:
        """A role from a string (case-insensitive), or None for anything else."""
        if isinstance(value, Role):
            return value
        if not isinstance(value, str):
            return None
        try:
            return cls(value.strip().lower())
        except ValueError:
            return None


class AuthMethod(str, enum.Enum):
    API_KEY = 'api_key'
    JWT = 'jwt'
    MTLS = 'mtls'
    ANONYMOUS = 'anonymous'  # no credential presented
    DISABLED = 'auth_disabled'  # development profile: authentication switched off


@dataclass(frozen=True)
class Identity:
    """An authenticated (or explicitly anonymous) caller."""

    subject: str  # stable id: key id, JWT sub, certificate CN, 'anonymous'
    role: Optional[Role]  # None: authenticated but no role (every permission -> 403)
    method: AuthMethod
    client: str = ''  # rate-limit bucket key; defaults to the subject
    key_id: str = ''  # API key id (never the key itself)
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def authenticated(self) -> bool:
        return self.method is not AuthMethod.ANONYMOUS

    @property
    def client_id(self) -> str:
        return self.client or self.subject

    def describe(self) -> dict:
        """A log/audit-safe description (no secrets: ids only)."""
        return {
            'subject': self.subject,
            'role': self.role.value if self.role else None,
            'method': self.method.value,
            'client': self.client_id,
            **({'key_id': self.key_id} if self.key_id else {}),
        }


ANONYMOUS = Identity(subject='anonymous', role=None, method=AuthMethod.ANONYMOUS)


PeerCert = Union[bytes, str, Mapping[str, Any], None]


@dataclass(frozen=True)
class Credentials:
    """Raw credentials as received. ``peer_cert`` must come from the TLS layer only.

    peer_cert: PEM text/bytes, DER bytes, or the dict of ``SSLSocket.getpeercert()``.
    peer: the remote address (used as the rate-limit key for anonymous callers).
    """

    api_key: Optional[str] = None
    bearer: Optional[str] = None
    peer_cert: PeerCert = None
    peer: str = ''
    malformed: Tuple[str, ...] = ()  # credentials that were present but unparseable

    @property
    def present(self) -> bool:
        return bool(self.api_key or self.bearer or self.malformed)

    def __repr__(self) -> str:  # never print a secret
        return (
            f'Credentials(api_key={"<set>" if self.api_key else None}, '
            f'bearer={"<set>" if self.bearer else None}, '
            f'peer_cert={"<set>" if self.peer_cert else None}, peer={self.peer!r}, '
            f'malformed={self.malformed!r})'
        )


# RFC 7235 token68 (the syntax of a bearer credential); JWTs and our API keys fit it.
_TOKEN68 = re.compile(r'[A-Za-z0-9\-._~+/]+=*')
_MAX_CREDENTIAL_LEN = 8192


def _clean_token(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        try:
            value = value.decode('ascii')
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    value = value.strip(' \t')
    if not value or len(value) > _MAX_CREDENTIAL_LEN or not _TOKEN68.fullmatch(value):
        return None
    return value


def parse_api_key_header(value: Any) -> Optional[str]:
    """The value of an ``X-API-Key`` header, or None when absent/malformed."""
    return _clean_token(value)


def parse_bearer(value: Any) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if isinstance(value, bytes):
        try:
            value = value.decode('ascii')
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    parts = value.strip(' \t').split(' ', 1)
    if len(parts) != 2 or parts[0].lower() != 'bearer':
        return None
    return _clean_token(parts[1])


def _lookup(items: Iterable[Tuple[Any, Any]], name: str) -> Tuple[bool, Any]:
    """(present, value) of header ``name``; a header sent twice has no usable value (None):
    gRPC keeps repeated metadata apart where WSGI joins them, and neither copy may win."""
    found, value = False, None
    for key, v in items:
        k = key.decode('latin-1') if isinstance(key, bytes) else str(key)
        if k.lower() == name:
            if found:
                return True, None
            found, value = True, v
    return found, value


def credentials_from_headers(
    headers: Union[Mapping[str, Any], Iterable[Tuple[Any, Any]]],
    peer: str = '',
    peer_cert: PeerCert = None,
    api_key_header: str = 'x-api-key',
) -> Credentials:
    """Credentials from HTTP headers or gRPC metadata (any mapping or (key, value) pairs).

    Header names are matched case-insensitively. A header that is present but malformed is
    recorded in ``malformed`` so the guard answers 401 instead of treating it as anonymous.
    """
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    malformed = []
    api_key = bearer = None
    found, raw = _lookup(items, api_key_header.lower())
    if found:
        api_key = parse_api_key_header(raw)
        if api_key is None:
            malformed.append('api_key')
    found, raw = _lookup(items, 'authorization')
    if found:
        bearer = parse_bearer(raw)
        if bearer is None:
            malformed.append('authorization')
    return Credentials(
        api_key=api_key, bearer=bearer, peer_cert=peer_cert, peer=peer, malformed=tuple(malformed)
    )


def credentials_from_wsgi(
    environ: Mapping[str, Any], api_key_header: str = 'X-API-Key'
) -> Credentials:
    """Credentials from a WSGI environ (Flask: ``request.environ``).

    The peer certificate is taken from ``SSL_CLIENT_CERT`` which Werkzeug's TLS server sets
    from the verified handshake (never from a request header).
    """
    want_key = 'HTTP_' + api_key_header.upper().replace('-', '_')
    headers = []
    if want_key in environ:
        headers.append(('x-api-key', environ[want_key]))
    if 'HTTP_AUTHORIZATION' in environ:
        headers.append(('authorization', environ['HTTP_AUTHORIZATION']))
    return credentials_from_headers(
        headers,
        peer=str(environ.get('REMOTE_ADDR', '')),
        peer_cert=environ.get('SSL_CLIENT_CERT') or None,
    )


def credentials_from_grpc(context: Any, api_key_header: str = 'x-api-key') -> Credentials:
    """Credentials from a ``grpc.ServicerContext``: metadata + the TLS auth context; the API
    key from ``api_key_header`` (the config's ``auth.api_keys.header``, as on REST)."""
    metadata = context.invocation_metadata() or ()
    auth = {}
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - insecure channels may not expose it
        auth = {}
    pem = auth.get('x509_pem_cert')
    cert = pem[0] if pem else None
    return credentials_from_headers(
        (
            [(m.key, m.value) for m in metadata]
            if metadata and hasattr(metadata[0], 'key')
            else metadata
        ),
        peer=str(context.peer() or ''),
        peer_cert=cert,
        api_key_header=api_key_header,
    )
