"""The embedding node over real DDS: the node runs in its own process (fixture ``node``)."""
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from ros_support import call, metric_value, NS, ROOT, scrape
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile

from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config
from akidb_ros.ros.conversions import embeddings_from_response
from akidb_ros.ros.loadgen import ConcurrentCaller
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

DEFAULT = 'all-minilm-l6-v2'
MPNET = 'all-mpnet-base-v2'
SENTENCES = [
    'The robot picked up the red cup.',
    'Navigation stack lost localisation near the charging dock.',
    'hello',
    'A quick brown fox jumps over the lazy dog while the battery drains slowly.',
    'Gripper force exceeded the safety threshold.',
    'Where is the kitchen?',
    'LIDAR returns are sparse on glass surfaces, so mapping the atrium takes longer.',
    'ok',
    'Embeddings turn text into vectors.',
    'Obstacle detected at 0.4 metres, slowing down.',
    'The arm completed 120 pick-and-place cycles without a fault.',
    'Please bring me the blue toolbox from the workshop on the second floor.',
    'Temperature of motor 3 is 71 degrees.',
    'Unit tests passed.',
    'Semantic search over robot logs finds similar incidents across the fleet quickly.',
    'Stop.',
]


def embed(client, inputs, **kw):
    return client.embed(inputs, **kw)


def test_embed_returns_one_unit_vector_per_input(client):
    resp = embed(client, SENTENCES[:3])
    assert resp.success, resp.message
    assert (resp.error_code, resp.message) == ('', '')
    assert resp.model == DEFAULT and resp.dimension == 384
    vecs = embeddings_from_response(resp)
    assert vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert resp.total_tokens > 3 and resp.truncated_inputs == 0 and resp.duration_ms > 0
    # input order: the single-input calls give the same rows
    for i, text in enumerate(SENTENCES[:3]):
        one = embeddings_from_response(embed(client, [text]))[0]
        assert np.abs(one - vecs[i]).max() <= 1e-5


def test_vectors_equal_the_engine_in_process(client):
    """The DDS door adds nothing: same vectors as engine.embed() in this process."""
    with EmbeddingEngine(load_config()) as engine:
        engine.start()
        ref = engine.embed(EmbedRequest(inputs=SENTENCES[:4])).embeddings
        raw = engine.embed(EmbedRequest(inputs=SENTENCES[:2], normalize=False)).embeddings
    got = embeddings_from_response(embed(client, SENTENCES[:4]))
    assert np.abs(got - ref).max() <= 1e-5
    got_raw = embeddings_from_response(embed(client, SENTENCES[:2], normalize=False))
    assert np.abs(got_raw - raw).max() <= 1e-5
    assert abs(np.linalg.norm(got_raw[0]) - 1.0) > 1e-3    # normalize=false really is raw


def test_list_models(client):
    resp = call(client, ListModels, 'list_models', ListModels.Request())
    by_id = {m.id: m for m in resp.models}
    assert resp.default_model == DEFAULT
    d = by_id[DEFAULT]
    assert (d.status, d.dimension, d.is_default) == ('loaded', 384, True)
    assert d.provider and d.max_tokens == 256 and d.params > 0 and d.memory_mb > 0
    assert d.name == 'sentence-transformers/all-MiniLM-L6-v2'
    assert by_id[MPNET].dimension == 768 and not by_id[MPNET].is_default
    assert by_id[MPNET].status in ('available', 'loaded')
    assert {m.status for m in resp.models} <= {'loaded', 'available', 'loading', 'failed',
                                               'unavailable'}


def test_load_embed_unload_mpnet(client):
    resp = call(client, LoadModel, 'load_model', LoadModel.Request(model=MPNET), timeout=120)
    assert resp.success, f'{resp.error_code}: {resp.message}'
    info = resp.model_info
    assert (info.id, info.status, info.dimension) == (MPNET, 'loaded', 768)
    out = embed(client, ['a sentence for the bigger model'], model=MPNET, timeout_s=60)
    assert out.success and out.model == MPNET and out.dimension == 768
    assert len(out.embeddings[0].values) == 768
    listed = {m.id: m.status for m in call(client, ListModels, 'list_models',
                                           ListModels.Request()).models}
    assert listed[MPNET] == 'loaded'
    resp = call(client, UnloadModel, 'unload_model', UnloadModel.Request(model=MPNET),
                timeout=60)
    assert resp.success, resp.message
    assert resp.model_info.status == 'available'
    listed = {m.id: m.status for m in call(client, ListModels, 'list_models',
                                           ListModels.Request()).models}
    assert listed[MPNET] == 'available' and listed[DEFAULT] == 'loaded'


def test_embed_on_a_cold_model_does_not_hold_the_node(client):
    """The model loads on a pool thread: the node answers other calls meanwhile ('loading')."""
    call(client, UnloadModel, 'unload_model', UnloadModel.Request(model=MPNET), timeout=60)
    fut = client.clients['embed'].call_async(Embed.Request(model=MPNET, inputs=['cold model']))
    seen = []
    deadline = time.monotonic() + 60
    while not fut.done() and time.monotonic() < deadline:
        listed = {m.id: m.status for m in client.call('list_models', ListModels.Request()).models}
        seen.append((listed[MPNET], fut.done()))
    client.executor.spin_until_future_complete(fut, timeout_sec=60)
    resp = fut.result()
    assert resp.success and resp.dimension == 768, resp.message
    # list_models was answered while the embed call waited for its model
    assert ('loading', False) in seen, seen
    call(client, UnloadModel, 'unload_model', UnloadModel.Request(model=MPNET), timeout=60)


@pytest.mark.parametrize('srv,name', [(LoadModel, 'load_model'), (UnloadModel, 'unload_model')])
@pytest.mark.parametrize('model,code', [('no-such-model', 'MODEL_NOT_FOUND'),
                                        ('', 'INVALID_INPUT')])
def test_load_unload_errors(client, srv, name, model, code):
    resp = call(client, srv, name, srv.Request(model=model))
    assert not resp.success
    assert resp.error_code == code and resp.message


def test_load_uninstalled_model_fails_cleanly(client):
    resp = call(client, LoadModel, 'load_model', LoadModel.Request(model='e5-small-v2'))
    assert not resp.success and resp.error_code in ('MODEL_UNAVAILABLE', 'MODEL_LOAD_FAILED')


LONG = ' '.join(['word'] * 600)     # > 256 tokens of all-MiniLM-L6-v2


@pytest.mark.parametrize('inputs,kw,code', [
    ([], {}, 'INVALID_INPUT'),
    ([''], {}, 'INVALID_INPUT'),
    (['ok', '   '], {}, 'INVALID_INPUT'),
    (['hello'], {'model': 'no-such-model'}, 'MODEL_NOT_FOUND'),
    (['x' * 40000], {}, 'INPUT_TOO_LARGE'),
    (['hi'] * 257, {}, 'INPUT_TOO_LARGE'),
    ([LONG], {'truncate': False}, 'INPUT_TOO_LONG'),
    (['hello'], {'input_type': 'question'}, 'INVALID_INPUT'),
    # exact, as REST's schema takes it (the node served 'QUERY' that REST refused)
    (['hello'], {'input_type': 'QUERY'}, 'INVALID_INPUT'),
    (['hello'], {'input_type': ' query '}, 'INVALID_INPUT'),
    # the same answers as REST, gRPC and the engine: a model name is taken as sent, the count
    # comes first, a text the tokenizer reduces to nothing is refused like a blank one
    (['hello'], {'model': ' ' + DEFAULT}, 'MODEL_NOT_FOUND'),
    (['hi'] * 299 + [''], {}, 'INPUT_TOO_LARGE'),
    (['ok', '\u0301\u0308'], {}, 'INVALID_INPUT'),
], ids=['empty-list', 'empty-string', 'blank-string', 'unknown-model', 'oversized-input',
        'too-many-inputs', 'too-long-no-truncate', 'bad-input-type', 'input-type-upper-case',
        'input-type-padded', 'model-with-a-space',
        'count-first', 'tokenises-to-nothing'])
def test_bad_input_answered_with_its_code(client, inputs, kw, code):
    resp = embed(client, inputs, **kw)
    assert not resp.success
    assert resp.error_code == code, resp.message
    assert resp.message and len(resp.embeddings) == 0
    assert resp.retry_after_s == 0.0        # a caller's mistake: no retry hint


def test_a_name_the_catalogue_lacks_is_labelled_unknown(client, metrics_port):
    """The node stripped the name before labelling it: ' all-minilm-l6-v2' (MODEL_NOT_FOUND,
    the name taken as sent) was counted as an error of the default model, on its error-rate
    and SLO series; REST and the sidecar label it 'unknown'."""
    def errors(model):
        return metric_value(scrape(metrics_port), 'akidb_embed_requests_total',
                            f'model="{model}",status="error",transport="ros"')
    before = (errors(DEFAULT), errors('unknown'))
    resp = embed(client, ['hello'], model=' ' + DEFAULT)
    assert resp.error_code == 'MODEL_NOT_FOUND'
    assert (errors(DEFAULT), errors('unknown')) == (before[0], before[1] + 1)


def test_a_timeout_carries_the_engines_retry_hint(client):
    """retry_after_s: what the in-process doors send as Retry-After, so a sidecar can too."""
    resp = client.call('embed', Embed.Request(inputs=['word ' * 200] * 64, timeout_s=0.001,
                                              normalize=True, truncate=True))
    assert (resp.success, resp.error_code, resp.retry_after_s) == (False, 'TIMEOUT', 1.0)


def test_a_ros_client_cannot_send_a_nul(client):
    """rosidl sends a string up to its first NUL, silently: the node gets the cut text and
    cannot tell (documented; the sidecar bridge refuses such a text before the DDS hop)."""
    # a raw request (EmbeddingClient.embed refuses the NUL: test below)
    cut = client.call('embed', Embed.Request(
        inputs=['Go to the kitchen\x00 and bring me the red cup'], normalize=True, truncate=True))
    whole = embed(client, ['Go to the kitchen'])
    assert cut.success and whole.success
    assert cut.total_tokens == whole.total_tokens
    assert np.abs(embeddings_from_response(cut) - embeddings_from_response(whole)).max() == 0


def test_negative_timeout_refused(client):
    resp = client.call('embed', Embed.Request(inputs=['hi'], timeout_s=-1.0))
    assert (resp.success, resp.error_code) == (False, 'INVALID_INPUT')


def test_long_input_truncated_by_default(client):
    resp = embed(client, [LONG, 'short'])
    assert resp.success and resp.truncated_inputs == 1 and len(resp.embeddings) == 2


def _probe_during_large_call(client, big):
    """Send ``big``; call list_models meanwhile. Returns (response, answers inside the window
    the node spent on ``big``, note for a failure message)."""
    fut = client.clients['embed'].call_async(big)
    answered_at = []
    fut.add_done_callback(lambda f: answered_at.append(time.perf_counter()))
    probes = []                 # when each list_models answer came back
    deadline = time.monotonic() + 120
    while not fut.done() and time.monotonic() < deadline:
        client.call('list_models', ListModels.Request(), timeout_s=60)
        probes.append(time.perf_counter())
    client.executor.spin_until_future_complete(fut, timeout_sec=120)
    resp = fut.result()
    # The node spent duration_ms on the call, nearly all of it tokenising; list_models calls
    # answered inside that window show the executor was free.
    busy_s = resp.duration_ms / 1000.0
    start, end = answered_at[0] - busy_s + 0.05, answered_at[0] - 0.05
    during = [t for t in probes if start <= t <= end]
    gaps = sorted(((round(b - a, 3), round(a - answered_at[0], 3))
                   for a, b in zip(probes, probes[1:])), reverse=True)[:3]
    return resp, len(during), (f'{len(during)} list_models answered during the {busy_s:.2f} s '
                               f'the node spent on the large call ({len(probes)} in all; '
                               f'longest gaps (s, start relative to its answer): {gaps})')


def test_a_call_withdrawn_on_cancel_embed_drops_its_work_and_is_answered_cancelled(
        client, metrics_port):
    """A caller that gave up publishes its call's request id on ``cancel_embed`` (a ROS
    service call cannot be withdrawn): the node drops the engine work (the queue empties long
    before the work would have ended) and answers the call CANCELLED."""
    from std_msgs.msg import String
    embed(client, ['warm'])                 # answered once: no first-contact copies
    pub = client.node.create_publisher(String, f'{NS}/cancel_embed', 10)
    long_text = ' '.join(['word'] * 300)    # 96 x 256 tokens: seconds of work here
    queue = lambda: metric_value(scrape(metrics_port), 'akidb_queue_size')   # noqa: E731
    try:
        assert _wait(lambda: pub.get_subscription_count() >= 1, 10), 'node not subscribed'
        fut = client.clients['embed'].call_async(Embed.Request(
            inputs=[f'{i} {long_text}' for i in range(96)], request_id='withdraw-me',
            timeout_s=60.0))
        assert _wait(lambda: queue() >= 1, 10), 'the call was never accepted'
        t0 = time.monotonic()
        pub.publish(String(data='someone-else'))      # an unknown id: left alone
        pub.publish(String(data='withdraw-me'))
        client.executor.spin_until_future_complete(fut, timeout_sec=30)
        resp = fut.result()
        assert (resp.success, resp.error_code) == (False, 'CANCELLED'), resp.message
        assert time.monotonic() - t0 < 3.0 and _wait(lambda: queue() == 0, 3)
        assert embed(client, ['after the cancel']).success
    finally:
        client.node.destroy_publisher(pub)


def _wait(cond, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_a_large_call_does_not_hold_the_node(client):
    """A large call (256 x 8,000 characters) is tokenised off the executor: the node answers
    other calls meanwhile (tokenised on the executor, it held every service: a legal
    256 x 32,000-character call for ~1.7 s)."""
    # an answered call first: a client's first request is sent again after 0.5 s if unanswered
    # (first_contact.py), and each copy of this one is 2 MB for the client to send
    assert embed(client, ['warm']).success
    assert client.call('list_models', ListModels.Request()).models
    big = Embed.Request(inputs=['word ' * 1600] * 256, truncate=False, timeout_s=120.0)
    notes = []
    # A second try only where the first saw too few answers: on a loaded machine the request's
    # UDP burst has cost a list_models datagram and a ~3 s repair, whoever tokenised it. A node
    # that tokenises on its executor answers none in the window, every time.
    for _ in range(2):
        resp, during, note = _probe_during_large_call(client, big)
        # every input was tokenised (none fits 256 tokens), then the call failed: no inference
        assert (resp.success, resp.error_code) == (False, 'INPUT_TOO_LONG'), resp.message
        assert resp.duration_ms > 150, f'the call took {resp.duration_ms:.0f} ms: too fast'
        notes.append(note)
        if during >= 10:
            break
    assert during >= 10, notes


def test_failed_calls_are_logged_with_their_request_id(client, node):
    """request_id is echoed into the node's log: failures at their code's level (INFO for a
    caller's mistake), successes only at DEBUG (not at the default INFO level)."""
    bad = client.call('embed', Embed.Request(inputs=['   '], request_id='rid-bad-7'))
    assert bad.error_code == 'INVALID_INPUT'
    assert client.call('embed', Embed.Request(inputs=['hi'], request_id='rid-ok-7')).success
    deadline = time.monotonic() + 10
    while not any('rid-bad-7' in ln for ln in node.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [ln for ln in node.lines if 'rid-bad-7' in ln]
    rec = json.loads(line)      # the node's lines are JSON on stderr (AKIDB_LOG_FORMAT)
    assert rec['level'] == 'info' and rec['msg'].startswith('embed failed'), line
    assert "model='(default)'" in line and 'code=INVALID_INPUT' in line, line
    assert re.search(r'latency_ms=\d+\.\d', line), line
    assert not any('rid-ok-7' in ln for ln in node.lines)


def test_concurrent_clients_match_single_calls_and_batch(client, metrics_port):
    """16 clients at once get the same vectors as single calls, and the engine batches them."""
    single = {s: embeddings_from_response(embed(client, [s]))[0] for s in SENTENCES}
    before = scrape(metrics_port)
    with ConcurrentCaller(16, namespace=NS) as lg:
        assert lg.wait_ready(30)
        recs = lg.run(lambda i, seq: Embed.Request(inputs=[SENTENCES[i]]), calls_per_client=4,
                      timeout_s=60)
    after = scrape(metrics_port)
    assert len(recs) == 64
    # each call got its own request id (the node joins in-flight copies by it)
    assert len({r.request.request_id for r in recs}) == 64 and all(
        r.request.request_id.startswith('loadgen-') for r in recs)
    worst = 0.0
    for r in recs:
        assert r.response is not None, 'a call got no answer'
        assert r.response.success, r.response.message
        v = np.asarray(r.response.embeddings[0].values, dtype=np.float32)
        worst = max(worst, float(np.abs(v - single[SENTENCES[r.client]]).max()))
    assert worst <= 1e-5
    lbl = f'model="{DEFAULT}"'
    n = metric_value(after, 'akidb_batch_size_count', lbl) - \
        metric_value(before, 'akidb_batch_size_count', lbl)
    s = metric_value(after, 'akidb_batch_size_sum', lbl) - \
        metric_value(before, 'akidb_batch_size_sum', lbl)
    assert n > 0 and s == 64
    assert s / n > 1.5, f'concurrent calls were not batched: {s / n:.2f} sentences/batch'
    ros_ok = metric_value(after, 'akidb_embed_requests_total', 'status="success",transport="ros"')
    assert ros_ok >= 64


def _computed_sentences(metrics_port, run) -> float:
    """Sentences the node's engine ran (its batch-size sum) while ``run()`` ran."""
    lbl = f'model="{DEFAULT}"'
    before = metric_value(scrape(metrics_port), 'akidb_batch_size_sum', lbl)
    run()
    time.sleep(0.3)         # a copy that joined nothing may still be running
    return metric_value(scrape(metrics_port), 'akidb_batch_size_sum', lbl) - before


def test_copies_of_a_call_in_flight_run_once(client, metrics_port):
    """A client re-sends a slow first call (first_contact); copies carry its request id. Four
    identical calls with one request id, in flight together, are computed once, counted once
    (the copies were each counted in the request and latency metrics: a new client's slow
    first call was 3 requests) and all answered with the same vectors; without a request id
    each is computed and counted."""
    texts = [f'copy {i}: ' + 'the robot crosses the loading dock again ' * 24 for i in range(12)]
    got = {}
    ok, seen = 'status="success",transport="ros"', 'transport="ros"'

    def counted():
        text = scrape(metrics_port)
        return (metric_value(text, 'akidb_embed_requests_total', ok),
                metric_value(text, 'akidb_embed_latency_seconds_count', seen))
    with ConcurrentCaller(4, namespace=NS) as lg:
        assert lg.wait_ready(30)
        for rid in ('copies-1', ''):
            def run(rid=rid):
                # a budget of its own: 4 x 12 long inputs at once outlast the default 5 s on
                # a busy 2-core machine
                got[rid] = lg.run(
                    lambda i, seq: Embed.Request(inputs=texts, request_id=rid, timeout_s=30.0),
                    calls_per_client=1, timeout_s=60)
            before = counted()
            got[rid + 'computed'] = _computed_sentences(metrics_port, run)
            got[rid + 'counted'] = [b - a for a, b in zip(before, counted())]
    for rid in ('copies-1', ''):
        assert len(got[rid]) == 4 and all(r.response is not None and r.response.success
                                          for r in got[rid]), [r.response for r in got[rid]]
    assert got['copies-1counted'] == [1, 1] and got['counted'] == [4, 4], got
    vectors = [embeddings_from_response(r.response) for r in got['copies-1']]
    assert all(np.array_equal(v, vectors[0]) for v in vectors)
    assert got['copies-1computed'] == len(texts)
    assert got['computed'] >= 4 * len(texts)


def test_a_reply_the_client_cannot_receive_is_resent_then_reported(client, node, metrics_port):
    """rmw_fastrtps drops a reply whose client reader is not matched: the node re-sends it, then
    logs and counts it; other callers are served meanwhile.

    The client asks for TRANSIENT_LOCAL replies, which the node's VOLATILE reply writer can never
    match; its TRANSIENT_LOCAL request is still delivered. (First contact, where discovery is
    merely late, is the same drop; the retry then gets through: see test_replies.py.)
    """
    (res,) = _set(client, resend_window_s=0.5)
    assert res.successful
    name = f'{NS}/embed'
    label = f'service="{name}"'
    before = metric_value(scrape(metrics_port), 'akidb_ros_replies_undelivered_total', label)
    deaf = client.node.create_client(
        Embed, name, qos_profile=QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    try:
        fut = deaf.call_async(Embed.Request(inputs=['nobody hears this']))
        assert embed(client, ['hello']).success         # others are served meanwhile
        deadline = time.monotonic() + 15
        while 'reply not delivered' not in node.output and time.monotonic() < deadline:
            client.executor.spin_once(timeout_sec=0.1)
        given_up = [ln for ln in node.lines if 'reply not delivered' in ln]
        assert given_up, node.output[-3000:]
        tries = int(re.search(r'after (\d+) tries', given_up[-1]).group(1))
        assert tries >= 3, given_up[-1]                 # re-sent, with backoff, then given up
        assert name in given_up[-1]
        after = metric_value(scrape(metrics_port), 'akidb_ros_replies_undelivered_total', label)
        assert after == before + 1
        assert not fut.done()
        assert embed(client, ['hello again']).success
    finally:
        client.node.destroy_client(deaf)
        _set(client, resend_window_s=2.0)


def test_diagnostics(client):
    got = threading.Event()
    seen = []

    def on_msg(msg):
        for st in msg.status:
            if st.name.startswith(f'{NS}/embedding_node'):
                seen.append(st)
                got.set()
    sub = client.node.create_subscription(DiagnosticArray, '/diagnostics', on_msg, 10)
    try:
        deadline_spins = 0
        while not got.is_set() and deadline_spins < 100:
            client.executor.spin_once(timeout_sec=0.1)
            deadline_spins += 1
    finally:
        client.node.destroy_subscription(sub)
    assert seen, 'no /diagnostics from the node'
    st = seen[-1]
    values = {kv.key: kv.value for kv in st.values}
    assert st.level == st.OK, st.message
    assert values['default_model'] == DEFAULT and values['provider']
    assert int(values['queue_size']) >= 0 and int(values['queue_capacity']) > 0
    assert values['serving'] == 'true' and values['embed_servers'] == '1'


def test_a_misspelt_parameter_is_warned_about():
    """rclpy ignores an override the node never declares: a typo kept the default silently."""
    from ros_support import NodeProcess
    node = NodeProcess('-p', 'batching.max_batch_sise:=4', '-p', 'diagnostics_period_s:=0.0',
                       namespace='/typo')
    try:
        node.wait_ready()
    finally:
        node.stop()
    assert 'unknown parameter(s) ignored: batching.max_batch_sise' in node.output, node.output
    assert 'use_sim_time' not in node.output


@pytest.mark.parametrize('remap', ['', 'my_embed'])
def test_a_second_node_in_the_same_namespace_is_reported(remap):
    """Two nodes serving one namespace answer calls at random with no error: each says so
    (a warning in its log, WARN on /diagnostics with embed_servers=2), also when the service
    is renamed (-r embed:=my_embed; the count once looked for the unrenamed name)."""
    from ros_support import NodeProcess
    ns = f'/twins_{remap or "plain"}'
    extra = ('-r', f'embed:={remap}') if remap else ()
    nodes = [NodeProcess('-p', 'diagnostics_period_s:=0.5', *extra, namespace=ns)
             for _ in range(2)]
    try:
        for n in nodes:
            n.wait_ready()
        end = time.monotonic() + 20
        while not all(f'2 servers of {ns}/{remap or "embed"}' in n.output for n in nodes):
            assert time.monotonic() < end, nodes[0].output[-2000:]
            time.sleep(0.2)
    finally:
        for n in nodes:
            n.stop()


def _set(client, **params):
    req = SetParameters.Request(parameters=[
        Parameter(k.replace('__', '.'), value=v).to_parameter_msg() for k, v in params.items()])
    return call(client, SetParameters, 'embedding_node/set_parameters', req).results


@pytest.mark.parametrize('name,value', [
    ('batching__max_batch_size', 5000), ('batching__max_batch_size', -3),
    ('diagnostics_period_s', -1.0), ('diagnostics_period_s', 1e-6),
    ('diagnostics_period_s', 0.05), ('queue__capacity', 2_000_000),
    ('batching__max_wait_ms', 5000.0), ('resend_window_s', 100.0)])
def test_out_of_range_parameter_refused(client, name, value):
    (res,) = _set(client, **{name: value})
    assert not res.successful
    assert 'range' in res.reason.lower() or 'read-only' in res.reason.lower(), res.reason


def test_parameter_checks(client):
    (res,) = _set(client, qos_depth=200)
    assert not res.successful and 'read-only' in res.reason.lower()
    (res,) = _set(client, device='gpu')
    assert not res.successful and 'device' in res.reason
    # inside the descriptor's range (-1 = keep the file value) but below the engine's minimum
    (res,) = _set(client, batching__max_wait_ms=-0.5)
    assert not res.successful and 'range 0..' in res.reason, res.reason
    (res,) = _set(client, batching__max_wait_ms=-1.0)
    assert res.successful
    (res,) = _set(client, batching__max_batch_size=16)      # in range: accepted
    assert res.successful
    (res,) = _set(client, diagnostics_period_s=0.0)          # 0 = off
    assert res.successful
    (res,) = _set(client, diagnostics_period_s=1.0)
    assert res.successful
    got = call(client, GetParameters, 'embedding_node/get_parameters',
               GetParameters.Request(names=['batching.max_batch_size', 'qos_depth']))
    assert got.values[0].type == ParameterType.PARAMETER_INTEGER
    assert [v.integer_value for v in got.values] == [16, 1000]
    _set(client, batching__max_batch_size=0)


def _state(client) -> int:
    return call(client, GetState, 'embedding_node/get_state',
                GetState.Request()).current_state.id


def test_lifecycle_deactivate_refuses_activate_serves(client):
    assert _state(client) == State.PRIMARY_STATE_ACTIVE
    res = call(client, ChangeState, 'embedding_node/change_state',
               ChangeState.Request(transition=Transition(id=Transition.TRANSITION_DEACTIVATE)))
    assert res.success
    try:
        assert _state(client) == State.PRIMARY_STATE_INACTIVE
        resp = embed(client, ['hello'])
        assert (resp.success, resp.error_code) == (False, 'UNAVAILABLE')
        # list_models says so (a sidecar bridge's health and readiness follow it)
        listed = call(client, ListModels, 'list_models', ListModels.Request())
        assert listed.node_state == 'inactive' and listed.default_model == DEFAULT
    finally:
        res = call(client, ChangeState, 'embedding_node/change_state',
                   ChangeState.Request(transition=Transition(id=Transition.TRANSITION_ACTIVATE)))
    assert res.success and _state(client) == State.PRIMARY_STATE_ACTIVE
    assert embed(client, ['hello']).success
    assert call(client, ListModels, 'list_models', ListModels.Request()).node_state == 'active'


def _cli(*args):
    code = 'import sys; from akidb_ros.ros.cli import {0}; sys.exit({0}())'
    fn = 'models_main' if args and args[0] == 'models' else 'embed_main'
    argv = args[1:] if args and args[0] == 'models' else args
    if '--namespace' not in argv:
        argv = (*argv, '--namespace', NS)
    return subprocess.run([sys.executable, '-c', code.format(fn), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_embed_and_models(client):
    p = _cli('hello', 'Where is the kitchen?', '--json')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out['dimension'] == 384 and len(out['embeddings']) == 2
    single = embeddings_from_response(embed(client, ['Where is the kitchen?']))[0]
    assert np.abs(np.asarray(out['embeddings'][1], np.float32) - single).max() <= 1e-5
    p = _cli('hello')
    assert p.returncode == 0 and 'dimension 384' in p.stdout
    p = _cli('   ')
    assert p.returncode == 1 and 'INVALID_INPUT' in p.stderr
    p = _cli('models', '--json')
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert listed['default_model'] == DEFAULT
    assert {m['id'] for m in listed['models']} >= {DEFAULT, MPNET}
    p = _cli('models')
    assert p.returncode == 0 and DEFAULT in p.stdout


def test_the_python_client_refuses_a_nul_it_could_not_send(client):
    """rosidl cuts a string at its first NUL: EmbeddingClient says so instead of sending less."""
    with pytest.raises(ValueError, match=r'inputs\[1\] contains U\+0000'):
        client.embed(['fine', 'cut\x00here'])
    with pytest.raises(ValueError, match='model contains U'):
        client.embed(['fine'], model='all-minilm-l6-v2\x00x')


def test_cli_output_into_a_closed_pipe_exits_0(client):
    """`akidb-embed a b c | head -c 10`: the reader left early; no traceback, exit 0."""
    code = 'import sys; from akidb_ros.ros.cli import embed_main; sys.exit(embed_main())'
    proc = subprocess.Popen([sys.executable, '-c', code, 'one', 'two', 'three', '--json',
                             '--namespace', NS], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()             # the reader is gone before the answer is printed
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and 'Traceback' not in err, err


def test_cli_no_node_exits_2(client):
    p = _cli('hello', '--namespace', '/nobody_here', '--timeout', '1')
    assert p.returncode == 2 and 'no node offers /nobody_here/embed' in p.stderr


def test_a_failed_configure_by_a_lifecycle_manager_is_on_diagnostics_with_its_reason():
    """autostart:=false leaves configure to a lifecycle manager; when it fails, the node stays
    unconfigured and /diagnostics says why (ERROR, configure_error) until a configure works
    (it said only 'unconfigured', WARN: the reason was in the node's log alone)."""
    from ros_support import NodeProcess

    from akidb_ros.ros.cli import EmbeddingClient
    ns = '/manual_configure'
    node = NodeProcess('-p', 'autostart:=false', '-p', 'default_model:=no-such-model',
                       '-p', 'diagnostics_period_s:=0.2', namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_lifecycle_manager') as c:
            change = c.node.create_client(ChangeState, f'{ns}/embedding_node/change_state')
            assert change.wait_for_service(timeout_sec=30), node.output

            def transition(tid):
                return call(c, ChangeState, f'{ns}/embedding_node/change_state',
                            ChangeState.Request(transition=Transition(id=tid)), timeout=60)

            def latest_status(want):
                seen = []

                def on_msg(msg):
                    seen.extend(st for st in msg.status
                                if st.name.startswith(f'{ns}/embedding_node'))
                sub = c.node.create_subscription(DiagnosticArray, '/diagnostics', on_msg, 10)
                try:
                    end = time.monotonic() + 15
                    while not (seen and want(seen[-1])) and time.monotonic() < end:
                        c.executor.spin_once(timeout_sec=0.1)
                finally:
                    c.node.destroy_subscription(sub)
                assert seen, node.output[-2000:]
                return seen[-1], {kv.key: kv.value for kv in seen[-1].values}

            st, values = latest_status(lambda s: True)
            assert (st.level, st.message) == (st.WARN, 'unconfigured')
            assert not transition(Transition.TRANSITION_CONFIGURE).success
            st, values = latest_status(lambda s: s.level == s.ERROR)
            assert st.level == st.ERROR and st.message.startswith('configure failed: ')
            assert 'no-such-model' in values['configure_error'], values
            # the manager fixes the parameter and configures again: the error is gone
            (res,) = call(c, SetParameters, f'{ns}/embedding_node/set_parameters',
                          SetParameters.Request(parameters=[
                              Parameter('default_model', value='').to_parameter_msg()])).results
            assert res.successful, res.reason
            assert transition(Transition.TRANSITION_CONFIGURE).success
            st, values = latest_status(lambda s: s.message == 'inactive')
            assert st.level == st.WARN and 'configure_error' not in values
            assert values['default_model'] == DEFAULT
    finally:
        node.stop()


def test_a_configure_by_a_lifecycle_manager_does_not_hold_the_node():
    """configure loads and warms the models (seconds; minutes for a first TensorRT build). It
    ran inside rclpy's change_state callback on the executor, so until it ended the node
    answered nothing, not even get_state, and /diagnostics went quiet. Now get_state answers
    `configuring` meanwhile, another change_state is refused at once, and configure's own
    reply comes when it ends."""
    from ros_support import NodeProcess

    from akidb_ros.ros.cli import EmbeddingClient
    ns = '/slow_configure'
    node = NodeProcess('-p', 'autostart:=false', '-p', f'preload_models:={MPNET}',
                       '-p', 'diagnostics_period_s:=0.2', namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_slow_configure_manager') as c:
            change = c.node.create_client(ChangeState, f'{ns}/embedding_node/change_state')
            get = c.node.create_client(GetState, f'{ns}/embedding_node/get_state')
            assert change.wait_for_service(timeout_sec=30), node.output
            assert get.wait_for_service(timeout_sec=30), node.output
            diagnostics = []
            c.node.create_subscription(
                DiagnosticArray, '/diagnostics',
                lambda msg: diagnostics.extend(
                    (time.monotonic(), st.message) for st in msg.status
                    if st.name.startswith(f'{ns}/embedding_node')), 10)

            def answer(fut, timeout=60.0):
                c.executor.spin_until_future_complete(fut, timeout_sec=timeout)
                assert fut.done(), node.output[-2000:]
                return fut.result()

            def request(tid):
                return ChangeState.Request(transition=Transition(id=tid))
            configure = change.call_async(request(Transition.TRANSITION_CONFIGURE))
            label = 'unconfigured'
            while label == 'unconfigured':      # until the node has taken the configure
                label = answer(get.call_async(GetState.Request())).current_state.label
            during = time.monotonic()
            assert label == 'configuring' and not configure.done(), label
            refused = answer(change.call_async(request(Transition.TRANSITION_CLEANUP)))
            assert not refused.success and not configure.done()
            # by label too, refused by the node with its own line (the label lookup came
            # first, failed in 'configuring', and rcl_lifecycle logged two warnings instead)
            by_label = ChangeState.Request(transition=Transition(label='cleanup'))
            assert not answer(change.call_async(by_label)).success and not configure.done()
            end = time.monotonic() + 10
            while 'change_state cleanup refused: configure is still running' not in \
                    node.output and time.monotonic() < end:
                time.sleep(0.05)
            assert 'change_state cleanup refused: configure is still running' in node.output, \
                node.output[-2000:]
            assert answer(configure).success, node.output[-2000:]
            ended = time.monotonic()
            assert any(during <= t < ended for t, _ in diagnostics), diagnostics[-5:]
            state = answer(get.call_async(GetState.Request())).current_state
            assert state.id == State.PRIMARY_STATE_INACTIVE, state.label
            assert answer(change.call_async(request(Transition.TRANSITION_ACTIVATE))).success
            with EmbeddingClient(ns) as user:
                assert user.embed(['hello'], model=MPNET).dimension == 768
    finally:
        node.stop()


RACE_TRIES = 8     # a round the load wins is tried again: 8 lost in a row has p ~ 0.004


def _until_loading(client, model: str) -> str:
    """list_models until ``model`` is 'loading' (a load_model is running); its last status."""
    status, end = '', time.monotonic() + 30
    while status != 'loading' and time.monotonic() < end:
        listed = client.call('list_models', ListModels.Request(), timeout_s=30)
        status = {m.id: m.status for m in listed.models}[model]
    return status


def _raced_load(client, start_load, finish_load):
    """A load_model of MPNet with an unload_model of it landing while it loads.

    ``start_load()`` sends the load, ``finish_load(pending)`` returns what the loader got (a
    loader that makes first contact re-sends its load after 0.5 s, and the node's two admin
    threads then run the load and its copy: the unload waits for both, and never wins). The
    engine's load answers the model's status as it stands when the unload won (by design):
    the node used to answer that success, '<model> loaded', with status 'available'.
    Returns (what the loader got, the model's listed status after both).
    """
    call(client, UnloadModel, 'unload_model', UnloadModel.Request(model=MPNET), timeout=60)
    pending = start_load()
    assert _until_loading(client, MPNET) == 'loading'
    unloaded = call(client, UnloadModel, 'unload_model', UnloadModel.Request(model=MPNET),
                    timeout=60)
    assert unloaded.success, unloaded.message
    got = finish_load(pending)
    listed = {m.id: m.status for m in call(client, ListModels, 'list_models',
                                           ListModels.Request()).models}[MPNET]
    return got, listed


def test_a_load_raced_by_an_unload_is_not_answered_loaded(client):
    """load_model answered success, 'all-mpnet-base-v2 loaded' (and `akidb-models --load`
    printed it, exit 0) when an unload_model of the same model, landing while it loaded, left
    it unloaded: now UNAVAILABLE with a retry hint and a message saying so, and the model's true
    status in model_info (the CLI then exits 1: test_cli.py). If the load wins the race (it is
    then loaded), the round is tried again (the engine wakes the load and the unload together:
    either may go first, about half of the time each)."""
    # first contact made: the load below goes out once (a re-sent copy could land after the
    # unload and load the model again)
    assert client.call('load_model', LoadModel.Request(model='')).error_code == 'INVALID_INPUT'
    raced = 0
    for _ in range(RACE_TRIES):
        resp, listed = _raced_load(
            client, lambda: client.clients['load_model'].call_async(
                LoadModel.Request(model=MPNET)),
            lambda fut: (client.executor.spin_until_future_complete(fut, timeout_sec=60),
                         fut.result())[1])
        assert resp.model_info.id == MPNET
        if resp.success:            # the load won (the unload came after): it was loaded
            assert resp.model_info.status == 'loaded' and resp.message == f'{MPNET} loaded'
            continue
        raced += 1
        assert (resp.error_code, resp.retry_after_s) == ('UNAVAILABLE', 1.0), resp.message
        assert 'concurrent unload_model' in resp.message and 'load it again' in resp.message
        assert resp.model_info.status == listed == 'available'
        break
    assert raced, 'the load won every race: nothing tested'


def test_before_its_first_activation_the_node_answers_every_call():
    """The services were created by the first activate: with autostart:=false (a lifecycle
    manager's node), callers of an unconfigured or inactive node got no answer at all and waited
    out their timeout. Now they exist from the start: embed, load_model and unload_model answer
    UNAVAILABLE and list_models the node's state, also after a configure that failed, until the
    node is active; a signal then stops it as before (exit 0). Its ready line comes at its
    first activation (it was printed only when autostarted: a supervisor waited for ever)."""
    from ros_support import NodeProcess

    from akidb_ros.ros.cli import EmbeddingClient
    ns = '/not_yet_active'
    # e5-small-v2 is in the catalogue but not installed: the first configure fails
    node = NodeProcess('-p', 'autostart:=false', '-p', 'default_model:=e5-small-v2',
                       namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_not_yet_active') as c:
            def transition(tid) -> bool:
                return call(c, ChangeState, f'{ns}/embedding_node/change_state',
                            ChangeState.Request(transition=Transition(id=tid)),
                            timeout=60).success

            def answered(state, default, discovery_s=10.0):
                listed = c.call('list_models', ListModels.Request(), timeout_s=10,
                                discovery_s=discovery_s)
                assert (listed.node_state, listed.default_model) == (state, default)
                assert {m.id for m in listed.models} >= ({DEFAULT, MPNET} if default else set())
                for service, request in (('embed', Embed.Request(inputs=['hi'])),
                                         ('load_model', LoadModel.Request(model=MPNET)),
                                         ('unload_model', UnloadModel.Request(model=DEFAULT))):
                    resp = c.call(service, request, timeout_s=10)
                    assert (resp.success, resp.error_code) == (False, 'UNAVAILABLE'), resp
                    assert 'not active' in resp.message and resp.retry_after_s == 1.0
            answered('unconfigured', '', discovery_s=30.0)
            assert not transition(Transition.TRANSITION_CONFIGURE)    # e5-small-v2: no files
            answered('unconfigured', '')
            (res,) = call(c, SetParameters, f'{ns}/embedding_node/set_parameters',
                          SetParameters.Request(parameters=[
                              Parameter('default_model', value='').to_parameter_msg()])).results
            assert res.successful, res.reason
            assert transition(Transition.TRANSITION_CONFIGURE), node.output[-2000:]
            answered('inactive', DEFAULT)
            assert not node.ready.is_set(), node.output[-2000:]
            assert transition(Transition.TRANSITION_ACTIVATE)
            assert node.ready.wait(10), node.output[-2000:]
            assert c.embed(['hello']).success
            assert transition(Transition.TRANSITION_DEACTIVATE)
            assert transition(Transition.TRANSITION_CLEANUP)
            answered('unconfigured', '')
    finally:
        node.stop()
    assert node.proc.returncode == 0 and 'Traceback' not in node.output, node.output[-3000:]
    assert node.output.count('embedding node ready in') == 1


def test_call_service_reports_a_slow_configure_as_it_ended():
    """EmbeddingClient.call_service re-sent every first call after 0.5 s (first contact): a copy
    of a lifecycle configure arrived while the first one loaded models, was refused at once, and
    that refusal was the answer (success=false) to a configure that succeeded. A call that is not
    safe to repeat (change_state, set_parameters) is now sent once; read-only ones still are
    re-sent until first contact."""
    from ros_support import NodeProcess

    from akidb_ros.ros.cli import EmbeddingClient
    ns = '/call_service_configure'
    node = NodeProcess('-p', 'autostart:=false', '-p', f'preload_models:={MPNET}',
                       namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_call_service_manager') as c:
            got = call(c, GetState, f'{ns}/embedding_node/get_state', GetState.Request(),
                       timeout=30)
            assert got.current_state.label == 'unconfigured'
            t0 = time.monotonic()
            res = call(c, ChangeState, f'{ns}/embedding_node/change_state',
                       ChangeState.Request(transition=Transition(
                           id=Transition.TRANSITION_CONFIGURE)), timeout=120)
            took = time.monotonic() - t0
            assert res.success, (took, node.output[-2000:])
            assert took > 0.5, f'configure took {took:.2f} s: too fast to test a re-send'
            assert _state_of(c, ns) == State.PRIMARY_STATE_INACTIVE
            assert 'refused: configure is still running' not in node.output
            clients = {key[0]: fc for key, fc in c._other_clients.items()}
            assert clients[ChangeState].resend_s == 0 and clients[ChangeState].copies_sent == 0
            assert clients[GetState].resend_s > 0
    finally:
        node.stop()


def _state_of(client, ns: str) -> int:
    return call(client, GetState, f'{ns}/embedding_node/get_state',
                GetState.Request()).current_state.id


def test_model_parameters_are_checked_when_set(client):
    """default_model, preload_models and config_path were accepted whatever their value: a typo
    showed only at the next configure, which then took the node out of service. Now an id the
    catalogue lacks, or a config file that does not load, is refused with the reason."""
    try:
        (res,) = _set(client, default_model='all-minilm-l6-v3')
        assert not res.successful
        assert "default_model: 'all-minilm-l6-v3' is not in the catalogue" in res.reason
        assert DEFAULT in res.reason                         # the ids it has
        (res,) = _set(client, preload_models=f'{MPNET}, nope')
        assert not res.successful and "preload_models: 'nope' not in the catalogue" in \
            res.reason, res.reason
        (res,) = _set(client, config_path='/nonexistent/models.yaml')
        assert not res.successful and res.reason.startswith('config_path: cannot read config')
        got = call(client, GetParameters, 'embedding_node/get_parameters', GetParameters.Request(
            names=['default_model', 'preload_models', 'config_path']))
        assert [v.string_value for v in got.values] == ['', '', '']     # nothing changed
        # ids (or names) the catalogue has, and the YAML null for "the default file"
        assert all(r.successful for r in _set(
            client, default_model=MPNET, preload_models='sentence-transformers/all-MiniLM-L6-v2',
            config_path='~'))
    finally:
        _set(client, default_model='', preload_models='', config_path='')
