"""Model manager: LRU by count and memory, in-flight pinning, one load per model, hot swaps."""
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from akidb_ros.engine import EmbedRequest, EngineError, ErrorCode, ModelStatus
from akidb_ros.engine.config import REPO_ROOT
from akidb_ros.engine.manager import LatencyWindow, ModelNotLoaded
from akidb_ros.observability import metrics
from engine_support import MINILM, MODELS, MPNET, Gate, make_engine, write_config


def status(eng):
    return {m.id: m.status for m in eng.list_models()}


def load_count(model):
    return metrics.MODEL_LOAD_SECONDS.labels(model=model)._sum.get(), sum(
        b.get() for b in metrics.MODEL_LOAD_SECONDS.labels(model=model)._buckets)


def test_catalogue_lists_uninstalled_models_as_unavailable(engine):
    st = status(engine)
    assert st[MINILM] is ModelStatus.LOADED
    assert st['e5-small-v2'] is ModelStatus.UNAVAILABLE
    assert st['qwen3-embedding-0.6b'] is ModelStatus.UNAVAILABLE
    info = {m.id: m for m in engine.list_models()}[MINILM]
    # The provider the model really runs on (CPU here, CUDA on a GPU host).
    running_on = engine.manager.loaded(MINILM).onnx.session.get_providers()[0]
    assert info.is_default and info.provider == running_on and info.dimension == 384


def test_submit_without_load_refuses_a_model_that_is_not_loaded(tmp_path):
    """An executor thread passes load=False: it is never the one that waits for a load."""
    eng = make_engine(tmp_path)
    try:
        with pytest.raises(ModelNotLoaded):
            eng.submit(EmbedRequest(inputs=['x'], model=MPNET), load=False)
        assert eng.admission.pending == 0                 # nothing was admitted
        assert status(eng)[MPNET] is ModelStatus.AVAILABLE   # nor loaded
        fut = eng.submit(EmbedRequest(inputs=['x']), load=False)   # the loaded default serves
        assert len(fut.result(30).embeddings) == 1
        eng.unload_model(MINILM)
        with pytest.raises(ModelNotLoaded):               # unloaded a moment ago: same
            eng.submit(EmbedRequest(inputs=['x']), load=False)
        assert eng.admission.pending == 0
    finally:
        eng.close()


def test_lru_by_count_never_evicts_the_default(tmp_path):
    """Room for one model: the default stays (readiness needs it), another model is served
    and goes again once idle, and is loaded again lazily when asked for."""
    eng = make_engine(tmp_path, lambda r: r['engine']['cache'].update(max_loaded_models=1))
    try:
        before = load_count(MPNET)[1]
        assert eng.embed(EmbedRequest(inputs=['x'], model=MPNET)).dimension == 768
        st = status(eng)
        assert st[MINILM] is ModelStatus.LOADED and st[MPNET] is ModelStatus.AVAILABLE
        assert eng.embed(EmbedRequest(inputs=['x'], model=MPNET)).dimension == 768
        assert load_count(MPNET)[1] == before + 2
        assert status(eng)[MINILM] is ModelStatus.LOADED
    finally:
        eng.close()


def test_an_unloaded_default_comes_back_at_the_next_readiness_look(tmp_path):
    """An operator unloads the default: not ready, and with no traffic nothing would load it
    again (a not-ready pod gets none); a readiness look starts its load."""
    eng = make_engine(tmp_path)
    try:
        eng.unload_model(MINILM)
        assert status(eng)[MINILM] is ModelStatus.AVAILABLE
        assert eng.keep_default_loaded() is False          # not yet: its load has started
        end = time.monotonic() + 30
        while not eng.keep_default_loaded():
            assert time.monotonic() < end, 'the default model did not come back'
            time.sleep(0.05)
        assert eng.health().status == 'healthy'
        eng.unload_model(MPNET)                              # not loaded: nothing to do
        assert eng.health().status == 'healthy'
    finally:
        eng.close()


def test_a_default_whose_load_failed_is_loaded_again_once_its_files_are_mended(
        tmp_path, monkeypatch):
    """Readiness looks load a failed default model again after a back-off (doubling): the
    failed load was never retried, and a not-ready pod, which gets no traffic, stayed not
    ready after its files were mended."""
    from akidb_ros.engine import manager as manager_mod
    monkeypatch.setattr(manager_mod, 'READY_RETRY_S', 0.3)
    folder = tmp_path / 'minilm'
    shutil.copytree(MODELS / 'all-MiniLM-L6-v2', folder)
    good = (folder / 'model.onnx').read_bytes()

    def mutate(raw):
        mini = next(m for m in raw['models'] if m['id'] == MINILM)
        mini.update(path=str(folder / 'model.onnx'), tokenizer=str(folder / 'tokenizer.json'))
    eng = make_engine(tmp_path, mutate)
    try:
        eng.unload_model(MINILM)
        (folder / 'model.onnx').write_bytes(b'\x08\x07not really a protobuf' * 100)
        assert eng.keep_default_loaded() is False       # its load starts, and fails
        end = time.monotonic() + 30
        while status(eng)[MINILM] is not ModelStatus.FAILED:
            assert time.monotonic() < end
            time.sleep(0.02)
        assert eng.health().status == 'unhealthy'
        assert eng.keep_default_loaded() is False       # within its back-off: not again
        assert status(eng)[MINILM] is ModelStatus.FAILED
        (folder / 'model.onnx').write_bytes(good)
        end = time.monotonic() + 30
        while not eng.keep_default_loaded():
            assert time.monotonic() < end, 'the mended default model did not come back'
            time.sleep(0.05)
        assert eng.health().status == 'healthy'
    finally:
        eng.close()


def test_a_callers_own_budget_counts_a_cold_load_and_the_servers_does_not(tmp_path):
    """A caller's own budget (a REST header, a gRPC deadline, a ROS timeout_s) counts a cold
    load: TIMEOUT when it runs out meanwhile (neutral to breakers; the load goes on). The
    in-process doors added the load to it (a 500 ms budget answered after 6 s), a sidecar did
    not. The server's own budget still starts after the load."""
    from akidb_ros.engine.errors import error_from_code
    from akidb_ros.guard.breaker import default_is_failure
    eng = make_engine(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            # an ask longer than the server's budget (timeout_s) still bounds the load
            eng.submit(EmbedRequest(inputs=['cold'], model=MPNET, timeout_s=0.1,
                                    caller_budget_s=0.2)).result(30)
        took = time.monotonic() - t0
        assert err.value.code is ErrorCode.TIMEOUT, err.value
        assert status(eng)[MPNET] is ModelStatus.LOADING, took   # answered before the load
        assert took < 0.2 + 1.0, took
        assert err.value.message.startswith("the call's own budget ran out while its model "
                                            f'loaded (model {MPNET} goes on loading')
        assert err.value.partial and not default_is_failure(err.value)
        assert not default_is_failure(error_from_code('TIMEOUT', err.value.message))
        eng.unload_model(MPNET)         # waits for the load that went on, then unloads it
        # the server's budget alone (no caller_budget_s): the load has its own limit
        res = eng.submit(EmbedRequest(inputs=['cold'], model=MPNET, timeout_s=0.5)).result(60)
        assert res.embeddings.shape == (1, 768)
    finally:
        eng.close()


def test_a_load_warms_the_model_before_it_serves(tmp_path, monkeypatch):
    """The first runs pay for allocations: the load makes them, not the first caller."""
    from akidb_ros.engine import runtime
    warmed = []
    real = runtime.OnnxModel.warm_up
    eng = make_engine(tmp_path, preload=False)

    def spy(self, pad_id):
        warmed.append((self.cfg.id, status(eng)[self.cfg.id]))   # what callers see meanwhile
        return real(self, pad_id)
    monkeypatch.setattr(runtime.OnnxModel, 'warm_up', spy)
    try:
        eng.start()
        assert warmed == [(MINILM, ModelStatus.LOADING)]     # during the load, before serving
        assert status(eng)[MINILM] is ModelStatus.LOADED
    finally:
        eng.close()


def test_lru_evicts_the_least_recently_used(tmp_path):
    """Three models, room for two: the one used longest ago goes, not the oldest loaded."""
    copy = 'minilm-copy'

    def mutate(raw):
        raw['engine']['cache'].update(max_loaded_models=2, max_memory_mb=4096)
        raw['models'].append(dict(raw['models'][0], id=copy, name='copy/all-MiniLM-L6-v2'))
    eng = make_engine(tmp_path, mutate)                    # loads the default (MINILM)
    try:
        eng.embed(EmbedRequest(inputs=['x'], model=copy))     # loaded after MINILM
        eng.embed(EmbedRequest(inputs=['x']))                 # MINILM used again: now newest
        eng.embed(EmbedRequest(inputs=['x'], model=MPNET))    # a third: one must go
        st = status(eng)
        assert (st[MINILM], st[copy], st[MPNET]) == (
            ModelStatus.LOADED, ModelStatus.AVAILABLE, ModelStatus.LOADED)
        eng.embed(EmbedRequest(inputs=['x'], model=copy))     # back, evicting MPNET (the
        st = status(eng)                                      # default MINILM always stays)
        assert (st[MINILM], st[copy], st[MPNET]) == (
            ModelStatus.LOADED, ModelStatus.LOADED, ModelStatus.AVAILABLE)
    finally:
        eng.close()


def _minilm(raw):
    return next(m for m in raw['models'] if m['id'] == MINILM)


@pytest.mark.parametrize('max_tokens', [1, 2])
def test_a_max_tokens_that_leaves_no_room_for_text_fails_the_load(tmp_path, max_tokens):
    """max_tokens 1 or 2 passed the schema: with 1 the tokeniser, which never cuts into
    [CLS] [SEP], did not truncate at all (an over-long input failed INTERNAL); with 2 every
    text became [CLS] [SEP] and every call was refused as empty."""
    eng = make_engine(tmp_path, lambda r: _minilm(r).update(max_tokens=max_tokens),
                      preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.start()
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        assert err.value.message == (
            f'model {MINILM}: max_tokens {max_tokens} leaves no room for text: its tokenizer '
            'adds 2 tokens of its own (special tokens and prompt prefix): set max_tokens above 2')
    finally:
        eng.close()
    eng = make_engine(tmp_path, lambda r: _minilm(r).update(max_tokens=3))
    try:
        res = eng.embed(EmbedRequest(inputs=['a longer text than one token']))
        assert res.total_tokens == 3 and res.truncated_inputs == 1
    finally:
        eng.close()


def test_a_default_model_over_the_cache_budget_says_what_to_set(tmp_path):
    """It said the default model 'cannot stay loaded beside the default model ... it is loaded
    for each request instead' (the start fails), with 180 MB for a model of 90."""
    eng = make_engine(tmp_path, lambda r: r['engine']['cache'].update(max_memory_mb=100),
                      preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.start()
        assert err.value.code is ErrorCode.INVALID_INPUT    # as docs/engine-api.md says
        assert err.value.message == (
            f'the default model {MINILM} (180 MB: 90 MB x 2 sessions, one per overlapping '
            'runner) does not fit the cache budget (max_loaded_models=2, max_memory_mb=100): '
            'set engine.cache.max_memory_mb to at least 180')
    finally:
        eng.close()


def test_lru_by_memory_budget(tmp_path):
    eng = make_engine(tmp_path, lambda r: r['engine']['cache'].update(
        max_loaded_models=4, max_memory_mb=500))              # 90 + 440 MB > 500 MB
    try:
        # a hot load that cannot stay (the default is never evicted) says so, not "200 ok"
        with pytest.raises(EngineError) as err:
            eng.load_model(MPNET)
        assert err.value.code is ErrorCode.INVALID_INPUT
        assert 'cannot stay loaded' in err.value.message
        st = status(eng)
        assert st[MPNET] is ModelStatus.AVAILABLE and st[MINILM] is ModelStatus.LOADED
        assert eng.embed(EmbedRequest(inputs=['x'], model=MPNET)).dimension == 768
        # the same answer while requests keep it loaded for now (it was "loaded" then)
        busy = eng.manager.acquire(MPNET)       # loaded on demand, pinned as a request pins it
        with pytest.raises(EngineError) as err:
            eng.load_model(MPNET)
        assert err.value.code is ErrorCode.INVALID_INPUT
        assert 'cannot stay loaded' in err.value.message
        assert status(eng)[MPNET] is ModelStatus.LOADED         # serving its work meanwhile
        eng.manager.release(busy)
        assert status(eng)[MPNET] is ModelStatus.AVAILABLE      # gone once idle
    finally:
        eng.close()


def test_never_evicts_a_model_with_work_in_flight(tmp_path):
    copy = 'minilm-copy'

    def mutate(raw):
        raw['engine']['cache'].update(max_loaded_models=2, max_memory_mb=4096)
        raw['models'].append(dict(raw['models'][0], id=copy, name='copy/all-MiniLM-L6-v2'))
    eng = make_engine(tmp_path, mutate)
    try:
        eng.load_model(copy)
        gate = Gate(eng.manager.loaded(copy).batcher)
        gate.close()
        held = eng.submit(EmbedRequest(inputs=['in flight'], model=copy))
        assert gate.entered.wait(5)
        # a third model: the least recently used one (copy) has work in flight, so the cache
        # runs over budget until that work is answered; MPNET fits beside the default, so its
        # hot load succeeds (it was refused "cannot stay loaded", and MPNET evicted at once)
        assert eng.load_model(MPNET).status is ModelStatus.LOADED
        st = status(eng)
        assert (st[MINILM], st[copy], st[MPNET]) == (ModelStatus.LOADED,) * 3
        gate.open.set()
        assert held.result(10).embeddings.shape == (1, 384)
        time.sleep(0.05)
        st = status(eng)   # within budget again: the least recently used idle model went
        assert (st[MINILM], st[copy], st[MPNET]) == (
            ModelStatus.LOADED, ModelStatus.AVAILABLE, ModelStatus.LOADED)
    finally:
        eng.close()


def test_a_stop_returns_only_once_the_run_in_progress_has_ended(tmp_path):
    """``Batcher.stop`` past its timeout answers what is queued, cuts the run in progress short,
    and returns once its thread has left ONNX Runtime: it returned at once, and a process
    exiting next aborted (SIGABRT). (The gate holds the run before ONNX Runtime, so the cut
    takes effect when it enters.)"""
    eng = make_engine(tmp_path)
    try:
        batcher = eng.manager.loaded(MINILM).batcher
        gate = Gate(batcher)
        gate.close()
        running = eng.submit(EmbedRequest(inputs=['in the run']))
        assert gate.entered.wait(5)
        threading.Timer(1.0, gate.open.set).start()     # the run ends a second from now
        t0 = time.monotonic()
        batcher.stop(timeout=0.05)
        assert time.monotonic() - t0 >= 0.9
        assert not any(t.is_alive() for t in batcher._threads)
        with pytest.raises(EngineError) as err:
            running.result(5)
        assert err.value.code is ErrorCode.UNAVAILABLE and 'stopped before' in err.value.message
    finally:
        gate.open.set()
        eng.close()


def test_a_stop_waits_for_and_cuts_a_run_in_a_callers_thread(tmp_path):
    """A caller that waits runs its job in its own thread when the model is idle (run_inline);
    no runner thread stands for that run, and Batcher.stop neither cut it short nor waited for
    it: it returned at once with the run still inside ONNX Runtime (a process exiting next
    aborts)."""
    eng = make_engine(tmp_path)
    try:
        batcher = eng.manager.loaded(MINILM).batcher
        gate = Gate(batcher)
        gate.close()
        out = {}

        def caller():
            try:
                out['result'] = eng.submit(EmbedRequest(inputs=['inline run']),
                                           caller_waits=True).result(10)
            except EngineError as exc:
                out['error'] = exc
        thread = threading.Thread(target=caller)
        thread.start()
        assert gate.entered.wait(5)
        assert not any(batcher._lanes.values())     # nothing queued: it runs in the caller
        threading.Timer(0.6, gate.open.set).start()
        t0 = time.monotonic()
        batcher.stop(timeout=0.05)
        took = time.monotonic() - t0
        thread.join(10)
        assert took >= 0.5, took                    # it waited for the caller's run
        assert out['error'].code is ErrorCode.UNAVAILABLE, out   # and cut it short
    finally:
        gate.open.set()
        eng.close()


def _close_with_heavy_work_queued(tmp_path, unload_first):
    """Close(0.1) an engine whose one runner has 32 runs of 8192 tokens queued (~0.4 s each
    here), the first in progress; return how long the close took."""
    eng = make_engine(tmp_path, lambda raw: raw['engine']['batching'].update(runners=1))
    long_text = ' '.join(['robots'] * 300)          # 256 tokens each, truncated
    futs = [eng.submit(EmbedRequest(inputs=[long_text] * 64)) for _ in range(4)]
    batcher = eng.manager.loaded(MINILM).batcher
    deadline = time.monotonic() + 10
    while batcher._active == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    if unload_first:
        eng.manager.unload(MINILM)                  # its queue drains on a retiring thread
        assert not all(f.done() for f in futs)
    t0 = time.monotonic()
    eng.close(timeout=0.1)
    took = time.monotonic() - t0
    codes = set()
    for f in futs:
        assert f.done()
        codes.add(None if f.exception() is None else f.exception().code)
    assert ErrorCode.UNAVAILABLE in codes and codes <= {None, ErrorCode.UNAVAILABLE}, codes
    return took


def test_a_close_out_of_time_cuts_the_runs_in_progress_short(tmp_path):
    """``close(timeout)`` bounds the stop: what is queued past it is failed, and the runs in
    progress are cut short inside ONNX Runtime (``RunOptions.terminate``), their callers
    UNAVAILABLE. The batchers used to run the whole queue for up to 10 s more, then wait for
    the runs: a server stopped with --grace 1 took 4-5 s."""
    took = _close_with_heavy_work_queued(tmp_path, unload_first=False)
    assert took < 1.0, took     # cut at 0.1 s plus a kernel or two


def test_a_close_out_of_time_also_cuts_a_model_being_unloaded(tmp_path):
    """A model retiring (unloaded with work still queued) when the engine closes is stopped
    within the close's timeout too. The close used to wait for the retirement on its own
    bounds (the whole queue, up to the load timeout): a stop with --grace 1 took seconds."""
    took = _close_with_heavy_work_queued(tmp_path, unload_first=True)
    assert took < 1.0, took


def test_a_second_close_waits_for_the_first(tmp_path):
    """Two closers (a signal handler and a ``with`` block): the second returned at once, while
    the first was still answering accepted work."""
    eng = make_engine(tmp_path)
    gate = Gate(eng.manager.loaded(MINILM).batcher)
    gate.close()
    held = eng.submit(EmbedRequest(inputs=['in the run']))
    assert gate.entered.wait(5)
    first = threading.Thread(target=eng.close)
    first.start()
    time.sleep(0.2)
    threading.Timer(0.5, gate.open.set).start()
    eng.close()
    assert held.done()                  # the first close answered it before the second returned
    first.join(10)
    assert held.result(0).embeddings.shape == (1, 384)


def test_nothing_loads_once_close_has_begun(tmp_path):
    """A load that starts after ``close()`` took its look would outlive it (a model serving,
    its runner threads left in ONNX Runtime): it is refused ``UNAVAILABLE``."""
    eng = make_engine(tmp_path)
    eng.close()
    for start in (lambda: eng.manager.load(MPNET), lambda: eng.manager.acquire(MPNET)):
        with pytest.raises(EngineError) as err:
            start()
        assert err.value.code is ErrorCode.UNAVAILABLE
    assert eng.manager.loaded(MPNET) is None
    assert not [t.name for t in threading.enumerate() if t.name.startswith('akidb-load-')]


def test_concurrent_loads_of_one_model_are_deduplicated(tmp_path):
    eng = make_engine(tmp_path)
    try:
        before = load_count(MPNET)[1]
        errors, results = [], []

        def call():
            try:
                results.append(eng.embed(EmbedRequest(inputs=['dedupe'], model=MPNET)))
            except Exception as exc:  # asserted below
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors and len(results) == 8
        assert load_count(MPNET)[1] == before + 1
    finally:
        eng.close()


def test_hot_unload_answers_queued_work_and_reloads_on_demand(tmp_path):
    eng = make_engine(tmp_path)
    try:
        gate = Gate(eng.manager.loaded(MINILM).batcher)
        gate.close()
        futures = [eng.submit(EmbedRequest(inputs=[f'queued {i}'])) for i in range(6)]
        assert gate.entered.wait(5)
        info = eng.unload_model(MINILM)
        assert info.status is ModelStatus.AVAILABLE
        gate.open.set()
        for f in futures:
            assert f.result(10).embeddings.shape == (1, 384)
        again = eng.embed(EmbedRequest(inputs=['queued 0']))
        np.testing.assert_allclose(again.embeddings, futures[0].result().embeddings, atol=1e-5)
        assert status(eng)[MINILM] is ModelStatus.LOADED
    finally:
        eng.close()


def test_close_right_after_an_unload_exits_cleanly(tmp_path):
    """Unload, then stop at once: close() waits for the retiring model (its overlap session may
    still be building inside ONNX Runtime), so the process exits 0 instead of aborting."""
    config = write_config(tmp_path)
    script = textwrap.dedent(f"""
        from akidb_ros.engine import EmbeddingEngine, load_config
        eng = EmbeddingEngine(load_config({str(config)!r}, env={{}}))
        eng.start()
        eng.load_model({MPNET!r})
        eng.unload_model({MPNET!r})
        eng.close()
        print('closed cleanly')
    """)
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'closed cleanly' in proc.stdout
    assert 'terminate called' not in proc.stderr


def test_corrupt_model_fails_cleanly_and_others_keep_serving(tmp_path):
    bad_dir = tmp_path / 'corrupt'
    bad_dir.mkdir()
    (bad_dir / 'model.onnx').write_bytes(b'\x08\x07not really a protobuf' * 100)
    shutil.copy(MODELS / 'all-MiniLM-L6-v2' / 'tokenizer.json', bad_dir / 'tokenizer.json')

    def mutate(raw):
        raw['models'].append(dict(raw['models'][0], id='corrupt', name='test/corrupt',
                                  path=str(bad_dir / 'model.onnx'),
                                  tokenizer=str(bad_dir / 'tokenizer.json')))
    eng = make_engine(tmp_path, mutate)
    try:
        with pytest.raises(EngineError) as err:
            eng.embed(EmbedRequest(inputs=['x'], model='corrupt'))
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        info = {m.id: m for m in eng.list_models()}['corrupt']
        assert info.status is ModelStatus.FAILED and 'cannot create session' in info.error
        assert eng.embed(EmbedRequest(inputs=['still fine'])).embeddings.shape == (1, 384)
        assert eng.admission.pending == 0
    finally:
        eng.close()


def test_load_timeout_is_reported(tmp_path):
    eng = make_engine(tmp_path, lambda r: r['engine']['timeouts'].update(model_load_s=0.001),
                      preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.load_model(MPNET)
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        assert 'did not load within' in err.value.message
    finally:
        eng.close()


def test_a_first_tensorrt_build_outlasts_the_load_timeout_at_start_only(tmp_path, monkeypatch):
    """A load that builds a TensorRT engine (minutes on a Jetson) was cut off at model_load_s:
    the start failed, the node exited, and the next start built again from scratch, for ever.
    Start-up now waits for the build (tensorrt_build_s); an admin load or a request meanwhile
    is answered UNAVAILABLE, retry later, and the build goes on. Here the build is this host's
    CPU load (TensorRT planned is what the manager is told), the timeout far below it."""
    from akidb_ros.engine import manager as manager_module
    monkeypatch.setattr(manager_module, 'tensorrt_build_expected', lambda cfg, settings: True)
    eng = make_engine(tmp_path, lambda r: r['engine']['timeouts'].update(
        model_load_s=0.001, tensorrt_build_s=120), preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.load_model(MPNET)               # an admin load: not waited for past 1 ms
        assert err.value.code is ErrorCode.UNAVAILABLE and err.value.retry_after_s
        assert 'still building its TensorRT engine' in err.value.message
        with pytest.raises(EngineError) as err:     # a request for it: the same answer
            eng.embed(EmbedRequest(inputs=['hello'], model=MPNET))
        assert err.value.code is ErrorCode.UNAVAILABLE
        eng.start(preload=[MINILM])             # start-up waits for the build
        assert status(eng)[MINILM] == 'loaded'
        deadline = time.monotonic() + 60        # the admin load's build went on meanwhile
        while status(eng)[MPNET] != 'loaded' and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status(eng)[MPNET] == 'loaded'
        assert eng.embed(EmbedRequest(inputs=['hello'], model=MPNET)).embeddings.shape == (1, 768)
    finally:
        eng.close()


def test_max_tokens_beyond_the_models_positions_is_refused_at_load(tmp_path):
    """max_tokens 100000 for MiniLM (512 positions) loaded, then each long input failed
    INTERNAL. The load refuses it, naming the limit; a max_tokens the model takes still loads,
    and a RoBERTa-style model (MPNet: 514 rows, 2 kept for padding) is tried at its edge."""
    def mutate(raw):
        raw['models'][0]['max_tokens'] = 100000
        raw['models'][1]['max_tokens'] = 514
        raw['models'].append(dict(raw['models'][0], id='minilm-512', name='test/minilm-512',
                                  max_tokens=512))
    eng = make_engine(tmp_path, mutate, preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.start()
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        assert 'max_tokens 100000 is more than the model takes (its position table ' \
            'inner.embeddings.position_embeddings.weight has 512 rows)' in err.value.message
        with pytest.raises(EngineError) as err:
            eng.load_model(MPNET)
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        assert 'max_tokens 514 is more than the model takes (a run that long fails' \
            in err.value.message and 'set max_tokens to at most 512' in err.value.message
        eng.load_model('minilm-512')
        res = eng.embed(EmbedRequest(inputs=['word ' * 600], model='minilm-512'))
        assert res.embeddings.shape == (1, 384) and res.total_tokens == 512
    finally:
        eng.close()


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_at_load(tmp_path):
    """MPNet's tokenizer (30527 tokens) beside MiniLM's graph (30522 word-embedding rows)
    loaded; then a text holding <mask> (id 30526) failed its whole batch INTERNAL and opened
    the breaker for every caller. The load refuses it, naming both sizes; the reverse pairing
    (fewer tokens than rows, as a table padded to a round size) still loads."""
    def mutate(raw):
        mini, mpnet = raw['models'][0], raw['models'][1]
        raw['models'].append(dict(mini, id='mini-mpnet-tok', name='test/mini-mpnet-tok',
                                  tokenizer=mpnet['tokenizer']))
        raw['models'].append(dict(mpnet, id='mpnet-mini-tok', name='test/mpnet-mini-tok',
                                  tokenizer=mini['tokenizer']))
    eng = make_engine(tmp_path, mutate)
    try:
        with pytest.raises(EngineError) as err:
            eng.load_model('mini-mpnet-tok')
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        assert 'has 30527 tokens, more than the 30522 rows of the model\'s word-embedding ' \
            'table' in err.value.message, err.value.message
        eng.load_model('mpnet-mini-tok')
    finally:
        eng.close()


def test_a_tokenizer_of_far_fewer_tokens_than_the_model_is_warned_about(tmp_path, caplog):
    """A tokenizer with under half the model's word-embedding rows (a 5-word one beside
    MiniLM) loads, and served meaningless vectors without a word: the load warns."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({'[UNK]': 0, '[CLS]': 1, '[SEP]': 2, '[PAD]': 3, 'hi': 4},
                                     unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / 'tiny.json'))

    def mutate(raw):
        raw['models'].append(dict(raw['models'][0], id='tiny-tok', name='test/tiny-tok',
                                  tokenizer=str(tmp_path / 'tiny.json')))
    eng = make_engine(tmp_path, mutate)
    try:
        with caplog.at_level(logging.WARNING, logger='akidb_ros.engine.manager'):
            eng.load_model('tiny-tok')
            eng.load_model(MPNET)       # its own tokenizer: no warning
        warned = [r.getMessage() for r in caplog.records if 'under half' in r.getMessage()]
        assert len(warned) == 1 and 'model tiny-tok: its tokenizer' in warned[0], warned
        assert 'has 5 tokens, under half the 30522 rows' in warned[0]
    finally:
        eng.close()


def test_a_failed_load_leaves_no_overlap_build_running(tmp_path, monkeypatch):
    """The overlap session is built on its own thread once the main one is warm; a step after
    it that failed left that thread inside ONNX Runtime, and the process aborted at exit
    ("terminate called without an active exception", exit 134). The failed load waits for it."""
    from akidb_ros.engine import manager, runtime
    real_build = runtime.OnnxModel._build_overlap

    def slow_build(self, pad_id):
        time.sleep(0.5)              # still building when the load fails
        return real_build(self, pad_id)

    def broken_batcher(*args, **kwargs):
        raise RuntimeError('a step after the overlap build failed')
    monkeypatch.setattr(runtime.OnnxModel, '_build_overlap', slow_build)
    monkeypatch.setattr(manager, 'Batcher', broken_batcher)
    eng = make_engine(tmp_path, lambda r: (r['engine'].update(intra_op_threads=2),
                                           r['engine']['batching'].update(runners=2)),
                      preload=False)
    try:
        with pytest.raises(EngineError) as err:
            eng.start()
        assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
        building = [t.name for t in threading.enumerate()
                    if t.name.startswith('akidb-overlap-') and t.is_alive()]
        assert building == []
    finally:
        eng.close()


def test_cache_hit_is_cheap(engine):
    engine.manager.release(engine.manager.acquire(MINILM))
    t0 = time.perf_counter()
    for _ in range(200):
        engine.manager.release(engine.manager.acquire(MINILM))
    per_hit_ms = (time.perf_counter() - t0) / 200 * 1000
    assert per_hit_ms < 5.0, per_hit_ms   # PRD: a cache hit adds < 5 ms (it is ~µs)


def test_latency_window_reports_the_last_minute_only():
    w = LatencyWindow(capacity=8, window_s=60.0)
    assert w.stats(now=100.0) == (0.0, 0.0)
    w.record(5.0, now=10.0)                     # outside the window below
    for k in range(20):                         # wraps the ring: only the last 8 are kept
        w.record(0.001 * (k + 1), now=100.0 + k)
    p95, qps = w.stats(now=120.0)
    kept = np.arange(13, 21) * 0.001            # the 8 newest latencies
    assert p95 == pytest.approx(np.percentile(kept, 95) * 1000.0)
    assert qps == pytest.approx(8 / (120.0 - 112.0))
    assert w.stats(now=200.0) == (0.0, 0.0)     # all of it older than the window


def test_served_requests_show_in_the_model_listing(engine):
    for _ in range(5):
        engine.embed(EmbedRequest(inputs=['stats']))
    info = next(m for m in engine.list_models() if m.id == MINILM)
    assert info.latency_p95_ms > 0 and info.throughput_qps > 0


@pytest.mark.parametrize('runners', [1, 2])
def test_batch_hold_only_where_one_run_has_the_device(tmp_path, runners):
    """max_wait_ms holds a batch open for one runner or on a GPU; runners that overlap on a CPU's
    cores do not hold, which would leave a core idle while the queue fills anyway."""
    eng = make_engine(tmp_path, lambda r: r['engine']['batching'].update(
        runners=runners, max_wait_ms=2.0))
    try:
        eng.load_model(MINILM)
        lm = eng.manager.loaded(MINILM)
        overlap_on_cpu = runners > 1 and lm.onnx.provider == 'CPUExecutionProvider'
        assert lm.onnx.runs_share_cores is overlap_on_cpu
        assert lm.batcher.max_wait_s == pytest.approx(0.0 if overlap_on_cpu else 0.002)
        vectors = eng.embed(EmbedRequest(inputs=['a', 'b c'])).embeddings
        assert vectors.shape == (2, 384)
    finally:
        eng.close()


def test_a_model_unloaded_right_after_its_load_is_loaded_again_without_holding_the_lock(
        tmp_path):
    """A request whose model is unloaded between its load and its turn loads it again; it waits
    with the manager's lock free, so that load (and everything else) can finish. Held, the
    lock froze the engine until the load timeout (the auditor's unload/load race under load)."""
    eng = make_engine(tmp_path, lambda r: r['engine']['timeouts'].update(model_load_s=20),
                      preload=False)
    mgr = eng.manager
    real_await = mgr._await_load
    unloaded = []

    def await_then_unload(cfg, fut, wait_s):
        lm = real_await(cfg, fut, wait_s)
        if not unloaded:                # once: an unload wins the race with this request
            unloaded.append(eng.unload_model(MINILM).status)
        return lm

    mgr._await_load = await_then_unload
    try:
        t0 = time.monotonic()
        res = eng.embed(EmbedRequest(inputs=['loaded twice']))
        assert res.embeddings.shape == (1, 384)
        assert unloaded == [ModelStatus.AVAILABLE]
        assert time.monotonic() - t0 < 10, 'the reload waited out the load timeout'
        assert status(eng)[MINILM] is ModelStatus.LOADED
    finally:
        eng.close()


def test_requests_survive_a_model_unloaded_and_loaded_in_a_loop(tmp_path):
    """Six callers on a model that an admin unloads and loads over and over: every call is
    answered with a vector within its budget (a load or two at most), none fails."""
    eng = make_engine(tmp_path)
    stop = threading.Event()
    errors, slow = [], []

    def caller(i):
        n = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                assert eng.embed(EmbedRequest(inputs=[f'caller {i} call {n}'])).dimension == 384
            except Exception as exc:     # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))
            if time.monotonic() - t0 > 8:
                slow.append(time.monotonic() - t0)
            n += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            eng.unload_model(MINILM)
            eng.load_model(MINILM)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        eng.close()
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and slow == []


def test_an_unloaded_copy_is_freed_once_its_requests_are_answered(tmp_path, monkeypatch):
    """Answered jobs stay in the deadline watcher's heap until their deadline; their callback
    pinned the model copy they ran on, so an unload's ~0.4-0.9 GB (mpnet) outlived it by up
    to the request budget (under churn, two copies at once). The retire itself lets the copy
    go (its sessions sit in reference cycles) and then gives glibc's free pages back
    (malloc_trim: RSS after each unload had kept rising, all of it free inside glibc)."""
    import weakref
    from akidb_ros.engine import manager as manager_module
    trims = []
    real_release = manager_module.release_free_memory

    def release():
        trims.append(gone())        # what is still alive when the pages are given back
        return real_release()
    monkeypatch.setattr(manager_module, 'release_free_memory', release)
    copy = 'minilm-copy'

    def mutate(raw):
        raw['models'].append(dict(raw['models'][0], id=copy, name='copy/all-MiniLM-L6-v2'))
    eng = make_engine(tmp_path, mutate)
    try:
        futures = [eng.submit(EmbedRequest(inputs=[f'queued {i}'], model=copy, timeout_s=120))
                   for i in range(6)]       # queued (not run inline): watched until answered
        for f in futures:
            f.result(timeout=60)
        gone = weakref.ref(eng.manager.loaded(copy))
        eng.unload_model(copy)
        deadline = time.monotonic() + 30
        while eng.manager._retiring and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trims == [None]      # freed by the retire, before the trim (no gc here)
        assert gone() is None
    finally:
        eng.close()


def test_malloc_thresholds_are_fixed_unless_the_operator_chose(tmp_path):
    """Freed weight buffers go back to the system: fixed glibc thresholds (malloc_tuning)."""
    from akidb_ros.engine import malloc_tuning
    assert malloc_tuning.tune_malloc().startswith('applied')     # this Linux, glibc
    assert malloc_tuning.operator_choice({'MALLOC_TRIM_THRESHOLD_': '1'}) == \
        'MALLOC_TRIM_THRESHOLD_ is set'
    assert malloc_tuning.operator_choice({'LD_PRELOAD': '/usr/lib/libjemalloc.so.2'})
    assert malloc_tuning.operator_choice({}) is None
    code = 'from akidb_ros.engine import malloc_tuning as m; print(m.tune_malloc())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}, timeout=60,
                         cwd=REPO_ROOT)
    assert out.stdout.strip() == 'not applied: MALLOC_MMAP_THRESHOLD_ is set', out


@pytest.mark.parametrize('first', ['unload', 'load'])
def test_an_unload_during_a_load_waits_for_it_and_leaves_the_model_unloaded(tmp_path, first):
    """An admin unloads a model while another loads it: the unload waits for the load and
    unloads what it loaded (it was answered "loading" and the model stayed loaded), and the
    load is answered with the model's status, not a cache-budget refusal. Once the load is
    done, either call may take the lock first: both orders are forced here (when the unload
    won, the load went round again and loaded the model a second time)."""
    eng = make_engine(tmp_path)
    mgr = eng.manager
    real_build, go = mgr._build, threading.Event()
    answered = {'load': threading.Event(), 'unload': threading.Event()}

    def gated_build(cfg, t0):
        if cfg.id == MPNET:
            assert go.wait(60)
        return real_build(cfg, t0)

    real_await, real_start = mgr._await_load, mgr._start_load

    def await_load(cfg, fut, *wait):            # the loader, once its load is done
        out = real_await(cfg, fut, *wait)
        if first == 'unload' and threading.current_thread().name == 'load':
            assert answered['unload'].wait(60)
        return out

    def start_load(cfg):                        # the unloader waits on this future
        fut = real_start(cfg)
        if not hasattr(fut, 'gated'):
            fut.gated, real_result = True, fut.result

            def result(timeout=None):
                out = real_result(timeout)
                if first == 'load' and threading.current_thread().name == 'unload':
                    assert answered['load'].wait(60)
                return out
            fut.result = result
        return fut

    mgr._build, mgr._await_load, mgr._start_load = gated_build, await_load, start_load
    answers = {}

    def call(name, fn):
        try:
            answers[name] = fn(MPNET).status
        except EngineError as exc:
            answers[name] = exc.code
        finally:
            answered[name].set()

    try:
        loader = threading.Thread(target=call, args=('load', eng.load_model), name='load')
        loader.start()
        deadline = time.monotonic() + 10
        while status(eng)[MPNET] is not ModelStatus.LOADING:
            assert time.monotonic() < deadline, 'the load did not start'
            time.sleep(0.01)
        unloader = threading.Thread(target=call, args=('unload', eng.unload_model),
                                    name='unload')
        unloader.start()
        unloader.join(0.5)
        assert unloader.is_alive() and 'unload' not in answers, answers   # waits for the load
        go.set()
        loader.join(120)
        unloader.join(120)
        # the load saw its model loaded, or already unloaded: either way no refusal
        assert answers == {'load': ModelStatus.LOADED if first == 'load' else
                           ModelStatus.AVAILABLE, 'unload': ModelStatus.AVAILABLE}
        assert status(eng)[MPNET] is ModelStatus.AVAILABLE
        assert eng.embed(EmbedRequest(inputs=['after'], model=MPNET)).embeddings.shape == (1, 768)
    finally:
        go.set()
        eng.close()
