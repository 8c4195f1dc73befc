"""Batching: order, token budget, padding bound, deadlines, shedding at 95 %, admin lane."""
import re
import threading
import time

import numpy as np
import pytest

from akidb_ros.engine import EmbedRequest, EngineError, ErrorCode, Priority
from akidb_ros.engine.batcher import INLINE_MIN_BUDGET_S, RUNNER_THREAD_PREFIX
from akidb_ros.observability import metrics
from engine_support import MINILM, Gate, make_engine

TEXTS = ['stop', 'the arm is moving to the left shelf now',
         'battery low', 'lidar detected a person crossing the aisle in front of the robot',
         'ok', 'navigation goal reached at the charging station near the loading dock ' * 3]


@pytest.fixture
def small_engine(tmp_path):
    # One runner: these tests pin down which sentences share a batch, in which order.
    def mutate(raw):
        raw['engine']['batching'].update(max_batch_size=4, max_batch_tokens=96,
                                         max_padding_ratio=1.5, max_wait_ms=0,
                                         split_policy='padding', runners=1)
        raw['engine']['queue'].update(capacity=20)
    eng = make_engine(tmp_path, mutate)
    yield eng
    eng.close()


def gate_of(eng, model=MINILM):
    return Gate(eng.manager.loaded(model).batcher)


def test_concurrent_jobs_batch_within_budgets_and_keep_order(small_engine):
    eng = small_engine
    singles = [eng.embed(EmbedRequest(inputs=[t])).embeddings[0] for t in TEXTS]
    gate = gate_of(eng)
    gate.close()
    first = eng.submit(EmbedRequest(inputs=['warm']))
    assert gate.entered.wait(5)
    futures = [eng.submit(EmbedRequest(inputs=TEXTS[i:i + 3])) for i in (0, 3)]
    futures.append(eng.submit(EmbedRequest(inputs=list(reversed(TEXTS)))))
    gate.open.set()
    first.result(10)
    results = [f.result(10).embeddings for f in futures]
    np.testing.assert_allclose(results[0], singles[0:3], atol=1e-5)
    np.testing.assert_allclose(results[1], singles[3:6], atol=1e-5)
    np.testing.assert_allclose(results[2], singles[::-1], atol=1e-5)
    for (b, width), real in zip(gate.shapes[1:], gate.real_tokens[1:]):
        assert b <= 4                                   # max_batch_size
        assert b == 1 or b * width <= 96                # token budget (padded tokens)
        assert b == 1 or b * width <= 1.5 * real + 1e-9  # padding bound after length sort
    assert len(gate.shapes) > 2   # 12 sentences could not go in one batch


def test_deadline_answers_timeout(small_engine):
    eng = small_engine
    gate = gate_of(eng)
    gate.close()
    blocker = eng.submit(EmbedRequest(inputs=['hold']))
    assert gate.entered.wait(5)
    fut = eng.submit(EmbedRequest(inputs=['late', 'later'], timeout_s=0.2))
    with pytest.raises(EngineError) as err:
        fut.result(5)
    assert err.value.code is ErrorCode.TIMEOUT
    # the message names the caller's budget and how far the call got (it named the time since
    # tokenising ended, which a large call's tokenising had eaten: "(0.89 s)" of a 5 s budget)
    assert re.fullmatch(r'request not answered within its deadline of 0\.2\d s \(0 of 2 inputs '
                        r'embedded; tokenising took 0\.\d\d s\): send fewer or shorter inputs '
                        r'per call, or give it a longer timeout', str(err.value)), str(err.value)
    assert err.value.partial is False           # nothing of it was embedded
    gate.open.set()
    assert blocker.result(10).embeddings.shape == (1, 384)
    assert eng.admission.pending == 0


def test_a_timeout_after_some_inputs_were_embedded_is_partial(small_engine):
    """A call some of whose inputs were embedded when its deadline passed is a *partial*
    TIMEOUT: the model answered, the call was more work than its budget. Circuit breakers
    count it as neutral (one client's large calls opened the default model's breaker for
    every caller); the flag survives the wire, which carries only code and message."""
    from akidb_ros.engine.errors import error_from_code
    from akidb_ros.guard.breaker import default_is_failure
    batcher = small_engine.manager.loaded(MINILM).batcher
    inner, release, runs = batcher._run, threading.Event(), []

    def second_run_waits(ids, mask, types):
        runs.append(ids.shape[0])
        if len(runs) > 1:
            release.wait(30)
        return inner(ids, mask, types)
    batcher._run = second_run_waits
    try:
        fut = small_engine.submit(EmbedRequest(inputs=[f'part {i}' for i in range(6)],
                                               timeout_s=1.0))
        with pytest.raises(EngineError) as err:
            fut.result(10)
    finally:
        release.set()
    assert runs[0] == 4                          # max_batch_size: then the held second run
    assert err.value.code is ErrorCode.TIMEOUT and err.value.partial
    assert '(4 of 6 inputs embedded;' in err.value.message
    assert not default_is_failure(err.value)
    assert error_from_code('TIMEOUT', err.value.message).partial
    assert not error_from_code('TIMEOUT', err.value.message.replace('(4 of', '(0 of')).partial
    assert not error_from_code('INTERNAL', err.value.message).partial
    assert default_is_failure(EngineError(ErrorCode.TIMEOUT, 'nothing embedded'))


def test_a_timeout_queued_behind_others_runs_is_the_loads_not_the_models(small_engine):
    """A call that timed out with nothing embedded while the model finished others' runs met
    a busy model, not a sick one: neutral to circuit breakers, on the wire too (eight
    concurrent calls of 256 long inputs opened the default model's breaker for everyone). A
    model that finished no run meanwhile (hung) still counts."""
    from akidb_ros.engine.errors import error_from_code
    from akidb_ros.guard.breaker import default_is_failure
    batcher = small_engine.manager.loaded(MINILM).batcher
    inner = batcher._run

    def slow_run(ids, mask, types):
        time.sleep(0.1)
        return inner(ids, mask, types)
    batcher._run = slow_run     # 15 runs of 0.1 s ahead (the queue holds 20 calls here)
    ahead = [small_engine.submit(EmbedRequest(inputs=[f'ahead {i} {k}' for k in range(4)],
                                              timeout_s=30)) for i in range(15)]
    late = small_engine.submit(EmbedRequest(inputs=['late'], timeout_s=0.8))
    with pytest.raises(EngineError) as err:
        late.result(10)
    assert err.value.code is ErrorCode.TIMEOUT, err.value
    assert '(0 of 1 inputs embedded; the model answered other calls meanwhile;' in \
        err.value.message, err.value.message
    assert err.value.partial and not default_is_failure(err.value)
    assert not default_is_failure(error_from_code('TIMEOUT', err.value.message))
    for f in ahead:
        assert f.result(30).embeddings.shape == (4, 384)


def test_a_model_too_slow_for_every_budget_still_counts_against_its_breaker(small_engine):
    """Runs that finish after every call in them timed out answered no one: they do not make
    the next call's TIMEOUT the load's (they did, and a model whose runs always overran its
    callers' budgets never opened its breaker)."""
    from akidb_ros.guard.breaker import default_is_failure
    batcher = small_engine.manager.loaded(MINILM).batcher
    inner = batcher._run

    def slower_than_every_budget(ids, mask, types):
        time.sleep(0.5)
        return inner(ids, mask, types)
    batcher._run = slower_than_every_budget
    errors = []
    for i in range(4):
        with pytest.raises(EngineError) as err:
            small_engine.submit(EmbedRequest(inputs=[f'slow {i}'], timeout_s=0.2)).result(10)
        errors.append(err.value)
    assert [e.code for e in errors] == [ErrorCode.TIMEOUT] * 4
    assert all(default_is_failure(e) for e in errors), [e.message for e in errors]


def test_a_cancelled_future_frees_its_slot_and_its_sentences_are_not_run(small_engine):
    """A caller that gives up cancels its future (``LocalBackend.cancel``): the job is settled
    then, its queue slot freed at once, and its sentences still queued never run."""
    eng = small_engine
    gate = gate_of(eng)
    gate.close()
    blocker = eng.submit(EmbedRequest(inputs=['hold']))
    assert gate.entered.wait(5)
    fut = eng.submit(EmbedRequest(inputs=[f'given up {i}' for i in range(8)]))
    assert eng.admission.pending == 2
    assert fut.cancel()
    assert eng.admission.pending == 1           # at once, not when its sentences would run
    runs_before = len(gate.shapes)
    gate.open.set()
    assert blocker.result(10).embeddings.shape == (1, 384)
    assert eng.embed(EmbedRequest(inputs=['after'])).embeddings.shape == (1, 384)
    # the blocker's run and 'after': none of the 8 cancelled sentences (two runs of 4) ran
    assert len(gate.shapes) - runs_before == 2, gate.shapes
    assert eng.admission.pending == 0


def test_tokenising_counts_in_the_budget(small_engine):
    """A request near the byte limit takes seconds to tokenise (~10 ms per 32 k-character
    input here); it times out within its budget plus one slice, not after all of it. That
    TIMEOUT is the caller's text, not the model (which never saw it): neutral to circuit
    breakers, on the wire too (a few such calls opened the model's breaker for everyone)."""
    from akidb_ros.engine.errors import error_from_code
    from akidb_ros.guard.breaker import default_is_failure
    eng = small_engine
    big = ['a b ' * 8000] * 200          # 6.4 MB, under the 10 MB limit
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        eng.submit(EmbedRequest(inputs=big, timeout_s=0.05)).result(10)
    elapsed = time.monotonic() - t0
    assert err.value.code is ErrorCode.TIMEOUT
    assert elapsed < 1.0, elapsed        # all 200 inputs: ~2 s on this CPU
    assert err.value.partial and not default_is_failure(err.value)
    assert not default_is_failure(error_from_code('TIMEOUT', err.value.message))
    assert eng.admission.pending == 0
    # a budget that covers it still gets every vector
    res = eng.embed(EmbedRequest(inputs=big[:8], timeout_s=30))
    assert res.embeddings.shape == (8, 384) and res.truncated_inputs == 8


def test_deadline_watcher_fires_on_time_and_sleeps_through_answered_work():
    """Jobs reach the watcher lock-free; expired ones fail with TIMEOUT at their deadline,
    answered ones are let go unfired, and arrivals due after the watcher's next look (the
    usual case: a 5 s deadline, answered in milliseconds) do not wake it."""
    from akidb_ros.engine.batcher import Job
    from akidb_ros.engine.deadlines import DeadlineWatcher
    from akidb_ros.engine.types import Priority as P

    def job(timeout_s):
        return Job([], MINILM, 384, True, deadline=time.monotonic() + timeout_s,
                   priority=P.NORMAL, provider='cpu', on_done=lambda _j: None)

    watcher = DeadlineWatcher(sweep_s=1.0)
    try:
        answered, late_long, late_short = job(0.05), job(0.4), job(0.08)
        t0 = time.monotonic()
        for j in (answered, late_long, late_short):   # a shorter deadline after a longer one
            watcher.watch(j)
        assert answered.complete()
        with pytest.raises(EngineError) as err:
            late_short.future.result(2)
        assert err.value.code is ErrorCode.TIMEOUT
        assert 0.07 <= time.monotonic() - t0 < 0.3
        assert not late_long.future.done()                # its deadline is still ahead
        with pytest.raises(EngineError):
            late_long.future.result(2)
        assert 0.39 <= time.monotonic() - t0 < 0.7
        assert answered.future.result(0).embeddings.shape == (0, 384)   # never failed

        time.sleep(0.05)                                  # the watcher plans its next look
        looks = watcher.wakeups
        quick = [job(5.0) for _ in range(50)]
        for j in quick:
            watcher.watch(j)                              # due after the next look: no wake
            assert j.complete()
        time.sleep(0.3)
        assert watcher.wakeups == looks
        again = job(0.05)
        t1 = time.monotonic()
        watcher.watch(again)                              # due before it: wakes the watcher
        with pytest.raises(EngineError):
            again.future.result(2)
        assert time.monotonic() - t1 < 0.5
        deadline = time.monotonic() + 3
        while watcher._incoming and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not watcher._incoming and not watcher._heap   # answered arrivals let go
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


def test_shedding_at_95_percent_and_admin_lane(small_engine):
    eng = small_engine   # capacity 20 -> normal work shed from 19 queued
    gate = gate_of(eng)
    gate.close()
    shed_before = metrics.LOAD_SHED.labels(reason='shed')._value.get()
    accepted = [eng.submit(EmbedRequest(inputs=[f'n{i}'])) for i in range(19)]
    assert gate.entered.wait(5)
    with pytest.raises(EngineError) as err:
        eng.submit(EmbedRequest(inputs=['one too many']))
    assert err.value.code is ErrorCode.OVERLOADED and err.value.retry_after_s
    assert metrics.LOAD_SHED.labels(reason='shed')._value.get() == shed_before + 1
    admin = eng.submit(EmbedRequest(inputs=['admin probe'], priority=Priority.ADMIN))
    with pytest.raises(EngineError) as full:
        eng.submit(EmbedRequest(inputs=['admin 2'], priority=Priority.ADMIN))
    assert full.value.code is ErrorCode.OVERLOADED and 'full' in full.value.message
    order = []
    for i, f in enumerate(accepted):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    admin.add_done_callback(lambda _f: order.append('admin'))
    gate.open.set()
    for f in accepted + [admin]:
        assert f.result(10).embeddings.shape == (1, 384)
    # The admin job was queued last but ran in the very next batch (max_batch_size 4).
    assert order.index('admin') < 8, order
    assert eng.admission.pending == 0


def test_shed_message_names_the_configured_threshold():
    """The OVERLOADED message says the threshold admission really uses (it said 95 % always)."""
    from akidb_ros.engine.batcher import Admission
    adm = Admission(capacity=4, shed_threshold=0.5)
    adm.admit(Priority.NORMAL)
    adm.admit(Priority.NORMAL)
    with pytest.raises(EngineError) as err:
        adm.admit(Priority.NORMAL)
    assert err.value.code is ErrorCode.OVERLOADED
    assert err.value.message == ('engine queue is at its shed threshold (50% full) (2/4); '
                                 'retry later'), err.value.message
    adm.admit(Priority.ADMIN)
    adm.admit(Priority.ADMIN)
    with pytest.raises(EngineError) as full:
        adm.admit(Priority.ADMIN)
    assert full.value.message == 'engine queue is full (4/4); retry later'


@pytest.mark.parametrize('capacity, threshold', [(1, 0.95), (10, 0.05), (1000, 0.0001)])
def test_a_small_queue_still_takes_one_normal_request(capacity, threshold):
    """The shed point rounds to at least one request (it rounded to 0: every normal request
    was refused OVERLOADED with the queue empty)."""
    from akidb_ros.engine.batcher import Admission
    adm = Admission(capacity=capacity, shed_threshold=threshold)
    adm.admit(Priority.NORMAL)
    assert adm.pending == 1


def test_sixteen_concurrent_callers_match_single_calls(engine):
    texts = [f'{t} #{i}' for i, t in enumerate(TEXTS * 3)][:16]
    singles = {t: engine.embed(EmbedRequest(inputs=[t])).embeddings[0] for t in texts}
    out, errors = {}, []
    barrier = threading.Barrier(16)

    def call(t):
        try:
            barrier.wait(5)
            for _ in range(5):
                out.setdefault(t, []).append(engine.embed(EmbedRequest(inputs=[t])).embeddings[0])
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    for t in texts:
        for v in out[t]:
            assert np.max(np.abs(v - singles[t])) <= 1e-5


def test_close_under_load_answers_every_accepted_request(tmp_path):
    eng = make_engine(tmp_path)
    accepted, refused, stop = [], [], threading.Event()
    lock = threading.Lock()

    def caller(k):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                f = eng.submit(EmbedRequest(inputs=[f'caller {k} sentence {i} about robots']))
            except EngineError as exc:
                with lock:
                    refused.append(exc.code)
                if exc.code is ErrorCode.UNAVAILABLE:
                    return
                continue
            with lock:
                accepted.append(f)
            try:
                f.result(30)          # a real caller waits for its answer before the next call
            except EngineError:
                pass

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(16)]
    for th in threads:
        th.start()
    while len(accepted) < 48:
        threading.Event().wait(0.01)
    eng.close()
    stop.set()
    for th in threads:
        th.join(10)
    assert all(f.done() for f in accepted), 'an accepted request was left unanswered'
    answered = [f for f in accepted if f.exception() is None]
    assert len(answered) == len(accepted)   # drained: all finished with a result
    assert set(refused) <= {ErrorCode.UNAVAILABLE}
    with pytest.raises(EngineError) as err:
        eng.submit(EmbedRequest(inputs=['after close']))
    assert err.value.code is ErrorCode.UNAVAILABLE


class _CountingSession:
    """Stands in front of a real InferenceSession: counts its runs and can hold them."""

    def __init__(self, inner):
        self.inner, self.runs = inner, 0
        self.release, self.entered = threading.Event(), threading.Event()
        self.release.set()

    def run(self, *args):
        self.runs += 1
        self.entered.set()
        assert self.release.wait(30)
        return self.inner.run(*args)


def test_two_runners_overlap_runs_on_the_overlap_session(tmp_path):
    """With runners: 2 a second batch runs while the first is still inside ONNX Runtime, on the
    second (one-core) session; a lone run uses the all-core session; vectors do not change."""
    def mutate(raw):
        raw['engine']['batching'].update(runners=2, max_wait_ms=0)
        raw['engine'].update(intra_op_threads=2, device='cpu')   # the overlap session is a CPU's
    eng = make_engine(tmp_path, mutate)
    try:
        lm = eng.manager.loaded(MINILM)
        onnx = lm.onnx
        assert onnx.wait_overlap(30)   # built in the background, after the load
        assert onnx.overlap_session is not None and onnx.memory_factor == 2
        assert lm.memory_mb == 2 * lm.cfg.memory_estimate_mb()
        assert eng.manager.info(lm.cfg).memory_mb == lm.memory_mb
        main, overlap = _CountingSession(onnx.session), _CountingSession(onnx.overlap_session)
        onnx.session, onnx.overlap_session = main, overlap
        singles = [eng.embed(EmbedRequest(inputs=[t])).embeddings[0] for t in TEXTS[:2]]
        assert (main.runs, overlap.runs) == (2, 0)        # alone: every core

        main.release.clear()
        main.entered.clear()
        first = eng.submit(EmbedRequest(inputs=[TEXTS[0]]))
        assert main.entered.wait(5)
        # The first run is held inside the main session: the other runner serves this one.
        second = eng.submit(EmbedRequest(inputs=[TEXTS[1]])).result(10)
        assert overlap.runs == 1 and not first.done()
        main.release.set()
        np.testing.assert_allclose(first.result(10).embeddings[0], singles[0], atol=1e-5)
        np.testing.assert_allclose(second.embeddings[0], singles[1], atol=1e-5)
    finally:
        eng.close()


def test_one_runner_keeps_one_session(tmp_path):
    eng = make_engine(tmp_path, lambda raw: raw['engine']['batching'].update(runners=1))
    try:
        lm = eng.manager.loaded(MINILM)
        assert lm.onnx.overlap_session is None and lm.memory_mb == lm.cfg.memory_estimate_mb()
    finally:
        eng.close()


class _ThreadLog(Gate):
    """The Gate, plus which thread ran each run and how many runs were inside at once."""

    def __init__(self, batcher):
        super().__init__(batcher)
        self.threads, self.inside, self.most_inside = [], 0, 0
        self._lock = threading.Lock()

    def __call__(self, ids, mask, types):
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().__call__(ids, mask, types)
        finally:
            with self._lock:
                self.inside -= 1


def test_a_waiting_caller_runs_its_own_job_while_the_model_is_idle(small_engine):
    """``embed`` (the caller blocks anyway) runs a one-run job in the caller's thread when
    nothing is queued and a run slot is free; ``submit``, a busy model or a job larger than one
    run go through the runners; never more runs at once than runners (here 1)."""
    eng = small_engine
    log = _ThreadLog(eng.manager.loaded(MINILM).batcher)
    me = threading.current_thread().name
    single = eng.embed(EmbedRequest(inputs=[TEXTS[1]])).embeddings[0]
    assert log.threads == [me]
    eng.submit(EmbedRequest(inputs=[TEXTS[1]])).result(10)
    assert log.threads[-1].startswith(RUNNER_THREAD_PREFIX)
    eng.embed(EmbedRequest(inputs=TEXTS))           # 6 sentences > max_batch_size 4
    # a deadline too near to run uninterruptibly: the queue, whose watcher answers on time
    eng.embed(EmbedRequest(inputs=[TEXTS[1]], timeout_s=INLINE_MIN_BUDGET_S / 2))
    assert all(t.startswith(RUNNER_THREAD_PREFIX) for t in log.threads[2:])

    # A caller's inline run holds the only run slot: queued work waits for it.
    del log.threads[:]
    log.close()
    inline = {}
    caller = threading.Thread(target=lambda: inline.update(
        res=eng.embed(EmbedRequest(inputs=[TEXTS[1]]))), name='door-worker')
    caller.start()
    assert log.entered.wait(5) and log.threads == ['door-worker']
    queued = eng.submit(EmbedRequest(inputs=[TEXTS[1]]))
    # ... and a waiting caller that finds the model busy queues too
    waiting = eng.submit(EmbedRequest(inputs=[TEXTS[1]]), caller_waits=True)
    time.sleep(0.3)
    assert log.threads == ['door-worker'] and not queued.done() and not waiting.done()
    log.open.set()
    caller.join(10)
    for res in (inline['res'], queued.result(10), waiting.result(10)):
        np.testing.assert_allclose(res.embeddings[0], single, atol=1e-5)
    assert log.most_inside == 1
    assert all(t.startswith(RUNNER_THREAD_PREFIX) for t in log.threads[1:])
    assert eng.admission.pending == 0


def test_before_its_run_cost_is_learnt_only_a_small_job_runs_inline(tmp_path):
    """An inline run cannot be cut short: until the model's run cost is learnt, a caller runs
    its own job only up to INLINE_UNLEARNT_TOKENS padded tokens (a 21 x 384-token MPNet job
    ran 13 s inline, answered long after its 2 s deadline)."""
    eng = make_engine(tmp_path)
    try:
        batcher = eng.manager.loaded(MINILM).batcher
        assert batcher.cost.params() is None
        log = _ThreadLog(batcher)
        me = threading.current_thread().name
        eng.embed(EmbedRequest(inputs=[TEXTS[1]]))
        long_texts = ['the robot crosses the loading dock ' * 40] * 3      # 3 x 256 tokens
        eng.embed(EmbedRequest(inputs=long_texts))
        assert log.threads[0] == me and log.threads[1].startswith(RUNNER_THREAD_PREFIX), \
            log.threads
    finally:
        eng.close()


def test_short_wait_gathers_near_simultaneous_callers(tmp_path):
    """max_wait_ms (one runner): after traffic with several callers, a batch stays open briefly
    so a caller arriving a moment later joins it; a lone caller's batch never waits."""
    def mutate(raw):
        raw['engine']['batching'].update(max_wait_ms=300, runners=1, split_policy='padding')
    eng = make_engine(tmp_path, mutate)
    try:
        gate = gate_of(eng)
        eng.embed(EmbedRequest(inputs=['alone']))          # one caller: no hold
        assert len(gate.shapes) == 1
        gate.close()                                        # make traffic with two callers
        held = eng.submit(EmbedRequest(inputs=['first']))
        assert gate.entered.wait(5)
        pair = [eng.submit(EmbedRequest(inputs=['same words'])) for _ in range(2)]
        gate.open.set()
        for f in [held] + pair:
            f.result(10)
        assert gate.shapes[-1][0] == 2                      # the pair ran together
        n = len(gate.shapes)
        a = eng.submit(EmbedRequest(inputs=['same words']))
        time.sleep(0.05)                                    # arrives 50 ms later
        b = eng.submit(EmbedRequest(inputs=['same words']))
        a.result(10), b.result(10)
        assert [s[0] for s in gate.shapes[n:]] == [2]       # one batch of both
    finally:
        eng.close()
