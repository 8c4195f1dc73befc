"""Sidecar mode: REST + gRPC forward over DDS (loopback only) to a real embedding node process.

Same answers as in-process; a stopped node gives UNAVAILABLE at once, a frozen (SIGSTOP) node
gives TIMEOUT, and the bridge recovers by itself when the node is back.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import requests

from akidb_ros.client import (GrpcClient, InvalidRequestError, RestClient,
                              ServiceUnavailableError)
from akidb_ros.client.retry import NO_RETRY, RetryPolicy
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import EmbedRequest

from bridge_support import DEFAULT_MODEL, ROOT, SECOND_MODEL, free_port, wait_until

# A node gone from the DDS graph is UNAVAILABLE: ServiceUnavailableError. (OverloadedError, which
# CIRCUIT_OPEN maps to, was allowed too while UNAVAILABLE was an enum alias of CIRCUIT_OPEN on
# the wire; test_error_codes.py keeps every code of the table its own member since.)
UNAVAILABLE_ERRORS = ServiceUnavailableError
SENTENCES = ['Grasp the blue box.', 'The battery is low, return to the dock.']


class NodeProcess:
    """The real embedding node (python -m akidb_ros.ros.node) in its own namespace."""

    def __init__(self, namespace: str, log_dir, *extra_args: str):
        self.namespace = namespace
        self.log_dir = log_dir
        self.extra_args = extra_args        # more --ros-args (parameters)
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        self.log = open(os.path.join(self.log_dir, f'node{self.starts}.log'), 'wb')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args',
             '-r', f'__ns:={self.namespace}', '-p', 'diagnostics_period_s:=0.0',
             *self.extra_args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None or self.proc.poll() is not None:
            return
        if sig == signal.SIGTERM:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if sig == signal.SIGKILL or self.proc.returncode == -signal.SIGKILL:
            from akidb_ros.dds_env import clean_zombie_shm
            clean_zombie_shm()      # its shared-memory ports would trouble later participants
        self.log.close()


@pytest.fixture(scope='module')
def node(tmp_path_factory):
    ns = '/akidb_test_' + uuid.uuid4().hex[:8]
    port = free_port()
    n = NodeProcess(ns, str(tmp_path_factory.mktemp('node')), '-p', f'metrics_port:={port}')
    n.metrics_port = port
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope='module')
def sidecar(node, span_exporter):
    from akidb_ros.backends import RosBackend
    from akidb_ros.server import Bridges
    backend = RosBackend(prefix=node.namespace, timeout_s=3.0)
    assert wait_until(backend.ready, 90, 0.2), 'embedding node did not come up over DDS'
    bridges = Bridges(backend, host='127.0.0.1', rest_port=0, grpc_port=0, timeout_s=3.0).start()
    yield bridges
    bridges.stop(grace_s=2)
    backend.close()


@pytest.fixture()
def side_rest(sidecar):
    c = RestClient(f'http://127.0.0.1:{sidecar.rest_port}', timeout_s=20, retry=NO_RETRY)
    yield c
    c.close()


@pytest.fixture()
def side_grpc(sidecar):
    c = GrpcClient(f'127.0.0.1:{sidecar.grpc_port}', timeout_s=20, retry=NO_RETRY)
    yield c
    c.close()


def test_same_answers_as_inprocess(side_rest, side_grpc, rest, engine):
    direct = engine.embed(EmbedRequest(inputs=SENTENCES, normalize=True)).embeddings
    a = side_rest.embed(SENTENCES)
    b = side_grpc.embed(SENTENCES, normalize=True)
    c = rest.embed(SENTENCES)                      # in-process REST door
    assert a.model == b.model == c.model == DEFAULT_MODEL
    for got in (a.embeddings, b.embeddings, c.embeddings):
        np.testing.assert_allclose(got, direct, atol=1e-5)
    assert a.total_tokens == c.total_tokens


def test_errors_cross_the_dds_hop(sidecar):
    url = f'http://127.0.0.1:{sidecar.rest_port}'
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['x'], 'model': 'nope'}, timeout=10)
    assert r.status_code == 400 and r.json()['code'] == 'MODEL_NOT_FOUND'
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['a'] * 300}, timeout=10)
    assert r.status_code == 413 and r.json()['code'] == 'INPUT_TOO_LARGE'
    # the node's TIMEOUT carries the engine's retry hint across the hop (Retry-After: 1, as
    # in-process; it was lost: no Retry-After on the sidecar's 504)
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['word ' * 200] * 64},
                      headers={'X-Request-Timeout-Ms': '1'}, timeout=10)
    assert (r.status_code, r.json()['code']) == (504, 'TIMEOUT'), r.text
    assert r.headers.get('Retry-After') == '1', dict(r.headers)


def _side_codes(sidecar, inputs, model=''):
    """(REST code, gRPC code) of the sidecar's doors for one request ('OK' for an answer)."""
    import grpc
    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    r = requests.post(f'http://127.0.0.1:{sidecar.rest_port}/api/v1/embed',
                      json={'inputs': inputs, 'model': model}, timeout=30)
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(f'127.0.0.1:{sidecar.grpc_port}'))
    try:
        stub.Embed(pb.EmbedRequest(inputs=inputs, model=model, normalize=True), timeout=30)
        g = 'OK'
    except grpc.RpcError as err:
        g = dict(err.trailing_metadata())['akidb-error-code']
    return ('OK' if r.status_code == 200 else r.json()['code']), g


def test_a_nul_is_refused_before_the_dds_hop(sidecar, side_rest, side_grpc):
    """A ROS string ends at its first NUL: the node would embed 'Go to the kitchen' and answer
    200; the bridge refuses the text as the in-process doors do, naming it."""
    texts = ['fine', 'Go to the kitchen\x00 and bring me the red cup']
    for client in (side_rest, side_grpc):
        with pytest.raises(InvalidRequestError) as ei:
            client.embed(texts)
        assert ei.value.code == 'INVALID_INPUT'
        assert ei.value.message.startswith('inputs[1] contains U+0000 (NUL) at character 17')
    # a model name cut at a NUL would be a known model
    assert _side_codes(sidecar, ['x'], DEFAULT_MODEL + '\x00junk') == (
        'INVALID_INPUT', 'INVALID_INPUT')
    # a lone surrogate (REST only: protobuf cannot carry one) is refused too, not a 500
    r = requests.post(f'http://127.0.0.1:{sidecar.rest_port}/api/v1/embed', timeout=30,
                      data=b'{"inputs": ["\\ud800"]}',
                      headers={'Content-Type': 'application/json'})
    assert (r.status_code, r.json()['code']) == (400, 'INVALID_INPUT')


def test_same_codes_as_inprocess_through_the_node(sidecar):
    """Count first, names as sent, texts that tokenise to nothing refused: the node's engine
    decides, and its answer is the in-process doors' (test_same_answer.py)."""
    assert _side_codes(sidecar, ['x'] * 299 + ['']) == ('INPUT_TOO_LARGE', 'INPUT_TOO_LARGE')
    assert _side_codes(sidecar, ['x'], ' ' + DEFAULT_MODEL) == (
        'MODEL_NOT_FOUND', 'MODEL_NOT_FOUND')
    for text in ('\u0301\u0308', '\ufe0f', '\ue000', '\ufffd'):
        assert _side_codes(sidecar, ['ok', text]) == ('INVALID_INPUT', 'INVALID_INPUT'), text


def test_grpc_options_and_truncated_count_cross_the_dds_hop(side_grpc):
    long_text = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 80)
    assert side_grpc.embed([long_text, 'short']).truncated_inputs == 1
    with pytest.raises(InvalidRequestError) as ei:
        side_grpc.embed(['short', long_text], truncate=False)
    assert ei.value.code == 'INPUT_TOO_LONG'
    assert side_grpc.embed(['x'], input_type='query').embeddings.shape == (1, 384)


def test_a_forwarded_call_is_counted_once_by_the_front_doors(
        node, sidecar, side_rest, side_grpc):
    """The bridge's doors count its calls (rest, grpc); the node counts the calls the bridge
    forwards under transport 'sidecar', which the shipped rules leave out, and a robot's own
    call under 'ros': a request is counted once by the front doors. A failed call that named no
    model is labelled with the default model's id on both sides (it was 'default' on the bridge,
    'unknown' on the node)."""
    from akidb_ros.ros.cli import EmbeddingClient
    from akidb_ros.srv import Embed
    from bridge_support import scrape, total

    def scrape_all():
        bridge = requests.get(f'http://127.0.0.1:{sidecar.rest_port}/metrics', timeout=10)
        node_m = requests.get(f'http://127.0.0.1:{node.metrics_port}/metrics', timeout=10)
        return scrape(bridge.text), scrape(node_m.text)

    def moved(a, b, **labels):
        return total(b, 'akidb_embed_requests_total', **labels) - \
            total(a, 'akidb_embed_requests_total', **labels)

    bridge0, node0 = scrape_all()
    side_rest.embed(['forwarded over rest'])
    side_grpc.embed(['forwarded over grpc'])
    r = requests.post(f'http://127.0.0.1:{sidecar.rest_port}/api/v1/embed',
                      json={'inputs': ['word ' * 400], 'truncate': False},
                      headers={'X-Request-ID': 'fwd-rid-1'}, timeout=10)
    assert r.json()['code'] == 'INPUT_TOO_LONG'
    with EmbeddingClient(node.namespace, node_name='akidb_sidecar_robot') as robot:
        assert robot.call('embed', Embed.Request(inputs=['a robot calls the node'])).success
        bad = robot.call('embed', Embed.Request(inputs=['   '], request_id='robot-bad-1'))
        assert bad.error_code == 'INVALID_INPUT'
    bridge1, node1 = scrape_all()
    ok = dict(model=DEFAULT_MODEL, status='success')
    failed = dict(model=DEFAULT_MODEL, status='error')
    assert moved(bridge0, bridge1, transport='rest', **ok) == 1
    assert moved(bridge0, bridge1, transport='grpc', **ok) == 1
    assert moved(bridge0, bridge1, transport='rest', **failed) == 1
    assert moved(node0, node1, transport='sidecar', **ok) == 2
    assert moved(node0, node1, transport='sidecar', **failed) == 1
    assert moved(node0, node1, transport='ros', **ok) == 1
    assert moved(node0, node1, transport='ros', **failed) == 1
    assert moved(node0, node1, model='unknown') == moved(bridge0, bridge1, model='default') == 0
    # what the shipped rules sum (every transport but 'sidecar', over both targets): 5 calls
    front = sum(moved(a, b, transport=t) for a, b in ((bridge0, bridge1), (node0, node1))
                for t in ('rest', 'grpc', 'ros'))
    assert front == 5
    # the node's log names the caller's request id (the bridge's mark taken off)
    log_path = os.path.join(node.log_dir, f'node{node.starts}.log')
    assert wait_until(lambda: 'fwd-rid-1' in open(log_path).read(), 10)
    logged = [ln for ln in open(log_path) if 'fwd-rid-1' in ln]
    assert len(logged) == 1 and "request_id='fwd-rid-1' " in logged[0], logged
    assert 'via=' not in logged[0] and 'code=INPUT_TOO_LONG' in logged[0]


def test_health_models_and_admin(sidecar, side_rest, side_grpc):
    url = f'http://127.0.0.1:{sidecar.rest_port}'
    h = requests.get(url + '/health', timeout=10).json()
    assert h['status'] == 'healthy' and h['mode'] == 'sidecar'
    assert {'embedding_provider', 'model_cache', 'gpu'} <= set(h['checks'])
    # the PRD's values, the same as in-process (a client may compare them with "ok")
    assert (h['checks']['embedding_provider'], h['checks']['model_cache']) == ('ok', 'ok')
    assert requests.get(url + '/health/ready', timeout=10).status_code == 200
    assert side_grpc.serving('akidb.embedding.v1.EmbeddingService')
    models = {m['id']: m for m in side_rest.list_models()}
    assert models[DEFAULT_MODEL]['status'] == 'loaded'
    assert side_rest.load_model(SECOND_MODEL)['status'] == 'loaded'
    assert side_grpc.embed(['hi'], model=SECOND_MODEL).embeddings.shape == (1, 768)
    assert side_rest.unload_model(SECOND_MODEL)['status'] == 'available'
    # names are taken as sent, as in-process: the node trimmed them, and a NUL cut them
    for op in ('load', 'unload'):
        for name, code in ((f' {SECOND_MODEL}', 'MODEL_NOT_FOUND'),
                           (f'{SECOND_MODEL}\n', 'MODEL_NOT_FOUND'),
                           (f'{SECOND_MODEL}\x00junk', 'INVALID_INPUT')):
            r = requests.post(f'{url}/admin/models/{op}', json={'model': name}, timeout=30)
            assert (r.status_code, r.json()['code']) == (400, code), (op, name, r.text)
    assert {m['id']: m for m in side_rest.list_models()}[SECOND_MODEL]['status'] == 'available'


def test_trace_context_crosses_dds(sidecar, span_exporter):
    span_exporter.clear()
    trace_id = uuid.uuid4().hex
    url = f'http://127.0.0.1:{sidecar.rest_port}'
    r = requests.post(url + '/api/v1/embed', json={'inputs': ['trace me']}, timeout=10,
                      headers={'traceparent': f'00-{trace_id}-{"ab" * 8}-01'})
    assert r.status_code == 200
    spans = [s for s in span_exporter.get_finished_spans()
             if format(s.context.trace_id, '032x') == trace_id]
    names = {s.name for s in spans}
    assert {'POST /api/v1/embed', 'ros /embed'} <= names
    hop = next(s for s in spans if s.name == 'ros /embed')
    server = next(s for s in spans if s.name == 'POST /api/v1/embed')
    assert hop.parent.span_id == server.context.span_id


def _outcome(future) -> str:
    try:
        future.result(timeout=30)
        return 'OK'
    except EngineError as err:
        return err.code.name


def test_a_burst_through_the_dds_hop_loses_no_call(node):
    """A bridge sends calls as its doors get them (EmbedStreams pipeline 64 each): the node's
    service keeps its last qos_depth requests not yet taken and DDS drops older ones silently.
    With the old default depth (100) a burst of 300 lost 16-101 calls, each a TIMEOUT after its
    budget; the default is now 1000, and a bridge keeps at most its own depth in flight,
    refusing one more OVERLOADED at once instead of losing it."""
    from akidb_ros.backends import RosBackend
    backend = RosBackend(prefix=node.namespace, timeout_s=10.0)
    try:
        assert wait_until(backend.ready, 60, 0.2)
        assert backend.embed(EmbedRequest(inputs=['first contact'])).dimension == 384
        futures = [backend.submit(EmbedRequest(inputs=[f'burst {i}'], timeout_s=10.0))
                   for i in range(400)]
        outcomes = [_outcome(f) for f in futures]
        assert outcomes.count('OK') == 400, sorted(set(outcomes))
    finally:
        backend.close()
    # more calls than the bridge's depth: the excess is refused at once, the rest answered;
    # each refusal is a shed in akidb_load_shed_total{reason="bridge"} (it was not counted)
    from prometheus_client import REGISTRY

    def bridge_sheds() -> float:
        return REGISTRY.get_sample_value('akidb_load_shed_total', {'reason': 'bridge'}) or 0.0
    shed_before = bridge_sheds()
    backend = RosBackend(prefix=node.namespace, timeout_s=10.0, qos_depth=16)
    try:
        assert wait_until(backend.ready, 60, 0.2)
        assert backend.embed(EmbedRequest(inputs=['first contact'])).dimension == 384
        texts = ['The robot waits at the charging dock for its next goal. ' * 6] * 8
        futures, refused = [], 0
        for _ in range(64):
            try:
                futures.append(backend.submit(EmbedRequest(inputs=texts, timeout_s=10.0)))
            except EngineError as err:
                assert err.code is ErrorCode.OVERLOADED and err.retry_after_s, err
                refused += 1
        assert refused and len(futures) >= 16
        assert bridge_sheds() == shed_before + refused
        assert {_outcome(f) for f in futures} == {'OK'}
    finally:
        backend.close()


def test_slow_node_gives_timeout_then_recovers(node, sidecar, side_rest, side_grpc):
    os.kill(node.proc.pid, signal.SIGSTOP)          # the node hangs (no crash, no goodbye)
    try:
        # A call made while the hung node is still in the DDS graph waits out its budget (1 s,
        # inside the 2 s DDS lease) and gets TIMEOUT.
        t0 = time.monotonic()
        r = requests.post(f'http://127.0.0.1:{sidecar.rest_port}/api/v1/embed',
                          json={'inputs': ['are you there?']},
                          headers={'X-Request-Timeout-Ms': '1000'}, timeout=10)
        assert r.status_code == 504 and r.json()['code'] == 'TIMEOUT'
        assert time.monotonic() - t0 < 1.0 + 1.0
        # Past the DDS lease (2 s, config/fastdds_loopback.xml) the silent node has left the
        # graph, and the bridge answers UNAVAILABLE at once instead of waiting.
        assert wait_until(lambda: not sidecar.backend._up('embed'), 10)
        t0 = time.monotonic()
        with pytest.raises(UNAVAILABLE_ERRORS):
            side_grpc.embed(['are you there?'], timeout_s=1.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    assert wait_until(lambda: _ok(side_rest), 20), 'bridge did not recover after the node resumed'


def test_calls_in_flight_cost_no_thread_each_and_are_answered_at_close(node):
    """Deadlines of DDS calls in flight are one watcher thread's heap, not a timer thread per
    call; a bridge closed with calls still waiting fails each with UNAVAILABLE at once."""
    import threading
    from akidb_ros.backends import RosBackend
    backend = RosBackend(prefix=node.namespace, timeout_s=30.0)
    try:
        for _attempt in range(3):
            assert wait_until(backend.ready, 60, 0.2)
            threads_before = threading.active_count()
            os.kill(node.proc.pid, signal.SIGSTOP)      # nobody answers: the calls stay in flight
            try:
                futures = [backend.submit(EmbedRequest(inputs=[f'waiting {i}'], timeout_s=30.0))
                           for i in range(20)]
                break
            except EngineError as exc:
                # The frozen node's 2 s DDS lease ran out before 20 calls were sent (a machine
                # slowed by something else): resume it, let it rejoin, try again.
                assert exc.code is ErrorCode.UNAVAILABLE
                os.kill(node.proc.pid, signal.SIGCONT)
        else:
            pytest.fail('the node left the DDS graph before 20 calls were sent, three times')
        assert threading.active_count() <= threads_before + 1
        assert not any(f.done() for f in futures)
        t0 = time.monotonic()
        backend.close()
        for f in futures:
            with pytest.raises(EngineError) as err:
                f.result(timeout=5)
            assert err.value.code is ErrorCode.UNAVAILABLE
        assert time.monotonic() - t0 < 7.0          # the spin thread's join, not the deadlines
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
        backend.close()


def _submit_to_frozen(backend, n: int, timeout_s: float) -> list:
    """Send ``n`` calls to a node just frozen (SIGSTOP); the futures of those it holds.

    The bridge may see the frozen node leave the graph within this loop (its lease ran out on a
    loaded machine, or Fast DDS gave up on its shared-memory port): a call sent after that is
    refused at once, UNAVAILABLE "has no server", which is right too; the first one is held.
    """
    futures = []
    for i in range(n):
        try:
            futures.append(backend.submit(EmbedRequest(inputs=[f'held {i}'],
                                                       timeout_s=timeout_s)))
        except EngineError as err:
            assert futures and err.code is ErrorCode.UNAVAILABLE, err
            assert 'has no server' in err.message, err.message
    return futures


def test_calls_in_flight_fail_unavailable_when_the_node_leaves_the_graph(node):
    """A node frozen past its DDS lease leaves the graph: the calls it held are answered
    UNAVAILABLE then (not TIMEOUT at the end of their budget: their requests may never have
    reached it, and a TIMEOUT would count against the model's circuit breaker)."""
    from akidb_ros.backends import RosBackend
    backend = RosBackend(prefix=node.namespace, timeout_s=30.0)
    try:
        assert wait_until(backend.ready, 60, 0.2)
        os.kill(node.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        futures = _submit_to_frozen(backend, 8, timeout_s=30.0)
        for f in futures:
            with pytest.raises(EngineError) as err:
                f.result(timeout=15)
            assert err.value.code is ErrorCode.UNAVAILABLE
            assert 'left the DDS graph' in err.value.message
        assert time.monotonic() - t0 < 8.0         # the 2 s lease and a check, not 30 s
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
        backend.close()
    assert wait_until(lambda: _node_answers(node), 20)


def test_a_stopping_bridge_answers_the_calls_still_waiting_when_its_grace_ends(node):
    """A graceful stop whose grace is shorter than the calls' budget: when the grace is over,
    the calls still waiting on the node are answered UNAVAILABLE (REST 503, gRPC UNAVAILABLE
    with akidb-error-code) before the doors close. The doors used to close first: a REST
    caller's connection was reset unanswered, a gRPC call cancelled without a code."""
    import threading
    import grpc
    from akidb_ros.backends import RosBackend
    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    from akidb_ros.server import ANSWER_S, Bridges
    backend = RosBackend(prefix=node.namespace, timeout_s=30.0)
    bridges = Bridges(backend, host='127.0.0.1', rest_port=0, grpc_port=0,
                      timeout_s=30.0).start()
    bridges.on_close(backend.close)
    outcomes = []

    def rest_call():
        try:
            r = requests.post(f'http://127.0.0.1:{bridges.rest_port}/api/v1/embed',
                              json={'inputs': ['held at the stop']}, timeout=20)
            outcomes.append(('rest', r.status_code, r.json()['code']))
        except requests.RequestException as exc:
            outcomes.append(('rest', type(exc).__name__, None))

    def grpc_call():
        with grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}') as channel:
            try:
                pb_grpc.EmbeddingServiceStub(channel).Embed(
                    pb.EmbedRequest(inputs=['held at the stop'], normalize=True), timeout=20)
                outcomes.append(('grpc', 'OK', None))
            except grpc.RpcError as err:
                outcomes.append(('grpc', err.code().name,
                                 dict(err.trailing_metadata() or ()).get('akidb-error-code')))
    stopped = False
    try:
        assert wait_until(backend.ready, 60, 0.2)
        assert backend.embed(EmbedRequest(inputs=['first contact'])).dimension == 384
        os.kill(node.proc.pid, signal.SIGSTOP)     # it holds the calls (within its DDS lease)
        threads = [threading.Thread(target=fn) for fn in (rest_call, grpc_call) * 3]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(backend._pending) == 6, 1.0, 0.02)
        t0 = time.monotonic()
        bridges.stop(grace_s=0.3)
        stopped = True
        for t in threads:
            t.join(10)
        assert time.monotonic() - t0 < 0.3 + ANSWER_S + 0.5
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
        if not stopped:
            bridges.stop(0)
    assert sorted(outcomes) == [('grpc', 'UNAVAILABLE', 'UNAVAILABLE')] * 3 + \
        [('rest', 503, 'UNAVAILABLE')] * 3, outcomes
    assert wait_until(lambda: _node_answers(node), 20)


def test_calls_waiting_for_discovery_outlive_a_rejoin(monkeypatch):
    """Calls made in the start-up grace wait for a node; one still absent after REJOIN_AFTER_S
    makes the bridge rejoin the DDS graph with a new participant and close the old one. The
    waiting calls are answered UNAVAILABLE when their wait ends; they used to fail with rclpy's
    InvalidHandle (REST 500 INTERNAL, gRPC UNKNOWN): they were blocked in the old participant's
    wait_for_service when it was closed."""
    import threading
    from akidb_ros import backends
    monkeypatch.setattr(backends, 'REJOIN_AFTER_S', 0.5)
    backend = backends.RosBackend(prefix='/akidb_nobody_' + uuid.uuid4().hex[:8], timeout_s=3.0,
                                  discovery_timeout_s=3.0)
    outcomes = []

    def call():
        t0 = time.monotonic()
        try:
            backend.embed(EmbedRequest(inputs=['anyone there?'], timeout_s=2.0))
            outcomes.append(('answered', time.monotonic() - t0))
        except Exception as exc:    # noqa: BLE001 - what the door would turn into a status
            outcomes.append((exc, time.monotonic() - t0))
    try:
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        # the bridge's own looks (probes, health) while the calls wait: the rejoin happens
        assert wait_until(lambda: backend._up('embed') or backend._last_rejoin > 0, 5, 0.05)
        for t in threads:
            t.join(10)
        assert len(outcomes) == 4
        for exc, took in outcomes:
            assert isinstance(exc, EngineError) and exc.code is ErrorCode.UNAVAILABLE, exc
            assert took < 2.0 + 1.0
    finally:
        backend.close()


def _node_answers(node) -> bool:
    from akidb_ros.backends import RosBackend
    b = RosBackend(prefix=node.namespace, timeout_s=2.0)
    try:
        return wait_until(b.ready, 10, 0.2)
    finally:
        b.close()


def _change_state(node, transition: int) -> bool:
    """A lifecycle manager's call: change the node's state."""
    import rclpy
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rclpy.context import Context
    ctx = Context()
    rclpy.init(context=ctx, args=[])
    try:
        n = rclpy.create_node('akidb_test_lc_manager', context=ctx)
        cli = n.create_client(ChangeState, f'{node.namespace}/embedding_node/change_state')
        assert cli.wait_for_service(timeout_sec=10)
        fut = cli.call_async(ChangeState.Request(transition=Transition(id=transition)))
        from rclpy.executors import SingleThreadedExecutor
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(n)
        ex.spin_until_future_complete(fut, timeout_sec=20)
        ok = fut.done() and fut.result().success
        ex.shutdown()
        n.destroy_node()
        return ok
    finally:
        rclpy.try_shutdown(context=ctx)


def test_bridge_health_follows_the_nodes_lifecycle_and_default_model(node, sidecar):
    """An inactive node answers every call UNAVAILABLE: the bridge is unhealthy and not ready
    then (it said "healthy"); an unloaded default model comes back by itself, without traffic
    (a not-ready pod gets none)."""
    from lifecycle_msgs.msg import Transition
    url = f'http://127.0.0.1:{sidecar.rest_port}'

    def node_check():
        return requests.get(url + '/health', timeout=10).json()['checks']['node']

    # earlier tests froze the node past its DDS lease: start from a bridge that has seen it back
    assert wait_until(lambda: requests.get(url + '/health/ready', timeout=10).status_code
                      == 200, 30)
    assert _change_state(node, Transition.TRANSITION_DEACTIVATE)
    try:
        assert wait_until(lambda: node_check() == 'inactive: not serving', 10), node_check()
        assert requests.get(url + '/health/ready', timeout=10).status_code == 503
        assert requests.get(url + '/health', timeout=10).json()['status'] == 'unhealthy'
    finally:
        assert _change_state(node, Transition.TRANSITION_ACTIVATE)
    assert wait_until(lambda: requests.get(url + '/health/ready', timeout=10).status_code
                      == 200, 10)
    r = requests.post(url + '/admin/models/unload', json={'model': DEFAULT_MODEL}, timeout=30)
    assert r.status_code == 200
    # no embed call from here on: the bridge's own health looks bring the default back
    assert wait_until(lambda: requests.get(url + '/health/ready', timeout=10).status_code
                      == 200, 30)
    assert requests.get(url + '/health', timeout=10).json()['status'] == 'healthy'


def test_labels_read_while_the_node_is_unconfigured_are_read_again_once_it_is_back(node):
    """A sidecar's model labels read while its node was unconfigured (an empty model list) were
    kept for 30 s: every success after the node came back was counted, and its breaker keyed,
    as model 'unknown'. An empty list keeps the labels known and is asked again after 1 s."""
    from lifecycle_msgs.msg import Transition
    from akidb_ros.backends import RosBackend
    from akidb_ros.doors import ModelLabels
    backend = RosBackend(prefix=node.namespace, timeout_s=10.0)
    try:
        assert wait_until(backend.ready, 60, 0.2)
        fresh = ModelLabels(backend)
        assert _change_state(node, Transition.TRANSITION_DEACTIVATE)
        try:
            assert _change_state(node, Transition.TRANSITION_CLEANUP)
            try:
                assert backend.list_models() == []
                fresh.refresh(force=True)           # its first look: nothing known yet
                assert fresh.label(DEFAULT_MODEL) == 'unknown'
            finally:
                assert _change_state(node, Transition.TRANSITION_CONFIGURE)
        finally:
            assert _change_state(node, Transition.TRANSITION_ACTIVATE)
        assert wait_until(lambda: fresh.label(DEFAULT_MODEL) == DEFAULT_MODEL, 5), \
            'labels still read from the unconfigured node'
        assert fresh.label('') == DEFAULT_MODEL
    finally:
        backend.close()


def test_a_node_killed_and_restarted_at_once_fails_its_calls_unavailable(node):
    """A supervisor restarts a killed node at once: the new node may be in the graph before the
    old one's lease runs out, so the bridge need not see "no server". The calls the old process
    held are answered UNAVAILABLE all the same (the node's instance id in ListModels changed),
    never TIMEOUT (a TIMEOUT counts against the model's breaker: 30 s of CIRCUIT_OPEN)."""
    from akidb_ros.backends import RosBackend
    backend = RosBackend(prefix=node.namespace, timeout_s=30.0)
    try:
        assert wait_until(backend.ready, 60, 0.2)
        # answered once: from now on a lost request is not sent again (first contact is over)
        assert backend.embed(EmbedRequest(inputs=['first contact'])).dimension == 384
        before = backend._instance
        os.kill(node.proc.pid, signal.SIGSTOP)       # it holds the calls, then dies
        futures = _submit_to_frozen(backend, 8, timeout_s=6.0)
        time.sleep(0.3)
        node.stop(signal.SIGKILL)
        node.start()
        # the bridge's health looks (its gRPC health poller, probes) hear the new instance
        assert wait_until(lambda: backend.health().status == 'healthy'
                          and backend._instance != before, 30, 0.2)
        for f in futures:
            with pytest.raises(EngineError) as err:
                f.result(timeout=15)
            assert err.value.code is ErrorCode.UNAVAILABLE, err.value
    finally:
        backend.close()


def test_node_down_unavailable_then_recovers(node, sidecar, side_rest, side_grpc):
    url = f'http://127.0.0.1:{sidecar.rest_port}'
    node.stop(signal.SIGTERM)
    # a cleanly stopped node leaves the DDS graph: the bridge sees no server and says so at once
    assert wait_until(lambda: not sidecar.backend._up('embed'), 15)
    t0 = time.monotonic()
    with pytest.raises(UNAVAILABLE_ERRORS) as ei:
        side_rest.embed(['anyone?'])
    assert time.monotonic() - t0 < 1.0
    assert ei.value.status == 503 and ei.value.retry_after_s is not None
    assert ei.value.retryable
    with pytest.raises(UNAVAILABLE_ERRORS):
        side_grpc.embed(['anyone?'])
    r = requests.get(url + '/health/ready', timeout=10)
    assert r.status_code == 503
    assert requests.get(url + '/health', timeout=10).json()['status'] == 'unhealthy'
    assert requests.get(url + '/health/live', timeout=10).status_code == 200

    # a client with retries rides through the restart
    node.start()
    t_restart = time.monotonic()
    patient = RestClient(url, timeout_s=60, retry=RetryPolicy(max_attempts=100,
                                                              max_backoff_s=0.5))
    out = patient.embed(SENTENCES)
    assert out.embeddings.shape == (2, 384)
    assert time.monotonic() - t_restart < 60
    assert wait_until(lambda: side_grpc.serving('akidb.embedding.v1.EmbeddingService'), 10)


def _ok(client) -> bool:
    try:
        client.embed(['ping'], timeout_s=2.0)
        return True
    except Exception:
        return False


def _node_queue(node) -> float:
    import urllib.request
    with urllib.request.urlopen(f'http://127.0.0.1:{node.metrics_port}/metrics', timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines()
               if line.startswith('akidb_queue_size'))


def test_a_caller_that_gives_up_withdraws_its_work_on_the_node(node):
    """A gRPC call cancelled, or a REST client that closes its connection, withdraws its work
    on the node too: the bridge publishes the call's request id on the node's cancel_embed
    topic, and the node's queue empties within seconds, not when the work would have ended
    (before, the node computed every abandoned call, and calls queued behind them timed
    out)."""
    import socket

    import grpc

    from akidb_ros.backends import RosBackend
    from akidb_ros.grpc_api import embedding_pb2 as pb, embedding_pb2_grpc as pb_grpc
    from akidb_ros.server import Bridges
    backend = RosBackend(prefix=node.namespace, timeout_s=60.0)
    assert wait_until(backend.ready, 60, 0.2)
    bridges = Bridges(backend, host='127.0.0.1', rest_port=0, grpc_port=0, timeout_s=60.0,
                      probe_port=None).start()
    long_text = ' '.join(['word'] * 300)        # 96 x 256 tokens: seconds of node work here
    inputs = [f'{i} {long_text}' for i in range(96)]
    try:
        assert wait_until(lambda: _node_queue(node) == 0, 30, 0.05)
        with grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}') as ch:
            call = pb_grpc.EmbeddingServiceStub(ch).Embed.future(
                pb.EmbedRequest(inputs=inputs), timeout=60)
            assert wait_until(lambda: _node_queue(node) >= 1, 20, 0.02), 'never accepted'
            call.cancel()
            assert wait_until(lambda: _node_queue(node) == 0, 3, 0.02), \
                'the node went on with the cancelled gRPC call'
        body = ('{"inputs": [%s]}' % ', '.join(f'"{t}"' for t in inputs)).encode()
        with socket.create_connection(('127.0.0.1', bridges.rest_port), timeout=10) as sock:
            sock.sendall(b'POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: '
                         b'application/json\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
            assert wait_until(lambda: _node_queue(node) >= 1, 20, 0.02), 'never accepted'
        # the client hung up: the door sees it within 0.2 s, the node's work goes
        assert wait_until(lambda: _node_queue(node) == 0, 3, 0.02), \
            'the node went on with the abandoned REST call'
        with grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}') as ch:
            after = pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=['after']),
                                                           timeout=30)
        assert len(after.embeddings) == 1
    finally:
        bridges.stop(grace_s=1)
        backend.close()


def test_the_admin_lane_crosses_the_dds_hop(tmp_path):
    """The guard grants an admin caller the engine's admin lane (admitted past the 95 % shed
    point, refused only when the queue is full); the bridge dropped it at the DDS hop, so in
    sidecar mode (the shipped deployments) admin calls were shed like everyone else's. Node
    with a queue of 4: 3 queued calls reach the shed point; a normal call is OVERLOADED, an
    admin one is served."""
    from akidb_ros.backends import RosBackend
    from akidb_ros.engine.types import Priority
    port = free_port()
    n = NodeProcess('/akidb_lane_' + uuid.uuid4().hex[:8], str(tmp_path), '-p',
                    f'metrics_port:={port}', '-p', 'queue.capacity:=4')
    n.metrics_port = port
    n.start()
    backend = RosBackend(prefix=n.namespace, timeout_s=120.0)
    long_text = ' '.join(['word'] * 300)
    try:
        assert wait_until(backend.ready, 90, 0.2), 'embedding node did not come up over DDS'
        held = [backend.submit(EmbedRequest(inputs=[f'{k} {i} {long_text}' for i in range(64)]))
                for k in range(3)]
        assert wait_until(lambda: _node_queue(n) >= 3, 30, 0.02), 'the queue never filled'
        with pytest.raises(EngineError) as err:
            backend.embed(EmbedRequest(inputs=['normal']))
        assert err.value.code is ErrorCode.OVERLOADED
        admin = backend.embed(EmbedRequest(inputs=['admin'], priority=Priority.ADMIN))
        assert admin.embeddings.shape == (1, 384)
        for fut in held:
            fut.result(120)
    finally:
        backend.close()
        n.stop()


def test_withdrawing_a_call_leaves_another_call_with_the_same_request_id(node):
    """The node withdraws (cancel_embed) and joins calls by request id, and the bridge sent the
    caller's own: a caller that hung up also withdrew every other call in flight with its
    X-Request-Id (a client's fan-out with one correlation id, a hedged request sent to two
    bridges, another tenant's id), which got 499 CANCELLED. Each forwarded call now carries a
    token of its own."""
    import json
    import socket
    import threading

    from akidb_ros.backends import RosBackend
    from akidb_ros.server import Bridges
    backend = RosBackend(prefix=node.namespace, timeout_s=60.0)
    assert wait_until(backend.ready, 60, 0.2)
    bridges = Bridges(backend, host='127.0.0.1', rest_port=0, grpc_port=0, timeout_s=60.0,
                      probe_port=None).start()
    long_text = ' '.join(['word'] * 300)
    url = f'http://127.0.0.1:{bridges.rest_port}/api/v1/embed'
    kept = {}

    def keeper():       # stays for its answer
        r = requests.post(url, json={'inputs': [f'kept {i} {long_text}' for i in range(48)]},
                          headers={'X-Request-Id': 'order-42'}, timeout=60)
        kept['answer'] = (r.status_code, r.json().get('code'))
    try:
        assert wait_until(lambda: _node_queue(node) == 0, 30, 0.05)
        thread = threading.Thread(target=keeper)
        thread.start()
        assert wait_until(lambda: _node_queue(node) >= 1, 20, 0.02), 'never accepted'
        body = json.dumps({'inputs': [f'gone {i} {long_text}' for i in range(48)]}).encode()
        with socket.create_connection(('127.0.0.1', bridges.rest_port), timeout=10) as sock:
            sock.sendall(b'POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: '
                         b'application/json\r\nX-Request-Id: order-42\r\n'
                         b'Content-Length: %d\r\n\r\n' % len(body) + body)
            assert wait_until(lambda: _node_queue(node) >= 2, 20, 0.02), 'never accepted'
        thread.join(60)
        assert kept['answer'] == (200, None), kept
    finally:
        bridges.stop(grace_s=1)
        backend.close()


def test_a_grpc_call_cut_off_by_its_deadline_is_counted_timeout(node, sidecar):
    """A gRPC caller whose deadline passes hears DEADLINE_EXCEEDED. The bridge withdraws the
    call's work on the node then (cancel_embed), and the node, answering the withdrawal before
    its own deadline, said CANCELLED: the bridge counted and logged most such calls CANCELLED
    (2-3 of 3 in the prober's runs), out of reach of the TIMEOUT alert and the SLO rules,
    where the in-process server counts TIMEOUT."""
    import grpc
    from prometheus_client import REGISTRY

    from akidb_ros.grpc_api import embedding_pb2 as pb, embedding_pb2_grpc as pb_grpc

    def errors(code):
        return REGISTRY.get_sample_value('akidb_request_errors_total',
                                         {'transport': 'grpc', 'code': code}) or 0.0
    before = (errors('TIMEOUT'), errors('CANCELLED'))
    long_text = ' '.join(['word'] * 200)
    inputs = [f'{i} {long_text}' for i in range(64)]      # seconds of node work here
    assert wait_until(lambda: _node_queue(node) == 0, 30, 0.05)
    with grpc.insecure_channel(f'127.0.0.1:{sidecar.grpc_port}') as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as ei:
                stub.Embed(pb.EmbedRequest(inputs=inputs), timeout=0.3)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: errors('TIMEOUT') == before[0] + 3, 10, 0.05), \
        (errors('TIMEOUT') - before[0], errors('CANCELLED') - before[1])
    assert errors('CANCELLED') == before[1]
    # the work was withdrawn on the node all the same
    assert wait_until(lambda: _node_queue(node) == 0, 10, 0.05)
