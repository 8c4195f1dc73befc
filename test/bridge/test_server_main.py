"""``python -m akidb_ros.server`` as a process: in-process mode (ROS node + REST + gRPC around
ONE engine) and sidecar mode (forwarding to a node process), graceful SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests
import yaml

from akidb_ros.client import GrpcClient, RestClient

from bridge_support import ROOT, SECOND_MODEL
from test_sidecar import NodeProcess, wait_until


def start_server(tmp_path, *args):
    ready = tmp_path / f'ready-{uuid.uuid4().hex[:6]}.json'
    log = open(tmp_path / 'server.log', 'ab')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'akidb_ros.server', '--host', '127.0.0.1', '--rest-port', '0',
         '--grpc-port', '0', '--ready-file', str(ready), *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, AKIDB_LOG_LEVEL='INFO'))
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, 90), 'server start'
    if not ready.exists():
        pytest.fail((tmp_path / 'server.log').read_text()[-3000:])
    return proc, json.loads(ready.read_text())


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
    return proc.returncode


def test_inprocess_one_engine_three_doors(tmp_path):
    from akidb_ros.backends import RosBackend
    ns = '/akidb_main_' + uuid.uuid4().hex[:8]
    proc, info = start_server(tmp_path, '--mode', 'inprocess', '--ros-args', '-r', f'__ns:={ns}',
                              '-p', 'diagnostics_period_s:=0.0')
    ros = None
    try:
        assert info['mode'] == 'inprocess' and info['pid'] == proc.pid
        # doors on free ports: the probe listener took a free one too (not a fixed 8081)
        probe = f'http://127.0.0.1:{info["probe_port"]}'
        assert info['probe_port'] not in (None, 8081, info['rest_port'])
        assert requests.get(probe + '/health/ready', timeout=10).json() == {'status': 'ready'}
        rest = RestClient(f'http://127.0.0.1:{info["rest_port"]}', timeout_s=60)
        grpc_c = GrpcClient(f'127.0.0.1:{info["grpc_port"]}', timeout_s=60)
        a = rest.embed(['one engine'])
        b = grpc_c.embed(['one engine'], normalize=True)
        assert abs(a.embeddings - b.embeddings).max() < 1e-6
        ros = RosBackend(prefix=ns, timeout_s=10)
        assert wait_until(ros.ready, 30, 0.2), 'in-process ROS node not reachable over DDS'
        # a model loaded through REST is loaded for the ROS door too: one shared engine
        rest.load_model(SECOND_MODEL)
        status = {m.id: m.status.value for m in ros.list_models()}
        assert status[SECOND_MODEL] == 'loaded'
        grpc_c.close()
    finally:
        if ros is not None:
            ros.close()
        t0 = time.monotonic()
        rc = stop_server(proc)
    assert rc == 0 and time.monotonic() - t0 < 15
    log = (tmp_path / 'server.log').read_text()
    assert '"akidb-server stopped"' in log
    assert '"probe listener on http://127.0.0.1:' in log
    # one JSON object per line, the in-process node's lines included: rcl's console output is
    # off (--disable-stdout-logs), the node's lines come through Python logging
    for line in filter(str.strip, log.splitlines()):
        assert isinstance(json.loads(line), dict), line
    assert '"logger": "akidb_ros.ros.node"' in log and '"msg": "serving embed' in log
    with pytest.raises(requests.ConnectionError):    # stopped with the doors
        requests.get(probe + '/health/live', timeout=5)
    # make run's development profile says so at start-up, with the real address
    assert ('SECURITY: development profile' in log and 'authentication OFF' in log
            and f'127.0.0.1:{info["rest_port"]} (loopback only)' in log)


def test_sigterm_answers_a_call_that_runs_to_its_budget(tmp_path):
    """A request that takes its whole budget (6.4 MB to tokenise, ~2 s here; 200 x 256 tokens
    to run), SIGTERM 0.3 s after both arrived: REST and gRPC each answer it (TIMEOUT, within its
    1.5 s budget, tokenising included: before, the budget started after tokenising and the REST
    client saw its connection closed at the end of the grace), then the server exits 0."""
    import threading

    import grpc

    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    proc, info = start_server(tmp_path, '--mode', 'inprocess', '--no-ros', '--timeout', '1.5',
                              '--grace', '2.5')
    big = ['a b ' * 8000] * 200
    out = {}

    def rest_call():
        try:
            r = requests.post(f'http://127.0.0.1:{info["rest_port"]}/api/v1/embed',
                              json={'inputs': big}, timeout=30)
            out['rest'] = (r.status_code, r.json().get('code'))
        except Exception as exc:       # noqa: BLE001 - the failure this test is about
            out['rest'] = repr(exc)

    def grpc_call():
        with grpc.insecure_channel(f'127.0.0.1:{info["grpc_port"]}', options=[
                ('grpc.max_send_message_length', 16 << 20)]) as ch:
            try:
                pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=big), timeout=30)
                out['grpc'] = 'OK'
            except grpc.RpcError as e:
                out['grpc'] = (e.code().name, dict(e.trailing_metadata() or ()).get(
                    'akidb-error-code'))

    threads = [threading.Thread(target=f) for f in (rest_call, grpc_call)]
    for t in threads:
        t.start()

    def both_in_flight():
        text = requests.get(f'http://127.0.0.1:{info["probe_port"]}/metrics', timeout=5).text
        return all(f'akidb_inflight_requests{{transport="{t}"}} 1.0' in text
                   for t in ('rest', 'grpc'))

    assert wait_until(both_in_flight, 10, 0.02), out
    time.sleep(0.3)
    rc = stop_server(proc)
    for t in threads:
        t.join(30)
    assert out['rest'] == (504, 'TIMEOUT'), out
    assert out['grpc'] == ('DEADLINE_EXCEEDED', 'TIMEOUT'), out
    assert rc == 0


def test_default_grace_covers_the_request_budget(caplog):
    from akidb_ros.server import build_parser, grace_for
    assert grace_for(build_parser().parse_args([])) == 5.0 + 2.0
    assert grace_for(build_parser().parse_args(['--timeout', '30'])) == 32.0
    with caplog.at_level('WARNING', logger='akidb_ros.server'):
        assert grace_for(build_parser().parse_args(['--grace', '3'])) == 3.0
    assert 'shorter than the request budget' in caplog.text


def test_dev_profile_refuses_a_non_loopback_bind(tmp_path):
    """Authentication off (the default dev profile) + 0.0.0.0 = refused before anything loads."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('AKIDB_SECURITY_PROFILE', 'AKIDB_SECURITY_CONFIG')}
    r = subprocess.run([sys.executable, '-m', 'akidb_ros.server', '--no-ros', '--host', '0.0.0.0',
                        '--rest-port', '0', '--grpc-port', '0'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "refusing to bind '0.0.0.0' with authentication off" in r.stderr
    assert 'serving' not in r.stderr


def test_sidecar_mode_process(tmp_path):
    from bridge_support import scrape, total
    from test_sidecar import free_port

    ns = '/akidb_side_' + uuid.uuid4().hex[:8]
    node_port = free_port()
    node = NodeProcess(ns, str(tmp_path), '-p', f'metrics_port:={node_port}')
    node.start()
    proc = None
    try:
        proc, info = start_server(tmp_path, '--mode', 'sidecar', '--ros-prefix', ns,
                                  '--probe-port', '0')
        url = f'http://127.0.0.1:{info["rest_port"]}'
        probe = f'http://127.0.0.1:{info["probe_port"]}/health/ready'
        assert wait_until(lambda: requests.get(url + '/health/ready', timeout=5).status_code
                          == 200, 90, 0.3)
        out = RestClient(url, timeout_s=30).embed(['over the sidecar'])
        assert out.embeddings.shape == (1, 384)
        # the bridge has no engine: it exports no engine family (they would read 0 models
        # loaded, a queue of capacity 0); the node's metrics port has them
        bridge_text = requests.get(f'http://127.0.0.1:{info["probe_port"]}/metrics',
                                   timeout=10).text
        node_text = requests.get(f'http://127.0.0.1:{node_port}/metrics', timeout=10).text
        for fam in ('akidb_model_cache_size', 'akidb_queue_capacity', 'akidb_queue_size',
                    'akidb_batch_size', 'akidb_gpu_memory_used_bytes'):
            assert f'# TYPE {fam} ' not in bridge_text, fam
            assert f'# TYPE {fam} ' in node_text, fam
        # labelled: the bridge exports samples only of its own sheds (reason="bridge")
        assert '\nakidb_load_shed_total{' not in bridge_text
        assert '# TYPE akidb_load_shed_total ' in node_text
        assert total(scrape(node_text), 'akidb_model_cache_size') == 1
        bridge = scrape(bridge_text)
        assert total(bridge, 'akidb_embed_requests_total', transport='rest') == 1
        assert total(bridge, 'akidb_backend_up', backend='sidecar') == 1
        # the node counted the forwarded call as the bridge's ('sidecar'), not a robot's
        node_calls = scrape(node_text)
        assert total(node_calls, 'akidb_embed_requests_total', transport='sidecar') == 1
        assert total(node_calls, 'akidb_embed_requests_total', transport='ros') == 0
        assert requests.get(url + '/health', timeout=5).json()['mode'] == 'sidecar'
        # the probe's readiness is the backend's: the node answers over DDS ...
        assert requests.get(probe, timeout=10).json() == {'status': 'ready'}
        # ... and once the node is gone, 503 not_ready (it left the DDS graph)
        node.stop()
        assert wait_until(lambda: requests.get(probe, timeout=10).status_code == 503, 15, 0.2)
        assert requests.get(probe, timeout=10).json()['code'] == 'UNAVAILABLE'
    finally:
        if proc is not None:
            assert stop_server(proc) == 0
        node.stop()


def test_sidecar_bridge_binds_at_once_and_waits_for_a_node_that_starts_later(tmp_path):
    """No node yet: the bridge still binds and answers at once (live, not ready); a call made
    as the node starts, within the discovery grace, waits for discovery and is served instead of
    failing UNAVAILABLE. (The bridge used to block in discovery before binding its ports.)"""
    ns = '/akidb_late_' + uuid.uuid4().hex[:8]
    node = NodeProcess(ns, str(tmp_path))
    t0 = time.monotonic()
    proc, info = start_server(tmp_path, '--mode', 'sidecar', '--ros-prefix', ns,
                              '--discovery-grace', '60', '--timeout', '40')
    try:
        assert time.monotonic() - t0 < 30, 'the bridge waited for discovery before binding'
        url = f'http://127.0.0.1:{info["rest_port"]}'
        assert requests.get(url + '/health/live', timeout=5).status_code == 200
        ready = requests.get(url + '/health/ready', timeout=10)
        assert ready.status_code == 503 and ready.json()['code'] == 'UNAVAILABLE'
        node.start()
        r = requests.post(url + '/api/v1/embed', json={'inputs': ['the node came later']},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()['embeddings'][0]) == 384
        assert requests.get(url + '/health/ready', timeout=10).status_code == 200
    finally:
        assert stop_server(proc) == 0
        node.stop()


def test_bad_arguments_fail_cleanly(tmp_path):
    """A usage error, flag or variable, is exit 2 and one line, before anything loads (each
    option's range: test_server_args.py). ``--timeout nan`` served every call 400 "timeout_s
    must be positive" and SIGTERM ended in a traceback."""
    for bad, env, says in (
            (['--mode', 'nope'], {}, b'invalid choice'),
            (['--timeout', 'nan'], {}, b"argument --timeout: 'nan' is not a number > 0"),
            ([], {'AKIDB_TIMEOUT_S': 'nan'}, b"error: AKIDB_TIMEOUT_S='nan' is not a number")):
        r = subprocess.run([sys.executable, '-m', 'akidb_ros.server', '--no-ros', '--rest-port',
                            '0', '--grpc-port', '0', '--probe-port', 'off', *bad],
                           cwd=ROOT, env=dict(os.environ, **env), capture_output=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and b'Traceback' not in r.stderr, \
            (bad, env, r.stderr[-2000:])


def test_bad_environment_fails_in_one_line(monkeypatch):
    """docs/api.md's variables: a value that is not a number, or not one of the option's
    choices, stops the start naming the variable (it was a ValueError traceback for the float
    ones, and AKIDB_MODE=inproces ran the sidecar: argparse never checks a default); an empty
    one keeps the default, as for the integer ones."""
    from akidb_ros.server import build_parser
    for name, value, says in (('AKIDB_TIMEOUT_S', 'abc', 'is not a number'),
                              ('AKIDB_DISCOVERY_GRACE_S', '5s', 'is not a number'),
                              ('AKIDB_GRPC_STREAM_IDLE_S', 'never', 'is not a number'),
                              ('AKIDB_MODE', 'inproces', 'is not one of inprocess, sidecar'),
                              ('AKIDB_ROS_EXECUTOR', 'multi', 'is not one of events, single')):
        with monkeypatch.context() as mp:
            mp.setenv(name, value)
            with pytest.raises(SystemExit) as ei:
                build_parser()
            assert str(ei.value) == f'{name}={value!r} {says}'
    for name in ('AKIDB_TIMEOUT_S', 'AKIDB_DISCOVERY_GRACE_S', 'AKIDB_GRPC_STREAM_IDLE_S',
                 'AKIDB_MODE', 'AKIDB_ROS_EXECUTOR'):
        monkeypatch.setenv(name, '')
    args = build_parser().parse_args([])
    assert (args.timeout, args.discovery_grace, args.grpc_stream_idle, args.mode,
            args.ros_executor) == (5.0, 5.0, 60.0, 'inprocess', 'events')
    monkeypatch.setenv('AKIDB_MODE', 'sidecar')
    monkeypatch.setenv('AKIDB_TIMEOUT_S', '2.5')
    args = build_parser().parse_args([])
    assert (args.mode, args.timeout) == ('sidecar', 2.5)


def _failed_start(tmp_path, env=None, *args):
    r = subprocess.run([sys.executable, '-m', 'akidb_ros.server', '--no-ros', '--rest-port', '0',
                        '--grpc-port', '0', '--probe-port', 'off', *args], cwd=ROOT,
                       env=dict(os.environ, AKIDB_LOG_FORMAT='json', **(env or {})),
                       capture_output=True, text=True, timeout=120)
    errors = [json.loads(line) for line in r.stderr.splitlines()
              if line.startswith('{') and json.loads(line)['level'] == 'error']
    return r, errors


def test_a_bad_config_fails_the_start_in_one_clean_line(tmp_path):
    """A config error (file or AKIDB_* variable) is the operator's to fix: one line that names
    it and exit 1, no traceback (it logged one: ConfigError did not count as expected)."""
    raw = yaml.safe_load((ROOT / 'config' / 'models.yaml').read_text())
    raw['models_dir'] = str(ROOT / 'models')
    raw['engine']['batching']['runners'] = 2.0
    bad = tmp_path / 'models.yaml'
    bad.write_text(yaml.safe_dump(raw))
    for env, args, says in (
            ({'AKIDB_DEVICE': 'gpu'}, (), "AKIDB_DEVICE='gpu': engine.device must be one of"),
            ({'AKIDB_MODEL_NAME': 'nope'}, (), "AKIDB_MODEL_NAME='nope' names no model"),
            ({}, ('--config', str(bad)), 'engine.batching.runners: 2.0 is not an integer')):
        r, errors = _failed_start(tmp_path, env, *args)
        assert r.returncode == 1, r.stderr[-2000:]
        assert [e['msg'].startswith('startup failed: ') and says in e['msg'] for e in errors] \
            == [True], r.stderr[-2000:]
        assert 'exc' not in errors[0] and 'Traceback' not in r.stderr


def test_bad_node_parameters_fail_an_inprocess_start_in_one_clean_line(tmp_path):
    """The in-process node's --ros-args are the operator's to fix like a config file: one line
    and exit 1 (an out-of-range value logged a traceback, as for a bug)."""
    for args, says in (
            (('-p', 'batching.max_batch_size:=5000'), 'batching.max_batch_size out of range'),
            (('--params-file', str(ROOT / 'config' / 'params.yaml'), '-p',
              'batching.max_batch_size:=abc'), '-p batching.max_batch_size:=abc was dropped'),
            (('-r', '__ns:=bad'), 'invalid --ros-args')):
        r = subprocess.run([sys.executable, '-m', 'akidb_ros.server', '--mode', 'inprocess',
                            '--rest-port', '0', '--grpc-port', '0', '--probe-port', 'off',
                            '--ros-args', *args], cwd=ROOT,
                           env=dict(os.environ, AKIDB_LOG_FORMAT='json'),
                           capture_output=True, text=True, timeout=120)
        errors = [json.loads(line) for line in r.stderr.splitlines()
                  if line.startswith('{') and json.loads(line)['level'] == 'error']
        assert r.returncode == 1, r.stderr[-2000:]
        assert len(errors) == 1 and errors[0]['msg'].startswith(
            'startup failed: embedding node: ') and says in errors[0]['msg'], r.stderr[-2000:]
        assert 'exc' not in errors[0] and 'Traceback' not in r.stderr


@pytest.mark.parametrize('door', ['--rest-port', '--grpc-port'])
def test_a_port_in_use_fails_the_start_in_one_clean_line(tmp_path, door):
    """A second server on a port in use (`make run` twice) is the operator's to fix: one line
    naming the address and exit 1 (it logged a traceback, as for a bug)."""
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        r, errors = _failed_start(tmp_path, {}, door, str(port))
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(errors) == 1 and errors[0]['msg'].startswith('startup failed: '), r.stderr[-2000:]
    assert str(port) in errors[0]['msg'] and 'in use' in errors[0]['msg'], errors[0]['msg']
    assert 'exc' not in errors[0] and 'Traceback' not in r.stderr


def test_a_start_whose_load_times_out_exits_1_cleanly(tmp_path):
    """The default model's load outran engine.timeouts.model_load_s: the start failed, but the
    load went on inside ONNX Runtime while the process exited, which aborted it (exit 134,
    "terminate called without an active exception"). The failed start closes the engine."""
    raw = yaml.safe_load((ROOT / 'config' / 'models.yaml').read_text())
    raw['models_dir'] = str(ROOT / 'models')
    raw['engine']['timeouts']['model_load_s'] = 0.01
    cfg = tmp_path / 'models.yaml'
    cfg.write_text(yaml.safe_dump(raw))
    for _ in range(2):
        r, errors = _failed_start(tmp_path, {}, '--config', str(cfg))
        assert r.returncode == 1 and 'terminate called' not in r.stderr, r.stderr[-2000:]
        assert [e['msg'] for e in errors] == [
            'startup failed: model all-minilm-l6-v2 did not load within 0.01 s']


def test_a_ready_file_that_cannot_be_written_stops_the_start_in_one_clean_line(tmp_path):
    """Its folder is checked when parsed; should the write still fail once serving (here its
    temporary file's name is taken by a folder), the server says so in one line, closes its
    doors and exits 1 (it was a traceback, after serving had begun)."""
    ready = tmp_path / 'ready.json'
    (tmp_path / 'ready.json.tmp').mkdir()
    r, errors = _failed_start(tmp_path, {}, '--ready-file', str(ready))
    assert r.returncode == 1, r.stderr[-2000:]
    assert [e['msg'] for e in errors] == [
        f'startup failed: cannot write --ready-file {ready}: [Errno 21] Is a directory: '
        f"'{ready}.tmp'"], r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and '"akidb-server stopped"' in r.stderr


def test_a_bridge_cleans_dds_shared_memory_left_by_killed_participants(tmp_path):
    """Before it joins DDS, the bridge removes the shared-memory port a SIGKILLed participant
    left (akidb_ros.dds_env.clean_zombie_shm; the node does the same, test/ros/test_dds_shm.py).
    A number no real port has (ports are UDP port numbers), so no live participant is touched."""
    shm = '/dev/shm'
    files = [os.path.join(shm, n) for n in (
        'fastdds_port99991_el', 'fastdds_port99991', 'sem.fastdds_port99991_mutex')]
    old = time.time() - 3600
    for f in files:
        open(f, 'wb').close()
        os.utime(f, (old, old))
    proc = None
    try:
        proc, _ = start_server(tmp_path, '--mode', 'sidecar', '--ros-prefix',
                               '/akidb_nobody_' + uuid.uuid4().hex[:8], '--no-grpc')
        assert not any(os.path.exists(f) for f in files)
        log = (tmp_path / 'server.log').read_text()
        # at least this one (a full test run leaves others of SIGKILLed nodes too)
        cleaned = re.search(r'DDS shared memory: (\d+) zombie ports cleaned', log)
        assert cleaned and int(cleaned.group(1)) >= 1, log[-2000:]
    finally:
        for f in files:
            if os.path.exists(f):
                os.unlink(f)
        if proc is not None:
            assert stop_server(proc) == 0


@pytest.mark.parametrize('sig,when', [(signal.SIGINT, 'imports'), (signal.SIGTERM, 'imports'),
                                      (signal.SIGINT, 'model load'),
                                      (signal.SIGTERM, 'model load')])
def test_a_signal_during_start_up_exits_0_quietly(tmp_path, sig, when):
    """Ctrl-C while the server imported its libraries or loaded its models printed a
    KeyboardInterrupt traceback and exited 130 (SIGTERM: 143, nothing closed). Now it exits
    0 with no traceback, and a start-up cut short during the model load serves nothing."""
    log = tmp_path / 'server.log'
    ready = tmp_path / 'ready.json'
    proc = subprocess.Popen(
        [sys.executable, '-m', 'akidb_ros.server', '--mode', 'inprocess', '--no-ros',
         '--rest-port', '0', '--grpc-port', '0', '--probe-port', 'off',
         '--ready-file', str(ready)], cwd=ROOT, stdout=open(log, 'wb'),
        stderr=subprocess.STDOUT, env=dict(os.environ, AKIDB_LOG_LEVEL='INFO'),
        start_new_session=True)
    try:
        marker = 'grpc/_cython' if when == 'imports' else 'onnxruntime_pybind11'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(f'/proc/{proc.pid}/maps') as f:
                    if marker in f.read():
                        break
            except OSError:
                break
            time.sleep(0.002)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert rc == 0 and 'Traceback' not in out, out[-3000:]
    assert not ready.exists(), out[-3000:]       # it never served


def test_signals_after_the_stop_began_change_nothing(tmp_path):
    """A second SIGINT/SIGTERM once the drain was over killed the server as Python finalised
    (its handlers reset to the default action): exit 130/143 after a clean stop. Signals keep
    coming here from the first one to the exit; it still exits 0."""
    proc, _ = start_server(tmp_path, '--mode', 'inprocess', '--no-ros', '--probe-port', 'off')
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    assert proc.wait(10) == 0


def test_calls_cut_off_at_the_end_of_the_grace_are_unavailable_and_the_stop_keeps_it(tmp_path):
    """With --grace 1 and heavy calls in flight: the stop took 4-5 s (the engine ran its queue
    and the runs in progress for up to 10 s more), and the calls the server cut off were
    logged and counted CANCELLED, as if their callers had given up. Now the engine is cut
    short within the grace, and they are UNAVAILABLE."""
    import threading

    import grpc

    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    proc, info = start_server(tmp_path, '--mode', 'inprocess', '--no-ros', '--grace', '1',
                              '--timeout', '30')
    texts = [' '.join(['robots'] * 300)] * 64
    out = []

    def rest_call():
        try:
            requests.post(f'http://127.0.0.1:{info["rest_port"]}/api/v1/embed',
                          json={'inputs': texts}, timeout=60)
            out.append('answered')
        except requests.RequestException:
            out.append('cut')

    def grpc_call():
        with grpc.insecure_channel(f'127.0.0.1:{info["grpc_port"]}') as ch:
            try:
                pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts), timeout=60)
                out.append('answered')
            except grpc.RpcError as e:
                out.append(e.code().name)

    threads = [threading.Thread(target=f) for f in (rest_call, rest_call, grpc_call, grpc_call)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    rc = stop_server(proc)
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert rc == 0
    assert 'answered' not in out, out      # 256 sequences of 256 tokens each: seconds of work
    log = (tmp_path / 'server.log').read_text()
    codes = re.findall(r'"transport": "(rest|grpc)".*?"code": "([A-Z_]+)"', log)
    assert codes and {c for _, c in codes} == {'UNAVAILABLE'}, codes
    assert took < 4.0, took                 # 1 s of grace, the doors' close, one kernel


def test_a_signal_during_the_model_loads_starts_no_ros_node(monkeypatch):
    """The in-process node serves as soon as it starts: started after a signal that came
    during the model loads, it advertised /embed and was torn down at once, its callers
    unanswered. The start-up now skips it once the stop event is set."""
    import threading

    from akidb_ros import server
    started = []
    monkeypatch.setattr(server, 'start_inprocess_node',
                        lambda *a, **k: started.append(a) or (lambda: None))
    args = server.parse_args(['--mode', 'inprocess', '--rest-port', '0', '--grpc-port', '0',
                              '--probe-port', 'off'])
    for stopping, want in ((True, 0), (False, 1)):
        stop = threading.Event()
        if stopping:
            stop.set()
        bridges = server.build(args, stop=stop)
        try:
            assert len(started) == want
        finally:
            bridges.stop(0)
