"""Admission, deadlines and the per-model dynamic batcher.

Work flows: ``Admission.admit`` (bounded queue, shedding at 95 %) -> ``Job`` (one request, its
future) -> ``Batcher`` (per model, one or more runner threads: each plans its next run from the
sentences of every queued job - sorted by length, cut where the learnt run cost is lowest
within the size and token budgets, the run holding the oldest sentence - or, until that cost is
learnt, takes a batch and cuts it by a padding ratio; runs it and scatters vectors back).
``deadlines.DeadlineWatcher`` fails a job with TIMEOUT at its deadline (``Job.expire``). A job's
future is resolved exactly once: whichever of batcher, watcher or shutdown gets there first wins;
the others are no-ops. A caller that cancels the future settles the job the same way: its
sentences not yet run are skipped.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..observability import metrics
from ..observability.tracing import capture_context, record_engine_spans
from .deadlines import mark_engine_thread
from .errors import BUSY_NOTE, EngineError, ErrorCode, progress_note
from .text import Encoded, l2_normalize, pad_batch, pool
from .types import EmbedResult, Priority

log = logging.getLogger('akidb_ros.engine.batcher')
RUNNER_THREAD_PREFIX = 'akidb-batcher-'   # runner threads are named PREFIX<model>-<n>
STOP_SLICE_S = 0.05   # stop(): how often a wait looks for an earlier deadline
RUN_JOIN_S = 300.0   # stop(): the longest a run in progress is waited for after the timeout
INLINE_MIN_BUDGET_S = 1.0   # a caller runs its own job only this far from its deadline or more
# Before the run cost is learnt (12 runs after a load) a caller runs its own job only up to this
# many padded tokens (one long sentence): a 21 x 384-token MPNet run took 13 s inline on 2 cores,
# answered long after its 2 s deadline, where the queue answers TIMEOUT on time.
INLINE_UNLEARNT_TOKENS = 512


# The queues of the process' open engines: the queue gauges add them up at scrape time (they
# followed the latest engine made, and kept a closed one's)
_QUEUES: 'weakref.WeakSet[Admission]' = weakref.WeakSet()
metrics.QUEUE_SIZE.set_function(lambda: metrics.summed(_QUEUES, lambda q: q._pending))
metrics.QUEUE_CAPACITY.set_function(lambda: metrics.summed(_QUEUES, lambda q: q.capacity))


class Admission:
    """Engine-wide bounded queue: counts accepted, unanswered requests."""

    def __init__(self, capacity: int, shed_threshold: float):
        self.capacity = capacity
        self.shed_threshold = shed_threshold
        # at least one: a small queue (capacity 1, or 10 at 5 %) shed every normal request
        self.shed_at = max(1, int(capacity * shed_threshold))
        self._pending = 0
        self._lock = threading.Lock()
        # read at scrape time rather than set on every admit/release (the request path)
        _QUEUES.add(self)

    def retire(self) -> None:
        """Its engine closed: the queue gauges stop counting it."""
        _QUEUES.discard(self)

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self, priority: Priority) -> None:
        with self._lock:
            if self._pending >= self.capacity:
                reason = 'full'
            elif self._pending >= self.shed_at and priority < Priority.ADMIN:
                reason = 'shed'
            else:
                self._pending += 1
                return
        metrics.LOAD_SHED.labels(reason=reason).inc()
        state = 'full' if reason == 'full' else \
            f'at its shed threshold ({self.shed_threshold * 100:g}% full)'
        raise EngineError(ErrorCode.OVERLOADED,
                          f'engine queue is {state} ({self._pending}/{self.capacity}); '
                          'retry later', retry_after_s=1.0)

    def release(self) -> None:
        with self._lock:
            self._pending -= 1


class RunClock:
    """When a model last finished a run (monotonic). A job that timed out with none of its
    inputs embedded while the model finished others' runs met a busy model, not a sick one:
    its TIMEOUT is the load's (``partial``, neutral to circuit breakers). Tiny on purpose: a
    settled job stays in the deadline watcher's heap until its deadline and must not pin the
    model."""

    __slots__ = ('last_end',)

    def __init__(self):
        self.last_end = 0.0


class Job:
    """One accepted request: its sentences, its partial results and its one future."""

    def __init__(self, encoded: List[Encoded], model_id: str, dimension: int, normalize: bool,
                 deadline: float, priority: Priority, provider: str,
                 on_done: Callable[['Job'], None], received: Optional[float] = None):
        self.encoded = encoded
        self.model_id = model_id
        self.normalize = normalize
        self.deadline = deadline
        self.priority = priority
        self.provider = provider
        self.future: Future = Future()
        self.vectors = np.empty((len(encoded), dimension), dtype=np.float32)
        self.remaining = len(encoded)
        self.total_tokens = sum(e.length for e in encoded)
        self.truncated = sum(1 for e in encoded if e.truncated)
        self.created = time.monotonic()
        self.received = self.created if received is None else received    # the budget's start
        self.started: Optional[float] = None
        self.run_clock: Optional[RunClock] = None     # its model's (set by Batcher.submit)
        self.expired = False        # failed TIMEOUT by its deadline (not answered, not cancelled)
        # The caller's trace context (a door's span), so queue/batch/inference spans nest in it.
        self.trace_ctx = capture_context()
        self._on_done = on_done
        self._settled = threading.Lock()
        self._is_settled = False
        self.future.add_done_callback(self._on_cancel)

    @property
    def done(self) -> bool:
        return self._is_settled

    def _settle(self) -> bool:
        with self._settled:
            if self._is_settled:
                return False
            self._is_settled = True
            return True

    def _done(self) -> None:
        # The deadline watcher's heap keeps a settled job until its deadline: the callback (and
        # the model copy it pins) must not live that long, or an unloaded model's memory
        # outlives its unload by up to the request budget.
        on_done, self._on_done = self._on_done, None
        on_done(self)

    def _on_cancel(self, future: Future) -> None:
        # The caller cancelled the future (``Backend.cancel``): the job is settled, so its
        # sentences not yet run are skipped and its model pin and queue slot are freed now.
        if future.cancelled() and self._settle():
            self._done()

    def fail(self, error: EngineError) -> bool:
        if not self._settle():
            return False
        self._done()
        try:
            self.future.set_exception(error)
        except InvalidStateError:  # a caller cancelled the future; the answer is still counted
            pass
        return True

    def expire(self, now: float) -> None:
        """Its deadline passed unanswered (called by the deadline watcher)."""
        self.expired = True
        n = len(self.encoded)
        done = n - self.remaining
        busy = done == 0 and self.run_clock is not None and self.run_clock.last_end > self.created
        self.fail(EngineError(
            ErrorCode.TIMEOUT,
            f'request not answered within its deadline of {self.deadline - self.received:.2f} s '
            f'({progress_note(done, n)}{"; " + BUSY_NOTE if busy else ""}; tokenising took '
            f'{self.created - self.received:.2f} s): send fewer or shorter inputs per call, or '
            'give it a longer timeout', retry_after_s=1.0, partial=done > 0 or busy))

    def complete(self) -> bool:
        if not self._settle():
            return False
        self._done()
        result = EmbedResult(
            embeddings=self.vectors, model=self.model_id, dimension=self.vectors.shape[1],
            total_tokens=self.total_tokens, truncated_inputs=self.truncated,
            duration_ms=(time.monotonic() - self.created) * 1000.0, provider=self.provider)
        try:
            self.future.set_result(result)
        except InvalidStateError:
            pass
        return True


class _Item:
    __slots__ = ('job', 'index', 'enc')

    def __init__(self, job: Job, index: int, enc: Encoded):
        self.job, self.index, self.enc = job, index, enc


class RunCostModel:
    """Online fit of one run's cost: ``seconds = overhead + per_token * padded_tokens``.

    Where to cut a length-sorted batch depends on the hardware: on a CPU a run costs little
    beyond its tokens, so cutting away padding pays; on a GPU a run costs milliseconds of kernel
    launches whatever its size, so one padded batch beats several tight ones. The batcher learns
    both numbers from its own runs (exponentially weighted least squares, so it follows load
    changes) instead of a fixed padding ratio tuned for one machine.
    """

    def __init__(self, decay: float = 0.98, min_samples: int = 12):
        self.decay = decay
        self.min_samples = min_samples
        self.samples = 0
        self._w = self._x = self._y = self._xx = self._xy = self._yy = 0.0
        self._xmin = self._xmax = None

    def observe(self, padded_tokens: int, seconds: float) -> None:
        d = self.decay
        x, y = float(padded_tokens), float(seconds)
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self._yy = self._yy * d + y * y
        self._xmin = x if self._xmin is None else min(self._xmin, x)
        self._xmax = x if self._xmax is None else max(self._xmax, x)
        self.samples += 1

    def params(self) -> Optional[tuple]:
        """(overhead_s, per_token_s), or None until the runs seen can support a fit."""
        if self.samples < self.min_samples or self._xmax < 2 * self._xmin:
            return None   # too few runs, or all the same size: slope and intercept unknowable
        w = self._w
        mean_x, mean_y = self._x / w, self._y / w
        var = self._xx / w - mean_x ** 2
        if var <= 0:
            return None
        cov = self._xy / w - mean_x * mean_y
        per_token = cov / var
        if per_token <= 0:
            # Flat within the noise (a GPU: a run costs its launches whatever its size) means
            # keep runs whole; a slope clearly below zero means the samples are not to be
            # trusted (load changed under them): keep the padding rule.
            residual = max(0.0, self._yy / w - mean_y ** 2 - cov * per_token)
            stderr = (residual / max(w - 2.0, 1.0) / var) ** 0.5
            if per_token < -2.0 * stderr:
                return None
            return max(mean_y, 0.0), 0.0
        overhead = mean_y - per_token * mean_x
        return max(overhead, 0.0), per_token


def cut_by_cost(lengths: List[int], overhead: float, per_token: float,
                max_tokens: Optional[int] = None) -> List[int]:
    """Optimal cut points of ascending ``lengths`` into runs (dynamic programming, O(n^2)).

    A run of items i..j-1 costs ``overhead + per_token * (j - i) * lengths[j - 1]`` (every row
    is padded to the longest); a run of several items over ``max_tokens`` padded tokens is not
    allowed. Returns the end index of each run.
    """
    n = len(lengths)
    best = [0.0] + [float('inf')] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[j - 1]
        for i in range(j):
            if max_tokens is not None and j - i > 1 and (j - i) * width > max_tokens:
                continue
            c = best[i] + overhead + per_token * (j - i) * width
            if c < best[j]:
                best[j], cut[j] = c, i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


class Batcher:
    """Dynamic batching for one loaded model, on ``runners`` threads.

    One runner leaves the model idle while it pads, pools and answers callers between runs;
    a second runner gathers and prepares the next batch meanwhile and overlaps its run with the
    first (``run`` is ``OnnxModel.run``, which serves concurrent runs: on a GPU from one
    session, on a CPU from the main and the overlap session).
    """

    def __init__(self, model_id: str, run: Callable, pad_id: int, uses_type_ids: bool,
                 pooling: str, max_batch_size: int, max_batch_tokens: int, max_wait_ms: float,
                 max_padding_ratio: float, on_batch: Optional[Callable[[int, int, float], None]]
                 = None, split_policy: str = 'cost', runners: int = 1,
                 terminate: Optional[Callable[[], None]] = None):
        """``terminate``: cuts ``run``'s runs in progress short (``OnnxModel.terminate_runs``),
        for a ``stop`` whose timeout has passed."""
        self.model_id = model_id
        self._run = run
        self._terminate = terminate
        self._terminated = False
        self._pad_id = pad_id
        self._uses_type_ids = uses_type_ids
        self._pooling = pooling
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_padding_ratio = max_padding_ratio
        self.split_policy = split_policy
        self.cost = RunCostModel()
        self._cost_lock = threading.Lock()
        self._scatter_lock = threading.Lock()   # a job's rows may come back from two runners
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(model=model_id)   # bound once
        self._batch_size = metrics.BATCH_SIZE.labels(model=model_id)
        self._on_batch = on_batch
        self._lanes = {Priority.ADMIN: collections.deque(), Priority.NORMAL: collections.deque()}
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_by = math.inf    # stop(): the earliest deadline any caller gave
        self.run_clock = RunClock()
        self._last_batch_jobs = 1   # how many callers the last batch served: our wait hint
        self._runners = max(1, runners)
        self._active = 0            # runs in flight, the runners' and callers' (run_inline)
        self._threads = [threading.Thread(target=self._loop, daemon=True,
                                          name=f'{RUNNER_THREAD_PREFIX}{model_id}-{n}')
                         for n in range(self._runners)]
        for t in self._threads:
            t.start()

    # --- producer side -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        items = [_Item(job, i, e) for i, e in enumerate(job.encoded)]
        job.run_clock = self.run_clock
        with self._cond:
            if self._stopping:
                raise EngineError(ErrorCode.UNAVAILABLE,
                                  f'model {self.model_id} is being unloaded; retry',
                                  retry_after_s=0.5)
            lane = self._lanes[Priority.ADMIN if job.priority >= Priority.ADMIN
                               else Priority.NORMAL]
            lane.extend(items)
            self._cond.notify()

    def run_inline(self, job: Job) -> bool:
        """Run ``job`` in the caller's thread, if the model is idle; False: queue it instead.

        A caller that will block on the answer anyway runs its own job when nothing is queued
        and a run slot is free, and skips two thread hand-offs. The hand-off also costs the run
        itself: the batcher thread that wakes for a lone call can land on the core of ONNX
        Runtime's pool thread, and the same run then took 0.9-1.9 ms longer than from the
        caller's thread (paired, on 2 cores). Only a job that fits one run qualifies, and only
        with time to spare: an inline run cannot be cut short, so a job whose deadline is under
        ``INLINE_MIN_BUDGET_S`` away, or nearer than twice its learnt run cost (before that cost
        is learnt: one over ``INLINE_UNLEARNT_TOKENS`` padded tokens), takes the queue, where
        the deadline watcher answers TIMEOUT on time.
        """
        enc = job.encoded
        if not enc:
            return False
        padded = len(enc) * max(e.length for e in enc)
        if len(enc) > self.max_batch_size or (len(enc) > 1 and padded > self.max_batch_tokens):
            return False
        budget = job.deadline - time.monotonic()
        if budget < INLINE_MIN_BUDGET_S:
            return False
        with self._cost_lock:
            params = self.cost.params()
        if params is None:
            if padded > INLINE_UNLEARNT_TOKENS:     # cost unknown: only a small run is safe
                return False
        elif 2 * (params[0] + params[1] * padded) > budget:
            return False
        with self._cond:
            if self._stopping or self._active >= self._runners or self.queued():
                return False
            self._active += 1
        try:
            self._serve([_Item(job, i, e) for i, e in enumerate(enc)], planned=True)
        finally:
            self._end_run()
        return True

    def queued(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, run what is queued within ``timeout``, then end the threads: what
        is still queued is failed UNAVAILABLE, and runs in progress are cut short
        (``terminate``; without it they are waited for).

        Two stops may overlap (a model retiring when the engine closes): both keep the
        earlier deadline, so the closer's grace also bounds the retirement's stop.
        """
        with self._cond:
            self._stopping = True
            self._stop_by = min(self._stop_by, time.monotonic() + timeout)
            self._cond.notify_all()
        for t in self._threads:
            # in slices: an overlapping stop may bring the deadline forward
            while t.is_alive() and time.monotonic() < self._stop_by:
                t.join(timeout=min(STOP_SLICE_S, max(0.0, self._stop_by - time.monotonic())))
        # Anything left (thread stuck past timeout) is answered, never dropped.
        with self._cond:
            leftovers = [it for q in self._lanes.values() for it in q]
            for q in self._lanes.values():
                q.clear()
        for it in leftovers:
            it.job.fail(EngineError(ErrorCode.UNAVAILABLE,
                                    f'model {self.model_id} stopped before this request ran'))
        # A run still inside ONNX Runtime must end before we return: the process may exit next,
        # and a thread inside ORT at exit aborts it (SIGABRT, not exit 0). A run is bounded by
        # max_batch_tokens; RUN_JOIN_S bounds a device that hangs.
        # Runs in progress are counted in _active: the runners' and those callers run in their
        # own threads (run_inline), which no runner thread stands for.
        with self._cond:
            running = self._active
        alive = [t for t in self._threads if t.is_alive()]
        if running and self._terminate is not None:
            # out of time: the runs in progress end within a kernel, their callers UNAVAILABLE
            self._terminated = True
            self._terminate()
        elif running:
            log.warning('%s: waiting for %d run(s) in progress to end before stopping',
                        self.model_id, running)
        end = time.monotonic() + RUN_JOIN_S
        with self._cond:
            while self._active and time.monotonic() < end:
                self._cond.wait(timeout=0.05)
        for t in alive:
            t.join(timeout=max(0.0, end - time.monotonic()))

    # --- consumer side -------------------------------------------------------------------
    def _take(self) -> Tuple[List[_Item], bool]:
        """Wait for work, then take it: ``(items, True)`` for one run planned by the learnt cost
        (``_plan_run``), else ``(items, False)``: up to one batch, admin lane first, then FIFO,
        for ``_chunks`` to cut."""
        with self._cond:
            # at most ``runners`` runs at once, counting callers' inline runs
            while not self.queued() or self._active >= self._runners:
                if self._stopping and not self.queued():
                    return [], False
                self._cond.wait()
            # Hold the batch open briefly only when recent traffic had several callers: a lone
            # caller never waits, concurrent callers land in one batch.
            if self.max_wait_s > 0 and self._last_batch_jobs > 1:
                deadline = time.monotonic() + self.max_wait_s
                want = min(self.max_batch_size, self._last_batch_jobs)
                while self.queued() < want and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            self._active += 1     # released by _loop once the take has run
            planned = self._plan_run()
            if planned:
                return planned, True
            taken: List[_Item] = []
            longest = 0
            for lane in (self._lanes[Priority.ADMIN], self._lanes[Priority.NORMAL]):
                while lane and len(taken) < self.max_batch_size:
                    nxt = lane[0]
                    if nxt.job.done:          # timed out while queued: nothing to compute
                        lane.popleft()
                        continue
                    width = max(longest, nxt.enc.length)
                    if taken and width * (len(taken) + 1) > self.max_batch_tokens:
                        break
                    taken.append(lane.popleft())
                    longest = width
            if not taken:
                self._active -= 1     # all it saw had timed out: no run
            return taken, False

    def _plan_run(self) -> List[_Item]:
        """Under the lock: the cost-optimal run that holds the oldest queued sentence.

        Planning one run at a time from everything queued, rather than cutting a whole take
        into runs, lets sentences that arrive meanwhile join the runs of their length: with 16
        single-sentence callers on the 2-core CPU runs grew from ~2.1 to 2.6-2.9 sentences and
        the ratio to the raw ceiling by 2-8 % in interleaved A/Bs. The oldest sentence rides in
        every run, so none waits for ever.
        Empty (the caller takes a batch instead) with the padding policy, before the cost is
        learnt, and while admin work waits (its lane goes first, whole).
        """
        if self.split_policy != 'cost' or self._lanes[Priority.ADMIN]:
            return []
        with self._cost_lock:
            params = self.cost.params()
        if params is None:
            return []
        lane = self._lanes[Priority.NORMAL]
        window = [it for it in itertools.islice(lane, self.max_batch_size) if not it.job.done]
        if not window:
            return []
        oldest = window[0]
        window.sort(key=lambda it: it.enc.length)
        at = window.index(oldest)
        start = 0
        for end in cut_by_cost([it.enc.length for it in window], *params,
                               max_tokens=self.max_batch_tokens):
            if end > at:
                break
            start = end
        run = window[start:end]
        chosen = set(run)
        # Timed out while queued: nothing to compute, drop them with the run's sentences.
        rest = [it for it in lane if it not in chosen and not it.job.done]
        lane.clear()
        lane.extend(rest)
        return run

    def _chunks(self, items: List[_Item]) -> List[List[_Item]]:
        """Sort by length, then cut into runs: by learnt run cost, else by padding ratio."""
        items.sort(key=lambda it: it.enc.length)
        params = None
        if self.split_policy == 'cost' and len(items) > 1:
            with self._cost_lock:
                params = self.cost.params()
        if params is not None and len(items) <= 256:   # the O(n^2) cut stays well under 1 ms
            ends = cut_by_cost([it.enc.length for it in items], *params)
            return [items[i:j] for i, j in zip([0] + ends[:-1], ends)]
        chunks, cur, real = [], [], 0
        for it in items:
            n = it.enc.length
            if cur and n * (len(cur) + 1) > self.max_padding_ratio * (real + n):
                chunks.append(cur)
                cur, real = [], 0
            cur.append(it)
            real += n
        if cur:
            chunks.append(cur)
        return chunks

    def _loop(self) -> None:
        mark_engine_thread()
        while True:
            items, planned = self._take()
            if not items:
                if self._stopping:
                    return
                continue
            try:
                self._serve(items, planned)
            finally:
                self._end_run()

    def _end_run(self) -> None:
        """Give back a run slot; a runner waiting for one takes the queued work."""
        with self._cond:
            self._active -= 1
            if self.queued():
                self._cond.notify()

    def _serve(self, items: List[_Item], planned: bool) -> None:
        """Bookkeeping, then the runs: ``items`` as one run if ``planned``, else cut."""
        now = time.monotonic()
        jobs = {id(it.job): it.job for it in items}
        for job in jobs.values():
            if job.started is None:
                job.started = now
                self._queue_wait.observe(now - job.created)
        self._last_batch_jobs = len(jobs)
        self._batch_size.observe(len(items))
        for chunk in [items] if planned else self._chunks(items):
            live = [it for it in chunk if not it.job.done]
            if live:
                self._run_chunk(live)

    def _run_chunk(self, chunk: List[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            ids, mask, types = pad_batch([it.enc for it in chunk], self._pad_id,
                                         self._uses_type_ids)
            hidden = self._run(ids, mask, types)
            vectors = pool(hidden, mask, self._pooling)
        except EngineError as exc:
            self._fail_chunk(chunk, exc)
            return
        except Exception as exc:  # a runtime failure must reach every caller, not kill the thread
            if self._terminated:      # cut short by stop(): not a failure of the model
                self._fail_chunk(chunk, EngineError(
                    ErrorCode.UNAVAILABLE, f'model {self.model_id} stopped before this request '
                    'was computed'))
                return
            log.exception('inference failed for model %s', self.model_id)
            self._fail_chunk(chunk, EngineError(ErrorCode.INTERNAL,
                                                f'inference failed: {type(exc).__name__}'))
            return
        elapsed = time.perf_counter() - t0
        if not all(it.job.expired for it in chunk):
            # it answered someone, or would have (a caller that cancelled left a well model);
            # a run whose calls had all timed out answered no one: a model too slow for every
            # budget must still count against its breaker
            self.run_clock.last_end = time.monotonic()
        tokens = int(mask.sum())
        with self._cost_lock:
            self.cost.observe(mask.size, elapsed)
        if self._on_batch:
            self._on_batch(len(chunk), tokens, elapsed)
        traced = {id(it.job): it.job for it in chunk if it.job.trace_ctx is not None}
        if traced:
            end = time.monotonic()
            for job in traced.values():
                record_engine_spans(job.trace_ctx, self.model_id, job.created, job.started or end,
                                    end - elapsed, end, len(chunk), tokens, job.provider)
        normed = l2_normalize(vectors) if any(it.job.normalize for it in chunk) else vectors
        finished = []
        with self._scatter_lock:
            for row, it in enumerate(chunk):
                job = it.job
                job.vectors[it.index] = normed[row] if job.normalize else vectors[row]
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        for job in finished:
            job.complete()

    @staticmethod
    def _fail_chunk(chunk: List[_Item], exc: EngineError) -> None:
        for job in {id(it.job): it.job for it in chunk}.values():
            job.fail(exc)
