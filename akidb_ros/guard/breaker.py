"""Circuit breaker per model (PRD numbers as defaults).

CLOSED   calls pass; the last ``window`` (10) outcomes are kept. Once at least ``min_calls``
         (10) outcomes are in the window and failures are >= ``failure_ratio`` (50 %) of them,
         the breaker OPENS.
OPEN     every call fails fast with CIRCUIT_OPEN (HTTP 503 / gRPC UNAVAILABLE) and
         ``retry_after_s`` = time left; after ``open_s`` (30 s) the next call moves it to
         HALF_OPEN.
HALF_OPEN up to ``half_open_probes`` (3) calls go through as probes, the rest fail fast. All 3
         succeed -> CLOSED (fresh window); any probe fails -> OPEN for another ``open_s``.

Only failures of the model count (timeouts, load failures, internal errors); a caller's mistake
(invalid input, unknown model, auth, rate limit, load shedding) is neutral, and so is a timeout of
a caller that asked for less than the server's budget (``Guard.door_hook``). Outcomes of calls
admitted in an earlier state (a slow call that finishes after the breaker opened) are dropped.
The state is exported as ``akidb_circuit_breaker_state{model}``: 0 closed, 1 half-open, 2 open.
"""

from __future__ import annotations

import enum
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from akidb_ros.engine.errors import EngineError, ErrorCode


class State(enum.IntEnum):
    CLOSED = 0  # gauge values ordered by severity (exported as akidb_circuit_breaker_state{model})
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class BreakerSettings:
    window: int = 10
    min_calls: int = 10
    failure_ratio: float = 0.5
    open_s: float = 30.0
    half_open_probes: int = 3

    def __post_init__(self):
        if (
            not (1 <= self.min_calls <= self.window)
            or not (0 < self.failure_ratio <= 1)
            or self.open_s <= 0
            or self.half_open_probes < 1
        ):
            raise ValueError(f'invalid breaker settings {self}')


# Codes that say "the model is sick". Everything else is the caller's business or, for
# UNAVAILABLE (node gone from the DDS graph, engine draining, model swapping), a state of the
# backend that is already answered fast and that a per-model breaker would only prolong: after a
# node restart the model would stay "open" for 30 s although the node serves again.
FAILURE_CODES = frozenset({ErrorCode.MODEL_LOAD_FAILED, ErrorCode.TIMEOUT, ErrorCode.INTERNAL})


def default_is_failure(exc: BaseException) -> bool:
    if isinstance(exc, EngineError):
        # a TIMEOUT after some of the call's inputs were embedded: the model answers, the call
        # was more work than its budget (one client's large calls must not open the model's
        # breaker for everyone)
        return exc.code in FAILURE_CODES and not (exc.code is ErrorCode.TIMEOUT and exc.partial)
    return isinstance(exc, Exception)


@dataclass(frozen=True)
class Permit:
    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: Optional[BreakerSettings] = None,
        clock: Callable[[], float] = time.monotonic,
        is_failure: Callable[[BaseException], bool] = default_is_failure,
        on_transition: Optional[Callable[[str, State, State], None]] = None,
        export_metrics: bool = True,
    ):
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self.is_failure = is_failure
        self._on_transition = on_transition
        self._export = export_metrics
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._window: deque = deque(maxlen=self.settings.window)  # True = failure
        self._opened_at = 0.0
        self._generation = 0
        self._probes_started = 0
        self._probe_successes = 0
        self._pending: list = []  # transitions to publish outside the lock
        if export_metrics:
            # read at each scrape: OPEN -> HALF_OPEN happens when open_s has passed, and a
            # model nobody calls any more would otherwise read open (and keep its alert
            # firing) until its next call
            ref = weakref.ref(self)
            from akidb_ros.observability import metrics
            metrics.CIRCUIT_BREAKER_STATE.labels(model=name).set_function(
                lambda: int(ref().state) if ref() is not None else int(State.CLOSED))

    # ---- state ----
    @property
    def state(self) -> State:
        try:
            with self._lock:
                self._tick()
                return self._state
        finally:
            self._flush()

    def snapshot(self) -> Dict[str, Any]:
        try:
            with self._lock:
                self._tick()
                fails = sum(self._window)
                return {
                    'model': self.name,
                    'state': self._state.name.lower(),
                    'window_calls': len(self._window),
                    'window_failures': fails,
                    'open_remaining_s': (
                        max(0.0, self._opened_at + self.settings.open_s - self._clock())
                        if self._state is State.OPEN
                        else 0.0
                    ),
                }
        finally:
            self._flush()

    def _publish(self, old: State, new: State) -> None:
        if self._export:
            from akidb_ros.observability import metrics

            # (the state gauge reads the state itself at each scrape: __init__)
            if old is not new:
                metrics.CIRCUIT_BREAKER_TRANSITIONS.labels(
                    model=self.name, to=new.name.lower()
                ).inc()
        if old is not new and self._on_transition:
            self._on_transition(self.name, old, new)

    def close(self) -> None:
        """Retire this breaker: its state series goes from the metrics (it read this object at
        each scrape, an open state included, for as long as the object lived) and it neither
        counts nor reports transitions any more. Its owner drops it (a new set of breakers)."""
        with self._lock:
            exported, self._export = self._export, False
            self._on_transition = None
            self._pending.clear()
        if exported:
            from akidb_ros.observability import metrics
            try:
                metrics.CIRCUIT_BREAKER_STATE.remove(self.name)
            except KeyError:
                pass        # no series left for this model

    def _set(self, new: State) -> None:  # lock held
        old, self._state = self._state, new
        self._generation += 1
        if new is State.OPEN:
            self._opened_at = self._clock()
        elif new is State.HALF_OPEN:
            self._probes_started = self._probe_successes = 0
        elif new is State.CLOSED:
            self._window.clear()
        self._pending.append((old, new))

    def _tick(self) -> None:  # lock held
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.settings.open_s:
            self._set(State.HALF_OPEN)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for old, new in pending:
            self._publish(old, new)

    def reprieve(self) -> None:
        """An operator loaded the model again, and the load succeeded: an open breaker lets its
        probes through now (half-open) instead of refusing every call for the rest of
        ``open_s``; the probes' outcome decides, as after the wait."""
        try:
            with self._lock:
                if self._state is State.OPEN:
                    self._set(State.HALF_OPEN)
        finally:
            self._flush()

    # ---- protocol ----
    def allow(self) -> Permit:
        """A permit to call the model, or EngineError(CIRCUIT_OPEN, retry_after_s=...)."""
        try:
            with self._lock:
                self._tick()
                if self._state is State.CLOSED:
                    return Permit(self._generation, False)
                if (
                    self._state is State.HALF_OPEN
                    and self._probes_started < self.settings.half_open_probes
                ):
                    self._probes_started += 1
                    return Permit(self._generation, True)
                retry = (
                    self._opened_at + self.settings.open_s - self._clock()
                    if self._state is State.OPEN
                    else 1.0
                )
            raise EngineError(
                ErrorCode.CIRCUIT_OPEN,
                f'model {self.name!r} is failing; circuit open',
                retry_after_s=max(retry, 0.001),
            )
        finally:
            self._flush()

    def record_success(self, permit: Permit) -> None:
        try:
            with self._lock:
                if permit.generation != self._generation:
                    return
                if self._state is State.CLOSED:
                    self._window.append(False)
                elif self._state is State.HALF_OPEN and permit.probe:
                    self._probe_successes += 1
                    if self._probe_successes >= self.settings.half_open_probes:
                        self._set(State.CLOSED)
        finally:
            self._flush()

    def record_failure(self, permit: Permit) -> None:
        try:
            with self._lock:
                if permit.generation != self._generation:
                    return
                if self._state is State.CLOSED:
                    self._window.append(True)
                    n = len(self._window)
                    if (
                        n >= self.settings.min_calls
                        and sum(self._window) >= self.settings.failure_ratio * n
                    ):
                        self._set(State.OPEN)
                elif self._state is State.HALF_OPEN and permit.probe:
                    self._set(State.OPEN)
        finally:
            self._flush()

    def record_neutral(self, permit: Permit) -> None:
        """The call ended in a caller error: it says nothing about the model; free the probe."""
        with self._lock:
            if (
                permit.generation == self._generation
                and permit.probe
                and self._state is State.HALF_OPEN
            ):
                self._probes_started -= 1

    def record(self, permit: Permit, exc: Optional[BaseException],
               own_deadline: bool = False) -> None:
        """Record a call's outcome. ``own_deadline``: the caller set a deadline well below the
        server's budget (``akidb_ros.doors.caller_deadline``): its TIMEOUT is the caller's
        choice, neutral (one client's 1 ms budget must not open the breaker for everyone)."""
        if exc is None:
            self.record_success(permit)
        elif own_deadline and isinstance(exc, EngineError) and exc.code is ErrorCode.TIMEOUT:
            self.record_neutral(permit)
        elif self.is_failure(exc):
            self.record_failure(permit)
        else:
            self.record_neutral(permit)

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run fn through the breaker (blocking calls, e.g. ``engine.embed``)."""
        permit = self.allow()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record(permit, exc)
            raise
        self.record_success(permit)
        return result

    def track(self, future: Future, permit: Optional[Permit] = None,
              own_deadline: bool = False) -> Future:
        """Record the outcome of an async call (``engine.submit``) when its future completes.

        Call :meth:`allow` before submitting and pass its permit (or let track call it, which
        raises CIRCUIT_OPEN before anything was submitted only if you call it first). A
        cancelled future (the caller withdrew) is neutral; ``own_deadline``: see :meth:`record`.
        """
        permit = permit if permit is not None else self.allow()

        def done(f: Future) -> None:
            if f.cancelled():
                self.record_neutral(permit)
            else:
                self.record(permit, f.exception(), own_deadline)

        future.add_done_callback(done)
        return future


class BreakerRegistry:
    """One breaker per model id, created on first use."""

    def __init__(
        self,
        settings: Optional[BreakerSettings] = None,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Optional[Callable[[str, State, State], None]] = None,
    ):
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._breakers: Dict[str, CircuitBreaker] = {}

    def get(self, model: str) -> CircuitBreaker:
        with self._lock:
            b = self._breakers.get(model)
            if b is None:
                b = CircuitBreaker(
                    model, self.settings, clock=self._clock, on_transition=self._on_transition
                )
                self._breakers[model] = b
            return b

    def reprieve(self, model: str) -> None:
        """:meth:`CircuitBreaker.reprieve` the model's breaker, if it has one."""
        with self._lock:
            b = self._breakers.get(model)
        if b is not None:
            b.reprieve()

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            items = list(self._breakers.items())
        return {k: b.snapshot() for k, b in items}

    def close(self) -> None:
        """Retire every breaker (:meth:`CircuitBreaker.close`): for an owner that replaces its
        breakers (the ROS node at each configure) or stops having any."""
        with self._lock:
            breakers, self._breakers = list(self._breakers.values()), {}
        for b in breakers:
            b.close()
