"""The guard chain shared by every network door (REST, gRPC); the ROS node takes its breaker.

authenticate (API key, JWT, client certificate) -> authorise (RBAC, one permission table)
-> rate limit (token buckets) -> [engine admission] -> circuit breaker per model, with an
append-only audit log. See SECURITY.md for the threat model and configuration.

    from akidb_ros.guard import Guard, Credentials, Permission, load_security_config
    guard = Guard(load_security_config())
    decision = guard.check('POST /api/v1/embed', Credentials(api_key=...), transport='rest')

The names below load their module on first use (PEP 562), so a process that needs one part
(the ROS node takes only ``breaker``) does not import JWT, cryptography and Flask with it:
about 0.1-0.2 s of a node's start here.
"""
from importlib import import_module
from typing import Any

# public name -> (module, name in it)
_EXPORTS = {
    'AuditLog': ('audit', 'AuditLog'),
    'BreakerRegistry': ('breaker', 'BreakerRegistry'),
    'BreakerSettings': ('breaker', 'BreakerSettings'),
    'CircuitBreaker': ('breaker', 'CircuitBreaker'),
    'BreakerState': ('breaker', 'State'),
    'Decision': ('chain', 'Decision'),
    'Guard': ('chain', 'Guard'),
    'guard_from_env': ('chain', 'guard_from_env'),
    'peer_host': ('chain', 'peer_host'),
    'SecurityConfig': ('config', 'SecurityConfig'),
    'SecurityConfigError': ('config', 'SecurityConfigError'),
    'check_bind': ('config', 'check_bind'),
    'load_security_config': ('config', 'load'),
    'startup_banner': ('config', 'startup_banner'),
    'ANONYMOUS': ('identity', 'ANONYMOUS'),
    'AuthMethod': ('identity', 'AuthMethod'),
    'Credentials': ('identity', 'Credentials'),
    'Identity': ('identity', 'Identity'),
    'Role': ('identity', 'Role'),
    'credentials_from_grpc': ('identity', 'credentials_from_grpc'),
    'credentials_from_headers': ('identity', 'credentials_from_headers'),
    'credentials_from_wsgi': ('identity', 'credentials_from_wsgi'),
    'RateLimitDecision': ('ratelimit', 'RateLimitDecision'),
    'RateLimitedError': ('ratelimit', 'RateLimitedError'),
    'RateLimiter': ('ratelimit', 'RateLimiter'),
    'GuardInterceptor': ('integrations', 'GuardInterceptor'),
    'current_decision': ('integrations', 'current_decision'),
    'install_flask': ('integrations', 'install_flask'),
    'ReloadingTLSContext': ('mtls', 'ReloadingTLSContext'),
    'TLSSettings': ('mtls', 'TLSSettings'),
    'grpc_server_credentials': ('mtls', 'grpc_server_credentials'),
    'prepare_grpc_tls13': ('mtls', 'prepare_grpc_tls13'),
    'PERMISSION_TABLE': ('rbac', 'PERMISSION_TABLE'),
    'Permission': ('rbac', 'Permission'),
    'permission_for': ('rbac', 'permission_for'),
    'TLSFront': ('tls_front', 'TLSFront'),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use, then keep the name here."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}') from None
    value = getattr(import_module(f'.{module}', __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
