"""Start-up and shutdown of the node: cold start, SIGINT/SIGTERM when idle, SIGTERM under load."""
import signal
import threading
import time

import pytest
from ros_support import NodeProcess

from akidb_ros.ros.cli import EmbeddingClient
from akidb_ros.ros.loadgen import ConcurrentCaller
from akidb_ros.srv import Embed

COLD_START_LIMIT_S = 10.0      # PRD: cold start to ready on the default model
IDLE_STOP_LIMIT_S = 1.0        # PRD: exit within 1 s of SIGINT/SIGTERM when idle


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_cold_start_then_idle_signal_exits_0_within_1s(sig):
    t0 = time.monotonic()
    ns = f'/cold_{sig.name.lower()}'
    node = NodeProcess(namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_cold_client') as c:
            resp = c.embed(['first call after a cold start'], timeout_s=60)
            cold_s = time.monotonic() - t0
            assert resp.success, resp.message
            ready_s = node.wait_ready(timeout=5)
        print(f'\ncold start: ready line {ready_s:.2f} s, first answer {cold_s:.2f} s')
        assert cold_s < COLD_START_LIMIT_S, node.output
        t_sig = time.monotonic()
        node.send(sig)
        rc = node.wait_exit(timeout=10)
        stop_s = time.monotonic() - t_sig
        print(f'idle {sig.name} -> exit {rc} in {stop_s:.2f} s')
        assert rc == 0, node.output
        assert stop_s < IDLE_STOP_LIMIT_S, node.output
        assert f'{sig.name}: stopped' in node.output
    finally:
        node.stop()


def test_sigterm_under_load_answers_every_accepted_call():
    """16 clients keep calling; SIGTERM: every call the node received gets an answer (its
    result, or UNAVAILABLE once it stops taking calls), the node exits 0."""
    node = NodeProcess(namespace='/term')
    node.wait_ready()
    texts = ['The robot reached waypoint %d and is waiting for the next goal from the planner.'
             % i for i in range(4)]
    warmed = threading.Event()
    stop = threading.Event()
    issued = [0]
    answered = set()

    def make_request(i, seq):
        # Closed loop: call seq of client i follows the answer to its call seq - 1. SIGTERM
        # waits until every client has had an answer: a first request can still be in the DDS
        # first-contact window (re-sent after 0.5 s, akidb_ros.ros.first_contact) and one that
        # never reached the node was not accepted by it - its copy would find the node gone
        # (seen once in CI: 4 clients' first calls, the node counting 60 of 64).
        issued[0] += 1
        if seq >= 1:
            answered.add(i)
        if issued[0] >= 64 and len(answered) == 16:
            warmed.set()
        return Embed.Request(inputs=texts)

    try:
        with ConcurrentCaller(16, namespace='/term', node_name='akidb_term_load') as lg:
            assert lg.wait_ready(30)
            out = []
            runner = threading.Thread(
                target=lambda: out.extend(lg.run(make_request, stop=stop, timeout_s=30)))
            runner.start()
            assert warmed.wait(timeout=60), 'the load never got going'
            t_sig = time.perf_counter()
            node.send(signal.SIGTERM)
            stop.set()                  # no new calls from here; those in flight must land
            runner.join(timeout=60)
            rc = node.wait_exit(timeout=30)
        assert not runner.is_alive()
        assert rc == 0, node.output
        lost = [r for r in out if r.response is None]
        # the node's log says whether a reply was dropped and given up, or never sent
        assert not lost, (f'{len(lost)} of {len(out)} calls got no answer (clients '
                          f'{sorted({r.client for r in lost})}); node log:\n{node.output[-4000:]}')
        codes = {r.response.error_code for r in out if not r.response.success}
        assert codes <= {'UNAVAILABLE'}, codes
        ok = [r for r in out if r.response.success]
        assert all(len(r.response.embeddings) == 4 and r.response.dimension == 384 for r in ok)
        # calls in flight when the signal arrived were finished, not dropped
        finished_after = [r for r in ok if r.t_done > t_sig]
        assert finished_after, 'no call in flight at SIGTERM was answered with its result'
        print(f'\nSIGTERM under load: {len(out)} calls, {len(ok)} ok, '
              f'{len(finished_after)} finished after the signal, {len(out) - len(ok)} refused')
        assert 'SIGTERM: stopped' in node.output
    finally:
        stop.set()
        node.stop()


def test_out_of_range_parameter_at_start_is_refused():
    node = NodeProcess('-p', 'batching.max_batch_size:=5000', namespace='/badparam')
    try:
        rc = node.wait_exit(timeout=30)
        assert rc == 2, node.output
        assert 'batching.max_batch_size' in node.output
        assert not node.ready.is_set()
    finally:
        node.stop()


def test_in_process_node_serves_a_shared_engine():
    """akidb_ros.server --mode inprocess hosts the node on its engine (start_in_process)."""
    from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config
    from akidb_ros.ros.node import start_in_process

    with EmbeddingEngine(load_config()) as engine:
        engine.start()
        handle = start_in_process(engine, args=[], namespace='/inproc')
        try:
            with EmbeddingClient('/inproc', node_name='akidb_inproc_client') as c:
                # The node must have discovered the client's reply reader before it answers:
                # rmw_fastrtps waits only 100 ms for that match, then drops the reply with a
                # warning ("failed to send response (timeout)"), a first-contact race that a
                # busy 2-core machine hit once. wait_for_service only covers the other direction.
                deadline = time.monotonic() + 20
                while handle.node.count_clients('/inproc/embed') < 1 and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
                resp = c.embed(['shared engine'], timeout_s=30)
            assert resp.success and resp.dimension == 384
        finally:
            handle.stop()
        # the node is gone, the engine (owned by the caller) still serves
        assert not engine.closed
        assert engine.embed(EmbedRequest(inputs=['still here'])).embeddings.shape == (1, 384)


def test_invalid_device_in_params_is_refused_at_start():
    node = NodeProcess('-p', 'device:=gpu', namespace='/baddevice')
    try:
        rc = node.wait_exit(timeout=30)
        assert rc == 2 and 'device must be one of' in node.output, node.output
    finally:
        node.stop()


def test_multi_threaded_executor_variant_serves_concurrent_calls():
    """executor:=multi_threaded (the non-default executor) answers 16 concurrent clients too."""
    node = NodeProcess('-p', 'executor:=multi_threaded', namespace='/multi')
    try:
        node.wait_ready()
        with ConcurrentCaller(16, namespace='/multi', node_name='akidb_multi_load') as lg:
            assert lg.wait_ready(30)
            recs = lg.run(lambda i, seq: Embed.Request(inputs=['multi %d' % (i % 4)]),
                          calls_per_client=3, timeout_s=60)
        assert len(recs) == 48 and all(r.response and r.response.success for r in recs)
        by_text = {}
        for r in recs:
            vec = list(r.response.embeddings[0].values)
            by_text.setdefault(r.request.inputs[0], []).append(vec)
        for vecs in by_text.values():
            assert max(abs(a - b) for v in vecs for a, b in zip(v, vecs[0])) <= 1e-5
        node.send(signal.SIGINT)
        assert node.wait_exit(timeout=10) == 0, node.output
    finally:
        node.stop()


def test_default_model_that_cannot_load_fails_configure_and_exits_1():
    node = NodeProcess('-p', 'default_model:=e5-small-v2', namespace='/noload')  # not installed
    try:
        rc = node.wait_exit(timeout=60)
        assert rc == 1, node.output
        assert 'configure failed' in node.output and 'e5-small-v2' in node.output
    finally:
        node.stop()


def test_traceparent_is_continued_by_the_node():
    """A request's W3C traceparent becomes the parent of the node's 'ros /embed' span."""
    trace_id, parent = 'ab' * 16, 'cd' * 8
    node = NodeProcess(namespace='/traced', env={'OTEL_TRACES_EXPORTER': 'console',
                                                 'OTEL_BSP_SCHEDULE_DELAY': '50'})
    try:
        node.wait_ready()
        with EmbeddingClient('/traced', node_name='akidb_traced_client') as c:
            resp = c.call('embed', Embed.Request(inputs=['traced'], request_id='req-42',
                                                 traceparent=f'00-{trace_id}-{parent}-01'))
            assert resp.success, resp.message
        node.send(signal.SIGINT)
        assert node.wait_exit(timeout=10) == 0
        out = node.output
        assert '"name": "ros /embed"' in out and f'"trace_id": "0x{trace_id}"' in out, out
        assert f'"parent_id": "0x{parent}"' in out and 'req-42' in out
    finally:
        node.stop()
