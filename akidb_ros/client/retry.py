"""Retry policy: exponential backoff with jitter, only on retryable errors.

Defaults are the week-6 PRD's retry pattern: 3 retries, base delay 100 ms, max delay 5 s,
jitter ±25 %. The server's Retry-After is honoured; retries are bounded by attempts and an
overall deadline.
"""
from __future__ import annotations

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
        if not 0.0 <= float(self.jitter) <= 1.0:
            raise ValueError(f'jitter must be a fraction in [0, 1], not {self.jitter!r}')

    def backoff(self, attempt: int, retry_after_s: Optional[float] = None,
                rng: Callable[[], float] = random.random) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        step = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
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
