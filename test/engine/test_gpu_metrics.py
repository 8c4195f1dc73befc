"""NVML GPU gauges: absent and explained on a host without an NVIDIA GPU, real values on one."""
import pytest
from prometheus_client import REGISTRY

from akidb_ros.engine.config import ConfigError
from akidb_ros.observability.gpu import GpuSampler
from engine_support import make_engine, write_config


def _nvml_present() -> bool:
    probe = GpuSampler(60.0)
    try:
        return probe.start()
    finally:
        probe.close()


NVML = _nvml_present()


def _gpu_memory_samples():
    return [s for m in REGISTRY.collect() if m.name == 'akidb_gpu_memory_used_bytes'
            for s in m.samples]


@pytest.mark.skipif(NVML, reason='this host has an NVIDIA GPU')
def test_without_a_gpu_the_sampler_says_why_and_sets_nothing():
    before = _gpu_memory_samples()
    sampler = GpuSampler(0.05)
    assert sampler.start() is False
    assert not sampler.running
    status = sampler.status()
    assert status['enabled'] is False and status['devices'] == []
    assert 'NVML' in status['reason']
    assert sampler.sample_once() == []
    assert _gpu_memory_samples() == before
    sampler.close()
    sampler.close()   # idempotent: engines close it on every shutdown path


def test_interval_zero_disables_sampling():
    sampler = GpuSampler(0)
    assert sampler.start() is False
    assert 'disabled' in sampler.reason
    sampler.close()


def test_negative_interval_is_refused_by_the_schema(tmp_path):
    from akidb_ros.engine import load_config

    def mutate(raw):
        raw['engine']['gpu_metrics_interval_s'] = -1
    with pytest.raises(ConfigError, match='engine.gpu_metrics_interval_s'):
        load_config(write_config(tmp_path, mutate), env={})


def test_engine_owns_the_sampler_lifecycle(tmp_path):
    eng = make_engine(tmp_path, lambda raw: raw['engine'].update(gpu_metrics_interval_s=0.05))
    try:
        assert eng.gpu_sampler.running is NVML
        assert eng.health().status == 'healthy'
    finally:
        eng.close()
    assert not eng.gpu_sampler.running


@pytest.mark.skipif(not NVML, reason='needs an NVIDIA GPU with NVML (run on a GPU host)')
def test_on_a_gpu_host_the_gauges_carry_real_readings():
    sampler = GpuSampler(0.05)
    assert sampler.start() is True
    try:
        readings = sampler.sample_once()
        assert readings and readings[0]['memory_used_bytes'] > 0
        assert sampler.devices[0]['memory_total_bytes'] >= readings[0]['memory_used_bytes']
        values = {s.labels['device']: s.value for s in _gpu_memory_samples()}
        assert values['0'] == readings[0]['memory_used_bytes']
    finally:
        sampler.close()
