"""Execution-provider planning (TensorRT -> CUDA -> CPU) and the CPU fallback seen in health."""
import onnxruntime as ort
import pytest

from akidb_ros.engine import load_config
from akidb_ros.engine import runtime
from akidb_ros.engine.runtime import (CPU, CUDA, TRT, OnnxModel, plan_providers,
                                      tensorrt_build_expected)
from engine_support import MINILM, write_config


def _cfg(tmp_path, device='auto'):
    cfg = load_config(write_config(tmp_path, lambda r: r['engine'].update(
        device=device, tensorrt_cache=str(tmp_path / 'trt'))), env={})
    return cfg, cfg.model(MINILM)


def test_full_gpu_stack_orders_tensorrt_cuda_cpu(tmp_path):
    cfg, model = _cfg(tmp_path)
    providers, note = plan_providers('auto', [TRT, CUDA, CPU], model, cfg.engine,
                                     ['input_ids', 'attention_mask', 'token_type_ids'])
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == [TRT, CUDA, CPU]
    trt = providers[0][1]
    assert trt['trt_fp16_enable'] is True and trt['trt_engine_cache_enable'] is True
    assert trt['trt_engine_cache_path'] == str(tmp_path / 'trt' / MINILM)
    assert trt['trt_timing_cache_enable'] is True
    assert trt['trt_profile_min_shapes'] == ('input_ids:1x1,attention_mask:1x1,'
                                             'token_type_ids:1x1')
    assert trt['trt_profile_max_shapes'].startswith('input_ids:32x256,')   # batch x max_tokens
    assert note == '' and (tmp_path / 'trt' / MINILM).is_dir()


def test_cuda_only_and_cpu_only_plans(tmp_path):
    cfg, model = _cfg(tmp_path)
    providers, note = plan_providers('cuda', [CUDA, CPU], model, cfg.engine, ['input_ids'])
    assert providers == [(CUDA, {'use_tf32': 0}), CPU] and note == ''
    providers, note = plan_providers('cpu', [TRT, CUDA, CPU], model, cfg.engine, ['input_ids'])
    assert providers == [CPU] and note == ''


def test_tf32_is_off_unless_the_config_trades_exact_vectors_for_speed(tmp_path):
    cfg = load_config(write_config(tmp_path, lambda r: r['engine'].update(cuda_tf32=True)),
                      env={})
    providers, _ = plan_providers('cuda', [CUDA, CPU], cfg.model(MINILM), cfg.engine, [])
    assert providers[0] == (CUDA, {'use_tf32': 1})


class _SessionSpy:
    """Records the providers of every real InferenceSession built (this CPU build runs on CPU)."""

    def __init__(self, monkeypatch, available):
        self.calls = []
        real = ort.InferenceSession

        self.options = []

        def build(path, sess_options=None, providers=None):
            self.calls.append(providers)
            self.options.append(sess_options)
            return real(path, sess_options=sess_options, providers=[CPU])
        monkeypatch.setattr(runtime.ort, 'InferenceSession', build)
        monkeypatch.setattr(runtime.ort, 'get_available_providers', lambda: list(available))
        monkeypatch.setattr(runtime, '_preload_cuda_libraries', lambda: None)


def test_without_tensorrt_libraries_cuda_keeps_its_options(tmp_path, monkeypatch):
    """ORT's own fallback from a failed TensorRT retries with bare provider names, losing the
    CUDA options (TF32 off, device id): a host without libnvinfer plans CUDA directly."""
    cfg, model = _cfg(tmp_path)
    spy = _SessionSpy(monkeypatch, [TRT, CUDA, CPU])
    monkeypatch.setattr(runtime, '_tensorrt_libraries_missing', lambda: ' (no libnvinfer)')
    onnx = OnnxModel(model, cfg.engine)
    assert spy.calls == [[(CUDA, {'use_tf32': 0}), CPU]]
    assert onnx.provider_note == (f'{TRT} failed to initialise; running on {CPU} '
                                  '(no libnvinfer)')


def test_a_failing_tensorrt_is_retried_as_cuda_with_options(tmp_path, monkeypatch):
    cfg, model = _cfg(tmp_path)
    spy = _SessionSpy(monkeypatch, [TRT, CUDA, CPU])
    monkeypatch.setattr(runtime, '_tensorrt_libraries_missing', lambda: '')
    onnx = OnnxModel(model, cfg.engine)
    probe, first, retry = spy.calls       # graph probe, TensorRT plan, then CUDA with options
    assert probe == [CPU] and first[0][0] == TRT
    assert retry == [(CUDA, {'use_tf32': 0}), CPU]
    assert onnx.provider_note == f'{TRT} failed to initialise; running on {CPU}'


def test_a_fallback_is_warned_once_per_process(tmp_path, monkeypatch, caplog):
    """Every model load repeats the fallback; the operator's log gets it once."""
    cfg, model = _cfg(tmp_path)
    _SessionSpy(monkeypatch, [TRT, CUDA, CPU])
    monkeypatch.setattr(runtime, '_tensorrt_libraries_missing', lambda: ' (no libnvinfer)')
    monkeypatch.setattr(runtime, '_warned', set())
    with caplog.at_level('WARNING', logger='akidb_ros.engine.runtime'):
        first, second = OnnxModel(model, cfg.engine), OnnxModel(model, cfg.engine)
    assert first.provider_note == second.provider_note != ''   # each load still reports it
    warnings = [r for r in caplog.records if r.levelname == 'WARNING']
    assert [r.getMessage() for r in warnings] == [first.provider_note]


def test_thread_settings_reach_the_session(tmp_path, monkeypatch):
    cfg = load_config(write_config(tmp_path, lambda r: r['engine'].update(
        device='cpu', intra_op_threads=1, inter_op_threads=2)), env={})
    spy = _SessionSpy(monkeypatch, [CPU])
    OnnxModel(cfg.model(MINILM), cfg.engine)
    (opts,) = spy.options
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 2)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _cgroup(tmp_path, proc_lines, files):
    """A cgroup tree under tmp_path: {relative path: content}; returns cgroup_cpu_limit's
    arguments."""
    for rel, text in files.items():
        f = tmp_path / 'fs' / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    proc = tmp_path / 'cgroup'
    proc.write_text(''.join(line + '\n' for line in proc_lines))
    return dict(root=str(tmp_path / 'fs'), proc_cgroup=str(proc))


@pytest.mark.parametrize('proc_lines, files, limit', [
    (['0::/'], {'cpu.max': '150000 100000\n'}, 1.5),                  # v2, in a container
    (['0::/'], {'cpu.max': 'max 100000\n'}, None),                    # v2, no limit
    (['0::/kubepods/pod1/c1'], {'cpu.max': 'max 100000',               # v2 on a host: the
                                'kubepods/pod1/cpu.max': '400000 100000',   # tightest ancestor
                                'kubepods/pod1/c1/cpu.max': 'max 100000'}, 4.0),
    (['4:memory:/x', '1:cpu,cpuacct:/'], {'cpu,cpuacct/cpu.cfs_quota_us': '250000',
                                          'cpu,cpuacct/cpu.cfs_period_us': '100000'}, 2.5),
    (['1:cpu,cpuacct:/'], {'cpu,cpuacct/cpu.cfs_quota_us': '-1',       # v1, no limit
                           'cpu,cpuacct/cpu.cfs_period_us': '100000'}, None),
    (['1:cpu:/docker/abc'], {'cpu/docker/abc/cpu.cfs_quota_us': '50000',
                             'cpu/docker/abc/cpu.cfs_period_us': '100000'}, 0.5),
    (['0::/'], {'cpu.max': 'garbage\n'}, None),                       # unreadable: no limit
    (['0::/'], {}, None),
])
def test_the_cpu_quota_is_read_from_cgroup_v1_and_v2(tmp_path, proc_lines, files, limit):
    assert runtime.cgroup_cpu_limit(**_cgroup(tmp_path, proc_lines, files)) == limit


def test_a_cpu_limit_sets_the_threads_the_config_leaves(tmp_path, monkeypatch):
    """A pod limited to 1.5 CPUs on a 64-core host: 2 ONNX Runtime threads, not ORT's 64;
    an explicit intra_op_threads still wins, and without a limit ORT keeps its default."""
    monkeypatch.setattr(runtime, '_affinity_cores', lambda: 64)
    monkeypatch.setattr(runtime, 'cgroup_cpu_limit', lambda **where: 1.5)
    threads = {}
    for intra in (0, 3):
        cfg = load_config(write_config(tmp_path, lambda r: r['engine'].update(
            device='cpu', intra_op_threads=intra)), env={})
        spy = _SessionSpy(monkeypatch, [CPU])
        OnnxModel(cfg.model(MINILM), cfg.engine)
        threads[intra] = spy.options[0].intra_op_num_threads
    monkeypatch.setattr(runtime, 'cgroup_cpu_limit', lambda **where: None)
    spy = _SessionSpy(monkeypatch, [CPU])
    OnnxModel(cfg.model(MINILM), load_config(write_config(tmp_path, lambda r: r[
        'engine'].update(device='cpu', intra_op_threads=0)), env={}).engine)
    assert threads == {0: 2, 3: 3} and spy.options[0].intra_op_num_threads == 0


def test_missing_gpu_degrades_to_cpu_with_a_note(tmp_path):
    cfg, model = _cfg(tmp_path)
    providers, note = plan_providers('tensorrt', [CPU], model, cfg.engine, ['input_ids'])
    assert providers == [CPU]
    assert 'asked for a GPU' in note and 'running on CPU' in note


@pytest.mark.skipif(CUDA in ort.get_available_providers(),
                    reason='this onnxruntime has a GPU provider: no CPU fallback to observe')
def test_health_reports_the_cpu_fallback(engine):
    h = engine.health()
    assert h.status == 'healthy' and h.provider == CPU
    assert h.checks['embedding_provider'] == 'ok' and h.checks['model_cache'] == 'ok'
    assert 'running on CPU' in h.checks['gpu']   # this machine has no GPU provider
    assert h.queue_capacity == 1000 and h.default_model == MINILM


def test_a_tensorrt_build_is_expected_only_where_tensorrt_runs_and_nothing_is_cached(
        tmp_path, monkeypatch):
    """The manager gives such a load tensorrt_build_s instead of model_load_s."""
    cfg, model = _cfg(tmp_path)
    assert not tensorrt_build_expected(model, cfg.engine)       # this host: no TensorRT
    monkeypatch.setattr(ort, 'get_available_providers', lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(runtime, '_tensorrt_libraries_missing', lambda: '')
    assert tensorrt_build_expected(model, cfg.engine)           # no cache folder yet
    cache = tmp_path / 'trt' / MINILM
    cache.mkdir(parents=True)
    (cache / 'timing.cache').write_bytes(b'x')
    assert tensorrt_build_expected(model, cfg.engine)           # a timing cache is no engine
    (cache / 'TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm90.engine').write_bytes(b'x')
    assert not tensorrt_build_expected(model, cfg.engine)       # cached: a plain load
    for device in ('cpu', 'cuda'):
        (tmp_path / device).mkdir()
        other, m = _cfg(tmp_path / device, device)
        assert not tensorrt_build_expected(m, other.engine)
    monkeypatch.setattr(runtime, '_tensorrt_libraries_missing', lambda: ' (no libnvinfer)')
    (tmp_path / 'fresh').mkdir()
    fresh, m = _cfg(tmp_path / 'fresh')
    assert not tensorrt_build_expected(m, fresh.engine)         # TensorRT cannot start


ARENA_PROBE = '''
import json, sys
from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config

def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith('VmRSS'))

engine = EmbeddingEngine(load_config(sys.argv[1], env={}))
engine.start()
engine.embed(EmbedRequest(inputs=['a short warm call', 'and another']))
before = rss_mb()
long_text = ' '.join(f'word{i}' for i in range(400))        # truncated to 256 tokens
out = engine.embed(EmbedRequest(inputs=[f'{i} {long_text}' for i in range(32)], timeout_s=120))
print(json.dumps({'growth_mb': rss_mb() - before, 'truncated': out.truncated_inputs}))
engine.close()
'''


def test_a_big_run_gives_its_arena_growth_back(tmp_path):
    """ONNX Runtime's CPU arena kept the peak of the largest run for good: one request of 32
    texts of 256 tokens left the process ~500 MB larger, for a model the cache budget counts at
    90 MB. A run of SHRINK_AT_TOKENS padded tokens or more now frees it when it ends."""
    import json
    import subprocess
    import sys
    from akidb_ros.engine.config import REPO_ROOT
    cfg = write_config(tmp_path, lambda r: r['engine']['batching'].update(runners=1))
    out = subprocess.run([sys.executable, '-c', ARENA_PROBE, str(cfg)], capture_output=True,
                         text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got['truncated'] == 32
    assert got['growth_mb'] < 150, got
