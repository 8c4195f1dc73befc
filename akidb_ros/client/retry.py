"""Retry policy: exponential backoff with full jitter, only on retryable errors.

The server's Retry-After is honoured; retries are bounded by attempts and an overall deadline.
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
    max_attempts: int = 4            # 1 = no retry
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    max_retry_after_s: float = 30.0  # never sleep longer than this on a server hint
    jitter: bool = True

    def backoff(self, attempt: int, retry_after_s: Optional[float] = None,
                rng: Callable[[], float] = random.random) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        delay = cap * rng() if self.jitter else cap   # "full jitter"
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
