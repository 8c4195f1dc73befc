"""The guard chain shared by every network door (REST, gRPC).

authenticate (API key, JWT, client certificate) -> authorise (RBAC, one permission table)
-> rate limit (token buckets) -> [engine admission] -> circuit breaker per model, with an
append-only audit log. See SECURITY.md for the threat model and configuration.

    from akidb_ros.guard import Guard, Credentials, Permission, load_security_config
    guard = Guard(load_security_config())
    decision = guard.check('POST /api/v1/embed', Credentials(api_key=...), transport='rest')
"""

from .audit import AuditLog
from .breaker import BreakerSettings, CircuitBreaker, State as BreakerState
from .chain import Decision, Guard, guard_from_env, peer_host
from .config import (
    SecurityConfig,
    SecurityConfigError,
    check_bind,
    load as load_security_config,
    startup_banner,
)
from .identity import (
    ANONYMOUS,
    AuthMethod,
    Credentials,
    Identity,
    Role,
    credentials_from_grpc,
    credentials_from_headers,
    credentials_from_wsgi,
)
from .ratelimit import RateLimitDecision, RateLimitedError, RateLimiter
from .integrations import GuardInterceptor, current_decision, install_flask
from .mtls import ReloadingTLSContext, TLSSettings, grpc_server_credentials, prepare_grpc_tls13
from .rbac import PERMISSION_TABLE, Permission, permission_for
from .tls_front import TLSFront

__all__ = [
    'GuardInterceptor',
    'ReloadingTLSContext',
    'TLSFront',
    'TLSSettings',
    'current_decision',
    'grpc_server_credentials',
    'install_flask',
    'prepare_grpc_tls13',
    'ANONYMOUS',
    'AuditLog',
    'AuthMethod',
    'BreakerSettings',
    'BreakerState',
    'CircuitBreaker',
    'Credentials',
    'Decision',
    'Guard',
    'Identity',
    'PERMISSION_TABLE',
    'Permission',
    'RateLimitDecision',
    'RateLimitedError',
    'RateLimiter',
    'Role',
    'SecurityConfig',
    'SecurityConfigError',
    'check_bind',
    'credentials_from_grpc',
    'credentials_from_headers',
    'credentials_from_wsgi',
    'guard_from_env',
    'load_security_config',
    'peer_host',
    'permission_for',
    'startup_banner',
]
