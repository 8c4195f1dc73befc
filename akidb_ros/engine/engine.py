"""EmbeddingEngine: the one core service every door (ROS, REST, gRPC) calls."""
from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
import time
import unicodedata
import weakref
from concurrent.futures import Future
from numbers import Real
from typing import List, Optional

import numpy as np

from .. import __version__
from ..observability.gpu import GpuSampler
from .batcher import Admission, Job
from .config import EngineConfig, LimitsConfig
from .deadlines import DeadlineWatcher, on_engine_thread
from .errors import EngineError, ErrorCode, tokenise_timeout
from .malloc_tuning import tune_malloc
from .manager import ModelManager
from .runtime import CPU
from .types import (EmbedRequest, EmbedResult, HealthInfo, InputType, ModelInfo, ModelStatus,
                    Priority)

log = logging.getLogger('akidb_ros.engine')
MAX_MODEL_NAME_CHARS = 256      # a model id or HF name; longer names are refused, never echoed


def _blank_pattern() -> 're.Pattern':
    """Whitespace, control and format characters (U+0000, U+200B, U+FEFF ...): tokenisers drop
    them, so a text made only of them would be embedded as the empty string. Built from the
    interpreter's Unicode tables (planes 0, 1 and 14 hold every Cc/Cf character; ~15 ms once)
    so the check itself is one C-speed regex match, whatever the text's length."""
    codes = [c for r in (range(0x20000), range(0xE0000, 0xE1000)) for c in r
             if unicodedata.category(chr(c)) in ('Cc', 'Cf')]
    ranges, start, prev = [], codes[0], codes[0]
    for c in codes[1:] + [-1]:
        if c != prev + 1:
            ranges.append(re.escape(chr(start)) + ('-' + re.escape(chr(prev)) if prev > start
                                                   else ''))
            start = c
        prev = c
    return re.compile(r'[\s' + ''.join(ranges) + ']*')


_BLANK = _blank_pattern()


def has_text(text: str) -> bool:
    """True when ``text`` holds a visible character (not only whitespace/control/format)."""
    return _BLANK.fullmatch(text) is None


_SURROGATE = re.compile('[\ud800-\udfff]')


def _surrogate_error(i: int) -> EngineError:
    return EngineError(ErrorCode.INVALID_INPUT,
                       f'inputs[{i}] is not valid Unicode (lone surrogate)')


def _nul_error(field: str, text: str) -> EngineError:
    return EngineError(ErrorCode.INVALID_INPUT,
                       f'{field} contains U+0000 (NUL) at character {text.index(chr(0))}: '
                       'a ROS string ends at the first NUL, so no door takes it')


def check_ros_strings(inputs, model: str) -> None:
    """Refuse what a ROS string cannot carry, with :func:`check_limits`' codes and messages.

    rosidl copies a string up to its first NUL (the rest is dropped without an error) and cannot
    encode a lone surrogate: the sidecar bridge calls this before the DDS hop, so the node never
    embeds a cut text. Only these two checks: the node's engine runs all of
    :func:`check_limits` (count first) on what arrives; the bridge does not know the node's
    limits, so a request over them that also holds a NUL hears INVALID_INPUT from it.
    """
    for i, text in enumerate(inputs):
        if '\x00' in text:
            raise _nul_error(f'inputs[{i}]', text)
        if _SURROGATE.search(text):
            raise _surrogate_error(i)
    if '\x00' in model:
        raise _nul_error('model', model)


def check_model_name(model) -> None:
    """A model id or name as every door takes it (taken as sent: no trimming), or
    INVALID_INPUT: embed and the admin load/unload alike."""
    if not isinstance(model, str) or len(model) > MAX_MODEL_NAME_CHARS:
        raise EngineError(ErrorCode.INVALID_INPUT,
                          f'model must be a model id or name of at most {MAX_MODEL_NAME_CHARS} '
                          'characters')
    if '\x00' in model:
        raise _nul_error('model', model)


def check_limits(request: EmbedRequest, limits: LimitsConfig) -> None:
    """Reject bad input before it costs anything; every rejection names the offending input.

    The order is the contract every door keeps (they all end here): the list itself, then the
    count, then each input in turn (type, NUL, characters, valid Unicode, total bytes, blank),
    then the model name and the options.
    """
    inputs = request.inputs
    if not isinstance(inputs, (list, tuple)):
        raise EngineError(ErrorCode.INVALID_INPUT, 'inputs must be a list of strings')
    if not inputs:
        raise EngineError(ErrorCode.INVALID_INPUT, 'inputs must not be empty')
    if len(inputs) > limits.max_inputs:
        raise EngineError(ErrorCode.INPUT_TOO_LARGE,
                          f'{len(inputs)} inputs exceed the limit of {limits.max_inputs}')
    total = 0
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise EngineError(ErrorCode.INVALID_INPUT, f'inputs[{i}] is not a string')
        if '\x00' in text:
            # a ROS string ends at a NUL: the ROS door and the sidecar would embed a cut text
            raise _nul_error(f'inputs[{i}]', text)
        if len(text) > limits.max_input_chars:
            raise EngineError(ErrorCode.INPUT_TOO_LARGE,
                              f'inputs[{i}] has {len(text)} characters, over the limit of '
                              f'{limits.max_input_chars}')
        try:
            total += len(text.encode('utf-8'))
        except UnicodeEncodeError:
            raise _surrogate_error(i) from None
        if total > limits.max_total_bytes:
            raise EngineError(ErrorCode.INPUT_TOO_LARGE,
                              f'inputs exceed {limits.max_total_bytes} bytes in total')
        if not has_text(text):
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'inputs[{i}] is empty (only whitespace or invisible characters)')
    check_model_name(request.model)
    if not isinstance(request.input_type, InputType):
        raise EngineError(ErrorCode.INVALID_INPUT, 'input_type must be none, query or passage')
    for name, seconds in (('timeout_s', request.timeout_s),
                          ('caller_budget_s', request.caller_budget_s)):
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, Real)
                                    or not 0 < seconds < math.inf):
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'{name} must be a positive, finite number of seconds')
    if not isinstance(request.priority, Priority):
        # the admin lane is the guard's to grant (Priority.ADMIN), never a caller's string
        raise EngineError(ErrorCode.INVALID_INPUT, 'priority must be a Priority')
    # yes/no options: 'no' was read as true (normalised)
    for name, value, none_ok in (('normalize', request.normalize, True),
                                 ('truncate', request.truncate, False)):
        if not (isinstance(value, (bool, np.bool_)) or (none_ok and value is None)):
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'{name} must be true or false{" or None" if none_ok else ""} '
                              f'(got {type(value).__name__})')


# Engines not closed yet: closed at interpreter exit (their runner threads, daemons inside
# ONNX Runtime, aborted the process: SIGABRT, exit 134), and unusable in a fork's child.
_LIVE: 'weakref.WeakSet[EmbeddingEngine]' = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # atexit runs before daemon threads are stopped: what is queued is failed UNAVAILABLE and
    # the runs in progress are cut short (nobody waits for them any more)
    for engine in list(_LIVE):
        try:
            engine.close(timeout=0.0)
        except Exception:       # one engine's failure must not leave the others open
            log.exception('closing an engine at exit failed')


def _after_fork_in_child() -> None:
    # the child has none of the engine's threads: a queued job would never be answered; nor
    # is anything of it closed at the child's exit (its copy counts runs of threads it lacks)
    for engine in list(_LIVE):
        engine._forked = True
    _LIVE.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class EmbeddingEngine:
    """Thread-safe. ``submit`` never blocks on inference; ``embed`` waits for the answer."""

    def __init__(self, config: EngineConfig):
        tune_malloc()       # before any model is loaded: unloads must give memory back
        self.config = config
        self.manager = ModelManager(config)
        queue = config.engine.queue
        self.admission = Admission(queue.capacity, queue.shed_threshold)
        self._deadlines = DeadlineWatcher(engine_thread=True)
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._idle = threading.Condition()
        self.started_at = time.monotonic()
        self.gpu_sampler = GpuSampler(config.engine.gpu_metrics_interval_s)
        self._forked = False
        _LIVE.add(self)

    # --- lifecycle -----------------------------------------------------------------------
    @property
    def default_model(self) -> str:
        return self.config.default_model

    def start(self, preload: Optional[List[str]] = None) -> None:
        """Load and warm the default model (and any others named) before serving.

        A first TensorRT engine build is waited for (``timeouts.tensorrt_build_s``): cut off
        at the load timeout, it would start again from scratch at every restart.
        """
        if not self.gpu_sampler.running and not self.gpu_sampler.start():
            log.debug('no GPU metrics: %s', self.gpu_sampler.reason)
        for model in preload if preload is not None else [self.default_model]:
            self.manager.load(model, wait_build=True)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, answer everything accepted (finish it, or fail it cleanly). A
        second caller waits for the first one's close to end (up to ``timeout`` more)."""
        with self._close_lock:
            first = not self._closed
            self._closed = True
        if self._forked:        # a fork's copy: its threads and runs are the parent's
            self._close_done.set()
            return
        if not first:
            self._close_done.wait(timeout)
            return
        try:
            self._close(timeout)
        finally:
            _LIVE.discard(self)
            self._close_done.set()

    def _close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.admission.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(timeout=min(left, 0.1))
        # the batchers run what is queued within what is left of ``timeout``, then fail the rest
        # UNAVAILABLE (they had 10 s of their own: a stop with --grace 1 took 4-5 s)
        self.manager.close(max(0.0, deadline - time.monotonic()))
        self.admission.retire()
        self._deadlines.stop()
        self.gpu_sampler.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- requests ------------------------------------------------------------------------
    def submit(self, request: EmbedRequest, caller_waits: bool = False,
               load: bool = True) -> 'Future[EmbedResult]':
        """Validate, admit and enqueue; the future resolves exactly once (result or EngineError).

        Caller mistakes and admission failures raise EngineError right away (nothing was
        accepted), and so do failures before the job is queued (its model's load failing, the
        deadline passing while it is tokenised, INPUT_TOO_LONG), its queue slot given back;
        once queued, every outcome arrives through the future. A caller that
        will block on the future (``caller_waits``) may get it answered already: its thread
        runs the job when the model is idle (``Batcher.run_inline``). An event loop or ROS
        executor must not set it, and should pass ``load=False``: a model that is not loaded
        then raises ``ModelNotLoaded`` (nothing admitted) instead of loading in its thread.
        """
        # The budget counts from here: tokenising a large request is part of it.
        received = time.monotonic()
        if self._closed:
            raise EngineError(ErrorCode.UNAVAILABLE, 'engine is shutting down', retry_after_s=1.0)
        if self._forked:
            raise EngineError(ErrorCode.UNAVAILABLE, 'this engine was created before fork(): '
                              'its threads are not in this process; create one after the fork')
        if not isinstance(request, EmbedRequest):
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'expected an EmbedRequest, got {type(request).__name__}')
        if caller_waits and on_engine_thread():
            # a future's done-callback runs on the thread that answered it: waiting there
            # for another answer held the threads that give it (the model hung until close)
            raise EngineError(ErrorCode.INVALID_INPUT, (
                'embed() from a done-callback would wait on the engine thread that must answer '
                'it: call submit() (it does not wait) or hand the work to a thread of your own'))
        limits = self.config.engine.limits
        check_limits(request, limits)
        model_cfg = self.manager.resolve(request.model)   # MODEL_NOT_FOUND before admission
        self.admission.admit(request.priority)
        try:
            return self._enqueue(request, model_cfg, caller_waits, load, received)
        except BaseException:
            self._release_slot()
            raise

    def _enqueue(self, request: EmbedRequest, model_cfg, inline: bool,
                 load: bool, received: float) -> 'Future[EmbedResult]':
        """Pin the model, tokenise in the caller's thread, hand the job to the batcher (or,
        ``inline`` and the model idle, run it here: ``Batcher.run_inline``)."""
        timeout = request.timeout_s or self.config.engine.timeouts.inference_s
        ask = request.caller_budget_s
        for attempt in range(2):
            t_load = time.monotonic()
            lm = self.manager.acquire(model_cfg.id, load=load,
                                      wait_until=None if ask is None else received + ask)
            # A cold load has its own limit (load timeout): the server's budget starts after
            # it, the caller's own ask counts it (EmbedRequest.caller_budget_s).
            deadline = received + timeout + (time.monotonic() - t_load)
            if ask is not None:
                deadline = min(deadline, received + ask)
            try:
                encoded = lm.encoder.encode(request.inputs, request.input_type, deadline)
                if not request.truncate:
                    over = [i for i, e in enumerate(encoded) if e.truncated]
                    if over:
                        raise EngineError(
                            ErrorCode.INPUT_TOO_LONG,
                            f'inputs{over[:8]} exceed the model max length of '
                            f'{model_cfg.max_tokens} tokens (truncate=false)')
                if time.monotonic() >= deadline:
                    raise tokenise_timeout(f'{timeout:.2f} s')
            except BaseException:
                self.manager.release(lm)
                raise
            normalize = model_cfg.normalize if request.normalize is None else request.normalize
            t0 = time.monotonic()

            def on_done(job: Job, lm=lm, t0=t0) -> None:
                self.manager.release(lm, time.monotonic() - t0)
                self._release_slot()

            job = Job(encoded, model_cfg.id, model_cfg.dimension, normalize,
                      deadline=deadline, priority=request.priority,
                      provider=lm.onnx.provider, on_done=on_done, received=received)
            if inline and lm.batcher.run_inline(job):
                return job.future      # answered (the run failed: its error is in the future)
            try:
                lm.batcher.submit(job)
            except EngineError:
                # The model was unloaded between pin and enqueue: retry once on a fresh load.
                self.manager.release(lm)
                if attempt:
                    raise
            except BaseException:
                self.manager.release(lm)    # never leave the model pinned (unevictable)
                raise
            else:
                self._deadlines.watch(job)
                return job.future
            # the retry (outside the except: the failed job and its model are not kept alive)
            lm = job = on_done = None
        raise AssertionError('unreachable')

    def embed(self, request: EmbedRequest) -> EmbedResult:
        """``submit`` and wait; the caller's thread runs the job itself when the model is idle."""
        return self.submit(request, caller_waits=True).result()

    def _release_slot(self) -> None:
        self.admission.release()
        if self._closed:
            with self._idle:
                self._idle.notify_all()

    # --- models and health ---------------------------------------------------------------
    def list_models(self) -> List[ModelInfo]:
        return self.manager.list()

    def load_model(self, model: str) -> ModelInfo:
        check_model_name(model)
        if self._closed:
            raise EngineError(ErrorCode.UNAVAILABLE, 'engine is shutting down')
        return self.manager.load(model)

    def unload_model(self, model: str) -> ModelInfo:
        check_model_name(model)
        return self.manager.unload(model)

    def keep_default_loaded(self) -> bool:
        """True when the default model is loaded; else start loading it and return False.

        Readiness means the default model is loaded, and a pod that is not ready gets no
        traffic to load it lazily: so every readiness look (health, probes, the node's
        ``list_models``) brings an unloaded default back by itself.
        """
        if self.manager.loaded(self.default_model) is not None:
            return True
        if not self._closed:
            try:
                self.manager.load_in_background(self.default_model)
            except EngineError:
                pass            # not installed: health says so
        return False

    def health(self) -> HealthInfo:
        self.keep_default_loaded()
        default, lm = self.manager.describe(self.config.model(self.default_model))
        provider = lm.onnx.provider if lm else ''
        note = lm.onnx.provider_note if lm else ''
        on_gpu = bool(provider) and provider != CPU
        checks = {
            'embedding_provider': 'ok' if lm else f'default model {default.status.value}',
            'model_cache': 'ok' if default.status is not ModelStatus.FAILED else 'failed',
            'gpu': 'ok' if on_gpu else (f'unavailable: {note}' if note else
                                        f'not used: {provider or CPU}'),
        }
        if self._closed:
            status = 'unhealthy'
        elif lm is None:
            status = 'unhealthy' if default.status is ModelStatus.FAILED else 'degraded'
        else:
            status = 'healthy'
        return HealthInfo(status=status, checks=checks, version=__version__, provider=provider,
                          provider_note=note, queue_size=self.admission.pending,
                          queue_capacity=self.admission.capacity,
                          default_model=self.default_model)

    def __enter__(self) -> 'EmbeddingEngine':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
