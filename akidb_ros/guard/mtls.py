"""TLS 1.3 (optionally mutual) for REST and gRPC, identity from the client certificate,
certificate rotation without a restart.

REST (``ssl``): :class:`ReloadingTLSContext` gives one ``ssl.SSLContext`` to hand to the HTTP
server (Werkzeug: ``app.run(ssl_context=tls.context)``; ``http.server``: ``wrap_socket``).
It accepts TLS 1.3 only, and with ``require_client_cert`` refuses a client without a
certificate signed by the configured CA during the handshake. On each handshake it checks
(at most every ``reload_interval_s``) whether the certificate, key or CA files changed; if so it
builds a fresh context and switches the connection to it from the SNI callback (OpenSSL calls it
for every ClientHello, with or without SNI), so new connections get the new certificate while
established ones finish undisturbed. A half-written or mismatched pair is refused and the
previous context kept.

gRPC: :func:`grpc_server_credentials` returns ``grpc.dynamic_ssl_server_credentials`` whose
fetcher re-reads the files when they change (same rotation semantics). Python gRPC exposes no
minimum-TLS-version setting, so TLS 1.2 is closed through gRPC core's documented
``GRPC_SSL_CIPHER_SUITES`` variable: it only governs TLS <= 1.2 suites (TLS 1.3 suites are fixed
in BoringSSL), and we set it to a PSK-only suite that a certificate server can never negotiate,
so every TLS 1.2 ClientHello fails with "no shared cipher" while TLS 1.3 is unaffected. gRPC reads
it once when it is imported: call :func:`prepare_grpc_tls13` before ``import grpc`` (the server
entry point does), or export it in the environment.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .identity import AuthMethod, Identity, PeerCert, Role

log = logging.getLogger(__name__)


@dataclass
class TLSSettings:
    cert_file: str
    key_file: str
    ca_file: Optional[str] = None  # CA that signs client certificates (mTLS)
    require_client_cert: bool = True
    reload_interval_s: float = 5.0


class TLSFilesError(ValueError):
    """A certificate, key or CA file that is missing, unreadable or does not fit the others."""


def _reason(exc: Exception) -> str:
    """'No such file or directory', 'KEY_VALUES_MISMATCH' ...: the cause without the noise."""
    return getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or str(exc)


def build_server_context(s: TLSSettings) -> ssl.SSLContext:
    """A fresh TLS 1.3-only server context (raises on a bad/mismatched cert-key pair)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    try:
        ctx.load_cert_chain(s.cert_file, s.key_file)
    except (OSError, ssl.SSLError) as exc:   # ssl names neither file; the operator needs both
        raise TLSFilesError(f'tls.cert_file {s.cert_file} / tls.key_file {s.key_file}: '
                            f'{_reason(exc)}') from None
    if s.require_client_cert:
        if not s.ca_file:
            raise ValueError('tls.require_client_cert needs tls.ca_file (the client CA)')
        try:
            ctx.load_verify_locations(cafile=s.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSFilesError(f'tls.ca_file {s.ca_file}: {_reason(exc)}') from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_client_context(
    ca_file: str,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
    tls_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> ssl.SSLContext:
    """A client context (tools, tests, the REST client): verifies the server against ca_file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = tls_version
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _file_sig(paths) -> Tuple:
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            sig.append((p, None))
    return tuple(sig)


class ReloadingTLSContext:
    """One stable server ``SSLContext`` whose certificate follows the files on disk."""

    def __init__(
        self,
        settings: TLSSettings,
        clock: Callable[[], float] = time.monotonic,
        on_reload: Optional[Callable[[str, str], None]] = None,
    ):
        self.settings = settings
        self._clock = clock
        self._on_reload = on_reload  # (outcome, detail) -> None, e.g. audit
        self._lock = threading.Lock()
        self._paths = [p for p in (settings.cert_file, settings.key_file, settings.ca_file) if p]
        self._sig = _file_sig(self._paths)
        self._current = build_server_context(settings)
        self._front = build_server_context(settings)
        self._front.sni_callback = self._on_client_hello
        self._next_check = self._clock() + settings.reload_interval_s
        self.generation = 0

    @property
    def context(self) -> ssl.SSLContext:
        """Hand this to the server; it stays valid across rotations."""
        return self._front

    def current(self) -> ssl.SSLContext:
        with self._lock:
            return self._current

    def maybe_reload(self, force: bool = False) -> bool:
        now = self._clock()
        with self._lock:
            if not force and now < self._next_check:
                return False
            self._next_check = now + self.settings.reload_interval_s
            sig = _file_sig(self._paths)
            if not force and sig == self._sig:
                return False
        try:
            ctx = build_server_context(self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                'TLS files changed but do not load (keeping the previous certificate): %s', exc
            )
            if self._on_reload:
                self._on_reload('failure', type(exc).__name__)
            return False
        with self._lock:
            self._current, self._sig = ctx, sig
            self.generation += 1
        log.info('TLS certificate reloaded (generation %d)', self.generation)
        if self._on_reload:
            self._on_reload('success', f'generation {self.generation}')
        return True

    def _on_client_hello(self, sslobj, server_name, _ctx) -> None:
        try:
            self.maybe_reload()
            sslobj.context = self.current()
        except (
            Exception
        ):  # noqa: BLE001 - a callback exception would abort the handshake obscurely
            log.exception('TLS context switch failed; serving the previous certificate')
        return None


# ---------------- identity from a verified client certificate ----------------


@dataclass
class CertIdentitySettings:
    role_from_ou: bool = True  # OU=<role> in the subject (CA decides roles)
    role_map: Dict[str, str] = field(default_factory=dict)  # CN -> role (wins over OU)
    default_role: Optional[str] = None  # role for a valid cert with no mapping


def _subject_from_dict(cert: Mapping[str, Any]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for rdn in cert.get('subject', ()):
        for name, value in rdn:
            out.setdefault(name, value)
    return {
        'CN': out.get('commonName', ''),
        'OU': out.get('organizationalUnitName', ''),
        'O': out.get('organizationName', ''),
    }


def _subject_from_x509(data: PeerCert) -> Dict[str, str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    raw = data.encode('ascii') if isinstance(data, str) else bytes(data)
    cert = (
        x509.load_pem_x509_certificate(raw)
        if b'-----BEGIN' in raw
        else x509.load_der_x509_certificate(raw)
    )

    def attr(oid):
        vals = cert.subject.get_attributes_for_oid(oid)
        return str(vals[0].value) if vals else ''

    return {
        'CN': attr(NameOID.COMMON_NAME),
        'OU': attr(NameOID.ORGANIZATIONAL_UNIT_NAME),
        'O': attr(NameOID.ORGANIZATION_NAME),
    }


def cert_subject(peer_cert: PeerCert) -> Dict[str, str]:
    """CN/OU/O of a peer certificate given as getpeercert() dict, PEM or DER."""
    if isinstance(peer_cert, Mapping):
        return _subject_from_dict(peer_cert)
    return _subject_from_x509(peer_cert)


def identity_from_cert(peer_cert: PeerCert, settings: CertIdentitySettings) -> Identity:
    """Identity of a client whose certificate the TLS layer has already verified.

    Only call this with a certificate from the handshake (``getpeercert()``, Werkzeug's
    ``SSL_CLIENT_CERT``, gRPC's ``auth_context()['x509_pem_cert']``), never from a header.
    """
    subj = cert_subject(peer_cert)
    cn = subj['CN']
    if not cn:
        raise ValueError('client certificate has no common name')
    role = None
    if cn in settings.role_map:
        role = Role.parse(settings.role_map[cn])
    elif settings.role_from_ou and Role.parse(subj['OU']):
        role = Role.parse(subj['OU'])
    elif settings.default_role:
        role = Role.parse(settings.default_role)
    return Identity(subject=cn, role=role, method=AuthMethod.MTLS, client=f'cert:{cn}')


# ---------------- gRPC ----------------

GRPC_TLS13_ONLY_SUITES = (
    'ECDHE-PSK-CHACHA20-POLY1305'  # TLS<=1.2 suite needing a PSK: never agreed
)


def prepare_grpc_tls13() -> bool:
    """Close TLS 1.2 in gRPC. Must run before ``import grpc``; True when it is in effect."""
    current = os.environ.get('GRPC_SSL_CIPHER_SUITES')
    if current is None and 'grpc' not in sys.modules:
        os.environ['GRPC_SSL_CIPHER_SUITES'] = GRPC_TLS13_ONLY_SUITES
        return True
    return current == GRPC_TLS13_ONLY_SUITES


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, 'rb') as fh:
        return fh.read()


class GrpcCredentialsReloader:
    """Backs ``grpc.dynamic_ssl_server_credentials``: new certs are served without a restart."""

    def __init__(self, settings: TLSSettings, clock: Callable[[], float] = time.monotonic):
        import grpc

        self._grpc = grpc
        self.settings = settings
        self._clock = clock
        # The client CA only with client certificates required, as on REST: a TLS-only secret
        # (kubectl create secret tls) has no ca.crt, and gRPC would otherwise ask clients for
        # certificates it does not need.
        self._ca_file = settings.ca_file if settings.require_client_cert else None
        self._paths = [p for p in (settings.cert_file, settings.key_file, self._ca_file) if p]
        self._sig = _file_sig(self._paths)
        self._next_check = clock() + settings.reload_interval_s
        self.generation = 0
        self.initial = self._config()

    def _config(self):
        return self._grpc.ssl_server_certificate_configuration(
            [(_read(self.settings.key_file), _read(self.settings.cert_file))],
            root_certificates=_read(self._ca_file),
        )

    def fetch(self):
        """Called by gRPC per handshake; None keeps the current configuration."""
        now = self._clock()
        if now < self._next_check:
            return None
        self._next_check = now + self.settings.reload_interval_s
        sig = _file_sig(self._paths)
        if sig == self._sig:
            return None
        try:
            _check_pair(self.settings)
            cfg = self._config()
        except Exception as exc:  # noqa: BLE001 - keep serving the old pair
            log.error('gRPC TLS files changed but do not load (keeping the previous): %s', exc)
            return None
        self._sig = sig
        self.generation += 1
        log.info('gRPC TLS certificate reloaded (generation %d)', self.generation)
        return cfg

    def credentials(self):
        return self._grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,
            require_client_authentication=bool(self.settings.require_client_cert),
        )


def _check_pair(s: TLSSettings) -> None:
    """Refuse a half-rotated pair (new cert, old key) before gRPC sees it."""
    build_server_context(s)


def grpc_server_credentials(settings: TLSSettings, require_tls13: bool = True):
    """``grpc.ServerCredentials`` for ``server.add_secure_port(addr, creds)``.

    With ``require_tls13`` it refuses to build credentials unless :func:`prepare_grpc_tls13`
    took effect (i.e. ran before grpc was imported), so TLS 1.2 can never be served silently.
    """
    if require_tls13 and not prepare_grpc_tls13():
        raise RuntimeError(
            'gRPC would accept TLS 1.2: call akidb_ros.guard.mtls.prepare_grpc_tls13() '
            'before importing grpc, or export GRPC_SSL_CIPHER_SUITES=' + GRPC_TLS13_ONLY_SUITES
        )
    _check_pair(settings)   # also refuses client-cert checks without a CA
    return GrpcCredentialsReloader(settings).credentials()
