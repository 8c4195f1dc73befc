"""``akidb-keys``: manage API keys (the key file holds SHA-256 hashes only).

    akidb-keys [--config C] [--file F] [--audit A] create --role developer --client robot-7
               [--expires-days 90] [--note TEXT]
    akidb-keys [--file F] list [--json]
    akidb-keys [--file F] revoke k3f9a1c2d4e5
    akidb-keys [--file F] rotate k3f9a1c2d4e5 [--grace-s 3600] [--expires-days 90]

``create`` and ``rotate`` print the new key ONCE on stdout (nothing else goes to stdout, so
``KEY=$(akidb-keys create ...)`` works); it cannot be shown again. A running server picks the
change up within ``auth.api_keys.reload_interval_s`` without a restart. Default file: the
``auth.api_keys.file`` of the active security config (``--config``, else
AKIDB_SECURITY_CONFIG/PROFILE), else ``config/api_keys.yaml``. A config that cannot be loaded is
an error (exit 1, nothing written): falling back would change keys the server does not read,
unaudited. Every change is written to the audit log (ids only). Concurrent runs are serialised
by a lock on ``<key file>.lock``.

An audit log's missing folder is created, as the server creates it: keys are made before a new
deployment's server first starts. It is said on stderr (``created folder ... for the audit
log``), so that a typo in ``--audit`` does not hide the audit trail silently.

A key file or config that cannot be read (not UTF-8, not YAML, not a key file) is one line on
stderr naming the file, and exit 1.

Input is checked before anything is written (exit 2): ``--expires-days`` 0 (never) or 1 to 3650,
``--grace-s`` 0 to 2592000 (30 days), ``--client`` and ``--note`` one printable line. Rotating a
revoked or expired key is refused (exit 1): create a new key instead.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import List, Optional

import yaml

from . import apikeys
from .audit import AuditLog
from .config import REPO_ROOT, SecurityConfigError, load
from .identity import Role


def _defaults(config_path: Optional[str] = None):
    """(key file, audit path or None) from the security config; SecurityConfigError if broken."""
    cfg = load(config_path)
    return (
        cfg['auth']['api_keys']['file'] or os.path.join(REPO_ROOT, 'config', 'api_keys.yaml'),
        cfg['audit']['file'] if cfg['audit']['enabled'] else None,
    )


def _checked(check, *args):
    """An argparse type from a validator: refusals become usage errors (exit 2)."""

    def parse(text: str):
        try:
            return check(text, *args)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _days(text: str) -> float:
    days = float(text)  # ValueError on 'soon'; 'inf'/'nan' parse and are refused next
    apikeys.check_expires_days(days)
    return days  # 0 stays 0 (never), for the CLI's `or None`


def _grace(text: str) -> float:
    return apikeys.check_grace_s(float(text))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='akidb-keys', description='Manage akidb API keys.')
    p.add_argument('--config', help='security config (default: AKIDB_SECURITY_CONFIG/PROFILE)')
    p.add_argument('--file', help='key file (default: from the security config)')
    p.add_argument('--audit', help='audit log (default: from the security config)')
    sub = p.add_subparsers(dest='cmd', required=True)
    days = _checked(_days)
    days_help = (
        f'days until expiry, {apikeys.MIN_EXPIRES_DAYS:g} to {apikeys.MAX_EXPIRES_DAYS:g} '
        f'(default 90, the PRD rotation period; 0 = never)'
    )
    c = sub.add_parser('create', help='create a key and print it once')
    c.add_argument('--role', required=True, choices=[r.value for r in Role])
    c.add_argument(
        '--client',
        required=True,
        type=_checked(apikeys.check_text, 'client', apikeys.MAX_CLIENT_LEN),
        help='who holds the key (rate-limit bucket, audit); one printable line',
    )
    c.add_argument('--expires-days', type=days, default=90.0, help=days_help)
    c.add_argument(
        '--note',
        default='',
        type=_checked(apikeys.check_text, 'note', apikeys.MAX_NOTE_LEN, False),
        help='free text for operators; one printable line',
    )
    ls = sub.add_parser('list', help='list keys (ids, roles, clients, status; never secrets)')
    ls.add_argument('--json', action='store_true')
    r = sub.add_parser('revoke', help='revoke a key now')
    r.add_argument('key_id')
    ro = sub.add_parser('rotate', help='new key for the same role/client; old one revoked')
    ro.add_argument('key_id')
    ro.add_argument(
        '--grace-s',
        type=_checked(_grace),
        default=0.0,
        help='keep the old key valid this many seconds, at most 2592000 (30 days); '
        'default 0: revoke now',
    )
    ro.add_argument('--expires-days', type=days, default=90.0, help=days_help)
    return p


def _shown(text: str) -> str:
    """A key-file field as one safe terminal line (the file may have been edited by hand)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _one_line(text: str) -> str:
    """A message as one safe terminal line (YAML's errors span several)."""
    return _shown(' '.join(str(text).split()))


def _unreadable(path: str, exc: Exception) -> str:
    """Why ``path`` could not be read: not UTF-8 text, or not YAML."""
    if isinstance(exc, UnicodeDecodeError):
        return f'{path}: not UTF-8 text ({exc.reason} at byte {exc.start})'
    mark, problem = getattr(exc, 'problem_mark', None), getattr(exc, 'problem', None)
    if mark is not None and problem:
        where = f'line {mark.line + 1}, column {mark.column + 1}'
        return f'{path}: not valid YAML: {problem} ({where})'
    return f'{path}: not valid YAML: {exc}'


def _list(path: str, as_json: bool) -> None:
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
        for r in apikeys.read_key_file(path).values()
    ]
    if as_json:
        print(json.dumps(rows, indent=1))  # ASCII-only: control characters come out escaped
        return
    print(f'{"ID":14} {"ROLE":9} {"STATUS":8} {"EXPIRES":21} CLIENT')
    for w in rows:
        print(
            f'{_shown(w["id"]):14} {w["role"]:9} {w["status"]:8} {w["expires"] or "never":21} '
            f'{_shown(w["client"])}'
        )


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dfile, daudit = _defaults(args.config)
    except UnicodeDecodeError as exc:   # config.load reads it as UTF-8 text before YAML
        where = args.config or os.environ.get('AKIDB_SECURITY_CONFIG') or 'the profile file'
        print(f'akidb-keys: security config: {_one_line(_unreadable(where, exc))}',
              file=sys.stderr)
        return 1
    except SecurityConfigError as exc:
        print(f'akidb-keys: security config: {_one_line(exc)}', file=sys.stderr)
        return 1
    path = args.file or dfile
    audit = None
    actor = {'cli': 'akidb-keys', 'user': getpass.getuser()}

    def note(event: str, **fields):
        if audit:
            audit.record(event, outcome='success', actor=actor, action=args.cmd, **fields)

    try:
        if args.cmd != 'list' and (args.audit or daudit):
            audit_path = args.audit or daudit
            folder = os.path.dirname(os.path.abspath(audit_path))
            fresh = not os.path.exists(folder)
            audit = AuditLog(audit_path)  # opened first: no change goes unaudited
            if fresh:   # created, as the server would; said, so a typo cannot hide the log
                print(f'akidb-keys: created folder {_one_line(folder)} for the audit log',
                      file=sys.stderr)
        if args.cmd == 'create':
            folder = os.path.dirname(os.path.abspath(path))
            fresh = not os.path.exists(folder)
            rec, key = apikeys.create_key(
                path,
                Role(args.role),
                args.client,
                expires_days=args.expires_days or None,
                note=args.note,
            )
            note('key_created', key_id=rec.id, role=rec.role.value, client=rec.client)
            if fresh:   # said, like the audit log's folder: a typo in --file cannot hide
                print(f'akidb-keys: created folder {_one_line(folder)} for the key file',
                      file=sys.stderr)
            print(key)
            print(
                f'created {rec.id} role={rec.role.value} client={rec.client} '
                f'expires={apikeys._fmt(rec.expires) or "never"} in {path}; '
                f'the key is shown only once',
                file=sys.stderr,
            )
        elif args.cmd == 'list':
            _list(path, args.json)
        elif args.cmd == 'revoke':
            rec = apikeys.revoke_key(path, args.key_id)
            note('key_revoked', key_id=rec.id, client=rec.client)
            print(f'revoked {rec.id} ({_shown(rec.client)})', file=sys.stderr)
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
                f'rotated {old.id} -> {new.id} ({_shown(new.client)}); old key '
                f'{"revoked" if old.revoked else "valid until " + apikeys._fmt(old.expires)}',
                file=sys.stderr,
            )
    except KeyError as exc:
        print(f'akidb-keys: no key {exc.args[0]!r} in {path}', file=sys.stderr)
        return 2
    except (yaml.YAMLError, UnicodeDecodeError) as exc:    # the key file is all that is read
        print(f'akidb-keys: {_one_line(_unreadable(path, exc))}', file=sys.stderr)
        return 1
    except (apikeys.KeyFileError, OSError, ValueError) as exc:
        print(f'akidb-keys: {_one_line(exc)}', file=sys.stderr)
        return 1
    finally:
        if audit:
            audit.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
