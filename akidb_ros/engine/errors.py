"""One typed error table for every door.

Each code is declared once with its HTTP status, gRPC status name and whether a client may
retry. REST, gRPC and the ROS node only look codes up here; they never invent statuses.
The ROS ``error_code`` field carries the code's name verbatim.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ErrorSpec:
    http_status: int
    grpc_status: str          # name of a grpc.StatusCode member (no grpc import here)
    retryable: bool
    log_level: str            # how a door logs it: caller mistakes are 'info', ours 'error'


@enum.unique
class ErrorCode(enum.Enum):
    """Each member gets its own ordinal value, so codes with equal specs stay distinct
    members (a plain spec-valued Enum would silently alias e.g. UNAVAILABLE to CIRCUIT_OPEN).
    Look codes up by name: ``ErrorCode['TIMEOUT']``."""

    def __new__(cls, http_status: int, grpc_status: str, retryable: bool, log_level: str):
        member = object.__new__(cls)
        member._value_ = len(cls.__members__) + 1
        member.spec = ErrorSpec(http_status, grpc_status, retryable, log_level)
        return member

    INVALID_INPUT = (400, 'INVALID_ARGUMENT', False, 'info')
    INPUT_TOO_LONG = (400, 'INVALID_ARGUMENT', False, 'info')
    INPUT_TOO_LARGE = (413, 'INVALID_ARGUMENT', False, 'info')
    MODEL_NOT_FOUND = (400, 'NOT_FOUND', False, 'info')     # 400: the PRD's contract
    MODEL_UNAVAILABLE = (404, 'FAILED_PRECONDITION', False, 'info')
    MODEL_LOAD_FAILED = (503, 'UNAVAILABLE', True, 'error')
    MODEL_IN_USE = (409, 'FAILED_PRECONDITION', True, 'info')
    UNAUTHENTICATED = (401, 'UNAUTHENTICATED', False, 'warning')
    PERMISSION_DENIED = (403, 'PERMISSION_DENIED', False, 'warning')
    RATE_LIMITED = (429, 'RESOURCE_EXHAUSTED', True, 'info')
    OVERLOADED = (503, 'RESOURCE_EXHAUSTED', True, 'warning')
    # The PRD's retry pattern: retry on 5xx, never on an open circuit breaker (its Retry-After
    # still says when it lets a probe through)
    CIRCUIT_OPEN = (503, 'UNAVAILABLE', False, 'warning')
    TIMEOUT = (504, 'DEADLINE_EXCEEDED', True, 'warning')
    UNAVAILABLE = (503, 'UNAVAILABLE', True, 'warning')
    INTERNAL = (500, 'INTERNAL', True, 'error')
    # The caller gave up on its call (a gRPC cancel, a REST client that closed its connection):
    # its work is dropped and the outcome is counted and logged as this, not as a TIMEOUT or a
    # failure; no caller hears it (499: nginx's "client closed request").
    CANCELLED = (499, 'CANCELLED', False, 'info')
    # Transport-level refusals (an HTTP route or method that does not exist, a body that is not
    # JSON); listed here so every code a caller can see comes from this one table.
    NOT_FOUND = (404, 'UNIMPLEMENTED', False, 'info')
    METHOD_NOT_ALLOWED = (405, 'UNIMPLEMENTED', False, 'info')
    UNSUPPORTED_MEDIA_TYPE = (415, 'INVALID_ARGUMENT', False, 'info')

    @property
    def http_status(self) -> int:
        return self.spec.http_status

    @property
    def grpc_status(self) -> str:
        return self.spec.grpc_status

    @property
    def retryable(self) -> bool:
        return self.spec.retryable

    @property
    def log_level(self) -> str:
        return self.spec.log_level


class EngineError(Exception):
    """The one exception type that crosses the engine boundary.

    ``partial``: a TIMEOUT that says nothing of the model's health: some of the call's
    inputs were embedded when its deadline passed (the model answered), the model finished
    other calls' runs while it waited (``BUSY_NOTE``: the load's, the model is well), the
    call ran out of time while its text was tokenised (``tokenise_timeout``: the caller's own
    text, before the model), or its own budget ran out while its model loaded
    (``loading_timeout``). Circuit breakers count it as neutral, not as a sick model.
    """

    def __init__(self, code: ErrorCode, message: str, retry_after_s: Optional[float] = None,
                 partial: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.partial = partial

    def __repr__(self) -> str:
        return f'EngineError({self.code.name}, {self.message!r})'

    def to_dict(self) -> dict:
        """The wire shape shared by REST (``{error, code}``) and logs."""
        return {'error': self.message, 'code': self.code.name}


def progress_note(done: int, total: int) -> str:
    """How much of a timed-out call was embedded, as its TIMEOUT message says it."""
    return f'{done} of {total} inputs embedded'


TOKENISE_TIMEOUT = 'request not tokenised within its deadline'
# in a TIMEOUT with nothing embedded, when the model finished other calls' runs while it waited
BUSY_NOTE = 'the model answered other calls meanwhile'
LOADING_NOTE = "the call's own budget ran out while its model loaded"


def loading_timeout(model_id: str) -> EngineError:
    """TIMEOUT of a call whose own budget ran out while its model loaded (the load goes on):
    ``partial``, since a model loading is not a sick one."""
    return EngineError(ErrorCode.TIMEOUT, f'{LOADING_NOTE} (model {model_id} goes on loading: '
                       'retry, or give the call a longer budget)', retry_after_s=1.0,
                       partial=True)


def tokenise_timeout(detail: str) -> EngineError:
    """TIMEOUT of a call whose text was not tokenised within its budget: ``partial``, since the
    model never saw it (the wire keeps that in the message, see ``error_from_code``)."""
    return EngineError(ErrorCode.TIMEOUT, f'{TOKENISE_TIMEOUT} ({detail})', retry_after_s=1.0,
                       partial=True)


# progress_note inside a TIMEOUT message: the wire (the ROS response) carries code and message
_PROGRESS = re.compile(r'\b(\d+) of (\d+) inputs embedded\b')


def error_from_code(name: str, message: str,
                    retry_after_s: Optional[float] = None) -> EngineError:
    """Rebuild an EngineError from a code name received over a wire (e.g. the ROS response);
    ``retry_after_s`` ≤ 0 (the wire's "none") is no hint; a TIMEOUT whose message says some
    inputs were embedded, that the model answered others meanwhile, that its text was not
    tokenised, or that its own budget ran out while its model loaded, is ``partial``."""
    try:
        code = ErrorCode[name]
    except KeyError:
        code = ErrorCode.INTERNAL
    partial = False
    if code is ErrorCode.TIMEOUT:
        progress = _PROGRESS.search(message)
        partial = bool(progress and int(progress.group(1)) > 0) or \
            message.startswith((TOKENISE_TIMEOUT, LOADING_NOTE)) or BUSY_NOTE in message
    return EngineError(code, message, retry_after_s if retry_after_s and retry_after_s > 0
                       else None, partial=partial)
