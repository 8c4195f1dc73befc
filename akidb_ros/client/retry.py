"""Retry policy: exponential backoff with jitter, only on retryable errors.

Defaults are the week-6 PRD's retry pattern: 3 retries, base delay 100 ms, max delay 5 s,
jitter ±25 %. The server's Retry-After is honoured; retries are bounded by attempts and an
overall deadline. A policy's fields are checked when it is made (``TypeError``/``ValueError``).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from akidb_ros.client.errors import AkidbError

T = TypeVar('T')


@dataclass
class RetryPolicy:
    max_attempts: int = 4            # 1 = no retry; 4 = the PRD's "max retries: 3"
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_retry_after_s: float = 30.0  # never sleep longer than this on a server hint
    jitter: float = 0.25             # each delay drawn within ±25 % of its step; 0 = none

    def __post_init__(self):
        # refused here, not at the first failure: a negative delay would raise inside
        # time.sleep, a nan one never compare, all mid-outage
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f'max_attempts must be an int >= 1, got '
                            f'{type(self.max_attempts).__name__} {self.max_attempts!r}')
        if self.max_attempts < 1:
            raise ValueError(f'max_attempts must be >= 1 (1 = no retry), got '
                             f'{self.max_attempts!r}')
        for name, low in (('initial_backoff_s', 0.0), ('max_backoff_s', 0.0),
                          ('multiplier', 1.0), ('max_retry_after_s', 0.0), ('jitter', 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f'{name} must be a number, got {type(value).__name__} '
                                f'{value!r}')
            try:
                ok = math.isfinite(value) and value >= low
            except OverflowError:   # an int too large for a float
                ok = False
            if not ok:
                raise ValueError(f'{name} must be a finite number >= {low:g}, got {value!r}')
        if self.jitter > 1.0:
            raise ValueError(f'jitter must be a fraction in [0, 1], not {self.jitter!r}')

    def backoff(self, attempt: int, retry_after_s: Optional[float] = None,
                rng: Callable[[], float] = random.random) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        step = float(self.initial_backoff_s)
        if 0.0 < step < self.max_backoff_s and attempt > 1:
            try:
                step *= float(self.multiplier) ** (attempt - 1)
            except OverflowError:   # past ~1000 attempts: long since at the cap
                step = math.inf
        step = min(float(self.max_backoff_s), step)
        # ±jitter around the step, so callers that failed together spread out, yet no retry
        # comes (almost) at once as full jitter's would
        delay = step * (1.0 + float(self.jitter) * (2.0 * rng() - 1.0))
        if retry_after_s is not None:
            delay = max(delay, min(float(retry_after_s), self.max_retry_after_s))
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(fn: Callable[[Optional[float]], T], policy: RetryPolicy,
                    deadline_s: Optional[float] = None,
                    sleep: Callable[[float], None] = time.sleep,
                    on_retry: Optional[Callable[[int, AkidbError, float], None]] = None) -> T:
    """Call ``fn(remaining_s)`` until it succeeds, fails for good, or time/attempts run out."""
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        remaining = None if deadline_s is None else deadline_s - (time.monotonic() - start)
        try:
            return fn(remaining)
        except AkidbError as err:
            if not err.retryable or attempt >= policy.max_attempts:
                raise
            delay = policy.backoff(attempt, err.retry_after_s)
            if deadline_s is not None and time.monotonic() - start + delay >= deadline_s:
                raise
            if on_retry is not None:
                on_retry(attempt, err, delay)
            sleep(delay)
