"""Token-bucket rate limits: one bucket per client, one global bucket, per-role overrides.

PRD numbers (defaults): per client 100 req/s with burst 20, global 1000 req/s with burst 200.
A request takes one token from its client's bucket AND one from the global bucket, atomically:
when either is empty nothing is taken and the caller gets RATE_LIMITED (HTTP 429 / gRPC
RESOURCE_EXHAUSTED) with ``Retry-After`` = time until both buckets hold a token again.

Headers (all integers, seconds), about the client's bucket (on a refusal by the global
bucket, about that one):
  X-RateLimit-Limit      sustained rate of the bucket (requests per second)
  X-RateLimit-Remaining  whole tokens left in the bucket after this request
  X-RateLimit-Reset      seconds until the bucket is full again
  Retry-After            (refusals only) seconds until a retry can succeed, rounded up
Buckets of idle clients are dropped (bounded memory, ``max_clients``); a dropped bucket would
have been full anyway once idle for burst/rate seconds. A client whose role changes (two keys of
one client with different roles) keeps its bucket's tokens under the new role's spec: switching
keys never refills it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from akidb_ros.engine.errors import EngineError, ErrorCode


@dataclass(frozen=True)
class BucketSpec:
    rate: float  # tokens per second
    burst: int  # bucket capacity

    def __post_init__(self):
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f'rate must be > 0 and burst >= 1 (got {self.rate}, {self.burst})')


class TokenBucket:
    """Not thread-safe on its own; the limiter serialises access."""

    __slots__ = ('spec', 'tokens', 'stamp')

    def __init__(self, spec: BucketSpec, now: float):
        self.spec, self.tokens, self.stamp = spec, float(spec.burst), now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(
                float(self.spec.burst), self.tokens + (now - self.stamp) * self.spec.rate
            )
            self.stamp = now

    def wait_for(self, n: float = 1.0) -> float:
        """Seconds until n tokens are available (0 when they are)."""
        short = n - self.tokens
        return 0.0 if short <= 1e-9 else short / self.spec.rate  # tolerate float dust

    def time_to_full(self) -> float:
        return (self.spec.burst - self.tokens) / self.spec.rate


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    scope: str  # 'client' | 'global' | 'auth_failures' | 'none' (limits off)
    limit: float
    remaining: int
    reset_s: float
    retry_after_s: float = 0.0

    def headers(self) -> Dict[str, str]:
        if self.scope == 'none':
            return {}
        h = {
            'X-RateLimit-Limit': str(
                int(self.limit) if float(self.limit).is_integer() else self.limit
            ),
            'X-RateLimit-Remaining': str(self.remaining),
            'X-RateLimit-Reset': str(max(0, math.ceil(self.reset_s))),
        }
        if not self.allowed:
            h['Retry-After'] = str(max(1, math.ceil(self.retry_after_s)))
        return h


class RateLimitedError(EngineError):
    """EngineError(RATE_LIMITED) that also carries the headers to send."""

    def __init__(self, decision: RateLimitDecision):
        super().__init__(
            ErrorCode.RATE_LIMITED,
            f'rate limit exceeded ({decision.scope}); retry after '
            f'{max(1, math.ceil(decision.retry_after_s))} s',
            retry_after_s=decision.retry_after_s,
        )
        self.decision = decision
        self.headers = decision.headers()


@dataclass
class RateLimitSettings:
    enabled: bool = True
    per_client: BucketSpec = field(default_factory=lambda: BucketSpec(100.0, 20))
    global_: BucketSpec = field(default_factory=lambda: BucketSpec(1000.0, 200))
    roles: Dict[str, BucketSpec] = field(default_factory=dict)  # role name -> per-client spec
    max_clients: int = 10000
    use_global: bool = True     # False: per-client buckets only (the auth-failure limiter)


class RateLimiter:
    def __init__(
        self,
        settings: Optional[RateLimitSettings] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings or RateLimitSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._global = TokenBucket(self.settings.global_, clock())
        self._clients: 'OrderedDict[str, TokenBucket]' = OrderedDict()

    def spec_for(self, role: Optional[str]) -> BucketSpec:
        return self.settings.roles.get(role or '', self.settings.per_client)

    def check(
        self, client: str, role: Optional[str] = None, cost: float = 1.0
    ) -> RateLimitDecision:
        s = self.settings
        if not s.enabled:
            return RateLimitDecision(True, 'none', 0, 0, 0.0)
        spec = self.spec_for(role)
        with self._lock:
            now = self._clock()
            bucket = self._clients.get(client)
            if bucket is None:
                bucket = TokenBucket(spec, now)
                self._clients[client] = bucket
                while len(self._clients) > s.max_clients:
                    self._clients.popitem(last=False)
            elif bucket.spec != spec:
                # same client, another role: keep what is left, never a fresh full bucket
                bucket.refill(now)
                bucket.spec, bucket.tokens = spec, min(bucket.tokens, float(spec.burst))
            self._clients.move_to_end(client)
            bucket.refill(now)
            self._global.refill(now)
            wait_client = bucket.wait_for(cost)
            wait_global = self._global.wait_for(cost) if s.use_global else 0.0
            if wait_client == 0.0 and wait_global == 0.0:
                bucket.tokens = max(0.0, bucket.tokens - cost)
                if s.use_global:
                    self._global.tokens = max(0.0, self._global.tokens - cost)
                return RateLimitDecision(
                    True, 'client', spec.rate, int(bucket.tokens + 1e-9), bucket.time_to_full()
                )
            if wait_client >= wait_global:
                scope, full = 'client', bucket
            else:           # the headers describe the bucket that refused
                scope, full = 'global', self._global
            return RateLimitDecision(
                False,
                scope,
                full.spec.rate,
                int(full.tokens + 1e-9),
                full.time_to_full(),
                max(wait_client, wait_global),
            )

    def acquire(self, client: str, role: Optional[str] = None) -> RateLimitDecision:
        """Take a token or raise :class:`RateLimitedError`."""
        d = self.check(client, role)
        if not d.allowed:
            raise RateLimitedError(d)
        return d

    def clients(self) -> int:
        with self._lock:
            return len(self._clients)
