"""The engine embedded in a developer's own process (docs/engine-api.md): callbacks, exit
without close(), fork, and the wrong types a Python caller can pass."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from akidb_ros.engine import EmbedRequest, EngineError, ErrorCode
from akidb_ros.engine.config import REPO_ROOT

from engine_support import Gate, make_engine, MINILM


def test_embed_from_a_done_callback_is_refused_not_a_hang(tmp_path):
    """A done-callback runs on the engine thread that answered the future: an embed() there
    waited on the threads that must answer it, and the model hung until close(). It is
    refused at once; submit() from a callback still works."""
    eng = make_engine(tmp_path)
    try:
        gate = Gate(eng.manager.loaded(MINILM).batcher)
        gate.close()        # held: the callbacks are added before the answers
        seen, done = [], threading.Semaphore(0)

        def blocking(_fut):
            try:
                seen.append(eng.embed(EmbedRequest(inputs=['inner'])))
            except EngineError as err:
                seen.append(err)
            done.release()

        def chained(_fut):
            seen.append(eng.submit(EmbedRequest(inputs=['chained'])))
            done.release()
        futs = [eng.submit(EmbedRequest(inputs=[f'outer {i}'])) for i in range(2)]
        assert gate.entered.wait(10)
        futs[0].add_done_callback(blocking)
        futs[1].add_done_callback(chained)
        gate.open.set()
        for f in futs:
            assert f.result(10).embeddings.shape == (1, 384)
        # the callbacks run after the waiters are woken
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
        refused = next(s for s in seen if isinstance(s, EngineError))
        assert refused.code is ErrorCode.INVALID_INPUT
        assert 'from a done-callback' in refused.message
        chained_fut = next(s for s in seen if not isinstance(s, EngineError))
        assert chained_fut.result(10).embeddings.shape == (1, 384)
    finally:
        eng.close()


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / 'script.py'
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)


def test_an_interpreter_exit_without_close_is_clean(tmp_path):
    """Work still running at exit (no close()): the runner threads, inside ONNX Runtime, were
    torn down with the interpreter ("terminate called without an active exception", exit
    134). The engine is closed at exit, its runs cut short."""
    cp = _run('''
        from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config
        eng = EmbeddingEngine(load_config())
        eng.start()
        long_text = ' '.join(['robots'] * 300)
        futs = [eng.submit(EmbedRequest(inputs=[long_text] * 32)) for _ in range(3)]
        print('submitted', flush=True)
    ''', tmp_path)
    assert (cp.returncode, 'submitted' in cp.stdout) == (0, True), cp.stderr[-2000:]
    assert 'terminate called' not in cp.stderr


@pytest.mark.skipif(not hasattr(os, 'fork'),
                    reason='os.fork() exists on POSIX only (this test forks its process)')
def test_an_engine_used_in_a_forked_child_says_so(tmp_path):
    """A fork's child has none of the engine's threads: a submit() there was never answered.
    It is refused UNAVAILABLE, saying to create the engine after the fork."""
    cp = _run('''
        import os
        import time
        from akidb_ros.engine import EmbeddingEngine, EmbedRequest, EngineError, load_config
        eng = EmbeddingEngine(load_config())
        eng.start()
        pid = os.fork()
        if pid == 0:
            try:
                eng.submit(EmbedRequest(inputs=['in the child'])).result(15)
                os._exit(3)
            except EngineError as err:
                ok = err.code.name == 'UNAVAILABLE' and 'after the fork' in err.message
                t0 = time.monotonic()
                eng.close()         # the parent's threads and runs are not the child's
                os._exit(0 if ok and time.monotonic() - t0 < 1.0 else 4)
        _, status = os.waitpid(pid, 0)
        print('child', os.waitstatus_to_exitcode(status), flush=True)
        print('parent', eng.embed(EmbedRequest(inputs=['in the parent'])).embeddings.shape)
        eng.close()
    ''', tmp_path)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert 'child 0' in cp.stdout and 'parent (1, 384)' in cp.stdout, cp.stdout


def test_the_queue_and_cache_gauges_add_up_the_process_engines(tmp_path):
    """Two engines in one process: the gauges followed the latest made (queue) or the latest
    to change them (cache), and a closed engine's queue capacity stayed."""
    from prometheus_client import REGISTRY

    def gauges():
        return tuple(REGISTRY.get_sample_value(name) for name in (
            'akidb_model_cache_size', 'akidb_queue_capacity'))
    cache0, capacity0 = gauges()
    for d in ('a', 'b'):
        (tmp_path / d).mkdir()
    a = make_engine(tmp_path / 'a')
    b = make_engine(tmp_path / 'b', lambda raw: raw['engine']['queue'].update(capacity=20))
    try:
        assert gauges() == (cache0 + 2, capacity0 + 1000 + 20)
        a.close()
        assert gauges() == (cache0 + 1, capacity0 + 20)
    finally:
        a.close()
        b.close()
    assert gauges() == (cache0, capacity0)


@pytest.mark.parametrize('request_, says', [
    (['hello'], 'expected an EmbedRequest, got list'),
    (EmbedRequest(inputs=['x'], normalize='no'), 'normalize must be true or false or None'),
    (EmbedRequest(inputs=['x'], truncate=None), 'truncate must be true or false'),
    (EmbedRequest(inputs=['x'], caller_budget_s=True), 'caller_budget_s must be a positive'),
    (EmbedRequest(inputs=['x'], caller_budget_s=float('inf')), 'caller_budget_s must be a'),
])
def test_the_wrong_types_are_invalid_input(engine, request_, says):
    """A list for a request raised AttributeError; normalize='no' normalised (truthy)."""
    with pytest.raises(EngineError) as err:
        engine.submit(request_)
    assert err.value.code is ErrorCode.INVALID_INPUT and says in err.value.message
