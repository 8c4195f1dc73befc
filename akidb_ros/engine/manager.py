"""Model manager: lazy loads, LRU by count and memory, in-flight pinning, hot load/unload."""
from __future__ import annotations

import collections
import gc
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from ..observability import metrics
from .batcher import Batcher
from .config import EngineConfig, ModelConfig
from .errors import EngineError, ErrorCode, loading_timeout
from .malloc_tuning import release_free_memory
from .runtime import OnnxModel, tensorrt_build_expected
from .text import TextEncoder
from .types import ModelInfo, ModelStatus

log = logging.getLogger('akidb_ros.engine.manager')

STATS_WINDOW_S = 60.0
# A load still running at close is waited for: a thread left inside ONNX Runtime at exit aborts.
LOAD_JOIN_S = 60.0
# A readiness look loads a default model whose last load failed again after this long,
# doubling with each failure in a row up to READY_RETRY_MAX_S: fixed files (or a passing
# fault) make the pod ready again, with no traffic, which a not-ready pod never gets.
READY_RETRY_S = 5.0
READY_RETRY_MAX_S = 60.0


class LatencyWindow:
    """The last ``capacity`` request latencies, for p95 and requests/s over ``window_s``.

    Two numpy ring buffers: ``record`` is O(1) on the request path, and ``stats`` (read by
    /diagnostics every second, ListModels and /health) is vectorised instead of walking 4096
    Python tuples while holding the GIL the doors need.
    """

    def __init__(self, capacity: int = 4096, window_s: float = STATS_WINDOW_S):
        self.window_s = window_s
        self._at = np.zeros(capacity)
        self._lat = np.zeros(capacity)
        self._count = 0
        self._lock = threading.Lock()

    def record(self, latency_s: float, now: Optional[float] = None) -> None:
        with self._lock:
            i = self._count % len(self._at)
            self._at[i] = time.monotonic() if now is None else now
            self._lat[i] = latency_s
            self._count += 1

    def stats(self, now: Optional[float] = None) -> Tuple[float, float]:
        """(p95 latency ms, requests/s) over the window; (0, 0) when nothing is in it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            n = min(self._count, len(self._at))
            at, lat = self._at[:n].copy(), self._lat[:n].copy()
        recent = at >= now - self.window_s
        if not recent.any():
            return 0.0, 0.0
        p95 = float(np.percentile(lat[recent], 95)) * 1000.0
        span = max(now - float(at[recent].min()), 1.0)
        return p95, int(recent.sum()) / span


class LoadedModel:
    """A model ready to serve: session, tokenizer, batcher and its live statistics."""

    def __init__(self, cfg: ModelConfig, onnx: OnnxModel, encoder: TextEncoder,
                 batcher: Batcher, load_seconds: float):
        self.cfg = cfg
        self.onnx = onnx
        self.encoder = encoder
        self.batcher = batcher
        self.load_seconds = load_seconds
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.latencies = LatencyWindow()
        self.cache_hits = metrics.MODEL_CACHE_HITS.labels(model=cfg.id)   # bound once
        # What the LRU budget counts: the weights once per session (an overlap session doubles).
        self.memory_mb = cfg.memory_estimate_mb() * onnx.memory_factor

    def record(self, latency_s: float) -> None:
        self.latencies.record(latency_s)

    def stats(self) -> Tuple[float, float]:
        """(p95 latency ms, requests/s) over the last minute."""
        return self.latencies.stats()


class ModelNotLoaded(Exception):
    """``acquire(..., load=False)`` found the model not loaded (nothing was pinned)."""


# The process' managers: the cache gauge adds up their loaded models at scrape time (with two
# engines in one process it followed whichever changed it last). A closed manager has none.
_MANAGERS: 'weakref.WeakSet[ModelManager]' = weakref.WeakSet()
metrics.MODEL_CACHE_SIZE.set_function(lambda: metrics.summed(_MANAGERS, lambda m: len(m._loaded)))


class ModelManager:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.settings = config.engine
        self._lock = threading.RLock()
        _MANAGERS.add(self)
        self._loaded: 'collections.OrderedDict[str, LoadedModel]' = collections.OrderedDict()
        self._loading: Dict[str, Future] = {}
        self._failed: Dict[str, str] = {}
        # model id -> (failed loads in a row, when a readiness look may load it again)
        self._retry: Dict[str, Tuple[int, float]] = {}
        self._unloads: Dict[str, int] = {}     # explicit unloads per model id, so far
        self._loaders: Set[threading.Thread] = set()
        self._closing = False       # close() began: no load starts, none finishing is kept
        # model id -> until when its load in progress may take: it builds a TensorRT engine
        self._build_until: Dict[str, float] = {}
        # Unloaded/evicted models still draining or still building their overlap session.
        self._retiring: Set[threading.Thread] = set()
        self._draining: Dict[int, LoadedModel] = {}   # id(model) -> a model they retire
        # id and HF name -> config: the request path looks a model up without scanning
        self._by_key: Dict[str, ModelConfig] = {}
        for m in config.models:
            self._by_key.setdefault(m.name, m)
        self._by_key.update({m.id: m for m in config.models})

    # --- lookup --------------------------------------------------------------------------
    def resolve(self, model: str) -> ModelConfig:
        """Map a requested id or HF name ('' = default) to its config, or raise."""
        wanted = model or self.config.default_model
        m = self._by_key.get(wanted)
        if m is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f'Model not found: {wanted}')
        # A loaded model serves from memory; only a load needs its files (a stat per call
        # was a measurable share of the request path).
        if m.id not in self._loaded and not m.installed:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE,
                              f'model {m.id} is in the catalogue but its files are not '
                              'installed')
        return m

    def label(self, model: str) -> str:
        """A bounded metric label for a requested id or HF name ('' = the default model): its
        catalogue id, or 'unknown' for a name the catalogue does not have."""
        m = self._by_key.get(model or self.config.default_model)
        return m.id if m is not None else 'unknown'

    # --- acquire / release (the request path) ---------------------------------------------
    def acquire(self, model: str, load: bool = True,
                wait_until: Optional[float] = None) -> LoadedModel:
        """Return the loaded model pinned against eviction; loads it if needed (deduplicated).

        With ``load=False`` a model that is not loaded raises :class:`ModelNotLoaded` instead
        (for threads that must never wait for a load, e.g. a ROS executor). ``wait_until``
        (monotonic; a caller's own budget): a load not done by then is answered TIMEOUT, and
        goes on for the next call.
        """
        cfg = self.resolve(model)
        give_up = None
        missed = False          # a request is a hit or a miss, once (not a miss, then a hit)
        while True:
            with self._lock:
                lm = self._loaded.get(cfg.id)
                if lm is not None:
                    self._loaded.move_to_end(cfg.id)
                    lm.in_flight += 1
                    lm.last_used = time.monotonic()
                    if not missed:
                        lm.cache_hits.inc()
                    return lm
                if not load:
                    raise ModelNotLoaded(cfg.id)
                if not missed:
                    metrics.MODEL_CACHE_MISSES.labels(model=cfg.id).inc()
                    missed = True
                fut = self._start_load(cfg)
            # Wait with the lock free (everything else needs it: releases, other models'
            # loads, deadlines); a model unloaded between its load and now is loaded again,
            # within one load timeout in all.
            if give_up is None:
                give_up = time.monotonic() + self.settings.timeouts.model_load_s
            if wait_until is not None and wait_until < give_up:
                try:
                    fut.result(timeout=max(0.0, wait_until - time.monotonic()))
                except TimeoutError:
                    raise loading_timeout(cfg.id) from None
            else:
                self._await_load(cfg, fut, give_up)

    def release(self, lm: LoadedModel, latency_s: Optional[float] = None) -> None:
        with self._lock:
            lm.in_flight -= 1
            if latency_s is not None:
                lm.record(latency_s)
            if lm.in_flight == 0:
                self._enforce_limits(keep_newest=False)

    # --- load ----------------------------------------------------------------------------
    def _start_load(self, cfg: ModelConfig) -> Future:
        fut = self._loading.get(cfg.id)
        if fut is None:
            if self._closing:       # a load started now would outlive close() (its threads too)
                raise EngineError(ErrorCode.UNAVAILABLE, 'engine is shutting down',
                                  retry_after_s=1.0)
            fut = Future()
            self._loading[cfg.id] = fut
            if tensorrt_build_expected(cfg, self.settings):
                # A first TensorRT build takes minutes: cut off at model_load_s, it would start
                # again from scratch at every restart, for ever. Known before any wait begins.
                budget = self.settings.timeouts.tensorrt_build_s
                self._build_until[cfg.id] = time.monotonic() + budget
                log.info('%s: building its TensorRT engine (none cached yet; minutes for a large '
                         'model), load timeout %g s', cfg.id, budget)
            self._start_tracked(self._loaders, lambda: self._load_into(cfg, fut),
                                f'akidb-load-{cfg.id}')
        return fut

    def _start_tracked(self, threads: Set[threading.Thread], work: Callable[[], None],
                       name: str) -> None:
        """Run ``work`` on a daemon thread kept in ``threads`` until it ends: close() joins
        them, since a thread still inside ONNX Runtime when the process exits aborts it."""
        def body():
            try:
                work()
            finally:
                with self._lock:
                    threads.discard(threading.current_thread())
        thread = threading.Thread(target=body, name=name, daemon=True)
        with self._lock:
            threads.add(thread)
        thread.start()

    def _await_load(self, cfg: ModelConfig, fut: Future, give_up: float,
                    wait_build: bool = False) -> LoadedModel:
        """Wait for ``fut`` until ``give_up`` (``model_load_s`` after the wait began).

        A load that builds a TensorRT engine (``_build_until``) goes on past that: a start-up
        (``wait_build``) waits for it, up to ``tensorrt_build_s``; anyone else is answered
        UNAVAILABLE, retry later, while it builds.
        """
        timeout = self.settings.timeouts.model_load_s
        while True:
            try:
                return fut.result(timeout=max(0.0, give_up - time.monotonic()))
            except EngineError:
                raise
            except TimeoutError:
                with self._lock:
                    build_until = self._build_until.get(cfg.id)
                if build_until is None:
                    raise EngineError(ErrorCode.MODEL_LOAD_FAILED,
                                      f'model {cfg.id} did not load within {timeout:g} s',
                                      retry_after_s=5.0) from None
                if not wait_build or build_until <= give_up:
                    raise EngineError(
                        ErrorCode.UNAVAILABLE,
                        f'model {cfg.id} is still building its TensorRT engine (first use; up '
                        f'to {self.settings.timeouts.tensorrt_build_s:g} s): retry later',
                        retry_after_s=30.0) from None
                give_up = build_until

    def _load_into(self, cfg: ModelConfig, fut: Future) -> None:
        t0 = time.perf_counter()
        try:
            lm = self._build(cfg, t0)
        except EngineError as exc:
            self._finish_load(cfg, fut, exc=exc)
        except Exception as exc:  # any loader bug becomes a clean MODEL_LOAD_FAILED
            log.exception('loading %s failed', cfg.id)
            self._finish_load(cfg, fut, exc=EngineError(
                ErrorCode.MODEL_LOAD_FAILED,
                f'model {cfg.id} failed to load ({type(exc).__name__})'))
        else:
            self._finish_load(cfg, fut, lm=lm)

    @staticmethod
    def _check_vocabulary(cfg: ModelConfig, encoder: TextEncoder, onnx: OnnxModel) -> None:
        """A tokenizer with more tokens than the model has word-embedding rows is another
        model's: it loaded, then every batch holding one of the extra ids failed INTERNAL (and
        opened the breaker for every caller). A few tokens fewer than rows is common (tables
        padded to a round size) and cannot be told from a mismatch; fewer than half the rows is
        warned about (another model's tokenizer serves vectors, all of them meaningless)."""
        if onnx.vocab_table is None:
            return
        table, rows = onnx.vocab_table
        if encoder.vocab_size < rows // 2:
            log.warning('model %s: its tokenizer %s has %d tokens, under half the %d rows of the '
                        "model's word-embedding table %s: is it this model's tokenizer? Its "
                        'vectors are meaningless if not', cfg.id, cfg.tokenizer,
                        encoder.vocab_size, rows, table)
        if encoder.vocab_size > rows:
            raise EngineError(
                ErrorCode.MODEL_LOAD_FAILED,
                f'model {cfg.id}: its tokenizer {cfg.tokenizer} has {encoder.vocab_size} tokens, '
                f'more than the {rows} rows of the model\'s word-embedding table {table}: it is '
                'not this model\'s tokenizer')

    def _build(self, cfg: ModelConfig, t0: float) -> LoadedModel:
        try:
            encoder = TextEncoder(cfg)
        except EngineError:
            raise                       # its own, clear reason (max_tokens leaves no room)
        except Exception as exc:
            log.error('model %s: cannot read tokenizer %s: %s', cfg.id, cfg.tokenizer, exc)
            raise EngineError(ErrorCode.MODEL_LOAD_FAILED,
                              f'model {cfg.id}: cannot read its tokenizer') from exc
        b = self.settings.batching
        onnx = OnnxModel(cfg, self.settings, b.runners)

        batch_sizes = metrics.INFERENCE_BATCH_SIZE.labels(model=cfg.id)
        tokens_done = metrics.TOKENS_PROCESSED.labels(model=cfg.id)
        run_seconds = metrics.INFERENCE_SECONDS.labels(model=cfg.id)

        def on_batch(n: int, tokens: int, seconds: float) -> None:
            batch_sizes.observe(n)
            tokens_done.inc(tokens)
            run_seconds.observe(seconds)

        try:
            self._check_vocabulary(cfg, encoder, onnx)
            onnx.warm_up(encoder.pad_id)
            onnx.build_overlap(encoder.pad_id)
            # Holding a batch open for more callers pays where one run uses the whole device.
            # Where runners overlap on a CPU's cores, a runner that holds leaves a core idle
            # (both, between runs) while sentences queue up during the other's run anyway: in
            # interleaved A/Bs on 2 cores, no hold served 5-6 % more sentences/s through REST
            # and gRPC (docs/benchmarks.md).
            wait_ms = 0.0 if onnx.runs_share_cores else b.max_wait_ms
            batcher = Batcher(cfg.id, onnx.run, encoder.pad_id, onnx.uses_type_ids,
                              cfg.pooling, b.max_batch_size, b.max_batch_tokens, wait_ms,
                              b.max_padding_ratio, on_batch, b.split_policy, b.runners,
                              terminate=onnx.terminate_runs)
        except BaseException:
            # A failed load leaves nothing running: the overlap session may still be building,
            # and a thread inside ONNX Runtime when the process exits aborts it (exit 134).
            onnx.wait_overlap(LOAD_JOIN_S)
            raise
        seconds = time.perf_counter() - t0
        metrics.MODEL_LOAD_SECONDS.labels(model=cfg.id).observe(seconds)
        if onnx.trt_engine_built is True:
            metrics.TENSORRT_ENGINE_BUILDS.labels(model=cfg.id).inc()
        elif onnx.trt_engine_built is False:
            metrics.TENSORRT_ENGINE_CACHE_HITS.labels(model=cfg.id).inc()
        log.info('loaded %s on %s in %.0f ms', cfg.id, onnx.provider, seconds * 1000)
        return LoadedModel(cfg, onnx, encoder, batcher, seconds)

    def _finish_load(self, cfg: ModelConfig, fut: Future, lm: Optional[LoadedModel] = None,
                     exc: Optional[EngineError] = None) -> None:
        with self._lock:
            self._loading.pop(cfg.id, None)
            self._build_until.pop(cfg.id, None)
            closing = self._closing and lm is not None
            if closing:
                exc, lm, done = EngineError(ErrorCode.UNAVAILABLE, 'engine is shutting down',
                                            retry_after_s=1.0), None, lm
            elif lm is not None:
                self._loaded[cfg.id] = lm
                self._failed.pop(cfg.id, None)
                self._retry.pop(cfg.id, None)
                self._enforce_limits()
            else:
                self._failed[cfg.id] = exc.message
                streak = self._retry.get(cfg.id, (0, 0.0))[0] + 1
                self._retry[cfg.id] = (streak, time.monotonic() + min(
                    READY_RETRY_MAX_S, READY_RETRY_S * 2 ** (streak - 1)))
        if closing:                 # close() has taken the models: stop this one here
            done.batcher.stop()
            done.onnx.wait_overlap(LOAD_JOIN_S)
            fut.set_exception(exc)
        elif lm is not None:
            fut.set_result(lm)
        else:
            log.error('%s', exc.message)
            fut.set_exception(exc)

    def load_in_background(self, model: str) -> None:
        """Start loading ``model`` unless it is loaded, loading, or its last load failed less
        than its back-off ago (``READY_RETRY_S``, doubling)."""
        cfg = self.resolve(model)
        with self._lock:
            if cfg.id in self._loaded or cfg.id in self._loading:
                return
            failed = self._failed.get(cfg.id)
            if failed is not None and time.monotonic() < self._retry[cfg.id][1]:
                return
            log.info('loading %s again (readiness needs it%s)', cfg.id,
                     f'; its last load failed: {failed}' if failed else '')
            self._start_load(cfg)

    def load(self, model: str, wait_build: bool = False) -> ModelInfo:
        """Hot load (idempotent): returns once the model serves.

        ``wait_build``: wait for a TensorRT engine build too (start-up); otherwise a build
        still running after ``model_load_s`` is answered UNAVAILABLE (it goes on meanwhile).

        An unload that lands after this load began wins: the load answers the model's status
        as it then stands instead of loading it again (acquire() would, and the unload, which
        waited for this load, would be answered "loading").
        """
        cfg = self.resolve(model)
        give_up = time.monotonic() + self.settings.timeouts.model_load_s
        with self._lock:
            unloads = self._unloads.get(cfg.id, 0)
        over_budget = False
        while True:
            with self._lock:
                if self._unloads.get(cfg.id, 0) != unloads:
                    break
                lm = self._loaded.get(cfg.id)
                if lm is not None:
                    self._loaded.move_to_end(cfg.id)
                    lm.last_used = time.monotonic()
                    if self._fits_beside_default(lm):
                        # kept: a busy model may hold the cache over budget until its work
                        # is answered (trimmed on that release), as after any lazy load
                        self._enforce_limits()
                    else:
                        # the answer does not depend on traffic: busy now, it stays only
                        # until its work is answered (it was "loaded" then, refused idle)
                        self._enforce_limits(keep_newest=False)
                        over_budget = True
                    break
                fut = self._start_load(cfg)
            # a model evicted between its load and now is loaded again, within one timeout
            self._await_load(cfg, fut, give_up, wait_build)
        if over_budget:     # loaded, and over budget as soon as it is idle
            cache = self.settings.cache
            size = f'{lm.memory_mb} MB'
            declared = cfg.memory_estimate_mb()
            if declared and lm.memory_mb != declared:
                size += (f': {declared} MB x {lm.memory_mb // declared} sessions, one per '
                         'overlapping runner')
            budget = (f'max_loaded_models={cache.max_loaded_models}, max_memory_mb='
                      f'{cache.max_memory_mb}')
            if cfg.id == self.config.default_model:
                raise EngineError(
                    ErrorCode.INVALID_INPUT,
                    f'the default model {cfg.id} ({size}) does not fit the cache budget '
                    f'({budget}): set engine.cache.max_memory_mb to at least {lm.memory_mb}')
            raise EngineError(      # not retryable: only a larger budget helps
                ErrorCode.INVALID_INPUT,
                f'model {cfg.id} ({size}) cannot stay loaded within the cache budget '
                f'({budget}) beside the default model, which is never evicted: it is loaded '
                'for each request instead')
        return self.info(cfg)

    # --- unload / eviction ---------------------------------------------------------------
    def unload(self, model: str) -> ModelInfo:
        """Hot unload: new requests lazily reload; queued and running work finishes first.

        A load in progress is waited for (within the load timeout) and what it loaded is
        unloaded: answered "loading", the unload would leave the model loaded afterwards.
        """
        cfg = self.resolve(model)
        with self._lock:
            loading = self._loading.get(cfg.id)
        if loading is not None:
            try:
                loading.result(timeout=self.settings.timeouts.model_load_s)
            except Exception:   # failed (status says so) or still loading: answered as it is
                pass
        with self._lock:
            self._unloads[cfg.id] = self._unloads.get(cfg.id, 0) + 1
            lm = self._loaded.pop(cfg.id, None)
            if lm is not None:
                # in the same hold: a close() between the two would see it nowhere
                self._retire(lm)
        return self.info(cfg)

    def _retire(self, lm: LoadedModel) -> None:
        # Batcher.stop drains the queue, so every accepted request is still answered; the
        # overlap session may still be building, hence a tracked thread.
        # Requests that pinned the model before it left the cache may not have reached its
        # batcher yet: it keeps serving until they have (bounded by their budget).
        # close() stops a draining model's batcher within its own grace (_draining).
        held = [lm]
        with self._lock:
            self._draining[id(lm)] = lm

        def retire():
            model = held.pop()
            give_up = time.monotonic() + self.settings.timeouts.inference_s + LOAD_JOIN_S
            while model.in_flight > 0 and time.monotonic() < give_up and not self._closing:
                time.sleep(0.01)
            model.batcher.stop()
            model.onnx.wait_overlap(LOAD_JOIN_S)
            with self._lock:
                self._draining.pop(id(model), None)
            # let the model go (its sessions are in reference cycles), then give glibc's
            # free pages back: the thresholds alone left them in its arenas (malloc_tuning)
            del model
            gc.collect()
            release_free_memory()
        self._start_tracked(self._retiring, retire, f'akidb-retire-{lm.cfg.id}')

    def _fits_beside_default(self, lm: LoadedModel) -> bool:
        """Whether ``lm`` fits the cache budget with only the default model beside it (other
        models are evictable once idle); under ``_lock``."""
        cache = self.settings.cache
        default = self._loaded.get(self.config.default_model)
        if default is None or default is lm:
            return lm.memory_mb <= cache.max_memory_mb
        return cache.max_loaded_models >= 2 and \
            default.memory_mb + lm.memory_mb <= cache.max_memory_mb

    def _enforce_limits(self, keep_newest: bool = True) -> None:
        """Evict least-recently-used idle models until count and memory budgets hold.

        The default model is never evicted: readiness means it is loaded, and a probe that
        says "not ready" takes the traffic away that would have loaded it again. A model with
        work in flight is never evicted either, nor (``keep_newest``, after a load) the most
        recently used one, which its caller is about to take: the cache may run over its
        budget until that work is answered, and is trimmed on the release that ends it. So a
        budget too small for the default and one more model serves the others one request
        (or batch of concurrent requests) at a time.
        """
        cache = self.settings.cache

        def over() -> bool:
            mem = sum(m.memory_mb for m in self._loaded.values())
            return len(self._loaded) > cache.max_loaded_models or mem > cache.max_memory_mb

        order = list(self._loaded)
        for model_id in order[:-1] if keep_newest else order:   # [-1]: most recently used
            if not over():
                break
            lm = self._loaded[model_id]
            if lm.in_flight > 0 or model_id == self.config.default_model:
                continue   # never evict a model with work in flight, nor the default
            del self._loaded[model_id]
            metrics.MODEL_EVICTIONS.labels(model=model_id).inc()
            log.info('evicted %s (LRU)', model_id)
            self._retire(lm)

    # --- status --------------------------------------------------------------------------
    def loaded(self, model_id: str) -> Optional[LoadedModel]:
        with self._lock:
            return self._loaded.get(model_id)

    def info(self, cfg: ModelConfig) -> ModelInfo:
        return self.describe(cfg)[0]

    def describe(self, cfg: ModelConfig) -> Tuple[ModelInfo, Optional[LoadedModel]]:
        """The model's info and, when loaded, the model itself (one consistent look)."""
        with self._lock:
            lm = self._loaded.get(cfg.id)
            loading = cfg.id in self._loading
            failed = self._failed.get(cfg.id, '')
        p95, qps = lm.stats() if lm else (0.0, 0.0)
        if lm is not None:
            status = ModelStatus.LOADED
        elif loading:
            status = ModelStatus.LOADING
        elif not cfg.installed:
            status = ModelStatus.UNAVAILABLE
        elif failed:
            status = ModelStatus.FAILED
        else:
            status = ModelStatus.AVAILABLE
        return ModelInfo(
            id=cfg.id, name=cfg.name, dimension=cfg.dimension, params=cfg.params,
            memory_mb=lm.memory_mb if lm else cfg.memory_estimate_mb(), max_tokens=cfg.max_tokens,
            latency_p95_ms=round(p95, 3), throughput_qps=round(qps, 3), status=status,
            provider=lm.onnx.provider if lm else '', pooling=cfg.pooling,
            is_default=cfg.id == self.config.default_model, error=failed,
            in_flight=lm.in_flight if lm else 0), lm

    def list(self) -> List[ModelInfo]:
        return [self.info(m) for m in self.config.models]

    def close(self, timeout: float = 10.0) -> None:
        """Wait for loads and retirements in progress (a thread inside ONNX Runtime must not
        outlive us), then stop every batcher; each runs its queue first, all within
        ``timeout`` (what is left then is failed UNAVAILABLE, and the runs in progress are cut
        short and waited for). A model being retired (an unload or eviction) is stopped
        within the same ``timeout``; a load in progress cannot be cut short, and is waited for
        on its own bounds."""
        with self._lock:
            self._closing = True
            loaders = list(self._loaders)
        for thread in loaders:
            thread.join(timeout=max(self.settings.timeouts.model_load_s, LOAD_JOIN_S))
        with self._lock:
            models = list(self._loaded.values())
            self._loaded.clear()
            draining = list(self._draining.values())
            retiring = list(self._retiring)
        end = time.monotonic() + timeout
        for lm in models + draining:
            lm.batcher.stop(max(0.0, end - time.monotonic()))
            lm.onnx.wait_overlap(LOAD_JOIN_S)
        for thread in retiring:      # their stops have returned (above): only the cleanup left
            thread.join(timeout=LOAD_JOIN_S)
