"""The embed service's circuit breaker, one per model, over real DDS (``breaker.*`` parameters).

REST and gRPC had a breaker per model; ``/embed`` had none, so a model whose every call failed
(a corrupt file, a run that always times out) was tried again by each call: a 5 s TIMEOUT
each, or a load attempt each. The node's catalogue here holds the real MiniLM (the default)
and ``sick``: MiniLM's tokenizer and weights beside a corrupt graph, so every call for it
fails ``MODEL_LOAD_FAILED``.
"""
import os
import time

import pytest
import yaml
from ros_support import call, metric_value, NodeProcess, ROOT, scrape, free_port
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter

from akidb_ros.guard.breaker import BreakerSettings
from akidb_ros.ros import params as P
from akidb_ros.ros.cli import EmbeddingClient

MINILM = ROOT / 'models' / 'all-MiniLM-L6-v2'
OPEN_S = 1.5


@pytest.fixture(scope='module')
def catalogue(tmp_path_factory):
    """models.yaml with the default MiniLM and 'sick' (a graph ONNX Runtime cannot read)."""
    d = tmp_path_factory.mktemp('breaker-models')
    (d / 'sick').mkdir()
    (d / 'sick' / 'model.onnx').write_bytes(b'\x08\x07\x12\x04junk' + b'\xff' * 64)
    os.symlink(MINILM / 'model.onnx.data', d / 'sick' / 'model.onnx.data')
    os.symlink(MINILM, d / 'minilm')
    entry = {'dimension': 384, 'max_tokens': 256, 'pooling': 'mean', 'normalize': True}
    cfg = {'default_model': 'all-minilm-l6-v2', 'models_dir': str(d),
           'engine': {'device': 'cpu', 'intra_op_threads': 1},
           'models': [dict(entry, id='all-minilm-l6-v2', name='minilm',
                           path='minilm/model.onnx', tokenizer='minilm/tokenizer.json'),
                      dict(entry, id='sick', name='sick', path='sick/model.onnx',
                           tokenizer=str(MINILM / 'tokenizer.json'))]}
    path = d / 'models.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def _node(catalogue, ns, *params):
    args = ['-p', f'config_path:={catalogue}', '-p', 'diagnostics_period_s:=0.2']
    for p in params:
        args += ['-p', p]
    return NodeProcess(*args, namespace=ns)


def _latest_diagnostics(client, ns, want, timeout=10.0):
    seen = []

    def on_msg(msg):
        seen.extend(st for st in msg.status if st.name.startswith(f'{ns}/embedding_node'))
    sub = client.node.create_subscription(DiagnosticArray, '/diagnostics', on_msg, 10)
    try:
        end = time.monotonic() + timeout
        while not (seen and want(seen[-1])) and time.monotonic() < end:
            client.executor.spin_once(timeout_sec=0.1)
    finally:
        client.node.destroy_subscription(sub)
    assert seen
    return seen[-1], {kv.key: kv.value for kv in seen[-1].values}


def test_a_failing_model_opens_its_breaker_and_is_answered_circuit_open_at_once(catalogue):
    ns, port = '/breaker_on', free_port()
    node = _node(catalogue, ns, 'breaker.window:=3', 'breaker.min_calls:=3',
                 f'breaker.open_s:={OPEN_S}', 'breaker.half_open_probes:=1',
                 f'metrics_port:={port}')
    try:
        node.wait_ready()
        with EmbeddingClient(ns, node_name='akidb_breaker_client') as c:
            assert c.clients['embed'].wait_for_service(timeout_sec=30), node.output
            codes = [c.embed(['hello'], model='sick', timeout_s=30).error_code
                     for _ in range(3)]
            assert codes == ['MODEL_LOAD_FAILED'] * 3, node.output[-3000:]
            t0 = time.monotonic()
            refused = c.embed(['hello'], model='sick', timeout_s=30)
            assert (refused.success, refused.error_code) == (False, 'CIRCUIT_OPEN')
            assert 0 < refused.retry_after_s <= OPEN_S, refused.retry_after_s
            assert 'circuit open' in refused.message
            assert time.monotonic() - t0 < 1.0       # no load attempt behind it
            # one breaker per model: the default still serves
            ok = c.embed(['the default model is not touched'], timeout_s=30)
            assert ok.success and ok.dimension == 384
            text = scrape(port)
            assert metric_value(text, 'akidb_circuit_breaker_state', 'model="sick"') == 2
            assert metric_value(text, 'akidb_circuit_breaker_state',
                                'model="all-minilm-l6-v2"') == 0
            assert metric_value(text, 'akidb_request_errors_total',
                                'code="CIRCUIT_OPEN"') == 1
            st, values = _latest_diagnostics(c, ns, lambda s: s.level == s.WARN)
            assert values['circuit_open'] == 'sick', values
            assert st.message.startswith('circuit open for sick'), st.message
            # after open_s one probe is let through: it fails, and the breaker opens again
            time.sleep(OPEN_S + 0.2)
            assert c.embed(['probe'], model='sick', timeout_s=30).error_code == \
                'MODEL_LOAD_FAILED'
            assert c.embed(['again'], model='sick', timeout_s=30).error_code == 'CIRCUIT_OPEN'
            # the pair of limits is checked at run time too (each alone is in range)
            (res,) = call(c, SetParameters, f'{ns}/embedding_node/set_parameters',
                          SetParameters.Request(parameters=[
                              Parameter('breaker.min_calls', value=4).to_parameter_msg()])
                          ).results
            assert not res.successful
            assert res.reason == 'breaker.min_calls (4) must be at most breaker.window (3)'
            # a new configure builds new breakers; the old ones' series go with them (the
            # gauge read the retired breaker: open, then half-open for good)
            for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                        Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                assert call(c, ChangeState, f'{ns}/embedding_node/change_state',
                            ChangeState.Request(transition=Transition(id=tid)),
                            timeout=60).success, tid
            assert 'model="sick"' not in [ln for ln in scrape(port).splitlines()
                                          if ln.startswith('akidb_circuit_breaker_state{')]
            time.sleep(OPEN_S + 0.2)    # the retired breaker would turn half-open meanwhile
            text = scrape(port)
            assert metric_value(text, 'akidb_circuit_breaker_state', 'model="sick"') == 0
            assert c.embed(['fresh'], model='sick', timeout_s=30).error_code == \
                'MODEL_LOAD_FAILED'
        assert 'circuit breaker sick: CLOSED -> OPEN' in node.output
        assert 'circuit breaker sick: OPEN -> HALF_OPEN' in node.output     # the probe's
        assert node.output.count('OPEN -> HALF_OPEN') == 1, node.output[-3000:]
    finally:
        node.stop()


def test_calls_too_large_for_their_budget_do_not_open_the_breaker(catalogue):
    """A call whose deadline passes after some of its inputs were embedded is the caller's
    choice (too much work for the budget), not a sick model: neutral. Five such calls from one
    client opened the default model's breaker for every caller (the prober's repro: 256 inputs
    of 1,620 characters each, within every limit, against the 5 s budget)."""
    node = _node(catalogue, '/breaker_big', 'breaker.window:=2', 'breaker.min_calls:=2',
                 'timeouts.inference_s:=1.0', 'batching.max_batch_tokens:=1024')
    big = [f'{i} ' + ' '.join(['word'] * 300) for i in range(200)]    # ~10 s of work here
    try:
        node.wait_ready()
        with EmbeddingClient('/breaker_big', node_name='akidb_breaker_big_client') as c:
            assert c.clients['embed'].wait_for_service(timeout_sec=30), node.output
            for _ in range(2):
                r = c.embed(big, timeout_s=30)
                assert r.error_code == 'TIMEOUT' and ' of 200 inputs embedded' in r.message
                assert not r.message.startswith('request not answered within its deadline of '
                                                '1.00 s (0 of'), r.message
            ok = c.embed(['a small call from someone else'], timeout_s=30)
            assert ok.success, (ok.error_code, ok.message)
    finally:
        node.stop()


def test_a_model_loaded_again_once_mended_is_served_at_once(catalogue, tmp_path):
    """A successful load_model of a model whose breaker is open lets its probe through at
    once: it was refused CIRCUIT_OPEN for the rest of open_s (60 s here)."""
    import shutil
    from akidb_ros.srv import LoadModel
    cfg = yaml.safe_load(catalogue.read_text())
    (tmp_path / 'sick').mkdir()
    bad = tmp_path / 'sick' / 'model.onnx'
    bad.write_bytes(b'\x08\x07\x12\x04junk' + b'\xff' * 64)
    # a copy: ONNX Runtime refuses weights that a link takes outside the model's folder
    shutil.copy(MINILM / 'model.onnx.data', tmp_path / 'sick' / 'model.onnx.data')
    cfg['models'][1]['path'] = str(bad)
    (tmp_path / 'models.yaml').write_text(yaml.safe_dump(cfg))
    ns = '/breaker_mended'
    node = _node(tmp_path / 'models.yaml', ns, 'breaker.window:=3', 'breaker.min_calls:=3',
                 'breaker.open_s:=60.0')
    try:
        node.wait_ready()
        with EmbeddingClient(ns, node_name='akidb_breaker_mended') as c:
            assert c.clients['embed'].wait_for_service(timeout_sec=30), node.output
            assert [c.embed(['hello'], model='sick', timeout_s=30).error_code
                    for _ in range(4)] == ['MODEL_LOAD_FAILED'] * 3 + ['CIRCUIT_OPEN']
            shutil.copy(MINILM / 'model.onnx', bad)
            loaded = c.call('load_model', LoadModel.Request(model='sick'), timeout_s=60)
            assert loaded.success, loaded.message
            ok = c.embed(['mended'], model='sick', timeout_s=30)
            assert (ok.success, ok.dimension) == (True, 384), ok.message
        assert 'circuit breaker sick: OPEN -> HALF_OPEN' in node.output
    finally:
        node.stop()


def test_breaker_enabled_false_tries_every_call(catalogue):
    node = _node(catalogue, '/breaker_off', 'breaker.enabled:=false', 'breaker.window:=2',
                 'breaker.min_calls:=2')
    try:
        node.wait_ready()
        with EmbeddingClient('/breaker_off', node_name='akidb_breaker_off_client') as c:
            assert c.clients['embed'].wait_for_service(timeout_sec=30), node.output
            codes = {c.embed(['hello'], model='sick', timeout_s=30).error_code
                     for _ in range(5)}
            assert codes == {'MODEL_LOAD_FAILED'}
    finally:
        node.stop()


def test_breaker_limits_that_cannot_hold_together_fail_the_start(catalogue):
    node = _node(catalogue, '/breaker_bad', 'breaker.min_calls:=20')   # window stays 10
    try:
        assert node.wait_exit(timeout=60) == 1, node.output
        assert 'configure failed: breaker.min_calls (20) must be at most breaker.window ' \
            '(10)' in node.output
        assert 'Traceback' not in node.output
    finally:
        node.stop()


def test_in_process_node_shares_the_doors_breakers():
    """akidb_ros.server --mode inprocess hands the node its Guard's breakers: a model opened
    by REST or gRPC calls is open on /embed too (one breaker per model, whatever the door),
    and the security config's breaker section governs, not the node's parameters."""
    from akidb_ros.engine import EmbeddingEngine, load_config
    from akidb_ros.guard import Guard, load_security_config
    from akidb_ros.server import start_inprocess_node

    guard = Guard(load_security_config())
    breaker = guard.breaker_for('all-minilm-l6-v2')
    for _ in range(guard.breakers.settings.window):
        breaker.record_failure(breaker.allow())      # as the REST door records its failures
    with EmbeddingEngine(load_config()) as engine:
        engine.start()
        stop = start_inprocess_node(engine, ['-r', '__ns:=/inproc_breaker',
                                             '-p', 'breaker.enabled:=false'], security=guard)
        try:
            node = stop.__self__.node
            assert node.breakers is guard.breakers
            with EmbeddingClient('/inproc_breaker', node_name='akidb_inproc_breaker') as c:
                deadline = time.monotonic() + 20
                while node.count_clients('/inproc_breaker/embed') < 1 and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
                resp = c.embed(['the default model, open on the other doors'], timeout_s=30)
            assert resp.error_code == 'CIRCUIT_OPEN', resp.message
        finally:
            stop()
        guard.audit.close()


def test_breaker_parameters_map_onto_the_breaker_settings():
    values = {p.name: p.default for p in P.PARAMS}
    assert P.breaker_settings(values.get) == BreakerSettings()     # one set of defaults
    assert P.breaker_settings({**values, 'breaker.enabled': False}.get) is None
    with pytest.raises(ValueError, match=r'breaker.min_calls \(11\) must be at most'):
        P.breaker_settings({**values, 'breaker.min_calls': 11}.get)
    assert P.validate_value('breaker.failure_ratio', 0.0) == \
        'breaker.failure_ratio must be above 0 (got 0.0)'
    assert P.validate_value('breaker.open_s', 0.0) is not None
    assert P.validate_value('breaker.open_s', 0.5) is None


def test_a_new_configure_retires_the_breakers_the_node_built():
    """Each configure builds new breakers from the parameters; the old ones' state series went
    only once nothing referred to them any more. The prober's node kept reading an old open
    breaker 96 s after a reconfigure (then half-open for good, logging a transition at each
    scrape): retired breakers now leave the metrics at once, however long they live on."""
    from prometheus_client import REGISTRY

    from akidb_ros.engine import EmbeddingEngine, load_config
    from akidb_ros.ros.node import start_in_process

    def state(model):
        return REGISTRY.get_sample_value('akidb_circuit_breaker_state', {'model': model})
    with EmbeddingEngine(load_config()) as engine:
        engine.start()
        handle = start_in_process(engine, args=['akidb-server', '--ros-args', '-p',
                                                'breaker.open_s:=0.5'],
                                  namespace='/retired_breakers')
        try:
            old = handle.node.breakers       # held here, as a lingering reference would
            breaker = old.get('ghost')
            for _ in range(old.settings.window):
                breaker.record_failure(breaker.allow())
            assert state('ghost') == 2
            with EmbeddingClient('/retired_breakers', node_name='akidb_retire_client') as c:
                for tid in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                            Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                    assert call(c, ChangeState, '/retired_breakers/embedding_node/change_state',
                                ChangeState.Request(transition=Transition(id=tid)),
                                timeout=60).success, tid
            assert handle.node.breakers is not old and handle.node.breakers is not None
            assert state('ghost') is None
            time.sleep(0.6)                  # past open_s: the old one would read half-open
            assert breaker.state.name == 'HALF_OPEN' and state('ghost') is None
        finally:
            handle.stop()
