"""Start-up and shutdown of the node: cold start, SIGINT/SIGTERM when idle, SIGTERM under load,
lifecycle transitions under load."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_support import call, free_port, NodeProcess, PARAMS_FILE, ROOT

from akidb_ros.ros.cli import EmbeddingClient
from akidb_ros.ros.loadgen import ConcurrentCaller
from akidb_ros.srv import Embed, ListModels, LoadModel

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


def _change(client, ns: str, transition: int) -> bool:
    return call(client, ChangeState, f'{ns}/embedding_node/change_state',
                ChangeState.Request(transition=Transition(id=transition)), timeout=30).success


def _state(client, ns: str) -> int:
    return call(client, GetState, f'{ns}/embedding_node/get_state',
                GetState.Request()).current_state.id


def _spin_for(client, seconds: float) -> None:
    """Wait while the client keeps taking replies (a pause in spinning can cost it its own)."""
    # rmw_fastrtps delivers a service's every reply to every client of it, which discards the
    # others' on take: a client that stops taking while 16 others get ~500 replies/s can see its
    # own reply pushed out of its reader's history (depth 100) before it looks.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        client.executor.spin_once(timeout_sec=0.05)


def test_lifecycle_transitions_under_load_answer_every_call():
    """16 clients keep calling while a lifecycle manager deactivates, cleans up, configures,
    activates and shuts the node down: the node never dies (a reply sent on a service cleanup
    had destroyed ended its spin loop), every call is answered (a result, or UNAVAILABLE while
    not active), and a later SIGINT exits 0 without a failed shutdown transition."""
    ns = '/lcload'
    node = NodeProcess('-p', 'shutdown_timeout_s:=5.0', '-p', 'qos_depth:=5000', namespace=ns)
    node.wait_ready()
    stop = threading.Event()
    records = []

    def make_request(i, seq):
        time.sleep(0.002)       # paced: 16 calls stay in flight without spinning a core
        return Embed.Request(inputs=['go to the kitchen %d' % (i % 4)], request_id=f'c{i}-{seq}')

    try:
        with EmbeddingClient(ns, node_name='akidb_lc_manager') as mgr, \
                ConcurrentCaller(16, namespace=ns, node_name='akidb_lc_load') as lg:
            assert lg.wait_ready(30)
            runner = threading.Thread(target=lambda: records.extend(
                lg.run(make_request, stop=stop, timeout_s=30)))
            runner.start()
            time.sleep(1.5)
            # a call worth seconds of inference is still in flight through deactivate and cleanup
            long_text = 'the robot moves along the corridor and reports every door it passes ' * 20
            assert mgr.call('embed', Embed.Request(inputs=['first contact'])).success
            slow = mgr.clients['embed'].call_async(Embed.Request(
                inputs=[f'{long_text} {k}' for k in range(48)], timeout_s=60.0))
            _spin_for(mgr, 0.3)
            assert _change(mgr, ns, Transition.TRANSITION_DEACTIVATE)
            _spin_for(mgr, 0.5)
            t0 = time.perf_counter()
            assert _change(mgr, ns, Transition.TRANSITION_CLEANUP)
            cleanup_s = time.perf_counter() - t0
            # the transition does not wait for the engine to close (it held the executor)
            assert cleanup_s < 1.0, (cleanup_s, node.output[-3000:])
            _spin_for(mgr, 1.0)
            assert node.proc.poll() is None, node.output[-3000:]
            assert _state(mgr, ns) == State.PRIMARY_STATE_UNCONFIGURED
            listed = call(mgr, ListModels, f'{ns}/list_models', ListModels.Request())
            assert (list(listed.models), listed.default_model) == ([], '')
            assert listed.node_state == 'unconfigured'
            refused = mgr.call('embed', Embed.Request(inputs=['hello']))
            assert (refused.success, refused.error_code) == (False, 'UNAVAILABLE')
            assert _change(mgr, ns, Transition.TRANSITION_CONFIGURE)
            assert _change(mgr, ns, Transition.TRANSITION_ACTIVATE)
            assert mgr.call('embed', Embed.Request(inputs=['serving again'])).success
            _spin_for(mgr, 1.0)
            assert _change(mgr, ns, Transition.TRANSITION_ACTIVE_SHUTDOWN)
            _spin_for(mgr, 1.0)
            assert node.proc.poll() is None, node.output[-3000:]
            assert _state(mgr, ns) == State.PRIMARY_STATE_FINALIZED
            # a finalized node stays until signalled (ROS semantics) and says it is finalized
            assert call(mgr, ListModels, f'{ns}/list_models',
                        ListModels.Request()).node_state == 'finalized'
            mgr.executor.spin_until_future_complete(slow, timeout_sec=60)
            assert slow.done() and slow.result().success, node.output[-3000:]
            stop.set()
            runner.join(timeout=40)
        assert not runner.is_alive()
        lost = [r for r in records if r.response is None]
        assert not lost, f'{len(lost)} of {len(records)} calls got no answer:\n' + \
            node.output[-3000:]
        codes = {r.response.error_code for r in records if not r.response.success}
        assert codes == {'UNAVAILABLE'}, codes
        assert any(r.response.success for r in records)
        # refusals are logged with the caller's request_id, at UNAVAILABLE's level (warning)
        assert re.search(r'"level": "warning", "logger": "akidb_ros.ros.node", '
                         r"\"msg\": \"embed failed: request_id='c\d+-\d+'.*code=UNAVAILABLE",
                         node.output), node.output[-3000:]
        node.send(signal.SIGINT)
        assert node.wait_exit(timeout=15) == 0, node.output[-3000:]
        out = node.output
        assert 'Traceback' not in out and 'shutdown transition failed' not in out, out[-3000:]
        assert 'SIGINT: stopped' in out
    finally:
        stop.set()
        node.stop()


def test_a_load_cut_short_by_cleanup_is_not_answered_loaded():
    """A lifecycle manager cleans the node up while load_model is loading a model: the engine it
    loads into is closed, so the model is not loaded when the node serves again. The node
    answered success ('all-mpnet-base-v2 loaded', status loaded) all the same; now
    UNAVAILABLE, so the caller loads it again."""
    ns = '/loadcut'
    mpnet = 'all-mpnet-base-v2'
    node = NodeProcess(namespace=ns)
    node.wait_ready()
    try:
        with EmbeddingClient(ns, node_name='akidb_loadcut') as mgr:
            # first contact made: the load below is sent once (no copy after a cleanup)
            assert mgr.call('load_model', LoadModel.Request(model='')).error_code == \
                'INVALID_INPUT'
            pending = mgr.clients['load_model'].call_async(LoadModel.Request(model=mpnet))
            status, end = '', time.monotonic() + 10
            while status != 'loading' and time.monotonic() < end:
                listed = mgr.call('list_models', ListModels.Request())
                status = {m.id: m.status for m in listed.models}[mpnet]
            assert status == 'loading', node.output[-3000:]
            assert _change(mgr, ns, Transition.TRANSITION_DEACTIVATE)
            assert _change(mgr, ns, Transition.TRANSITION_CLEANUP)
            mgr.executor.spin_until_future_complete(pending, timeout_sec=60)
            assert pending.done(), node.output[-3000:]
            resp = pending.result()
            assert (resp.success, resp.error_code) == (False, 'UNAVAILABLE'), resp.message
            # the node's word when the load ended before the engine closed, the engine's when
            # its close() came first (a load finishing during close() is not kept)
            assert 'cleaned up' in resp.message or resp.message == 'engine is shutting down', \
                resp.message
            assert _change(mgr, ns, Transition.TRANSITION_CONFIGURE)
            assert _change(mgr, ns, Transition.TRANSITION_ACTIVATE)
            listed = mgr.call('list_models', ListModels.Request())
            assert {m.id: m.status for m in listed.models}[mpnet] == 'available'
    finally:
        node.stop()


def test_sigterm_under_long_calls_is_bounded_by_shutdown_timeout():
    """Calls that would take the engine far longer than shutdown_timeout_s (their own timeout_s
    is 600 s): SIGTERM answers every one within about shutdown_timeout_s (finished, or
    UNAVAILABLE), logs 'stopped' once that is true, and exits 0 (it took twice the timeout, and
    lost the replies sent after the services were destroyed)."""
    budget = 2.0
    ns = '/bounded'
    node = NodeProcess('-p', f'shutdown_timeout_s:={budget}', namespace=ns)
    node.wait_ready()
    text = 'the robot moves along the corridor and reports every door it passes ' * 20
    try:
        # set-up, not the subject (16 concurrent calls are tested in test_node): 16 warm calls,
        # once more with a new participant if one went unanswered. Late in a full run (2 of 5
        # this stop, never when run alone) every call of one loader's participant went
        # unanswered for 60 s although it had discovered the node, and the node logged none:
        # DDS data between those two participants, not the node
        for attempt in range(2):
            lg = ConcurrentCaller(16, namespace=ns, node_name=f'akidb_bounded_load{attempt}')
            warm = lg.run(lambda i, seq: Embed.Request(inputs=['warm %d' % i]),
                          calls_per_client=1, timeout_s=20) if lg.wait_ready(30) else []
            if warm and all(r.response is not None and r.response.success for r in warm):
                break
            print('warm-up failed:', [
                r.response and (r.response.error_code, r.response.message) for r in warm],
                f'({len(lg.node.get_node_names_and_namespaces())} nodes in the DDS graph)')
            lg.close()
        assert warm and all(r.response is not None and r.response.success for r in warm), (
            [r.response and (r.response.error_code, r.response.message) for r in warm],
            node.output[-3000:])
        with lg:
            out = []
            # 16 calls x 16 inputs of 256 tokens: many seconds of inference on this CPU
            runner = threading.Thread(target=lambda: out.extend(lg.run(
                lambda i, seq: Embed.Request(inputs=[f'{text} {i} {k}' for k in range(16)],
                                             timeout_s=600.0),
                calls_per_client=1, timeout_s=20)))
            runner.start()
            time.sleep(1.0)
            t_sig = time.perf_counter()
            node.send(signal.SIGTERM)
            rc = node.wait_exit(timeout=30)
            t_exit = time.perf_counter()
            runner.join(timeout=40)
            assert not runner.is_alive()
        assert rc == 0, node.output[-3000:]
        assert len(out) == 16
        lost = [r for r in out if r.response is None]
        assert not lost, f'{len(lost)} calls got no answer:\n{node.output[-3000:]}'
        codes = {r.response.error_code for r in out if not r.response.success}
        assert codes <= {'UNAVAILABLE'}, codes
        last = max(r.t_done for r in out) - t_sig
        print(f'\nSIGTERM with long calls: exit after {t_exit - t_sig:.2f} s, last answer '
              f'{last:.2f} s, {sum(r.response.success for r in out)} finished')
        assert 'UNAVAILABLE' in codes, 'all calls finished within the budget: nothing tested'
        assert t_exit - t_sig < budget + 1.5, node.output[-3000:]
        stopped = re.search(r'SIGTERM: stopped in ([\d.]+) s .*cut short', node.output)
        assert stopped and float(stopped.group(1)) <= budget + 0.5, node.output[-3000:]
    finally:
        node.stop()


@pytest.mark.parametrize('sig,how', [(signal.SIGINT, 'module'), (signal.SIGTERM, 'module'),
                                     (signal.SIGTERM, 'script')])
def test_a_signal_during_start_up_exits_0_quietly(sig, how):
    """A signal while the node's imports are still loading (rclpy's extension mapped, the
    engine's not yet) ends it with 0 and no traceback, before it starts anything."""
    args = ['--ros-args', '--params-file', str(PARAMS_FILE), '-r', '__ns:=/early']
    cmd = [sys.executable, '-m', 'akidb_ros.ros.node', *args] if how == 'module' else \
        [str(Path(sys.executable).parent / 'embedding_node'), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(f'/proc/{proc.pid}/maps') as f:
                    if '_rclpy_pybind11' in f.read():
                        break
            except OSError:
                break
            time.sleep(0.002)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert 'Traceback' not in out and 'ready in' not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_signal_during_the_start_up_configure_does_not_wait_for_it():
    """A SIGTERM while autostart's configure loads models (minutes for a first TensorRT build)
    waited for the whole load. Now the node stops at once: it waits shutdown_timeout_s for the
    configure, then exits 0 without it. Here MPNet is still loading when the signal comes."""
    node = NodeProcess('-p', 'preload_models:=all-mpnet-base-v2', '-p', 'shutdown_timeout_s:=0.2',
                       namespace='/stop_in_configure')
    try:
        deadline = time.monotonic() + 60
        while 'loaded all-minilm-l6-v2' not in node.output and time.monotonic() < deadline \
                and node.proc.poll() is None:
            time.sleep(0.01)
        assert 'loaded all-mpnet-base-v2' not in node.output, 'MPNet loaded before the signal'
        t0 = time.monotonic()
        node.send(signal.SIGTERM)
        rc = node.wait_exit(30)
        took = time.monotonic() - t0
        assert rc == 0, node.output
        assert 'exiting while a configure is still loading models' in node.output, node.output
        assert 'loaded all-mpnet-base-v2' not in node.output and took < 1.5, (took, node.output)
    finally:
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


def test_a_parameter_of_the_wrong_type_beside_a_params_file_is_refused():
    """rcl drops a -p whose type differs from the params file's value for that name, with no
    word, and the file's value served: refused as the same -p without a file is."""
    node = NodeProcess('-p', 'batching.max_batch_size:=abc', namespace='/badtype')
    try:
        rc = node.wait_exit(timeout=30)
        assert rc == 2, node.output
        assert '-p batching.max_batch_size:=abc was dropped by ROS' in node.output, node.output
        assert not node.ready.is_set()
    finally:
        node.stop()


def test_dropped_overrides_reads_the_ros_args_as_rcl_does():
    from rclpy.parameter import Parameter

    from akidb_ros.ros.params import dropped_overrides

    table = {'batching.max_batch_size': Parameter('b', value=0),
             'batching.max_wait_ms': Parameter('w', value=1000.0),
             'device': Parameter('d', value='cpu'), 'autostart': Parameter('a', value=True)}

    def dropped(*ros_args):
        return dropped_overrides(['node', '--ros-args', *ros_args], table)
    # what rcl kept: the -p values themselves, in any spelling rcl reads as YAML
    assert dropped('-p', 'batching.max_batch_size:=0', '--param', 'batching.max_wait_ms:=1e3',
                   '-p', 'device:=cpu', '-p', "device:='cpu'", '-p', 'autostart:=true') == []
    assert dropped('-p', 'batching.max_batch_size:=0x0') == []
    # what it dropped (the file's value served instead), the last -p of a name counting
    (why,) = dropped('-p', 'batching.max_batch_size:=4', '-p', 'batching.max_batch_size:=abc')
    assert why.startswith('-p batching.max_batch_size:=abc was dropped') and 'int 0' in why
    assert len(dropped('-p', 'autostart:=1', '-p', 'device:=5')) == 2
    # not ours, not an override, or outside --ros-args: not this check's business
    assert dropped('-p', 'use_sim_time:=abc', '-r', '__ns:=/x', '-p', 'nonsense') == []
    assert dropped_overrides(['node', '-p', 'device:=5', '--ros-args', '--', '-p',
                              'device:=5'], table) == []


@pytest.mark.parametrize('bad', [('--params-file', '/nonexistent/params.yaml'),
                                 ('-r', '__ns:=bad'), ('-p', 'nonsense')])
def test_ros_args_rcl_cannot_parse_exit_2_in_one_line(bad):
    """A typo in the params file's path or a malformed --ros-args: rcl refuses them in
    rclpy.init, which ended in a traceback and exit 1 (the code for 'could not configure')."""
    out = subprocess.run([sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args', *bad],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert 'embedding_node: invalid --ros-args:' in out.stderr and 'Traceback' not in out.stderr


@pytest.mark.parametrize('name, value', [('AKIDB_LOG_LEVEL', 'bogus'),
                                         ('AKIDB_LOG_FORMAT', 'xml')])
def test_a_bad_log_variable_exits_2_in_one_line(name, value):
    """A bad AKIDB_LOG_LEVEL ended in a traceback (exit 1); a bad format was taken as text."""
    out = subprocess.run([sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args', '-p',
                          'metrics_port:=0'], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, name: value})
    assert out.returncode == 2, out
    assert out.stderr.startswith(f'embedding_node: {name}={value!r} is not one of '), out.stderr


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


@pytest.mark.parametrize('how', ['port_in_use', 'not_an_address'])
def test_a_metrics_port_that_cannot_be_served_is_refused_at_start(how):
    """metrics_port/metrics_address are read-only start parameters: one that cannot be served
    (the port in use, an address that is none) ends the start, exit 2 in one line naming them,
    as a bad range does. The node logged an error and served on without /metrics."""
    with socket.socket() as held:
        held.bind(('127.0.0.1', 0))
        held.listen()
        port = held.getsockname()[1] if how == 'port_in_use' else free_port()
        extra = ('-p', 'metrics_address:=999.1.1.1') if how == 'not_an_address' else ()
        node = NodeProcess('-p', f'metrics_port:={port}', *extra, namespace=f'/metrics_{how}')
        try:
            rc = node.wait_exit(timeout=30)
            assert rc == 2, node.output
            (line,) = [ln for ln in node.lines if 'invalid parameters' in ln]
            assert line.startswith(f'embedding_node: invalid parameters: metrics_port {port} '
                                   'on metrics_address '), line
            assert 'Traceback' not in node.output and not node.ready.is_set(), node.output
        finally:
            node.stop()


def test_config_path_null_in_a_params_file_is_the_default_config(tmp_path):
    """`config_path: ~` (YAML null, which rcl hands over as the text '~') was read as a file
    named '~': exit 1, "cannot read config ~". It means the default config, as '' does."""
    params = tmp_path / 'params.yaml'
    params.write_text(PARAMS_FILE.read_text().replace("config_path: ''", 'config_path: ~', 1))
    assert 'config_path: ~' in params.read_text()
    node = NodeProcess(params_file=params, namespace='/null_config')
    try:
        node.wait_ready()
        with EmbeddingClient('/null_config', node_name='akidb_null_config') as c:
            assert c.embed(['hello'], timeout_s=30).success
    finally:
        node.stop()


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


def test_with_configure_retry_a_config_error_keeps_the_node_up_until_it_is_fixed():
    """configure_retry_s > 0 (the launch files and the systemd unit set 5): a configure that
    fails at start no longer exits 1, which a restarter (launch's respawn, systemd) turned into
    the same error every second; the node stays up unconfigured, says why on /diagnostics,
    tries again with a doubling wait, and serves once the parameter is fixed."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    from diagnostic_msgs.msg import DiagnosticArray
    ns = '/retry_configure'
    node = NodeProcess('-p', 'default_model:=e5-small-v2', '-p', 'configure_retry_s:=0.3',
                       '-p', 'diagnostics_period_s:=0.2', namespace=ns)
    try:
        with EmbeddingClient(ns, node_name='akidb_retry_watcher') as c:
            errors = []
            c.node.create_subscription(
                DiagnosticArray, '/diagnostics',
                lambda msg: errors.extend(
                    st.message for st in msg.status
                    if st.name.startswith(f'{ns}/embedding_node') and st.level == st.ERROR),
                10)
            end = time.monotonic() + 30     # two retries, and /diagnostics heard (discovery)
            while (output_count(node, 'next try in') < 2 or not errors) \
                    and time.monotonic() < end:
                c.executor.spin_once(timeout_sec=0.1)
            assert node.proc.poll() is None, node.output             # still up, not exit 1
            assert 'next try in 0.3 s' in node.output and 'next try in 0.6 s' in node.output
            # meanwhile its services answer (they were made by the first activate: a caller
            # got no answer and waited out its timeout)
            listed = c.call('list_models', ListModels.Request(), discovery_s=20)
            assert (listed.node_state, list(listed.models)) == ('unconfigured', [])
            refused = c.embed(['hello'])
            assert (refused.success, refused.error_code) == (False, 'UNAVAILABLE')
            assert any(m.startswith('configure failed: ') and 'e5-small-v2' in m
                       for m in errors), errors[-3:]
            (res,) = call(c, SetParameters, f'{ns}/embedding_node/set_parameters',
                          SetParameters.Request(parameters=[
                              Parameter('default_model', value='').to_parameter_msg()])).results
            assert res.successful, res.reason
            assert node.ready.wait(30), node.output                  # the next try serves
            assert c.embed(['hello']).success
    finally:
        node.stop()
    assert node.proc.returncode == 0, node.output


def output_count(node, text: str) -> int:
    return sum(text in line for line in list(node.lines))


def test_traceparent_is_continued_by_the_node():
    """A request's W3C traceparent becomes the parent of the node's 'ros /embed' span."""
    trace_id, parent = 'ab' * 16, 'cd' * 8
    # the node's own logger at DEBUG: successful calls are logged there, with request_id
    node = NodeProcess('--log-level', 'traced.embedding_node:=debug', namespace='/traced',
                       env={'OTEL_TRACES_EXPORTER': 'console', 'OTEL_BSP_SCHEDULE_DELAY': '50'})
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
        # the model that served it (the caller sent none: the span said '')
        assert '"akidb.model": "all-minilm-l6-v2"' in out and '"akidb.transport": "ros"' in out
        assert re.search(r'"level": "debug", "logger": "akidb_ros.ros.node", '
                         r"\"msg\": \"embed ok: request_id='req-42' model=all-minilm-l6-v2 "
                         r'inputs=1 tokens=\d+ latency_ms=', out), out
    finally:
        node.stop()
