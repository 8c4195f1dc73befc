"""What the REST and gRPC doors share: request ids, the guard seam, metrics and access logs.

The guard seam
--------------
``guard`` is any callable
``guard(call: DoorCall) -> None | Callable[[Optional[EngineError]], None]``
run by every door *before* the backend is called (after parsing and schema validation, so the
guard sees the model and input count). It may

* raise :class:`EngineError` (``UNAUTHENTICATED``, ``PERMISSION_DENIED``, ``RATE_LIMITED``,
  ``CIRCUIT_OPEN`` ...) — the door answers with that code's status and never calls the backend;
* set ``call.principal`` (the authenticated identity) for logs;
* return a completion callback, called once with the backend's error (or ``None``) when the
  call ends — for concurrency permits and circuit-breaker outcome accounting.

``akidb_ros.guard`` (auth → RBAC → rate limit → breaker) plugs in here; the doors import none
of it.
"""
from __future__ import annotations

import logging
import random
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Set, Tuple

from akidb_ros.backends import DEFAULT_TIMEOUT_S
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.observability import metrics as m
from akidb_ros.observability.logs import log_request

GuardHook = Callable[['DoorCall'], Optional[Callable[[Optional[EngineError]], None]]]


class BindError(OSError):
    """A door could not bind its port (gRPC does not say why: in use, or not this host's)."""


def drain_backlog(sock: socket.socket, take: Callable[[socket.socket, Any], None]) -> None:
    """Hand ``take`` each connection the kernel completed on a stopping listener, then close it.

    Closing a listener resets the connections still in its backlog, whose clients may already
    have sent a request: from their side an accepted call cut without an answer. Taken here,
    each is served (and answered) within the stop's grace.
    """
    try:
        sock.setblocking(False)
        while True:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            take(conn, peer)
    except OSError:
        pass                                # the listener is gone: nothing left to take
    finally:
        try:
            sock.close()
        except OSError:
            pass


# an accept loop's pause after accept() failed for want of descriptors or memory (the
# connection waits in the backlog; retrying at once would spin a core until one comes free)
ACCEPT_PAUSE_S = 0.1


class NowAndThen:
    """Warnings of a loop that may fail many times a second (an accept loop out of
    descriptors): at most one every ``every_s``, the next one saying how many were held."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0):
        self.logger, self.every_s = logger, every_s
        self._warned_at = -float('inf')
        self._held = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._warned_at < self.every_s:
            self._held += 1
            return
        if self._held:
            message += f' ({self._held} more since the last warning)'
        self._warned_at, self._held = now, 0
        self.logger.warning(message, *args)


_REQUEST_ID_RE = re.compile(r'^[A-Za-z0-9._:/+=-]{1,128}$')
REQUEST_ID_HEADER = 'X-Request-ID'
LOG_LEVELS = {'info': logging.INFO, 'warning': logging.WARNING, 'error': logging.ERROR}


def log_level_of(error: Optional[EngineError]) -> int:
    """The access line's level: INFO for a success, else its code's level in the table."""
    return logging.INFO if error is None else LOG_LEVELS.get(error.code.log_level,
                                                             logging.WARNING)


def request_id_from(value: Optional[str]) -> str:
    """Return the caller's request id when it is sane, else a fresh one (128 random bits from
    the process' PRNG, like OpenTelemetry's trace ids: an id names a request, it guards nothing,
    and ``uuid4`` would make a system call on every request)."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return f'{random.getrandbits(128):032x}'


@dataclass
class DoorCall:
    """One request as the guard sees it."""

    transport: str                    # 'rest' | 'grpc'
    # 'embed' | 'list_models' | 'load_model' | 'unload_model' | 'health' | 'metrics'
    operation: str
    request_id: str
    headers: Dict[str, str] = field(default_factory=dict)   # lower-case names (HTTP / metadata)
    peer: str = ''
    model: str = ''
    n_inputs: int = 0
    n_bytes: int = 0
    principal: Optional[object] = None
    response_headers: Dict[str, str] = field(default_factory=dict)   # set by the guard
    priority: Optional[object] = None   # set by the guard: engine Priority (ADMIN lane)
    peer_cert: Optional[object] = None  # client certificate (DER/PEM) when the door has one
    # the caller asked for less time than the server's budget: its TIMEOUT says nothing about
    # the model (the breaker counts it as neutral, like any other choice of the caller)
    caller_deadline: bool = False
    started: float = field(default_factory=time.perf_counter)


def server_cut() -> EngineError:
    """What a ``CANCELLED`` call cut off by the server's own stop (its grace ran out: the
    connection closed, the RPC cancelled) is counted and logged as: ``UNAVAILABLE``, the
    server's doing, not a caller that gave up (each deploy showed as a burst of callers giving
    up)."""
    return EngineError(ErrorCode.UNAVAILABLE, 'the server stopped before the call was answered '
                       '(its graceful-stop budget, --grace, ran out)', retry_after_s=1.0)


def caller_deadline(asked_s: float, budget_s: Optional[float]) -> bool:
    """Whether a caller's own deadline is well below the server's budget (``None``: the
    engine's default, ``DEFAULT_TIMEOUT_S``; under 90 %: a gRPC deadline equal to the budget
    arrives a little spent): its TIMEOUT is then the caller's choice, not a sign of a sick model
    (``DoorCall.caller_deadline``)."""
    return asked_s < 0.9 * (DEFAULT_TIMEOUT_S if budget_s is None else budget_s)


def run_guard(guard: Optional[GuardHook], call: DoorCall):
    """Run the guard chain; returns the completion callback (or None)."""
    if guard is None:
        return None
    try:
        return guard(call)
    except EngineError:
        raise
    except Exception as exc:  # a guard bug must not become a caller's 500 with a traceback
        logging.getLogger('akidb_ros.doors').exception('guard failed')
        raise EngineError(ErrorCode.INTERNAL, f'guard error: {type(exc).__name__}') from exc


class ModelLabels:
    """Bounded metric labels: only model ids the backend knows become label values.

    A call is labelled with the model that serves it (or would have): a call that names no
    model with the default model's id, as its success is; a name the backend does not know
    with ``unknown``; ``default`` only while the backend's model list cannot be read.
    """

    # An empty list (a sidecar's node unconfigured or shutting down) keeps the labels known
    # and is asked again this soon: cached for the whole refresh_s, it labelled every success
    # after the node came back 'unknown' (and keyed its breaker so) for up to 30 s.
    EMPTY_RETRY_S = 1.0

    def __init__(self, backend, refresh_s: float = 30.0):
        self._backend = backend
        self._known: Set[str] = set()
        self._names: Dict[str, str] = {}
        self._default = ''
        self._ts = 0.0
        self._refresh_s = refresh_s

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._ts < self._refresh_s:
            return
        self._ts = time.monotonic()
        try:
            models = self._backend.list_models()
        except Exception:
            return
        if not models:
            self._ts += self.EMPTY_RETRY_S - self._refresh_s
            return
        self._known = {mi.id for mi in models}
        self._names = {mi.name: mi.id for mi in models}
        self._default = next((mi.id for mi in models if mi.is_default), '')

    def resolve(self, model: str) -> str:
        """Accept a model's display name (``sentence-transformers/all-MiniLM-L6-v2``) too."""
        if not model:
            return model
        self.refresh()
        if model in self._known:
            return model
        return self._names.get(model, model)

    def label(self, model: str) -> str:
        """The ``model`` label of a call that named ``model`` ('' = none: the default's)."""
        self.refresh()
        if not model:
            return self._default or 'default'
        return model if model in self._known else 'unknown'

    def breaker_key(self, model: str, default_model: str) -> str:
        """The model a call's circuit breaker is keyed by: the one that will serve it, or
        'unknown' for a name the backend does not know (answered MODEL_NOT_FOUND, neutral to a
        breaker): breakers and their metric series stay bounded whatever callers send."""
        return self.label(model) if model else default_model


# labelled metric children, looked up once per label set (``labels()`` validates, builds a tuple
# and takes the family's lock on every call); bounded: ModelLabels keeps model labels to the
# backend's models plus 'default' and 'unknown'
_REQUEST_CHILDREN: Dict[Tuple[str, str, str], Tuple[Any, Any]] = {}


def _request_metrics(model_label: str, transport: str, status: str) -> Tuple[Any, Any]:
    key = (model_label, transport, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = _REQUEST_CHILDREN[key] = (
            m.EMBED_REQUESTS.labels(model_label, transport, status),
            m.EMBED_LATENCY.labels(model_label, transport))
    return children


def record_refusal(transport: str, request_id: str, error: EngineError, started: float,
                   **log_fields) -> None:
    """A call refused before a door's handler ran (the guard's 401, 403 and 429): counted by its
    code in ``akidb_request_errors_total`` and written as the one access-log line each request
    gets (``model`` empty: nothing of the request was read). ``started``: its
    ``time.perf_counter()`` at arrival. ``akidb_embed_requests_total`` counts the calls the
    doors handled, so SLO ratios are not moved by callers' credentials or rate limits."""
    elapsed_ms = (time.perf_counter() - started) * 1000
    m.REQUEST_ERRORS.labels(transport, error.code.name).inc()
    log_request(transport, request_id, '', elapsed_ms, 'error', code=error.code.name,
                level=log_level_of(error),
                error=error.message, **log_fields)


def record(call: DoorCall, model_label: str, error: Optional[EngineError],
           **log_fields) -> float:
    """Metrics + one access-log line for a finished embed call; returns latency in ms."""
    elapsed = time.perf_counter() - call.started
    status = 'success' if error is None else 'error'
    requests, latency = _request_metrics(model_label, call.transport, status)
    requests.inc()
    latency.observe(elapsed)
    if error is not None:
        m.REQUEST_ERRORS.labels(call.transport, error.code.name).inc()
        level = log_level_of(error)
        log_request(call.transport, call.request_id, model_label, elapsed * 1000, 'error',
                    code=error.code.name, level=level, error=error.message,
                    n_inputs=call.n_inputs, **log_fields)
    else:
        log_request(call.transport, call.request_id, model_label, elapsed * 1000, 'success',
                    n_inputs=call.n_inputs, **log_fields)
    return elapsed * 1000
