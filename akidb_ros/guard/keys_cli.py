"""``akidb-keys``: manage API keys (the key file holds SHA-256 hashes only).

    akidb-keys [--file F] [--audit A] create --role developer --client robot-7 [--expires-days 90]
    akidb-keys [--file F] list [--json]
    akidb-keys [--file F] revoke k3f9a1c2d4e5
    akidb-keys [--file F] rotate k3f9a1c2d4e5 [--grace-s 3600] [--expires-days 90]

``create`` and ``rotate`` print the new key ONCE on stdout (nothing else goes to stdout, so
``KEY=$(akidb-keys create ...)`` works); it cannot be shown again. A running server picks the
change up within ``auth.api_keys.reload_interval_s`` without a restart. Default file: the
``auth.api_keys.file`` of the active security config (AKIDB_SECURITY_CONFIG/PROFILE), else
``config/api_keys.yaml``. Every change is written to the audit log (ids only).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import List, Optional

from . import apikeys
from .audit import AuditLog
from .identity import Role


def _defaults():
    try:
        from .config import REPO_ROOT, load

        cfg = load()
        return (
            cfg['auth']['api_keys']['file'] or os.path.join(REPO_ROOT, 'config', 'api_keys.yaml'),
            cfg['audit']['file'] if cfg['audit']['enabled'] else None,
        )
    except Exception:  # noqa: BLE001 - a broken config must not lock the operator out
        from .config import REPO_ROOT

        return os.path.join(REPO_ROOT, 'config', 'api_keys.yaml'), None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='akidb-keys', description='Manage akidb API keys.')
    p.add_argument('--file', help='key file (default: from the security config)')
    p.add_argument('--audit', help='audit log (default: from the security config)')
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('create', help='create a key and print it once')
    c.add_argument('--role', required=True, choices=[r.value for r in Role])
    c.add_argument('--client', required=True, help='who holds the key (rate-limit bucket, audit)')
    c.add_argument(
        '--expires-days',
        type=float,
        default=90.0,
        help='days until expiry (default 90, the PRD rotation period; 0 = never)',
    )
    c.add_argument('--note', default='')
    ls = sub.add_parser('list', help='list keys (ids, roles, clients, status; never secrets)')
    ls.add_argument('--json', action='store_true')
    r = sub.add_parser('revoke', help='revoke a key now')
    r.add_argument('key_id')
    ro = sub.add_parser('rotate', help='new key for the same role/client; old one revoked')
    ro.add_argument('key_id')
    ro.add_argument(
        '--grace-s',
        type=float,
        default=0.0,
        help='keep the old key valid this many seconds (default 0: revoke now)',
    )
    ro.add_argument('--expires-days', type=float, default=90.0)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    dfile, daudit = _defaults()
    path = args.file or dfile
    audit = AuditLog(args.audit or daudit) if (args.audit or daudit) else None
    actor = {'cli': 'akidb-keys', 'user': getpass.getuser()}

    def note(event: str, **fields):
        if audit:
            audit.record(event, outcome='success', actor=actor, action=args.cmd, **fields)

    try:
        if args.cmd == 'create':
            rec, key = apikeys.create_key(
                path,
                Role(args.role),
                args.client,
                expires_days=args.expires_days or None,
                note=args.note,
            )
            note('key_created', key_id=rec.id, role=rec.role.value, client=rec.client)
            print(key)
            print(
                f'created {rec.id} role={rec.role.value} client={rec.client} '
                f'expires={apikeys._fmt(rec.expires) or "never"} in {path}; '
                f'the key is shown only once',
                file=sys.stderr,
            )
        elif args.cmd == 'list':
            records = apikeys.read_key_file(path)
            rows = [
                {
                    'id': r.id,
                    'role': r.role.value,
                    'client': r.client,
                    'status': r.status(),
                    'created': apikeys._fmt(r.created),
                    'expires': apikeys._fmt(r.expires),
                    'note': r.note,
                }
                for r in records.values()
            ]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(f'{"ID":14} {"ROLE":9} {"STATUS":8} {"EXPIRES":21} CLIENT')
                for w in rows:
                    print(
                        f'{w["id"]:14} {w["role"]:9} {w["status"]:8} {w["expires"] or "never":21} '
                        f'{w["client"]}'
                    )
        elif args.cmd == 'revoke':
            rec = apikeys.revoke_key(path, args.key_id)
            note('key_revoked', key_id=rec.id, client=rec.client)
            print(f'revoked {rec.id} ({rec.client})', file=sys.stderr)
        elif args.cmd == 'rotate':
            old, new, key = apikeys.rotate_key(
                path, args.key_id, grace_s=args.grace_s, expires_days=args.expires_days or None
            )
            note(
                'key_rotated',
                key_id=new.id,
                previous_key_id=old.id,
                client=new.client,
                grace_s=args.grace_s,
            )
            print(key)
            print(
                f'rotated {old.id} -> {new.id} ({new.client}); old key '
                f'{"revoked" if old.revoked else "valid until " + apikeys._fmt(old.expires)}',
                file=sys.stderr,
            )
    except KeyError as exc:
        print(f'akidb-keys: no key {exc.args[0]!r} in {path}', file=sys.stderr)
        return 2
    except (apikeys.KeyFileError, OSError, ValueError) as exc:
        print(f'akidb-keys: {exc}', file=sys.stderr)
        return 1
    finally:
        if audit:
            audit.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
