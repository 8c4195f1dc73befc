"""Circuit breaker transitions against the PRD's numbers (50 % of 10, 30 s open, 3 probes)."""

import concurrent.futures
import time

import pytest
from prometheus_client import REGISTRY

from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.guard.breaker import BreakerRegistry, BreakerSettings, CircuitBreaker, State


def gauge(model):
    return REGISTRY.get_sample_value('akidb_circuit_breaker_state', {'model': model})


def fail(b, n=1, code=ErrorCode.TIMEOUT):
    for _ in range(n):
        b.record(b.allow(), EngineError(code, 'x'))


def ok(b, n=1):
    for _ in range(n):
        b.record(b.allow(), None)


def test_defaults_are_the_prd_numbers():
    s = BreakerSettings()
    assert (s.window, s.failure_ratio, s.open_s, s.half_open_probes) == (10, 0.5, 30.0, 3)


def test_opens_at_half_of_last_ten(clock):
    b = CircuitBreaker('m-open', clock=clock)
    ok(b, 5)
    fail(b, 4)
    assert b.state is State.CLOSED  # 4/9: not yet 10 calls
    ok(b, 1)
    assert b.state is State.CLOSED  # 4/10 < 50 %
    fail(b, 1)  # window slides: last 10 = 4 ok + 5 fail + ... -> 5/10
    assert b.state is State.OPEN and gauge('m-open') == 2


def test_stays_closed_below_threshold(clock):
    b = CircuitBreaker('m-below', clock=clock)
    for _ in range(10):  # 40 % failures forever
        ok(b, 3)
        fail(b, 2)
    assert b.state is State.CLOSED and gauge('m-below') == 0


def test_open_for_thirty_seconds_then_three_probes(clock):
    b = CircuitBreaker('m-cycle', clock=clock)
    fail(b, 10)
    assert b.state is State.OPEN
    clock.advance(29.9)
    with pytest.raises(EngineError) as e:
        b.allow()
    assert e.value.code is ErrorCode.CIRCUIT_OPEN and e.value.retry_after_s == pytest.approx(0.1)
    assert e.value.code.http_status == 503 and e.value.code.grpc_status == 'UNAVAILABLE'
    clock.advance(0.1)  # exactly 30 s
    probes = [b.allow() for _ in range(3)]
    assert b.state is State.HALF_OPEN and gauge('m-cycle') == 1
    with pytest.raises(EngineError):
        b.allow()  # a 4th call is not let through
    for p in probes[:2]:
        b.record_success(p)
    assert b.state is State.HALF_OPEN
    b.record_success(probes[2])
    assert b.state is State.CLOSED and gauge('m-cycle') == 0
    assert b.snapshot()['window_calls'] == 0


def test_the_gauge_reads_half_open_after_open_s_without_calls(clock):
    """The exported state moved only when something called the breaker: a model nobody
    called any more read open (2) for good, and AkidbCircuitBreakerOpen never cleared."""
    moves = []
    b = CircuitBreaker('m-idle', clock=clock, on_transition=lambda m, old, new: moves.append(new))
    fail(b, 10)
    assert gauge('m-idle') == 2
    clock.advance(30)
    assert gauge('m-idle') == 1      # the scrape alone, no call
    assert moves == [State.OPEN, State.HALF_OPEN]       # logged when it happened


def test_probe_failure_reopens_for_another_thirty_seconds(clock):
    b = CircuitBreaker('m-reopen', clock=clock)
    fail(b, 10)
    clock.advance(30)
    p1, p2 = b.allow(), b.allow()
    b.record_success(p1)
    b.record_failure(p2)
    assert b.state is State.OPEN
    clock.advance(29)
    with pytest.raises(EngineError):
        b.allow()
    clock.advance(1)
    assert b.state is State.HALF_OPEN


def test_caller_errors_are_neutral(clock):
    b = CircuitBreaker('m-neutral', clock=clock)
    for code in (
        ErrorCode.INVALID_INPUT,
        ErrorCode.INPUT_TOO_LONG,
        ErrorCode.MODEL_NOT_FOUND,
        ErrorCode.RATE_LIMITED,
        ErrorCode.OVERLOADED,
        ErrorCode.PERMISSION_DENIED,
    ):
        fail(b, 10, code)
    assert b.state is State.CLOSED and b.snapshot()['window_calls'] == 0
    fail(b, 10, ErrorCode.MODEL_LOAD_FAILED)
    assert b.state is State.OPEN
    clock.advance(30)
    p = b.allow()
    b.record(p, EngineError(ErrorCode.INVALID_INPUT, 'bad'))  # frees the probe slot
    assert len([b.allow() for _ in range(3)]) == 3


def test_stale_outcomes_are_dropped(clock):
    b = CircuitBreaker('m-stale', clock=clock)
    slow = b.allow()  # admitted while closed
    fail(b, 10)
    clock.advance(30)
    probe = b.allow()
    b.record_success(slow)  # finishes late: must not count as a probe
    assert b.state is State.HALF_OPEN
    b.record_success(probe)
    ok(b, 2)
    assert b.state is State.CLOSED


def test_call_and_track_future(clock):
    b = CircuitBreaker('m-call', clock=clock)
    assert b.call(lambda x: x + 1, 1) == 2
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        for _ in range(7):
            b.track(ex.submit(lambda: 1 / 0)).exception()
        assert b.state is State.CLOSED and b.snapshot()['window_failures'] == 8
        permit = b.allow()  # the door takes the permit before submitting
        b.track(ex.submit(lambda: 1 / 0), permit).exception()
    deadline = time.monotonic() + 2
    while b.state is not State.OPEN and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.state is State.OPEN  # 9 failures of 10


def test_a_reprieve_lets_the_probes_through_at_once(clock):
    """An operator loaded the model again (its files mended): its open breaker goes half-open
    at once instead of refusing every call for the rest of its 30 s; the probes decide."""
    reg = BreakerRegistry(clock=clock)
    b = reg.get('m')
    fail(b, 10)
    assert b.state is State.OPEN
    reg.reprieve('m')
    reg.reprieve('never-called')        # no breaker is made for it
    assert b.state is State.HALF_OPEN and 'never-called' not in reg.snapshot()
    ok(b, 3)
    assert b.state is State.CLOSED
    fail(b, 10)
    reg.reprieve('m')
    fail(b)                             # a probe that fails opens it again
    assert b.state is State.OPEN


def test_registry_one_breaker_per_model(clock):
    reg = BreakerRegistry(clock=clock)
    assert reg.get('a') is reg.get('a') and reg.get('a') is not reg.get('b')
    fail(reg.get('a'), 10)
    assert reg.snapshot()['a']['state'] == 'open' and reg.snapshot()['b']['state'] == 'closed'


def test_real_time_transition_with_real_failing_model(tmp_path):
    """A model file that really fails to load (corrupt ONNX) drives the breaker; open time is
    measured with the real clock (scaled to 0.5 s so the suite stays fast)."""
    import onnxruntime as ort
    bad = tmp_path / 'model.onnx'
    bad.write_bytes(b'\x08\x07\x12\x04junk' + b'\xff' * 64)

    def load_model():
        try:
            return ort.InferenceSession(str(bad), providers=['CPUExecutionProvider'])
        except Exception as exc:  # what the engine maps to MODEL_LOAD_FAILED
            raise EngineError(
                ErrorCode.MODEL_LOAD_FAILED, f'load failed: {type(exc).__name__}'
            ) from exc

    b = CircuitBreaker('m-corrupt', BreakerSettings(open_s=0.5))
    errors = []
    for _ in range(10):
        with pytest.raises(EngineError) as e:
            b.call(load_model)
        errors.append(e.value.code)
    assert errors == [ErrorCode.MODEL_LOAD_FAILED] * 10
    assert b.state is State.OPEN
    t_open = time.monotonic()
    remaining = b.snapshot()['open_remaining_s']
    assert 0.3 < remaining <= 0.5
    with pytest.raises(EngineError) as e:
        b.call(load_model)
    assert e.value.code is ErrorCode.CIRCUIT_OPEN  # failing fast: the model is not touched
    assert e.value.retry_after_s <= remaining
    while b.state is State.OPEN:
        time.sleep(0.002)
    waited = time.monotonic() - t_open
    assert remaining - 0.005 <= waited <= remaining + 0.25, (waited, remaining)
    with pytest.raises(EngineError):
        b.call(load_model)  # probe fails -> open again
    assert b.state is State.OPEN


def test_backend_unavailable_is_not_a_model_failure():
    from akidb_ros.guard.breaker import default_is_failure
    assert not default_is_failure(EngineError(ErrorCode.UNAVAILABLE, 'node left the graph'))
    assert not default_is_failure(EngineError(ErrorCode.INVALID_INPUT, 'caller mistake'))
    assert default_is_failure(EngineError(ErrorCode.TIMEOUT, 'hung'))
    assert default_is_failure(EngineError(ErrorCode.MODEL_LOAD_FAILED, 'corrupt'))
