"""API keys: stored only as SHA-256 hashes, compared in constant time, reloaded on change.

Key format (printed once by ``akidb-keys create``)::

    akidb.<key id>.<secret>        e.g. akidb.k3f9a1c2d4e5.Qm9...43 chars of urlsafe base64

The key id is not secret; it selects the record, and ``hmac.compare_digest`` compares the
SHA-256 of the presented key with the stored hash. The secret carries 256 bits of entropy,
so a plain (unsalted, fast) SHA-256 is enough: there is nothing to brute-force offline.

Key file (YAML, written atomically with mode 0600)::

    version: 1
    keys:
      - id: k3f9a1c2d4e5
        sha256: 9f86d0...          # hex digest of the whole key string
        role: developer
        client: robot-7            # rate-limit bucket and audit 'who'
        created: '2026-11-26T00:00:00Z'
        expires: '2027-02-24T00:00:00Z'   # or null
        revoked: false

The store checks the file's (mtime, size, inode) at most every ``reload_interval_s`` and
reloads when it changed, so ``akidb-keys revoke`` takes effect without a restart. A file that
fails to parse on reload is ignored (the previous set stays) and reported once.

Every change (create, revoke, rotate) is one read-modify-write under an exclusive ``flock`` on
``<key file>.lock``, so concurrent ``akidb-keys`` runs never lose each other's keys or
revocations. Readers need no lock: the file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import yaml

from .identity import Role

log = logging.getLogger(__name__)

KEY_PREFIX = 'akidb'
_KEY_RE = re.compile(r'akidb\.(k[0-9a-f]{12})\.([A-Za-z0-9_\-]{43})')
_DUMMY_HASH = hashlib.sha256(b'akidb.dummy').hexdigest()

# Management limits: a key lives 1 day to 10 years (0/None = never expires); a rotated key keeps
# working at most 30 days more; client and note are one printable line (they reach terminals,
# logs and the audit).
MIN_EXPIRES_DAYS, MAX_EXPIRES_DAYS = 1.0, 3650.0
MAX_GRACE_S = 30 * 86400.0
MAX_CLIENT_LEN, MAX_NOTE_LEN = 128, 256


class KeyFileError(ValueError):
    pass


class KeyStateError(ValueError):
    """The key's state forbids the change (rotating a revoked or expired key)."""


def check_expires_days(days: Optional[float]) -> Optional[float]:
    """None (never) for 0/None, else the days if finite and within the limits."""
    if not days:  # nan is truthy, so it is checked below
        return None
    if not math.isfinite(days) or not MIN_EXPIRES_DAYS <= days <= MAX_EXPIRES_DAYS:
        raise ValueError(
            f'expiry must be 0 (never) or {MIN_EXPIRES_DAYS:g} to {MAX_EXPIRES_DAYS:g} days'
        )
    return float(days)


def check_grace_s(grace_s: float) -> float:
    if not math.isfinite(grace_s) or not 0 <= grace_s <= MAX_GRACE_S:
        raise ValueError(f'grace must be 0 to {MAX_GRACE_S:.0f} seconds (30 days)')
    return float(grace_s)


def check_text(value: str, what: str, max_len: int, required: bool = True) -> str:
    """One printable line: no newlines, escapes or other control characters."""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f'{what} must not be empty')
    if len(value) > max_len or not value.isprintable():
        raise ValueError(f'{what}: at most {max_len} printable characters, no control codes')
    return value


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _fmt(ts: Optional[_dt.datetime]) -> Optional[str]:
    return ts.astimezone(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ') if ts else None


def _parse_ts(value) -> Optional[_dt.datetime]:
    if value in (None, ''):
        return None
    if isinstance(value, _dt.datetime):
        ts = value
    else:
        ts = _dt.datetime.fromisoformat(str(value).replace('Z', '+00:00'))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_dt.timezone.utc)
    return ts


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode('utf-8')).hexdigest()


def generate_key() -> tuple:
    """A fresh (key id, full key). The key is shown to its owner once and never stored."""
    key_id = 'k' + secrets.token_hex(6)
    key = f'{KEY_PREFIX}.{key_id}.{secrets.token_urlsafe(32)}'
    return key_id, key


def parse_key(key: str) -> Optional[str]:
    """The key id of a well-formed key, else None."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    return m.group(1) if m else None


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    sha256: str
    role: Role
    client: str
    created: Optional[_dt.datetime] = None
    expires: Optional[_dt.datetime] = None
    revoked: bool = False
    note: str = ''

    def status(self, now: Optional[_dt.datetime] = None) -> str:
        now = now or utcnow()
        if self.revoked:
            return 'revoked'
        if self.expires is not None and now >= self.expires:
            return 'expired'
        return 'active'

    def to_dict(self) -> dict:
        d = {
            'id': self.id,
            'sha256': self.sha256,
            'role': self.role.value,
            'client': self.client,
            'created': _fmt(self.created),
            'expires': _fmt(self.expires),
            'revoked': self.revoked,
        }
        if self.note:
            d['note'] = self.note
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'ApiKeyRecord':
        if not isinstance(d, dict):
            raise KeyFileError('key entry must be a mapping')
        missing = {'id', 'sha256', 'role', 'client'} - set(d)
        if missing:
            raise KeyFileError(f'key entry lacks {sorted(missing)}')
        role = Role.parse(d['role'])
        if role is None:
            raise KeyFileError(f'key {d["id"]!r}: unknown role {d["role"]!r}')
        digest = str(d['sha256']).lower()
        if not re.fullmatch(r'[0-9a-f]{64}', digest):
            raise KeyFileError(f'key {d["id"]!r}: sha256 must be 64 hex digits')
        try:
            created, expires = _parse_ts(d.get('created')), _parse_ts(d.get('expires'))
        except ValueError as exc:
            raise KeyFileError(f'key {d["id"]!r}: bad timestamp: {exc}') from None
        try:
            # a hand-edited file is held to what create_key writes: client and note reach the
            # audit log, metrics' rate-limit buckets and terminals (a list, a line break: no)
            client = check_text(d['client'], 'client', MAX_CLIENT_LEN)
            note = check_text(d.get('note') or '', 'note', MAX_NOTE_LEN, required=False)
        except ValueError as exc:
            raise KeyFileError(f'key {d["id"]!r}: {exc}') from None
        return cls(
            id=str(d['id']),
            sha256=digest,
            role=role,
            client=client,
            created=created,
            expires=expires,
            revoked=bool(d.get('revoked', False)),
            note=note,
        )


class VerifyResult:
    """Why a key was refused (for metrics/audit), or the matching record."""

    __slots__ = ('record', 'reason', 'key_id')

    def __init__(
        self, record: Optional[ApiKeyRecord], reason: str, key_id: Optional[str] = None
    ):
        self.record, self.reason = record, reason
        # The id the caller presented (ids are not secret), also on a wrong secret: the audit
        # can name the key under attack while the caller gets the same answer as an unknown id.
        self.key_id = key_id or (record.id if record else None)

    @property
    def ok(self) -> bool:
        return self.record is not None and self.reason == 'ok'


def read_key_file(path: str, empty_ok: bool = True) -> Dict[str, ApiKeyRecord]:
    """The file's keys by id; a missing file holds none.

    ``empty_ok=False`` (the server): a file that exists but holds no document (0 bytes,
    comments only) is corrupt, not an empty set. A file caught truncated in an operator's
    rewrite would otherwise drop every key at once; no keys at all is written ``keys: []``.
    """
    if not os.path.exists(path):
        return {}
    with open(path, 'r', encoding='utf-8') as fh:
        data = yaml.safe_load(fh)
    if data is None:
        if not empty_ok:
            raise KeyFileError(f'{path}: the file is empty (no keys at all is written '
                               '"keys: []")')
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get('keys', []) or [], list):
        raise KeyFileError(f'{path}: expected a mapping with a "keys" list')
    records: Dict[str, ApiKeyRecord] = {}
    for entry in data.get('keys') or []:
        rec = ApiKeyRecord.from_dict(entry)
        if rec.id in records:
            raise KeyFileError(f'{path}: duplicate key id {rec.id!r}')
        records[rec.id] = rec
    return records


def write_key_file(path: str, records: Dict[str, ApiKeyRecord]) -> None:
    """Atomic replace (readers never see a half-written file), mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.keys.', dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, 'w', encoding='utf-8') as fh:
            fh.write('# akidb API keys: SHA-256 hashes only. Manage with `akidb-keys`.\n')
            yaml.safe_dump(
                {'version': 1, 'keys': [r.to_dict() for r in records.values()]},
                fh,
                sort_keys=False,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ApiKeyStore:
    """Thread-safe, file-backed key set that follows the file without a restart."""

    def __init__(
        self,
        path: str,
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], _dt.datetime] = utcnow,
    ):
        self.path = path
        self.reload_interval_s = reload_interval_s
        self._clock, self._now = clock, now
        self._lock = threading.Lock()
        self._records: Dict[str, ApiKeyRecord] = {}
        self._sig = None
        self._next_check = 0.0
        self.last_error: Optional[str] = None
        self.reload(force=True)

    def _signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, force: bool = False) -> bool:
        """Re-read the file when it changed (or ``force``). True when the set was replaced."""
        sig = self._signature()
        with self._lock:
            if not force and sig == self._sig:
                return False
            try:
                records = read_key_file(self.path, empty_ok=False)
            # ValueError: KeyFileError, bytes that are not UTF-8, a date YAML cannot build
            except (OSError, yaml.YAMLError, ValueError) as exc:
                if self.last_error != str(exc):
                    log.error(
                        'API key file %s not reloaded (keeping %d keys): %s',
                        self.path,
                        len(self._records),
                        exc,
                    )
                self.last_error = str(exc)
                if force and self._sig is None and not self._records:
                    raise KeyFileError(str(exc)) from exc
                return False
            self._records, self._sig, self.last_error = records, sig, None
            log.info('API key file %s loaded: %d keys', self.path, len(records))
            return True

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.reload_interval_s
            self.reload()

    def verify(self, key: str) -> VerifyResult:
        """Constant-time check of a presented key. Never logs or keeps the key."""
        self._maybe_reload()
        key_id = parse_key(key)
        with self._lock:
            rec = self._records.get(key_id) if key_id else None
        presented = hash_key(key if isinstance(key, str) else '')
        # Always run one comparison so unknown ids cost the same as wrong secrets.
        match = hmac.compare_digest(presented, rec.sha256 if rec else _DUMMY_HASH)
        if key_id is None:
            return VerifyResult(None, 'malformed')
        if rec is None or not match:
            return VerifyResult(None, 'unknown_key', key_id)
        status = rec.status(self._now())
        if status != 'active':
            return VerifyResult(rec, status)
        return VerifyResult(rec, 'ok')

    def records(self) -> List[ApiKeyRecord]:
        self._maybe_reload()
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        return len(self.records())


# ---- management (used by akidb-keys; each change is one locked read-modify-write) ----


@contextlib.contextmanager
def locked(path: str):
    """Hold an exclusive lock on ``<path>.lock`` (never deleted: a deleted lock file could be
    locked by two writers at once). Closing the descriptor releases it, even on a crash.
    Only ``create_key`` makes the file's folder: a revoke or rotate naming a mistyped path must
    not leave folders behind."""
    fd = os.open(path + '.lock', os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _new_record(
    records: Dict[str, ApiKeyRecord],
    role: Role,
    client: str,
    expires_days: Optional[float],
    note: str,
    now: _dt.datetime,
) -> tuple:
    key_id, key = generate_key()
    while key_id in records:  # 48-bit id: collision is theoretical
        key_id, key = generate_key()
    expires = now + _dt.timedelta(days=expires_days) if expires_days else None
    rec = ApiKeyRecord(
        id=key_id,
        sha256=hash_key(key),
        role=role,
        client=client,
        created=now.replace(microsecond=0),
        expires=expires and expires.replace(microsecond=0),
        revoked=False,
        note=note,
    )
    records[key_id] = rec
    return rec, key


def create_key(
    path: str,
    role: Role,
    client: str,
    expires_days: Optional[float] = None,
    note: str = '',
    now: Optional[_dt.datetime] = None,
) -> tuple:
    """Add a key; returns (record, full key). The full key is not stored anywhere."""
    now = now or utcnow()
    client = check_text(client, 'client', MAX_CLIENT_LEN)
    note = check_text(note, 'note', MAX_NOTE_LEN, required=False)
    expires_days = check_expires_days(expires_days)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with locked(path):
        records = read_key_file(path)
        rec, key = _new_record(records, role, client, expires_days, note, now)
        write_key_file(path, records)
    return rec, key


def revoke_key(path: str, key_id: str) -> ApiKeyRecord:
    if not os.path.exists(path):        # no file, no key (and nothing to lock or create)
        raise KeyError(key_id)
    with locked(path):
        records = read_key_file(path)
        if key_id not in records:
            raise KeyError(key_id)
        records[key_id] = replace(records[key_id], revoked=True)
        write_key_file(path, records)
    return records[key_id]


def rotate_key(
    path: str,
    key_id: str,
    grace_s: float = 0.0,
    expires_days: Optional[float] = None,
    now: Optional[_dt.datetime] = None,
) -> tuple:
    """New key for the same role/client; the old one is revoked now, or expires after grace_s.

    Only an active key rotates: a revoked or expired one gets no successor (that would
    resurrect access it lost); create a new key deliberately instead.
    """
    now = now or utcnow()
    grace_s, expires_days = check_grace_s(grace_s), check_expires_days(expires_days)
    if not os.path.exists(path):
        raise KeyError(key_id)
    with locked(path):
        records = read_key_file(path)
        if key_id not in records:
            raise KeyError(key_id)
        old = records[key_id]
        status = old.status(now)
        if status != 'active':
            raise KeyStateError(f'key {key_id} is {status}; only an active key can be rotated')
        new, key = _new_record(
            records, old.role, old.client, expires_days, f'rotated from {key_id}', now
        )
        if grace_s > 0:
            until = now + _dt.timedelta(seconds=grace_s)
            if old.expires is None or old.expires > until:
                records[key_id] = replace(old, expires=until.replace(microsecond=0))
        else:
            records[key_id] = replace(old, revoked=True)
        write_key_file(path, records)
    return records[key_id], new, key
