"""Fixtures for the bridge tests: one real engine on the real default model, real REST and gRPC
servers on 127.0.0.1 ephemeral ports, an in-memory span exporter, loopback-only DDS."""
from __future__ import annotations

import os

import pytest

from akidb_ros.dds_env import apply_loopback_dds, clean_zombie_shm
from bridge_support import DEFAULT_MODEL, MODELS, ROOT, SECOND_MODEL  # noqa: F401

# Loopback-only DDS before anything imports rclpy (same settings as scripts/dds_env.sh).
apply_loopback_dds(os.environ)


def pytest_collection_modifyitems(config, items):
    if not (MODELS / 'all-MiniLM-L6-v2' / 'model.onnx').is_file():
        skip = pytest.mark.skip(reason='models not installed (run make setup)')
        for item in items:
            if 'test/bridge' in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope='module', autouse=True)
def no_zombie_dds_ports():
    """Each module starts without shared-memory ports of DDS participants killed before it
    (test_sidecar SIGKILLs a node): see akidb_ros.dds_env.clean_zombie_shm."""
    said = clean_zombie_shm()
    assert 'cleaned' in said, said


@pytest.fixture(scope='session')
def span_exporter():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from akidb_ros.observability.tracing import setup_tracing
    exporter = InMemorySpanExporter()
    setup_tracing('akidb-test', exporters=[exporter], simple=True)
    return exporter


@pytest.fixture(scope='session')
def engine(span_exporter):
    from akidb_ros.engine import EmbeddingEngine, load_config
    eng = EmbeddingEngine(load_config())
    eng.start()
    yield eng
    eng.close()


@pytest.fixture(scope='session')
def local_backend(engine):
    from akidb_ros.backends import LocalBackend
    return LocalBackend(engine)


@pytest.fixture(scope='session')
def inproc(local_backend):
    """REST + gRPC in this process around the shared engine (in-process mode, no ROS)."""
    from akidb_ros.server import Bridges
    bridges = Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=0,
                      timeout_s=10.0).start()
    yield bridges
    bridges.stop(grace_s=2)


@pytest.fixture(scope='session')
def rest_url(inproc):
    return f'http://127.0.0.1:{inproc.rest_port}'


@pytest.fixture(scope='session')
def grpc_target(inproc):
    return f'127.0.0.1:{inproc.grpc_port}'


@pytest.fixture()
def rest(rest_url):
    from akidb_ros.client import RestClient
    c = RestClient(rest_url, timeout_s=20)
    yield c
    c.close()


@pytest.fixture()
def grpc_client(grpc_target):
    from akidb_ros.client import GrpcClient
    c = GrpcClient(grpc_target, timeout_s=20)
    yield c
    c.close()


@pytest.fixture(scope='module')
def small_bridges(span_exporter):
    """A second real engine with a tiny queue (sheds at 2 pending) and an LRU of one model,
    behind its own REST + gRPC servers: real OVERLOADED answers and real evictions."""
    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine import EmbeddingEngine, load_config
    from akidb_ros.server import Bridges
    eng = EmbeddingEngine(load_config(overrides={'engine': {
        'cache': {'max_loaded_models': 1},
        'queue': {'capacity': 4, 'shed_threshold': 0.5}}}))
    eng.start()
    bridges = Bridges(LocalBackend(eng), host='127.0.0.1', rest_port=0, grpc_port=0,
                      timeout_s=20.0).start()
    yield bridges
    bridges.stop(grace_s=2)
    eng.close()
