"""The ``security:`` section: schema, defaults (the PRD's numbers), profiles, env overrides.

Where it comes from (first found wins):
  1. ``AKIDB_SECURITY_CONFIG`` = path to a YAML file with a top-level ``security:`` mapping;
  2. ``AKIDB_SECURITY_PROFILE`` = ``dev`` | ``prod`` -> ``config/security.<profile>.yaml``;
  3. the ``dev`` profile (authentication off, loopback only).
Relative file paths inside the section are resolved against the YAML file's folder's parent
(the repository root for files in ``config/``). Unknown keys are errors, so a typo cannot
silently switch a control off.

Env overrides (the PRD's deployment names), applied on top of whichever file was chosen:
``AKIDB_TLS_CERT`` + ``AKIDB_TLS_KEY`` turn TLS on with that certificate and key (one without
the other is an error), ``AKIDB_TLS_CA`` sets the CA that client certificates are checked
against (an error while TLS is off, where it would do nothing). Relative paths are taken from
the current directory; an empty value counts as unset.

Bind rule: with authentication off the server may only listen on a loopback address;
:func:`check_bind` raises :class:`SecurityConfigError` otherwise.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import jsonschema
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SecurityConfigError(ValueError):
    pass


_BUCKET = {
    'type': 'object',
    'additionalProperties': False,
    'required': ['rate', 'burst'],
    'properties': {
        'rate': {'type': 'number', 'exclusiveMinimum': 0},
        'burst': {'type': 'integer', 'minimum': 1},
    },
}
_ROLE = {'enum': ['viewer', 'operator', 'developer', 'admin']}
_PATH = {'type': ['string', 'null']}

SCHEMA: Dict[str, Any] = {
    'type': 'object',
    'additionalProperties': False,
    'properties': {
        'profile': {'type': 'string'},
        'auth': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'enabled': {'type': 'boolean'},
                'disabled_role': _ROLE,  # role of every caller when auth is off
                'api_keys': {
                    'type': 'object',
                    'additionalProperties': False,
                    'properties': {
                        'enabled': {'type': 'boolean'},
                        'file': _PATH,
                        # a name both HTTP and gRPC metadata carry alike (lower-cased on
                        # gRPC; no '_': WSGI folds '-' into it), never Authorization
                        'header': {'type': 'string', 'pattern': r'^[A-Za-z][A-Za-z0-9-]{0,63}$',
                                   'not': {'pattern': r'^(?i:authorization)$'}},
                        'reload_interval_s': {'type': 'number', 'minimum': 0},
                    },
                },
                'jwt': {
                    'type': 'object',
                    'additionalProperties': False,
                    'properties': {
                        'enabled': {'type': 'boolean'},
                        'public_key_file': _PATH,
                        'jwks_file': _PATH,
                        'issuer': {'type': ['string', 'null']},
                        'audience': {'type': ['string', 'null']},
                        'role_claim': {'type': 'string'},
                        'client_claim': {'type': 'string'},
                        'leeway_s': {'type': 'number', 'minimum': 0, 'maximum': 300},
                        'max_lifetime_s': {'type': ['number', 'null'], 'exclusiveMinimum': 0},
                        'reload_interval_s': {'type': 'number', 'minimum': 0},
                    },
                },
                'mtls': {
                    'type': 'object',
                    'additionalProperties': False,
                    'properties': {
                        'enabled': {'type': 'boolean'},
                        'role_from_ou': {'type': 'boolean'},
                        'role_map': {'type': 'object', 'additionalProperties': _ROLE},
                        'default_role': {'oneOf': [_ROLE, {'type': 'null'}]},
                    },
                },
            },
        },
        'tls': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'enabled': {'type': 'boolean'},
                'cert_file': _PATH,
                'key_file': _PATH,
                'ca_file': _PATH,
                'require_client_cert': {'type': 'boolean'},
                'reload_interval_s': {'type': 'number', 'minimum': 0},
            },
        },
        'rate_limit': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'enabled': {'type': 'boolean'},
                'per_client': _BUCKET,
                'global': _BUCKET,
                'auth_failures': _BUCKET,
                'roles': {
                    'type': 'object',
                    'additionalProperties': _BUCKET,
                    'propertyNames': _ROLE,
                },
                'max_clients': {'type': 'integer', 'minimum': 1},
            },
        },
        'breaker': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'enabled': {'type': 'boolean'},
                'window': {'type': 'integer', 'minimum': 1},
                'min_calls': {'type': 'integer', 'minimum': 1},
                'failure_ratio': {'type': 'number', 'exclusiveMinimum': 0, 'maximum': 1},
                'open_s': {'type': 'number', 'exclusiveMinimum': 0},
                'half_open_probes': {'type': 'integer', 'minimum': 1},
            },
        },
        'audit': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'enabled': {'type': 'boolean'},
                'file': _PATH,
                'max_bytes': {'type': 'integer', 'minimum': 1024},
                'backups': {'type': 'integer', 'minimum': 0},
            },
        },
    },
}

DEFAULTS: Dict[str, Any] = {
    'profile': 'dev',
    'auth': {
        'enabled': False,
        'disabled_role': 'admin',
        'api_keys': {
            'enabled': True,
            'file': None,
            'header': 'X-API-Key',
            'reload_interval_s': 1.0,
        },
        'jwt': {
            'enabled': False,
            'public_key_file': None,
            'jwks_file': None,
            'issuer': None,
            'audience': None,
            'role_claim': 'role',
            'client_claim': 'sub',
            'leeway_s': 30,
            'max_lifetime_s': 3600,
            'reload_interval_s': 1.0,
        },
        'mtls': {'enabled': False, 'role_from_ou': True, 'role_map': {}, 'default_role': None},
    },
    'tls': {
        'enabled': False,
        'cert_file': None,
        'key_file': None,
        'ca_file': None,
        'require_client_cert': True,
        'reload_interval_s': 5.0,
    },
    'rate_limit': {
        'enabled': True,
        'per_client': {'rate': 100, 'burst': 20},
        'global': {'rate': 1000, 'burst': 200},
        # refused credentials per peer host: past this a caller hears 429 and is not audited
        # line by line (a flood of bad keys must not rotate the audit trail away)
        'auth_failures': {'rate': 1, 'burst': 20},
        'roles': {},
        'max_clients': 10000,
    },
    'breaker': {
        'enabled': True,
        'window': 10,
        'min_calls': 10,
        'failure_ratio': 0.5,
        'open_s': 30.0,
        'half_open_probes': 3,
    },
    'audit': {'enabled': True, 'file': None, 'max_bytes': 10 * 1024 * 1024, 'backups': 5},
}

_PATH_KEYS = (
    ('auth', 'api_keys', 'file'),
    ('auth', 'jwt', 'public_key_file'),
    ('auth', 'jwt', 'jwks_file'),
    ('tls', 'cert_file'),
    ('tls', 'key_file'),
    ('tls', 'ca_file'),
    ('audit', 'file'),
)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ('role_map', 'roles'):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class SecurityConfig:
    data: Dict[str, Any]
    source: str = '<defaults>'

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.data['auth']['enabled'])

    @property
    def tls_enabled(self) -> bool:
        return bool(self.data['tls']['enabled'])


def from_dict(
    section: Optional[Dict[str, Any]], base_dir: Optional[str] = None, source: str = '<dict>'
) -> SecurityConfig:
    """Validate a ``security:`` mapping, fill defaults, resolve paths, check consistency."""
    section = section or {}
    try:
        jsonschema.validate(section, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = '.'.join(str(p) for p in exc.absolute_path) or 'security'
        raise SecurityConfigError(f'{source}: security.{where}: {exc.message}') from None
    data = _merge(DEFAULTS, section)
    base_dir = base_dir or REPO_ROOT
    for path in _PATH_KEYS:
        node = data
        for k in path[:-1]:
            node = node[k]
        v = node[path[-1]]
        if v:
            v = os.path.expanduser(str(v))
            node[path[-1]] = v if os.path.isabs(v) else os.path.normpath(os.path.join(base_dir, v))
    _check(data, source)
    return SecurityConfig(data, source)


def _check(d: Dict[str, Any], source: str) -> None:
    a, t = d['auth'], d['tls']
    if a['enabled']:
        methods = [m for m in ('api_keys', 'jwt', 'mtls') if a[m]['enabled']]
        if not methods:
            raise SecurityConfigError(f'{source}: auth.enabled needs at least one method')
        if a['api_keys']['enabled'] and not a['api_keys']['file']:
            raise SecurityConfigError(f'{source}: auth.api_keys.file is required')
        j = a['jwt']
        if j['enabled'] and (
            not (j['public_key_file'] or j['jwks_file']) or not j['issuer'] or not j['audience']
        ):
            raise SecurityConfigError(
                f'{source}: auth.jwt needs public_key_file or jwks_file, issuer and audience'
            )
        if a['mtls']['enabled'] and not (t['enabled'] and t['require_client_cert']):
            raise SecurityConfigError(
                f'{source}: auth.mtls needs tls.enabled and tls.require_client_cert'
            )
    if t['enabled']:
        if not (t['cert_file'] and t['key_file']):
            raise SecurityConfigError(f'{source}: tls.cert_file and tls.key_file are required')
        if t['require_client_cert'] and not t['ca_file']:
            raise SecurityConfigError(f'{source}: tls.require_client_cert needs tls.ca_file')
    r = d['rate_limit']
    g = r['global']
    for name, bucket in [('per_client', r['per_client'])] + \
            [(f'roles.{role}', b) for role, b in sorted(r['roles'].items())]:
        if r['enabled'] and (bucket['rate'] >= g['rate'] or bucket['burst'] >= g['burst']):
            raise SecurityConfigError(
                f"{source}: rate_limit.{name} ({bucket['rate']:g}/s, burst {bucket['burst']}) "
                f"must stay below rate_limit.global ({g['rate']:g}/s, burst {g['burst']}): one "
                'such client could spend the whole global budget and leave every other client '
                '429')
    b = d['breaker']
    if b['min_calls'] > b['window']:
        raise SecurityConfigError(f'{source}: breaker.min_calls must be <= breaker.window')


TLS_ENV = {'AKIDB_TLS_CERT': 'cert_file', 'AKIDB_TLS_KEY': 'key_file', 'AKIDB_TLS_CA': 'ca_file'}


def _tls_overrides(section: Dict[str, Any], env: Dict[str, str],
                   source: str) -> tuple:
    """Apply AKIDB_TLS_* to a ``security:`` mapping; returns (section, source label)."""
    given = {name: env[name].strip() for name in TLS_ENV if env.get(name, '').strip()}
    if not given:
        return section, source
    if ('AKIDB_TLS_CERT' in given) != ('AKIDB_TLS_KEY' in given):
        have, missing = (('AKIDB_TLS_CERT', 'AKIDB_TLS_KEY') if 'AKIDB_TLS_CERT' in given
                         else ('AKIDB_TLS_KEY', 'AKIDB_TLS_CERT'))
        raise SecurityConfigError(f'{missing} is required with {have}')
    tls = dict(section.get('tls') or {})
    for name, value in given.items():
        tls[TLS_ENV[name]] = os.path.abspath(os.path.expanduser(value))
    if 'AKIDB_TLS_CERT' in given:
        tls['enabled'] = True
    elif not tls.get('enabled'):
        raise SecurityConfigError(f'{source}: AKIDB_TLS_CA is set but TLS is off (set '
                                  'AKIDB_TLS_CERT and AKIDB_TLS_KEY, or tls.enabled)')
    return {**section, 'tls': tls}, f'{source} + {"/".join(sorted(given))}'


def load(path: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> SecurityConfig:
    """Load the security config (see module doc for the search order and env overrides)."""
    env = os.environ if env is None else env
    if path is None:        # a variable set blank counts as unset, as every AKIDB_* one does
        path = env.get('AKIDB_SECURITY_CONFIG', '').strip() or None
    if path is None:
        profile = env.get('AKIDB_SECURITY_PROFILE', '').strip() or 'dev'
        if not profile.replace('_', '').replace('-', '').isalnum():
            raise SecurityConfigError(f'bad AKIDB_SECURITY_PROFILE {profile!r}')
        path = os.path.join(REPO_ROOT, 'config', f'security.{profile}.yaml')
        if not os.path.exists(path):
            if profile == 'dev':
                return from_dict(*_tls_overrides({}, env, '<built-in dev defaults>'))
            raise SecurityConfigError(f'no security profile {path}')
    try:
        with open(path, 'r', encoding='utf-8') as fh:
            doc = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SecurityConfigError(f'{path}: {exc}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get('security', {}), dict):
        raise SecurityConfigError(f'{path}: expected a top-level "security:" mapping')
    base = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    section, source = _tls_overrides(doc.get('security') or {}, env, path)
    return from_dict(section, base_dir=base, source=source)


def is_loopback(host: str) -> bool:
    h = (host or '').strip().strip('[]')
    if h == 'localhost':
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(cfg: SecurityConfig, host: str) -> None:
    """Refuse to listen on a non-loopback address without authentication."""
    if not cfg.auth_enabled and not is_loopback(host):
        raise SecurityConfigError(
            f'refusing to bind {host!r} with authentication off ({cfg.source}); bind 127.0.0.1 '
            f'or use AKIDB_SECURITY_PROFILE=prod (authentication + TLS)'
        )


def startup_banner(cfg: SecurityConfig, host: str, port: int) -> str:
    """One line for the server to log at start-up."""
    if not cfg.auth_enabled:
        return (
            f'SECURITY: development profile ({cfg.source}): authentication OFF, every caller '
            f'is {cfg["auth"]["disabled_role"]}; listening on {host}:{port} (loopback only). '
            f'Use AKIDB_SECURITY_PROFILE=prod for keys, tokens and TLS.'
        )
    methods = [m for m in ('api_keys', 'jwt', 'mtls') if cfg['auth'][m]['enabled']]
    tls = (
        'TLS 1.3' + (' + client certificates' if cfg['tls']['require_client_cert'] else '')
        if cfg.tls_enabled
        else 'NO TLS'
    )
    return (
        f'SECURITY: profile {cfg["profile"]} ({cfg.source}): authentication {"+".join(methods)}, '
        f'{tls}, rate limits {"on" if cfg["rate_limit"]["enabled"] else "OFF"}; '
        f'listening on {host}:{port}'
    )
