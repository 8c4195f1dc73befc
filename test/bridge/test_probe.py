"""The probe listener (akidb_ros.rest.probe) over real HTTP: live/ready/metrics with the REST
door's own answers, nothing else served, readiness following the default model, a clean stop,
and the ``--probe-port`` / ``AKIDB_PROBE_PORT`` options. The prod-profile run (TLS, client
certificates on the doors, plain HTTP on the probe) is in test/guard/test_server_e2e.py."""
from __future__ import annotations

import socket

import pytest
import requests


@pytest.fixture(scope='module')
def probed(local_backend):
    """The REST door and the probe listener around the shared engine (no gRPC)."""
    from akidb_ros.server import Bridges
    b = Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=None,
                probe_port=0).start()
    yield b
    b.stop(grace_s=2)


def test_probe_answers_like_the_rest_door(probed):
    probe = f'http://127.0.0.1:{probed.probe_port}'
    rest = f'http://127.0.0.1:{probed.rest_port}'
    assert probed.probe_port not in (None, probed.rest_port)
    for path in ('/health/live', '/health/ready'):
        p, r = requests.get(probe + path, timeout=10), requests.get(rest + path, timeout=10)
        assert (p.status_code, p.json()) == (r.status_code, r.json()) == (200, p.json())
        assert p.headers['Content-Type'] == 'application/json'
        assert p.headers['Cache-Control'] == 'no-store'
        assert p.headers['X-Content-Type-Options'] == 'nosniff'
    assert requests.get(probe + '/health/ready', timeout=10).json() == {'status': 'ready'}
    m = requests.get(probe + '/metrics', timeout=10)
    assert m.status_code == 200 and m.headers['Content-Type'].startswith('text/plain')
    # one process, one registry: the engine's and the doors' families are all here
    for family in ('akidb_embed_requests_total', 'akidb_model_cache_size', 'akidb_backend_up',
                   'akidb_queue_capacity'):
        assert f'# TYPE {family} ' in m.text, family
    assert requests.head(probe + '/health/live', timeout=10).status_code == 200


def test_probe_serves_nothing_else(probed):
    probe = f'http://127.0.0.1:{probed.probe_port}'
    for path in ('/', '/health', '/models', '/openapi.json', '/api/v1/embed', '/v1/embeddings',
                 '/admin/models/load', '/static/x', '/health/ready/'):
        for method in ('GET', 'POST'):
            r = requests.request(method, probe + path, json={'inputs': ['x']}, timeout=10)
            assert r.status_code == 404, (method, path, r.status_code)
            assert r.json()['code'] == 'NOT_FOUND' and r.json()['error'], (method, path)
    for path in ('/health/live', '/health/ready', '/metrics'):
        for method in ('POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'):
            r = requests.request(method, probe + path, data=b'{"model": "x"}', timeout=10)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.json()['code'] == 'METHOD_NOT_ALLOWED', (method, path)
            assert set(r.headers['Allow'].split(', ')) == {'GET', 'HEAD'}


def test_probe_ready_follows_the_default_model():
    """A backend whose default model is not loaded: 503 not_ready (UNAVAILABLE), then 200 once
    it is; live answers throughout."""
    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine import EmbeddingEngine, load_config
    from akidb_ros.server import Bridges
    eng = EmbeddingEngine(load_config())       # not started: nothing loaded yet
    b = Bridges(LocalBackend(eng, own_engine=True), host='127.0.0.1', rest_port=None,
                grpc_port=None, probe_port=0).start()
    try:
        url = f'http://127.0.0.1:{b.probe_port}'
        r = requests.get(url + '/health/ready', timeout=10)
        assert r.status_code == 503
        assert r.json() == {'status': 'not_ready', 'code': 'UNAVAILABLE',
                            'error': 'default model not loaded or backend unreachable'}
        assert requests.get(url + '/health/live', timeout=10).status_code == 200
        eng.start()
        assert requests.get(url + '/health/ready', timeout=10).status_code == 200
    finally:
        b.stop(grace_s=1)
        eng.close()


def test_probe_stops_with_the_bridges(local_backend):
    from akidb_ros.server import Bridges
    b = Bridges(local_backend, host='127.0.0.1', rest_port=None, grpc_port=None,
                probe_port=0).start()
    port = b.probe_port
    # a keep-alive connection left open must not hold the stop
    s = requests.Session()
    assert s.get(f'http://127.0.0.1:{port}/health/live', timeout=10).status_code == 200
    b.stop(grace_s=2)
    # the serving thread has ended (no hung thread) and the port is closed
    assert b.probe._thread is not None and not b.probe._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(('127.0.0.1', port), timeout=2).close()
    s.close()


def test_a_taken_probe_port_fails_the_start(local_backend):
    from akidb_ros.server import Bridges
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        with pytest.raises(OSError):
            Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=0,
                    probe_port=busy.getsockname()[1])


def _port(monkeypatch, argv, env=None):
    from akidb_ros import server
    monkeypatch.delenv('AKIDB_PROBE_PORT', raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return server.probe_port_of(server.build_parser().parse_args(argv))


def test_probe_port_options(monkeypatch):
    assert _port(monkeypatch, []) == 8081
    assert _port(monkeypatch, ['--rest-port', '18080']) == 8081
    # doors on free ports (tests, benchmarks running servers side by side): a free probe port
    assert _port(monkeypatch, ['--rest-port', '0']) == 0
    assert _port(monkeypatch, ['--no-rest', '--grpc-port', '0']) == 0
    assert _port(monkeypatch, ['--rest-port', '0', '--probe-port', '9181']) == 9181
    assert _port(monkeypatch, ['--probe-port', '0']) == 0
    assert _port(monkeypatch, ['--probe-port', 'off']) is None
    assert _port(monkeypatch, ['--no-probe']) is None
    assert _port(monkeypatch, [], {'AKIDB_PROBE_PORT': '9182'}) == 9182
    assert _port(monkeypatch, [], {'AKIDB_PROBE_PORT': 'OFF'}) is None
    assert _port(monkeypatch, ['--probe-port', '9183'], {'AKIDB_PROBE_PORT': 'off'}) == 9183
    for bad in ('70000', '-1', 'eighty'):
        with pytest.raises(SystemExit):
            _port(monkeypatch, ['--probe-port', bad])
    with pytest.raises(SystemExit, match='AKIDB_PROBE_PORT'):
        _port(monkeypatch, [], {'AKIDB_PROBE_PORT': 'eighty'})


def test_door_ports_and_host_follow_the_prd_defaults_and_env(monkeypatch):
    """PRD: REST on 8080, gRPC on 9090; AKIDB_REST_PORT / AKIDB_GRPC_PORT / AKIDB_HOST."""
    from akidb_ros import server
    for k in ('AKIDB_REST_PORT', 'AKIDB_GRPC_PORT', 'AKIDB_HOST', 'AKIDB_MODE'):
        monkeypatch.delenv(k, raising=False)
    a = server.build_parser().parse_args([])
    assert (a.rest_port, a.grpc_port, a.host, a.mode) == (8080, 9090, '127.0.0.1', 'inprocess')
    monkeypatch.setenv('AKIDB_REST_PORT', '18080')
    monkeypatch.setenv('AKIDB_GRPC_PORT', '19090')
    monkeypatch.setenv('AKIDB_HOST', '0.0.0.0')
    monkeypatch.setenv('AKIDB_MODE', 'sidecar')
    a = server.build_parser().parse_args([])
    assert (a.rest_port, a.grpc_port, a.host, a.mode) == (18080, 19090, '0.0.0.0', 'sidecar')
    assert server.build_parser().parse_args(['--rest-port', '8888']).rest_port == 8888
