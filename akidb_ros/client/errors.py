"""Typed client errors, one class per family of the server's error table."""
from __future__ import annotations

from typing import Dict, Optional, Type


class AkidbError(Exception):
    """Base of every client error.

    ``code``: the error-table name (``INVALID_INPUT``, ``RATE_LIMITED`` ...; transport failures
    are ``UNAVAILABLE``/``TIMEOUT``), ``status``: HTTP status or gRPC status name,
    ``retryable``: whether the call may be retried, ``retry_after_s``: the server's hint,
    ``request_id``: the id to quote in a bug report, ``stream_index``: in a gRPC
    ``EmbedStream``, the 0-based index of the batch that failed (else None).
    """

    def __init__(self, message: str, code: str = 'INTERNAL', status=None,
                 retryable: bool = False, retry_after_s: Optional[float] = None,
                 request_id: str = '', stream_index: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.stream_index = stream_index

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.code}, {self.message!r}, status={self.status})'


class InvalidRequestError(AkidbError):
    """400/413 — the caller's mistake (INVALID_INPUT, INPUT_TOO_LONG, INPUT_TOO_LARGE)."""


class ModelNotFoundError(AkidbError):
    """MODEL_NOT_FOUND (HTTP 400, gRPC NOT_FOUND) / MODEL_UNAVAILABLE (HTTP 404)."""


class ConflictError(AkidbError):
    """409 — MODEL_IN_USE."""


class AuthenticationError(AkidbError):
    """401 — UNAUTHENTICATED."""


class PermissionDeniedError(AkidbError):
    """403 — PERMISSION_DENIED."""


class RateLimitedError(AkidbError):
    """429 — RATE_LIMITED (retryable, honours Retry-After)."""


class OverloadedError(AkidbError):
    """503 — OVERLOADED (load shed, retryable) / CIRCUIT_OPEN (not retried: the PRD's retry
    pattern; ``retry_after_s`` says when the breaker lets a probe through)."""


class ServiceUnavailableError(AkidbError):
    """503 — UNAVAILABLE / MODEL_LOAD_FAILED, a proxy's 502, or the server cannot be reached
    (retryable)."""


class DeadlineExceededError(AkidbError):
    """504 / DEADLINE_EXCEEDED — TIMEOUT, server- or client-side (retryable)."""


class ServerError(AkidbError):
    """500 — INTERNAL or an unexpected answer."""


class ProtocolError(ServerError):
    """BAD_RESPONSE — a success status whose body is not the answer the API defines (not JSON,
    a field missing or of the wrong type: a proxy's page, a different server). Not retried."""


class TLSError(AkidbError):
    """TLS_ERROR — the TLS handshake failed: the server's certificate is not trusted (wrong
    ``ca_file``, wrong host name), the server refused the client certificate (or none was
    given), or one side does not speak TLS. A configuration problem: not retried."""


_BY_CODE: Dict[str, Type[AkidbError]] = {
    'INVALID_INPUT': InvalidRequestError, 'INPUT_TOO_LONG': InvalidRequestError,
    'INPUT_TOO_LARGE': InvalidRequestError, 'MODEL_NOT_FOUND': ModelNotFoundError,
    'MODEL_UNAVAILABLE': ModelNotFoundError, 'MODEL_IN_USE': ConflictError,
    'UNAUTHENTICATED': AuthenticationError, 'PERMISSION_DENIED': PermissionDeniedError,
    'RATE_LIMITED': RateLimitedError, 'OVERLOADED': OverloadedError,
    'CIRCUIT_OPEN': OverloadedError, 'UNAVAILABLE': ServiceUnavailableError,
    'MODEL_LOAD_FAILED': ServiceUnavailableError, 'TIMEOUT': DeadlineExceededError,
    'INTERNAL': ServerError, 'BAD_RESPONSE': ProtocolError, 'TLS_ERROR': TLSError,
    # the server's record of a call its caller cancelled; a caller never receives it
    'CANCELLED': ServiceUnavailableError,
    # the REST door's transport refusals: a client calling a wrong path/method/body type
    'NOT_FOUND': InvalidRequestError, 'METHOD_NOT_ALLOWED': InvalidRequestError,
    'UNSUPPORTED_MEDIA_TYPE': InvalidRequestError,
}

# Which codes a client retries: the server's table says (ErrorCode.retryable); kept here as
# names so that the client has no engine import.
# The PRD's retry pattern: 5xx (INTERNAL too), 429 and timeouts; never an open breaker.
RETRYABLE_CODES = frozenset({'MODEL_LOAD_FAILED', 'MODEL_IN_USE', 'RATE_LIMITED', 'OVERLOADED',
                             'TIMEOUT', 'UNAVAILABLE', 'INTERNAL'})

_BY_HTTP = {400: 'INVALID_INPUT', 401: 'UNAUTHENTICATED', 403: 'PERMISSION_DENIED',
            404: 'MODEL_NOT_FOUND', 409: 'MODEL_IN_USE', 413: 'INPUT_TOO_LARGE',
            429: 'RATE_LIMITED', 503: 'UNAVAILABLE', 504: 'TIMEOUT',
            # a proxy's "bad gateway": the upstream is down or restarting, as transient as 503
            502: 'UNAVAILABLE'}

_BY_GRPC = {'INVALID_ARGUMENT': 'INVALID_INPUT', 'NOT_FOUND': 'MODEL_NOT_FOUND',
            'FAILED_PRECONDITION': 'MODEL_UNAVAILABLE', 'UNAUTHENTICATED': 'UNAUTHENTICATED',
            'PERMISSION_DENIED': 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED': 'OVERLOADED',
            'UNAVAILABLE': 'UNAVAILABLE', 'DEADLINE_EXCEEDED': 'TIMEOUT',
            'CANCELLED': 'UNAVAILABLE', 'INTERNAL': 'INTERNAL', 'UNKNOWN': 'INTERNAL'}


def make_error(message: str, code: str, status=None, retry_after_s: Optional[float] = None,
               request_id: str = '', stream_index: Optional[int] = None) -> AkidbError:
    cls = _BY_CODE.get(code, ServerError)
    # a code this client does not know (a newer server's) on a 5xx: the PRD retries 5xx
    retryable = code in RETRYABLE_CODES or (
        code not in _BY_CODE and isinstance(status, int) and status >= 500)
    return cls(message, code=code, status=status, retryable=retryable,
               retry_after_s=retry_after_s, request_id=request_id, stream_index=stream_index)


def code_from_http(status: int) -> str:
    return _BY_HTTP.get(status, 'INTERNAL' if status >= 500 else 'INVALID_INPUT')


def code_from_grpc(status_name: str, details: str = '') -> str:
    """The error-table code of a gRPC status that came without an ``akidb-error-code``.

    gRPC's own message-size refusal ("Received/Sent message larger than max", on either side)
    is RESOURCE_EXHAUSTED too, but resending the same message cannot help: INPUT_TOO_LARGE;
    so is its refusal of the call's metadata ("received metadata size exceeds ... limit": the
    caller's headers, over the server's 64 KiB): INVALID_INPUT.
    """
    if status_name == 'RESOURCE_EXHAUSTED' and 'larger than max' in (details or ''):
        return 'INPUT_TOO_LARGE'
    if status_name == 'RESOURCE_EXHAUSTED' and 'metadata size exceeds' in (details or ''):
        return 'INVALID_INPUT'
    return _BY_GRPC.get(status_name, 'INTERNAL')
