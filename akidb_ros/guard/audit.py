"""Append-only JSON-lines audit log: who did what, when, with what outcome, for which request.

Recorded: authentication failures, permission denials, rate-limit refusals (sampled by the
caller if wanted), key and config changes, certificate reloads, breaker transitions and admin
actions. One JSON object per line::

    {"ts": "2026-11-26T01:02:03.456Z", "event": "auth_failure", "outcome": "denied",
     "actor": {"subject": "k3f9a1c2d4e5", "role": null, "method": "api_key", ...},
     "action": "POST /api/v1/embed", "request_id": "...", "transport": "rest",
     "reason": "revoked", "peer": "10.0.0.7"}

Never a secret: fields whose name looks secret (``key``, ``token``, ``secret``, ``password``,
``authorization``, ``cookie``) are dropped to ``"[redacted]"``, and any string value that looks
like an API key or a JWT is redacted too, wherever it appears. Identifiers are kept: a name
ending in ``_id``/``_ids`` (``key_id``, ``previous_key_id``) names a secret without being one,
and rotation records need the old key's id (its value is still scrubbed by shape). The file is
opened in append mode with 0600 permissions and rotated by size (``max_bytes``, ``backups`` old
files kept).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
import os
import re
import threading
from typing import Any, Dict, Optional

_SECRET_NAME = re.compile(
    r'(^|_)(key|api_?key|token|secret|password|passwd|authorization|cookie|'
    r'bearer|credential|private)($|_)',
    re.IGNORECASE,
)
_SAFE_NAMES = frozenset({'key_id', 'event', 'reason'})
_ID_NAME = re.compile(r'(^|_)ids?$', re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r'akidb\.k[0-9a-f]{12}\.[A-Za-z0-9_\-]{8,}'  # our API keys
    r'|eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*'  # JWTs (header.payload.sig)
    r'|-----BEGIN [A-Z ]*PRIVATE KEY-----'
)
REDACTED = '[redacted]'


def _secret_name(name: str) -> bool:
    if name in _SAFE_NAMES or _ID_NAME.search(name):
        return False
    return bool(_SECRET_NAME.search(name))


def scrub(value: Any, depth: int = 0) -> Any:
    """A copy of value with secrets removed (by field name and by shape)."""
    if depth > 8:
        return '[depth]'
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = str(k)
            if _secret_name(k):
                out[k] = REDACTED
            else:
                out[k] = scrub(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value[:2048])
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return scrub(str(value), depth + 1)


class _Handler(logging.handlers.RotatingFileHandler):
    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, 'a', encoding='utf-8')


class AuditLog:
    """Thread-safe; ``path=None`` keeps events in memory only (``events``, for tests/dev)."""

    def __init__(
        self,
        path: Optional[str] = None,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 5,
        keep_in_memory: int = 0,
    ):
        self.path = path
        self._lock = threading.Lock()
        self._handler: Optional[_Handler] = None
        self.events: list = []
        self._keep = keep_in_memory or (0 if path else 1000)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._handler = _Handler(
                path, maxBytes=max_bytes, backupCount=backups, encoding='utf-8', delay=False
            )
            self._handler.setFormatter(logging.Formatter('%(message)s'))

    def record(
        self,
        event: str,
        *,
        outcome: str,
        actor: Any = None,
        action: str = '',
        request_id: str = '',
        **fields: Any,
    ) -> Dict[str, Any]:
        if hasattr(actor, 'describe'):
            actor = actor.describe()
        entry = {
            'ts': _dt.datetime.now(_dt.timezone.utc)
            .isoformat(timespec='milliseconds')
            .replace('+00:00', 'Z'),
            'event': event,
            'outcome': outcome,
            'actor': actor,
            'action': action,
            'request_id': request_id,
        }
        entry.update(fields)
        entry = scrub(entry)
        line = json.dumps(entry, separators=(',', ':'), ensure_ascii=True, default=str)
        with self._lock:
            if self._handler is not None:
                rec = logging.LogRecord('akidb.audit', logging.INFO, __file__, 0, line, None, None)
                self._handler.emit(rec)
                self._handler.flush()
            if self._keep:
                self.events.append(entry)
                if self._keep and len(self.events) > self._keep:
                    del self.events[: -self._keep]
        return entry

    def close(self) -> None:
        with self._lock:
            if self._handler is not None:
                self._handler.close()
                self._handler = None
