"""One typed error table for every door.

Each code is declared once with its HTTP status, gRPC status name and whether a client may
retry. REST, gRPC and the ROS node only look codes up here; they never invent statuses.
The ROS ``error_code`` field carries the code's name verbatim.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ErrorSpec:
    http_status: int
    grpc_status: str          # name of a grpc.StatusCode member (no grpc import here)
    retryable: bool
    log_level: str            # how a door logs it: caller mistakes are 'info', ours 'error'


class ErrorCode(enum.Enum):
    INVALID_INPUT = ErrorSpec(400, 'INVALID_ARGUMENT', False, 'info')
    INPUT_TOO_LONG = ErrorSpec(400, 'INVALID_ARGUMENT', False, 'info')
    INPUT_TOO_LARGE = ErrorSpec(413, 'INVALID_ARGUMENT', False, 'info')
    MODEL_NOT_FOUND = ErrorSpec(404, 'NOT_FOUND', False, 'info')
    MODEL_UNAVAILABLE = ErrorSpec(404, 'FAILED_PRECONDITION', False, 'info')
    MODEL_LOAD_FAILED = ErrorSpec(503, 'UNAVAILABLE', True, 'error')
    MODEL_IN_USE = ErrorSpec(409, 'FAILED_PRECONDITION', True, 'info')
    UNAUTHENTICATED = ErrorSpec(401, 'UNAUTHENTICATED', False, 'warning')
    PERMISSION_DENIED = ErrorSpec(403, 'PERMISSION_DENIED', False, 'warning')
    RATE_LIMITED = ErrorSpec(429, 'RESOURCE_EXHAUSTED', True, 'info')
    OVERLOADED = ErrorSpec(503, 'RESOURCE_EXHAUSTED', True, 'warning')
    CIRCUIT_OPEN = ErrorSpec(503, 'UNAVAILABLE', True, 'warning')
    TIMEOUT = ErrorSpec(504, 'DEADLINE_EXCEEDED', True, 'warning')
    UNAVAILABLE = ErrorSpec(503, 'UNAVAILABLE', True, 'warning')
    INTERNAL = ErrorSpec(500, 'INTERNAL', False, 'error')

    @property
    def http_status(self) -> int:
        return self.value.http_status

    @property
    def grpc_status(self) -> str:
        return self.value.grpc_status

    @property
    def retryable(self) -> bool:
        return self.value.retryable


class EngineError(Exception):
    """The one exception type that crosses the engine boundary."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: Optional[float] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f'EngineError({self.code.name}, {self.message!r})'

    def to_dict(self) -> dict:
        """The wire shape shared by REST (``{error, code}``) and logs."""
        return {'error': self.message, 'code': self.code.name}


def error_from_code(name: str, message: str) -> EngineError:
    """Rebuild an EngineError from a code name received over a wire (e.g. the ROS response)."""
    try:
        code = ErrorCode[name]
    except KeyError:
        code = ErrorCode.INTERNAL
    return EngineError(code, message)
