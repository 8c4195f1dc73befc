"""Token buckets against the PRD's numbers: exact with a hand-driven clock, measured in real
time."""

import threading
import time

import pytest

from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.guard.ratelimit import BucketSpec, RateLimitedError, RateLimiter, RateLimitSettings


def test_defaults_are_the_prd_numbers():
    s = RateLimitSettings()
    assert (s.per_client.rate, s.per_client.burst) == (100, 20)
    assert (s.global_.rate, s.global_.burst) == (1000, 200)


def test_client_burst_then_refusal_then_refill(clock):
    rl = RateLimiter(clock=clock)
    got = [rl.check('a') for _ in range(25)]
    assert [d.allowed for d in got] == [True] * 20 + [False] * 5
    assert got[0].remaining == 19 and got[19].remaining == 0
    refused = got[20]
    assert refused.scope == 'client' and refused.retry_after_s == pytest.approx(0.01)
    h = refused.headers()
    assert h == {
        'X-RateLimit-Limit': '100',
        'X-RateLimit-Remaining': '0',
        'X-RateLimit-Reset': '1',
        'Retry-After': '1',
    }
    clock.advance(0.05)  # 100/s -> 5 tokens
    assert [rl.check('a').allowed for _ in range(6)] == [True] * 5 + [False]
    assert rl.check('b').allowed  # other clients have their own bucket


def test_global_bucket_across_clients(clock):
    rl = RateLimiter(clock=clock)
    allowed = sum(rl.check(f'c{i}').allowed for i in range(300))  # 300 clients, 1 call each
    assert allowed == 200
    d = rl.check('fresh-client')
    assert not d.allowed and d.scope == 'global'
    assert d.retry_after_s == pytest.approx(0.001)
    clock.advance(0.1)  # 1000/s -> 100 tokens
    assert sum(rl.check(f'd{i}').allowed for i in range(150)) == 100


def test_refused_request_takes_no_token(clock):
    rl = RateLimiter(
        RateLimitSettings(per_client=BucketSpec(10, 2), global_=BucketSpec(1000, 1)), clock=clock
    )
    assert rl.check('a').allowed
    assert not rl.check('b').allowed  # global empty: b's own bucket stays full
    clock.advance(0.001)
    assert rl.check('b').remaining == 1


def test_role_overrides(clock):
    rl = RateLimiter(
        RateLimitSettings(roles={'admin': BucketSpec(1000, 200), 'viewer': BucketSpec(10, 2)}),
        clock=clock,
    )
    assert sum(rl.check('v', 'viewer').allowed for _ in range(5)) == 2
    assert rl.check('v', 'viewer').headers()['X-RateLimit-Limit'] == '10'
    # the viewer's 2 requests also came out of the global bucket (200): 198 left for admin
    assert sum(rl.check('adm', 'admin').allowed for _ in range(199)) == 198
    assert sum(rl.check('dev', 'developer').allowed for _ in range(30)) == 0  # global bucket spent
    clock.advance(1.0)
    assert sum(rl.check('dev', 'developer').allowed for _ in range(30)) == 20


def test_acquire_raises_rate_limited_with_headers(clock):
    rl = RateLimiter(RateLimitSettings(per_client=BucketSpec(0.5, 1)), clock=clock)
    rl.acquire('x')
    with pytest.raises(RateLimitedError) as e:
        rl.acquire('x')
    err = e.value
    assert isinstance(err, EngineError) and err.code is ErrorCode.RATE_LIMITED
    assert err.code.http_status == 429 and err.code.grpc_status == 'RESOURCE_EXHAUSTED'
    assert err.retry_after_s == pytest.approx(2.0) and err.headers['Retry-After'] == '2'


def test_client_table_is_bounded(clock):
    rl = RateLimiter(
        RateLimitSettings(max_clients=100, global_=BucketSpec(1e6, 100000)), clock=clock
    )
    for i in range(1000):
        rl.check(f'c{i}')
    assert rl.clients() == 100


def _hammer(rl, clients, duration, threads=4):
    count = [0] * threads
    stop = time.perf_counter() + duration

    def run(i):
        n = 0
        while time.perf_counter() < stop:
            for c in clients:
                if rl.check(c).allowed:
                    n += 1
        count[i] = n

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # tokens accrue over [first check, stop]; a thread descheduled past `stop` adds nothing
    return sum(count), stop - t0


def test_measured_per_client_rate_real_time():
    """One client hammering from 4 threads for 2 s gets burst + 100/s * 2 s = 220 (+-10 %)."""
    rl = RateLimiter()
    allowed, elapsed = _hammer(rl, ['robot'], 2.0)
    expected = 20 + 100 * elapsed
    assert abs(allowed - expected) <= 0.10 * expected, (allowed, expected)


def test_measured_global_rate_real_time():
    """50 clients (each under its own 100/s) together are held to 1000/s + burst 200 (+-10 %)."""
    rl = RateLimiter()
    allowed, elapsed = _hammer(rl, [f'c{i}' for i in range(50)], 1.5)
    expected = 200 + 1000 * elapsed
    assert abs(allowed - expected) <= 0.10 * expected, (allowed, expected)


def test_switching_roles_never_refills_a_clients_bucket(clock):
    """Two keys of one client with different roles share one bucket: alternating them takes
    from it like one key would, under the spec of the role of each request."""
    rl = RateLimiter(RateLimitSettings(per_client=BucketSpec(100, 20),
                                       roles={'viewer': BucketSpec(10, 2)}), clock=clock)
    allowed = sum(rl.check('svc', role).allowed
                  for role in ['developer', 'viewer'] * 30)
    assert allowed <= 20
    assert not rl.check('svc', 'viewer').allowed and not rl.check('svc', 'developer').allowed


def test_a_global_refusal_reports_the_global_bucket(clock):
    rl = RateLimiter(RateLimitSettings(per_client=BucketSpec(100, 20),
                                       global_=BucketSpec(10, 5)), clock=clock)
    for i in range(5):
        assert rl.check(f'c{i}').allowed
    d = rl.check('fresh')
    assert not d.allowed and d.scope == 'global'
    h = d.headers()
    assert h['X-RateLimit-Limit'] == '10' and h['X-RateLimit-Remaining'] == '0'
    assert h['X-RateLimit-Reset'] == '1' and h['Retry-After'] == '1'
