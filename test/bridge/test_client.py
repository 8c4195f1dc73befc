"""akidb_ros.client against real servers: typed errors, retries only when retryable,
Retry-After honoured, deadlines."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from akidb_ros.client import (DeadlineExceededError, GrpcClient, InvalidRequestError,
                              ModelNotFoundError, OverloadedError, RestClient, RetryPolicy,
                              ServiceUnavailableError)
from akidb_ros.client.rest import parse_retry_after
from akidb_ros.client.retry import NO_RETRY, call_with_retry

from bridge_support import free_port, scrape, total


def test_backoff_is_the_prds_pattern_and_honours_retry_after():
    """PRD (week 6): max retries 3, base delay 100 ms, max delay 5 s, jitter ±25 %."""
    p = RetryPolicy()
    assert p.max_attempts == 4
    mid = [p.backoff(a, rng=lambda: 0.5) for a in range(1, 9)]
    assert mid == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert p.backoff(1, rng=lambda: 0.0) == pytest.approx(0.075)
    assert p.backoff(1, rng=lambda: 1.0) == pytest.approx(0.125)
    assert p.backoff(7, rng=lambda: 1.0) == pytest.approx(6.25)
    draws = [p.backoff(3) for _ in range(200)]
    assert 0.3 <= min(draws) < max(draws) <= 0.5 and len(set(draws)) > 100
    assert RetryPolicy(jitter=0).backoff(3, rng=lambda: 0.0) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)
    assert p.backoff(1, retry_after_s=2.0, rng=lambda: 0.5) == 2.0
    assert p.backoff(1, retry_after_s=999, rng=lambda: 0.5) == p.max_retry_after_s


def test_backoff_is_capped_without_overflow():
    """multiplier ** (n-1) overflows a float past ~1025 attempts: the cap holds there, and a
    client with max_attempts=5000 against a down server gets a typed error, not OverflowError."""
    p = RetryPolicy(max_attempts=5000)
    for n in (1026, 5000, 10 ** 6):
        assert p.backoff(n, rng=lambda: 0.5) == p.max_backoff_s
    assert RetryPolicy(multiplier=2).backoff(5000, rng=lambda: 0.5) == p.max_backoff_s
    assert RetryPolicy(initial_backoff_s=0).backoff(5000) == 0.0
    calls, slept = [], []

    def fail(_remaining):
        calls.append(1)
        raise ServiceUnavailableError('down', code='UNAVAILABLE', retryable=True)
    with pytest.raises(ServiceUnavailableError):
        call_with_retry(fail, p, sleep=slept.append)
    assert len(calls) == 5000 and max(slept) <= p.max_backoff_s * 1.25


@pytest.mark.parametrize('field,bad,exc', [
    ('max_attempts', 0, ValueError), ('max_attempts', -1, ValueError),
    ('max_attempts', 2.5, TypeError), ('max_attempts', True, TypeError),
    ('max_attempts', '3', TypeError), ('initial_backoff_s', -1, ValueError),
    ('initial_backoff_s', float('nan'), ValueError),
    ('initial_backoff_s', float('inf'), ValueError),
    ('initial_backoff_s', '0.1', TypeError), ('max_backoff_s', -0.5, ValueError),
    ('max_backoff_s', float('inf'), ValueError), ('multiplier', 0.5, ValueError),
    ('multiplier', 0, ValueError), ('multiplier', float('nan'), ValueError),
    ('multiplier', float('inf'), ValueError), ('max_backoff_s', 10 ** 400, ValueError),
    ('max_retry_after_s', -1, ValueError),
    ('max_retry_after_s', float('nan'), ValueError), ('jitter', float('nan'), ValueError),
    ('jitter', -0.1, ValueError), ('jitter', None, TypeError),
])
def test_retry_policy_refuses_bad_fields_at_construction(field, bad, exc):
    with pytest.raises(exc, match=field):
        RetryPolicy(**{field: bad})


def test_retry_policy_accepts_its_bounds():
    p = RetryPolicy(max_attempts=1, initial_backoff_s=0, max_backoff_s=0, multiplier=1,
                    max_retry_after_s=0, jitter=0)
    assert p.backoff(3, retry_after_s=5) == 0.0
    assert RetryPolicy(jitter=1).backoff(1, rng=lambda: 0.0) == 0.0


def test_parse_retry_after():
    assert parse_retry_after('3') == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after('garbage') is None
    when = time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after(when) <= 31


def test_embed_and_typed_errors(rest):
    out = rest.embed(['typed client'])
    assert out.embeddings.shape == (1, 384) and out.request_id
    with pytest.raises(ModelNotFoundError) as ei:
        rest.embed(['x'], model='nope')
    assert ei.value.status == 400 and not ei.value.retryable and ei.value.request_id
    with pytest.raises(InvalidRequestError):
        rest.embed([''])


def test_caller_mistake_is_not_retried(rest_url):
    c = RestClient(rest_url, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.01))
    before = scrape(requests.get(rest_url + '/metrics', timeout=5).text)
    with pytest.raises(InvalidRequestError):
        c.embed(['   '])
    after = scrape(requests.get(rest_url + '/metrics', timeout=5).text)
    key = dict(transport='rest', code='INVALID_INPUT')
    assert total(after, 'akidb_request_errors_total', **key) - \
        total(before, 'akidb_request_errors_total', **key) == 1


def test_unreachable_server_is_retried_then_typed():
    port = free_port()
    c = RestClient(f'http://127.0.0.1:{port}', timeout_s=5,
                   retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, jitter=0))
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as ei:
        c.embed(['x'])
    assert ei.value.retryable
    assert time.monotonic() - t0 >= 0.05 + 0.1        # two backoffs were slept
    g = GrpcClient(f'127.0.0.1:{port}', timeout_s=3,
                   retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.05))
    with pytest.raises(ServiceUnavailableError):
        g.embed(['x'])
    g.close()


def test_deadline_is_enforced_client_side(rest_url):
    c = RestClient(rest_url, retry=NO_RETRY)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        c.embed([' '.join(['slow'] * 200)] * 64, timeout_s=0.05)
    assert time.monotonic() - t0 < 3


def test_call_with_retry_stops_at_deadline():
    calls = []

    def fail(_remaining):
        calls.append(time.monotonic())
        raise ServiceUnavailableError('down', code='UNAVAILABLE', retryable=True,
                                      retry_after_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailableError):
        call_with_retry(fail, RetryPolicy(max_attempts=100), deadline_s=1.0)
    assert 2 <= len(calls) <= 4 and time.monotonic() - t0 < 1.2
    assert all(b - a >= 0.29 for a, b in zip(calls, calls[1:]))   # Retry-After honoured


def test_overload_retry_after_then_success(small_bridges):
    """A real engine queue that sheds: without retries callers see OVERLOADED + Retry-After;
    with retries every call completes."""
    url = f'http://127.0.0.1:{small_bridges.rest_port}'
    texts = [' '.join(['crowded'] * 40)] * 8
    outcomes = {'shed': [], 'ok': [], 'other': []}
    lock = threading.Lock()

    def impatient():
        c = RestClient(url, timeout_s=60, retry=NO_RETRY)
        for _ in range(2):
            try:
                c.embed(texts)
                kind, val = 'ok', None
            except OverloadedError as e:
                kind, val = 'shed', e
            except Exception as e:  # pragma: no cover - reported by the assert below
                kind, val = 'other', e
            with lock:
                outcomes[kind].append(val)

    threads = [threading.Thread(target=impatient) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not outcomes['other'], outcomes['other'][:3]
    assert outcomes['shed'], 'the tiny queue never shed'
    assert all(e.status == 503 and e.retry_after_s and e.retryable for e in outcomes['shed'])

    results, errors = [], []

    def patient():
        c = RestClient(url, timeout_s=120, retry=RetryPolicy(max_attempts=30,
                                                             max_retry_after_s=1.0))
        try:
            results.append(c.embed(texts))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=patient) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 12
