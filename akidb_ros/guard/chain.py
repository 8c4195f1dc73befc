"""The guard chain every door calls before the backend:

    authenticate -> authorise (RBAC) -> rate limit -> [engine admission/queue] -> breaker

Transport-independent: a door turns what arrived into :class:`Credentials` and a route or
operation name, and maps the :class:`EngineError` it may get through the one error table
(UNAUTHENTICATED 401, PERMISSION_DENIED 403, RATE_LIMITED 429, CIRCUIT_OPEN 503).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Union
from urllib.parse import unquote

from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import Priority

from . import rbac
from .apikeys import ApiKeyStore
from .audit import AuditLog
from .breaker import BreakerRegistry, BreakerSettings, CircuitBreaker, State
from .config import SecurityConfig, from_dict
from .identity import ANONYMOUS, AuthMethod, Credentials, Identity, Role, credentials_from_headers
from .jwt import JwtSettings, JwtVerifier, TokenError
from .mtls import CertIdentitySettings, TLSSettings, identity_from_cert
from .ratelimit import (
    BucketSpec,
    RateLimitDecision,
    RateLimitedError,
    RateLimiter,
    RateLimitSettings,
)
from .rbac import Permission

log = logging.getLogger('akidb_ros.guard')

# A transport's decision older than this when its request reaches the door (an EmbedStream's
# first message, sent a while after the stream opened) has its credentials checked again;
# a unary call's reaches the door within milliseconds and is not checked twice.
STALE_DECISION_S = 1.0
_PEER_HOST = re.compile(r'^(?:ipv4:|ipv6:)?\[?([^\]]*?)\]?(?::\d+)?$')


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:5123' / '10.0.0.7' / 'ipv6:[::1]:5' -> the host part.

    gRPC percent-encodes the brackets of an IPv6 peer ('ipv6:%5B::1%5D:5'): decoded here, or
    every connection (every port) of one host would count as a host of its own.
    """
    if not peer:
        return 'unknown'
    if peer.startswith('ipv6:'):
        rest = unquote(peer[5:])
        return rest[1:rest.index(']')] if rest.startswith('[') and ']' in rest else rest
    if peer.count(':') > 1 and not peer.startswith(('ipv4:', '[')):
        return peer  # bare IPv6 address
    m = _PEER_HOST.match(peer)
    return (m.group(1) if m else peer) or 'unknown'


@dataclass
class Decision:
    """What a door needs after a successful check."""

    identity: Identity
    permission: Permission
    rate: Optional[RateLimitDecision] = None
    headers: Dict[str, str] = field(default_factory=dict)  # X-RateLimit-* to add to the reply
    # it served a request already: each further request of the same call (the messages of an
    # EmbedStream) is checked again by ``door_hook`` (credentials, role, a token of its own)
    spent: bool = False
    at: float = field(default_factory=time.monotonic)     # when it was made

    @property
    def priority(self) -> Priority:
        """The engine lane: ADMIN for a caller authenticated as an admin, else NORMAL.

        Not for the identity of a guard with authentication off (the development profile):
        its role is every caller's, so an admin lane for it would hold all the traffic, and
        admission would never shed normal work at its threshold (the queue filled to 100 %).
        """
        if self.identity.role is Role.ADMIN and self.identity.method is not AuthMethod.DISABLED:
            return Priority.ADMIN
        return Priority.NORMAL


def _rate_limited(d: RateLimitDecision, transport: str) -> RateLimitedError:
    """A refused token: counted by scope and transport, as the error the doors answer 429."""
    from akidb_ros.observability import metrics

    metrics.RATE_LIMITED.labels(scope=d.scope, transport=transport or 'none').inc()
    return RateLimitedError(d)


class Guard:
    def __init__(
        self,
        cfg: Union[SecurityConfig, Dict[str, Any], None] = None,
        clock: Callable[[], float] = time.monotonic,
        audit: Optional[AuditLog] = None,
    ):
        if cfg is None or isinstance(cfg, dict):
            cfg = from_dict(cfg)
        self.cfg = cfg
        self._clock = clock
        a = cfg['auth']
        au = cfg['audit']
        self.audit = audit or AuditLog(
            au['file'] if au['enabled'] else None, max_bytes=au['max_bytes'], backups=au['backups']
        )
        self.keys: Optional[ApiKeyStore] = None
        self.jwt: Optional[JwtVerifier] = None
        if a['enabled'] and a['api_keys']['enabled']:
            self.keys = ApiKeyStore(
                a['api_keys']['file'], a['api_keys']['reload_interval_s'], clock=clock
            )
        if a['enabled'] and a['jwt']['enabled']:
            j = a['jwt']
            self.jwt = JwtVerifier(
                JwtSettings(
                    issuer=j['issuer'],
                    audience=j['audience'],
                    public_key_file=j['public_key_file'],
                    jwks_file=j['jwks_file'],
                    role_claim=j['role_claim'],
                    client_claim=j['client_claim'],
                    leeway_s=j['leeway_s'],
                    max_lifetime_s=j['max_lifetime_s'],
                    reload_interval_s=j['reload_interval_s'],
                ),
                clock=clock,
            )
        m = a['mtls']
        self.cert_settings = CertIdentitySettings(
            role_from_ou=m['role_from_ou'],
            role_map=dict(m['role_map']),
            default_role=m['default_role'],
        )
        self.api_key_header = a['api_keys']['header']
        rl = cfg['rate_limit']
        self.limiter = RateLimiter(
            RateLimitSettings(
                enabled=rl['enabled'],
                per_client=BucketSpec(**rl['per_client']),
                global_=BucketSpec(**rl['global']),
                roles={r: BucketSpec(**spec) for r, spec in rl['roles'].items()},
                max_clients=rl['max_clients'],
            ),
            clock=clock,
        )
        # refusals (401/403) per peer host: beyond this, 429 and no audit line per refusal
        self.failure_limiter = RateLimiter(
            RateLimitSettings(
                enabled=rl['enabled'],
                per_client=BucketSpec(**rl['auth_failures']),
                max_clients=rl['max_clients'],
                use_global=False,
            ),
            clock=clock,
        )
        b = cfg['breaker']
        self.breakers_enabled = b['enabled']
        self.breakers = BreakerRegistry(
            BreakerSettings(
                window=b['window'],
                min_calls=b['min_calls'],
                failure_ratio=b['failure_ratio'],
                open_s=b['open_s'],
                half_open_probes=b['half_open_probes'],
            ),
            clock=clock,
            on_transition=self._breaker_transition,
        )
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def tls_settings(self) -> Optional[TLSSettings]:
        t = self.cfg['tls']
        if not t['enabled']:
            return None
        return TLSSettings(
            t['cert_file'],
            t['key_file'],
            t['ca_file'],
            t['require_client_cert'],
            t['reload_interval_s'],
        )

    def _fail(
        self,
        code: ErrorCode,
        message: str,
        *,
        method: str,
        reason: str,
        transport: str,
        action: str,
        request_id: str,
        actor: Any,
        peer: str = '',
    ) -> EngineError:
        from akidb_ros.observability import metrics

        metrics.AUTH_FAILURES.labels(
            method=method, reason=reason, transport=transport or 'none'
        ).inc()
        d = self.failure_limiter.check(f'fail:{peer or "unknown"}')
        if not d.allowed:
            # a flood of refused credentials: 429, counted but not audited line by line
            return _rate_limited(replace(d, scope='auth_failures'), transport)
        event = 'auth_failure' if code is ErrorCode.UNAUTHENTICATED else 'permission_denied'
        self.audit.record(
            event,
            outcome='denied',
            actor=actor,
            action=action,
            request_id=request_id,
            transport=transport,
            reason=reason,
            peer=peer,
        )
        return EngineError(code, message)

    def _breaker_transition(self, model: str, old: State, new: State) -> None:
        lvl = logging.WARNING if new is not State.CLOSED else logging.INFO
        log.log(lvl, 'circuit breaker %s: %s -> %s', model, old.name, new.name)
        self.audit.record(
            'breaker_transition',
            outcome=new.name.lower(),
            actor={'system': 'breaker'},
            action=f'model {model}',
            previous=old.name.lower(),
        )

    # ------------------------------------------------------------------ 1. authenticate
    def authenticate(
        self, creds: Credentials, *, transport: str = '', request_id: str = '', action: str = ''
    ) -> Identity:
        """The caller's identity; ANONYMOUS when no credential was presented.

        A credential that is presented but malformed, unknown, expired, revoked or forged is
        UNAUTHENTICATED right here (it never degrades to anonymous).
        """
        a = self.cfg['auth']
        peer = peer_host(creds.peer)
        if not a['enabled']:
            return Identity(
                subject='dev',
                role=Role(a['disabled_role']),
                method=AuthMethod.DISABLED,
                client=f'peer:{peer}',
            )
        fail = dict(transport=transport, action=action, request_id=request_id, peer=peer)
        if creds.malformed:
            raise self._fail(
                ErrorCode.UNAUTHENTICATED,
                'malformed credentials',
                method='header',
                reason='malformed',
                actor={'peer': peer},
                **fail,
            )
        if creds.api_key and creds.bearer:
            raise self._fail(
                ErrorCode.UNAUTHENTICATED,
                'send one credential, not several',
                method='header',
                reason='ambiguous',
                actor={'peer': peer},
                **fail,
            )
        if creds.api_key:
            if self.keys is None:
                raise self._fail(
                    ErrorCode.UNAUTHENTICATED,
                    'API keys are not accepted here',
                    method='api_key',
                    reason='method_disabled',
                    actor={'peer': peer},
                    **fail,
                )
            res = self.keys.verify(creds.api_key)
            if not res.ok:
                actor = {
                    'method': 'api_key',
                    'key_id': res.key_id,
                    'peer': peer,
                }
                msg = {'expired': 'API key expired', 'revoked': 'API key revoked'}.get(
                    res.reason, 'invalid API key'
                )
                raise self._fail(
                    ErrorCode.UNAUTHENTICATED,
                    msg,
                    method='api_key',
                    reason=res.reason,
                    actor=actor,
                    **fail,
                )
            rec = res.record
            return Identity(
                subject=rec.client,
                role=rec.role,
                method=AuthMethod.API_KEY,
                client=f'key:{rec.client}',
                key_id=rec.id,
            )
        if creds.bearer:
            if self.jwt is None:
                raise self._fail(
                    ErrorCode.UNAUTHENTICATED,
                    'bearer tokens are not accepted here',
                    method='jwt',
                    reason='method_disabled',
                    actor={'peer': peer},
                    **fail,
                )
            try:
                return self.jwt.identity(creds.bearer)
            except TokenError as exc:
                raise self._fail(
                    ErrorCode.UNAUTHENTICATED,
                    f'invalid token: {exc}',
                    method='jwt',
                    reason=exc.reason,
                    actor={'method': 'jwt', 'peer': peer},
                    **fail,
                ) from None
        if creds.peer_cert is not None and a['mtls']['enabled']:
            try:
                return identity_from_cert(creds.peer_cert, self.cert_settings)
            except (ValueError, TypeError) as exc:
                raise self._fail(
                    ErrorCode.UNAUTHENTICATED,
                    'unusable client certificate',
                    method='mtls',
                    reason='bad_certificate',
                    actor={'peer': peer, 'error': str(exc)[:200]},
                    **fail,
                ) from None
        return ANONYMOUS

    # ------------------------------------------------------------------ 2. authorise
    def authorize(
        self,
        identity: Identity,
        what: Union[Permission, str],
        *,
        transport: str = '',
        request_id: str = '',
        peer: str = '',
    ) -> Permission:
        """Raise 401/403 per the permission table. ``what``: a Permission, a route/method key
        (``'POST /api/v1/embed'``, ``'/akidb.embedding.v1.EmbeddingService/Embed'``)."""
        perm = what if isinstance(what, Permission) else rbac.permission_for(what)
        action = what.value if isinstance(what, Permission) else str(what)
        try:
            rbac.check(identity, perm)
        except EngineError as exc:
            reason = 'unauthenticated' if exc.code is ErrorCode.UNAUTHENTICATED else 'forbidden'
            raise self._fail(
                exc.code,
                exc.message,
                method=identity.method.value,
                reason=reason,
                transport=transport,
                action=action,
                request_id=request_id,
                actor=identity,
                peer=peer_host(peer),
            ) from None
        return perm

    # ------------------------------------------------------------------ 3. rate limit
    def rate_limit(
        self, identity: Identity, *, transport: str = '', request_id: str = ''
    ) -> RateLimitDecision:
        """Take a token or raise RateLimitedError (an EngineError RATE_LIMITED with .headers)."""
        role = identity.role.value if identity.role else None
        d = self.limiter.check(identity.client_id, role)
        if not d.allowed:
            raise _rate_limited(d, transport)
        return d

    # ------------------------------------------------------------------ 5. breaker
    def breaker_for(self, model: str) -> CircuitBreaker:
        return self.breakers.get(model or 'default')

    # ------------------------------------------------------------------ the chain
    def check(
        self,
        what: Union[Permission, str],
        creds: Credentials,
        *,
        transport: str = '',
        request_id: str = '',
    ) -> Decision:
        """authenticate -> authorise -> rate limit for one request. PUBLIC routes (liveness)
        skip all three so probes always get through."""
        perm = what if isinstance(what, Permission) else rbac.permission_for(what)
        if perm is Permission.PUBLIC:
            return Decision(ANONYMOUS, perm)
        action = what.value if isinstance(what, Permission) else str(what)
        identity = self.authenticate(
            creds, transport=transport, request_id=request_id, action=action
        )
        # the route or method itself, so a 403's audit line names what was tried
        self.authorize(identity, what, transport=transport, request_id=request_id, peer=creds.peer)
        d = self.rate_limit(identity, transport=transport, request_id=request_id)
        return Decision(identity, perm, d, d.headers())

    def door_hook(self, call: Any) -> Optional[Callable[[Optional[EngineError]], None]]:
        """The ``GuardHook`` of ``akidb_ros.doors``: pass ``guard=guard.door_hook`` to the doors.

        Sets ``call.principal`` (Identity) and ``call.response_headers`` (X-RateLimit-*), and for
        ``embed`` takes a circuit-breaker permit for ``call.model``; the returned callback
        records the backend's outcome (and audits admin actions).
        """
        op = call.operation
        perm = rbac.operation_permission(op)
        from .integrations import current_decision

        pre = current_decision()

        def creds() -> Credentials:
            return credentials_from_headers(
                call.headers or {},
                peer=call.peer or '',
                peer_cert=getattr(call, 'peer_cert', None),
                api_key_header=self.api_key_header,
            )
        if pre is not None and not pre.spent:
            # the transport layer (install_flask / GuardInterceptor) already authenticated,
            # authorised the route and took a rate-limit token: check the operation only
            if time.monotonic() - pre.at > STALE_DECISION_S:
                # an EmbedStream's first message, sent long after the stream opened: its
                # credentials again (a key revoked meanwhile); its token was taken at the open
                pre.identity = self.authenticate(
                    creds(), transport=call.transport, request_id=call.request_id,
                    action=perm.value)
            self.authorize(
                pre.identity,
                perm,
                transport=call.transport,
                request_id=call.request_id,
                peer=call.peer or '',
            )
            decision = pre
            pre.spent = True
        else:
            # no transport check, or a later request of the same call (the messages of an
            # EmbedStream): the whole chain again, so a key revoked or a token expired while
            # the stream is open stops it at its next message, and each takes its own token
            decision = self.check(
                perm, creds(), transport=call.transport, request_id=call.request_id
            )
        call.principal = decision.identity
        call.response_headers = decision.headers
        if hasattr(call, 'priority'):
            call.priority = decision.priority  # admin callers: the engine's priority lane
        breaker = permit = None
        if op == 'embed' and self.breakers_enabled:
            breaker = self.breaker_for(getattr(call, 'model', '') or 'default')
            permit = breaker.allow()
        admin_op = perm is Permission.MODELS_ADMIN

        def done(error: Optional[EngineError]) -> None:
            if breaker is not None:
                breaker.record(permit, error, getattr(call, 'caller_deadline', False))
            if op == 'load_model' and error is None and self.breakers_enabled:
                self.breakers.reprieve(getattr(call, 'model', ''))   # mended: probe it now
            if admin_op:
                self.audit.record(
                    'admin_action',
                    outcome='success' if error is None else 'failure',
                    actor=decision.identity,
                    action=f'{op} {getattr(call, "model", "")}',
                    request_id=call.request_id,
                    transport=call.transport,
                    **({'code': error.code.name} if error is not None else {}),
                )

        return done


def guard_from_env() -> Guard:
    """A Guard for the configuration named by AKIDB_SECURITY_CONFIG / AKIDB_SECURITY_PROFILE."""
    from .config import load

    return Guard(load())
