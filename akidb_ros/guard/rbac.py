"""Role-based access control: four roles and ONE permission table for every door.

Every REST route (``'METHOD /path'`` with Flask-style ``<param>`` segments) and every gRPC
method (``'/package.Service/Method'``) is declared here with the one permission it needs.
Anything not declared is denied to everyone but admin (default deny), so a route added to a
door without an entry here cannot silently become public.

Outcomes (exact codes asserted by test/guard/test_rbac_matrix.py):
  * permission PUBLIC                     -> allowed for everyone (liveness probes)
  * anonymous caller, any other permission -> UNAUTHENTICATED (HTTP 401 / gRPC UNAUTHENTICATED)
  * authenticated, role lacks permission  -> PERMISSION_DENIED (HTTP 403 / gRPC PERMISSION_DENIED)
"""

from __future__ import annotations

import enum
import re
from typing import Dict, FrozenSet, Iterator, Optional, Tuple

from akidb_ros.engine.errors import EngineError, ErrorCode

from .identity import Identity, Role


class Permission(str, enum.Enum):
    PUBLIC = 'public'  # no credential needed (liveness only)
    HEALTH_READ = 'health:read'  # detailed health, readiness
    METRICS_READ = 'metrics:read'  # Prometheus exposition
    MODELS_READ = 'models:read'  # list / describe models
    API_DOCS = 'api:docs'  # OpenAPI document, gRPC reflection
    EMBED = 'embed'  # create embeddings
    MODELS_ADMIN = 'models:admin'  # load / unload models


# The PRD's hierarchy: viewer "read-only (health, metrics)" < operator "viewer + operational
# tasks" (models read) < developer "operator + embedding generation" < admin "full access".
_VIEWER = frozenset({Permission.HEALTH_READ, Permission.METRICS_READ, Permission.API_DOCS})
_OPERATOR = _VIEWER | {Permission.MODELS_READ}
ROLE_PERMISSIONS: Dict[Role, FrozenSet[Permission]] = {
    Role.VIEWER: _VIEWER,
    Role.OPERATOR: _OPERATOR,
    Role.DEVELOPER: _OPERATOR | {Permission.EMBED},
    Role.ADMIN: frozenset(Permission),
}

_EMBED_SVC = '/akidb.embedding.v1.EmbeddingService/'

# The one permission table. Keys: REST 'METHOD /path' (HEAD follows GET), gRPC '/pkg.Svc/Method'.
PERMISSION_TABLE: Dict[str, Permission] = {
    # --- REST (akidb_ros/rest/app.py) ---
    'GET /health/live': Permission.PUBLIC,  # liveness probe: always open
    'GET /health/ready': Permission.HEALTH_READ,
    'GET /health': Permission.HEALTH_READ,
    'POST /api/v1/embed': Permission.EMBED,
    'POST /v1/embeddings': Permission.EMBED,  # OpenAI-compatible
    'GET /models': Permission.MODELS_READ,
    'POST /admin/models/load': Permission.MODELS_ADMIN,
    'POST /admin/models/unload': Permission.MODELS_ADMIN,
    'GET /metrics': Permission.METRICS_READ,
    'GET /openapi.json': Permission.API_DOCS,
    # --- gRPC: akidb.embedding.v1.EmbeddingService (proto/akidb/embedding/v1/embedding.proto) ---
    _EMBED_SVC + 'Embed': Permission.EMBED,
    _EMBED_SVC + 'EmbedStream': Permission.EMBED,
    _EMBED_SVC + 'Health': Permission.HEALTH_READ,
    _EMBED_SVC + 'ListModels': Permission.MODELS_READ,
    # --- gRPC: standard services ---
    '/grpc.health.v1.Health/Check': Permission.PUBLIC,  # kubelet gRPC probes send no metadata
    '/grpc.health.v1.Health/Watch': Permission.HEALTH_READ,
    '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo': Permission.API_DOCS,
    '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo': Permission.API_DOCS,
}

# The same permissions by door operation (``akidb_ros.doors.DoorCall.operation``); every
# route/method above maps to one of these (checked by the tests).
OPERATION_PERMISSIONS: Dict[str, Permission] = {
    'live': Permission.PUBLIC,
    'health': Permission.HEALTH_READ,
    'ready': Permission.HEALTH_READ,
    'embed': Permission.EMBED,
    'list_models': Permission.MODELS_READ,
    'load_model': Permission.MODELS_ADMIN,
    'unload_model': Permission.MODELS_ADMIN,
    'metrics': Permission.METRICS_READ,
    'openapi': Permission.API_DOCS,
    'reflection': Permission.API_DOCS,
}

DEFAULT_PERMISSION = Permission.MODELS_ADMIN  # undeclared route/method: admin only

_PARAM = re.compile(r'<[^<>]*>')


def _normalise(key: str) -> str:
    key = key.strip()
    if key.startswith('/'):  # gRPC full method name: exact
        return key
    method, _, path = key.partition(' ')
    method = method.upper()
    if method == 'HEAD':
        method = 'GET'
    path = _PARAM.sub('<>', path.strip())
    if len(path) > 1:
        path = path.rstrip('/')
    return f'{method} {path}'


_NORMALISED: Dict[str, Permission] = {_normalise(k): v for k, v in PERMISSION_TABLE.items()}
_PATTERNS: Tuple[Tuple[str, Tuple[str, ...], Permission], ...] = tuple(
    (k.split(' ', 1)[0], tuple(k.split(' ', 1)[1].split('/')), v)
    for k, v in _NORMALISED.items()
    if not k.startswith('/') and '<>' in k
)


def route_key(method: str, path: str) -> str:
    """The table key of a REST route (Flask: ``request.method``, ``request.url_rule.rule``)."""
    return f'{method} {path}'


def lookup(key: str) -> Optional[Permission]:
    """The declared permission of a route/method key, or None when undeclared.

    Accepts a Flask rule (``POST /api/v1/models/<model_id>/load``: parameter names do not
    matter), a concrete path (``POST /api/v1/models/foo/load``) or a gRPC full method name.
    """
    norm = _normalise(key)
    if norm in _NORMALISED:
        return _NORMALISED[norm]
    if norm.startswith('/'):
        return None
    method, _, path = norm.partition(' ')
    if method == 'OPTIONS':
        return Permission.PUBLIC  # CORS preflight / allowed-methods: no data
    segs = tuple(path.split('/'))
    for p_method, p_segs, perm in _PATTERNS:
        if (
            p_method == method
            and len(p_segs) == len(segs)
            and all(p == '<>' or p == s for p, s in zip(p_segs, segs))
        ):
            if all(s and '/' not in s for p, s in zip(p_segs, segs) if p == '<>'):
                return perm
    return None


def permission_for(key: str) -> Permission:
    """Declared permission, or the default-deny permission for undeclared routes."""
    perm = lookup(key)
    return DEFAULT_PERMISSION if perm is None else perm


def operation_permission(operation: str) -> Permission:
    """Permission of a door operation; undeclared operations are admin-only."""
    return OPERATION_PERMISSIONS.get(operation, DEFAULT_PERMISSION)


def role_allows(role: Optional[Role], permission: Permission) -> bool:
    if permission is Permission.PUBLIC:
        return True
    return role is not None and permission in ROLE_PERMISSIONS.get(role, frozenset())


def check(identity: Identity, permission: Permission) -> None:
    """Raise UNAUTHENTICATED (no identity) or PERMISSION_DENIED (identity lacks the permission)."""
    if permission is Permission.PUBLIC:
        return
    if not identity.authenticated:
        raise EngineError(ErrorCode.UNAUTHENTICATED, 'authentication required')
    if not role_allows(identity.role, permission):
        raise EngineError(
            ErrorCode.PERMISSION_DENIED,
            f'role {identity.role.value if identity.role else "none"!s} '
            f'may not {permission.value}',
        )


def iter_table() -> Iterator[Tuple[str, Permission]]:
    return iter(PERMISSION_TABLE.items())
