"""Structured JSON logs: one JSON object per line, with request id, model, latency, outcome.

``configure_logging()`` installs a JSON formatter on the root logger (``AKIDB_LOG_FORMAT=text``
keeps plain text, ``AKIDB_LOG_LEVEL`` sets the level). Anything passed in ``extra=`` lands as
top-level keys, and the current trace/span ids are added when a span is active.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Optional

_STD_ATTRS = set(vars(logging.LogRecord('', 0, '', 0, '', (), None))) | {'message', 'asctime'}

ACCESS_LOGGER = 'akidb_ros.access'


def _fields(record: logging.LogRecord):
    """The record's own fields: what ``extra=`` added (request id, model, latency ...)."""
    return ((k, v) for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith('_'))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            'ts': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))
            + f'.{int(record.msecs):03d}Z',
            'level': record.levelname.lower(),
            'logger': record.name,
            'msg': record.getMessage(),
        }
        out.update(_fields(record))
        if 'trace_id' not in out:
            try:
                from akidb_ros.observability.tracing import current_trace_ids
                trace_id, span_id = current_trace_ids()
                if trace_id:
                    out['trace_id'], out['span_id'] = trace_id, span_id
            except Exception:  # pragma: no cover - logging must never fail
                pass
        if record.exc_info:
            out['exc'] = self.formatException(record.exc_info)
        # json.dumps escapes controls below U+0020 only: the line breaks other readers split on
        # (U+0085, U+2028, U+2029) and C1 controls (U+009B starts a terminal escape) in a
        # caller's text are escaped too, so one record stays one line
        return _LINE_BREAKERS.sub(_escape, json.dumps(out, default=str, ensure_ascii=False))


# DEL, C1 controls (U+009B starts a terminal escape) and the line breaks other readers split on
_BREAKERS_C1 = '\x7f-\x9f\u2028\u2029'
_LINE_BREAKERS = re.compile(f'[{_BREAKERS_C1}]')


def _escape(match: 're.Match') -> str:
    return f'\\u{ord(match.group()):04x}'


# one_line: the C0 controls but tab and line feed (written out as \n first; ESC starts a
# terminal escape), and what _LINE_BREAKERS escapes
_CONTROLS = re.compile(f'[\x00-\x08\x0b-\x1f{_BREAKERS_C1}]')


def one_line(text: str) -> str:
    """``text`` with its line breaks and control characters escaped: a caller's text in a log
    line can neither start a forged line nor drive the terminal that shows it."""
    return _CONTROLS.sub(_escape, text.replace('\r', '\\r').replace('\n', '\\n'))


class TextFormatter(logging.Formatter):
    """``AKIDB_LOG_FORMAT=text``: the message, then the record's fields as ``key=value`` (an
    access line is the message 'request' and its fields)."""

    def __init__(self):
        super().__init__('%(asctime)s %(levelname)s %(name)s: %(message)s')

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = ' '.join(f'{k}={json.dumps(v, default=str)}' for k, v in _fields(record))
        return one_line(f'{line} {fields}' if fields else line)


LOG_FORMATS = ('json', 'text')
LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')


def log_format(fmt: Optional[str] = None) -> str:
    """The log format in effect: ``fmt``, else ``AKIDB_LOG_FORMAT``, else ``json``."""
    return (fmt or os.environ.get('AKIDB_LOG_FORMAT', '').strip() or 'json').lower()


def log_level(level: Optional[str] = None) -> str:
    """The log level in effect: ``level``, else ``AKIDB_LOG_LEVEL``, else ``INFO``."""
    return (level or os.environ.get('AKIDB_LOG_LEVEL', '').strip() or 'INFO').upper()


def log_settings_error() -> str:
    """One line naming the variable when ``AKIDB_LOG_FORMAT`` or ``AKIDB_LOG_LEVEL`` holds a
    value the logs cannot take ('' when both are usable; blank counts as unset)."""
    if log_format() not in LOG_FORMATS:
        return (f"AKIDB_LOG_FORMAT={os.environ['AKIDB_LOG_FORMAT']!r} is not one of "
                f"{', '.join(LOG_FORMATS)}")
    if log_level() not in LOG_LEVELS:
        return (f"AKIDB_LOG_LEVEL={os.environ['AKIDB_LOG_LEVEL']!r} is not one of "
                f"{', '.join(LOG_LEVELS)}")
    return ''


def configure_logging(level: Optional[str] = None, fmt: Optional[str] = None, stream=None) -> None:
    """Install the JSON (or text) handler on the root logger; idempotent. A bad level or
    format is a ValueError naming it (``log_settings_error`` checks the variables first)."""
    level, fmt = log_level(level), log_format(fmt)
    if fmt not in LOG_FORMATS or level not in LOG_LEVELS:
        raise ValueError(log_settings_error() or f'log level {level!r} or format {fmt!r} unknown')
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, '_akidb', False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._akidb = True
    handler.setFormatter(JsonFormatter() if fmt == 'json' else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)


def log_request(transport: str, request_id: str, model: str, latency_ms: float, outcome: str,
                code: str = '', level: int = logging.INFO, **fields) -> None:
    """Write the one access-log line every door writes per request."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if logger.isEnabledFor(level):
        logger.log(level, 'request', extra={
            'transport': transport, 'request_id': request_id, 'model': model,
            'latency_ms': round(latency_ms, 3), 'outcome': outcome, 'code': code, **fields})
