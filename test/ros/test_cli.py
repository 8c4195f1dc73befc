"""The CLI (akidb-embed, akidb-models): argument checks, waits, and what it prints.

Bad arguments are refused by argparse (exit 2, a usage message) before any DDS traffic: those
tests run the entry points in this process with the client replaced by one that fails if it is
ever made. The waits are checked over real DDS: against a namespace nobody serves, and against a
small stand-in node (in this process) whose load_model answers after a delay.
"""
import itertools
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from ros_support import ROOT

from akidb_ros.msg import ModelInfo
from akidb_ros.ros import cli
from akidb_ros.ros.cli import EmbeddingClient
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

BAD_WAITS = ['0', '-1', '-0.5', 'nan', 'inf', '-inf', '1e300', 'abc', '']
NOBODY = f'/akidb_cli_nobody_{os.getpid()}'


class _NoDDS:
    """Stands in for EmbeddingClient where the arguments must be refused before any DDS."""

    def __init__(self, *args, **kwargs):
        raise AssertionError('the CLI reached DDS with arguments it should have refused')


def _refused(capsys, monkeypatch, main, *argv) -> str:
    """Run ``main`` with ``argv``: it must exit 2 through argparse; returns its stderr."""
    monkeypatch.setattr(cli, 'EmbeddingClient', _NoDDS)
    with pytest.raises(SystemExit) as exc:
        main(['prog', *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'usage:' in err and 'error:' in err, err
    return err


class _Recorder:
    """Stands in for EmbeddingClient: records each call's waits, answers at once."""

    calls = []

    def __init__(self, namespace, args=None, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, service, request, timeout_s=10.0, discovery_s=None):
        _Recorder.calls.append((service, timeout_s, discovery_s))
        if service == 'list_models':
            return ListModels.Response(models=[ModelInfo(id='m', is_default=True)],
                                       default_model='m')
        return LoadModel.Response(success=True, message=f'{request.model} done',
                                  model_info=ModelInfo(id=request.model))


# --- arguments refused before any DDS traffic ---------------------------------------------
@pytest.mark.parametrize('value', BAD_WAITS)
@pytest.mark.parametrize('main, argv', [(cli.embed_main, ['x']), (cli.models_main, []),
                                        (cli.models_main, ['--load', 'm'])])
def test_timeout_must_be_a_positive_finite_number(capsys, monkeypatch, main, argv, value):
    err = _refused(capsys, monkeypatch, main, *argv, f'--timeout={value}')
    assert 'argument --timeout' in err and 'seconds' in err


@pytest.mark.parametrize('value', BAD_WAITS)
def test_load_timeout_must_be_a_positive_finite_number(capsys, monkeypatch, value):
    err = _refused(capsys, monkeypatch, cli.models_main, '--unload', 'm',
                   f'--load-timeout={value}')
    assert 'argument --load-timeout' in err and 'seconds' in err


def test_load_timeout_without_load_or_unload_is_refused(capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, cli.models_main, '--load-timeout', '5')
    assert '--load-timeout applies only to --load or --unload' in err


@pytest.mark.parametrize('option', ['--load', '--unload'])
@pytest.mark.parametrize('model', ['', '   '])
def test_an_empty_model_id_is_refused(capsys, monkeypatch, option, model):
    """``--load ""`` used to list the models and exit 0."""
    err = _refused(capsys, monkeypatch, cli.models_main, option, model)
    assert f'argument {option}: a model id must not be empty' in err


@pytest.mark.parametrize('main, argv', [(cli.embed_main, ['x']), (cli.models_main, [])])
@pytest.mark.parametrize('namespace', ['/robot-1', 'robot 1', '/1robot', '/a//b', '~', '{x}'])
def test_an_invalid_namespace_is_refused(capsys, monkeypatch, main, argv, namespace):
    """It used to end in an rclpy traceback and exit 1 ("the node answered with an error")."""
    err = _refused(capsys, monkeypatch, main, *argv, '--namespace', namespace)
    assert f'argument --namespace: {namespace!r} is not a ROS namespace' in err


@pytest.mark.parametrize('ros_args, message', [(['-r', 'bad'], 'invalid --ros-args'),
                                               (['--bogus'], 'unknown ROS arguments')])
def test_bad_ros_args_are_refused(capsys, monkeypatch, ros_args, message):
    """They used to end in an rclpy traceback and exit 1."""
    err = _refused(capsys, monkeypatch, cli.embed_main, 'x', '--ros-args', *ros_args)
    assert message in err


@pytest.mark.parametrize('main, argv', [(cli.embed_main, ['caf\udce9']),
                                        (cli.embed_main, ['x', '--model', 'm\udcff']),
                                        (cli.models_main, ['--load', 'm\udcff'])])
def test_an_argument_that_is_not_utf8_is_named(capsys, monkeypatch, main, argv):
    """Bytes the locale cannot decode (``akidb-embed $'caf\\xe9'``) were refused as "invalid
    --ros-args" though none were given; the refusal names the argument."""
    err = _refused(capsys, monkeypatch, main, *argv)
    assert 'is not valid UTF-8' in err and '--ros-args' not in err, err


@pytest.mark.parametrize('main, argv', [(cli.embed_main, ['x']), (cli.models_main, [])])
def test_ros_args_rclpy_refuses_at_node_creation_are_refused(capsys, main, argv):
    """A ``-p`` of the wrong type passes rcl's parser; rclpy refuses it when the client's node
    declares the parameter. It used to end in a traceback and exit 1 ("the node answered with an
    error"); now it is a usage error, exit 2, and the client's context is shut down."""
    contexts = []
    real_init = rclpy.init

    def init(*args, **kwargs):
        contexts.append(kwargs.get('context'))
        return real_init(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rclpy, 'init', init)
        with pytest.raises(SystemExit) as exc:
            main(['prog', *argv, '--ros-args', '-p', 'use_sim_time:=notabool'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'usage:' in err and 'invalid --ros-args' in err and 'use_sim_time' in err, err
    assert 'Traceback' not in err
    assert contexts and all(c is not None and not c.ok() for c in contexts)


@pytest.mark.parametrize('namespace, expected', [('', ''), ('/', ''), ('/robot1/', '/robot1'),
                                                 ('robot1', 'robot1'), ('/a/b_2', '/a/b_2')])
def test_valid_namespaces_are_kept(monkeypatch, namespace, expected):
    seen = []

    class Client(_Recorder):
        def __init__(self, ns, args=None, **kwargs):
            seen.append(ns)
    monkeypatch.setattr(cli, 'EmbeddingClient', Client)
    assert cli.models_main(['akidb-models', '--namespace', namespace]) == 0
    assert [ns.rstrip('/') for ns in seen] == [expected]      # the client drops a trailing /


def test_help_says_how_long_each_wait_is(capsys):
    with pytest.raises(SystemExit):
        cli.models_main(['akidb-models', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert '--timeout S seconds to wait for a node offering the service, then for its answer ' \
        '(default 10; > 0, <= 86400)' in out
    assert '--load-timeout S with --load/--unload' in out
    assert 'default 90, never less than --timeout' in out


# --- which wait bounds what ---------------------------------------------------------------
@pytest.mark.parametrize('argv, answer_s, discovery_s', [
    (['--load', 'm'], 90.0, 10.0),
    (['--unload', 'm', '--timeout', '1'], 90.0, 1.0),
    (['--load', 'm', '--timeout', '120'], 120.0, 120.0),
    (['--load', 'm', '--timeout', '2', '--load-timeout', '5'], 5.0, 2.0),
    (['--unload', 'm', '--timeout', '3', '--load-timeout', '1'], 3.0, 3.0),
    ([], 10.0, None),
    (['--timeout', '0.25'], 0.25, None),
])
def test_discovery_is_bounded_by_timeout_and_a_load_answer_by_load_timeout(
        monkeypatch, argv, answer_s, discovery_s):
    monkeypatch.setattr(cli, 'EmbeddingClient', _Recorder)
    _Recorder.calls = []
    assert cli.models_main(['akidb-models', *argv]) == 0
    [(_, got_answer_s, got_discovery_s)] = _Recorder.calls
    assert (got_answer_s, got_discovery_s) == (answer_s, discovery_s)


def test_the_client_refuses_a_wait_it_cannot_honour():
    """rclpy reads 0, nan and negative waits as "do not wait" (a false "no node offers") and
    inf as "return at once" (a false "did not answer within inf s")."""
    with EmbeddingClient(NOBODY, node_name='akidb_cli_test_client') as c:
        for bad in (0.0, -1.0, float('nan'), float('inf'), 1e300):
            with pytest.raises(ValueError, match='must be > 0'):
                c.call('embed', Embed.Request(inputs=['x']), bad)
            with pytest.raises(ValueError, match='must be > 0'):
                c.call('embed', Embed.Request(inputs=['x']), 1.0, discovery_s=bad)


# --- over real DDS ------------------------------------------------------------------------
def _run(*argv, timeout=30):
    """A CLI in its own process (the loopback DDS environment is inherited); rc, out, err, s."""
    fn = 'models_main' if argv[0] == 'models' else 'embed_main'
    code = f'import sys; from akidb_ros.ros.cli import {fn}; sys.exit({fn}())'
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, '-c', code, *argv[1:]], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f'{argv} still running after {timeout} s')
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


@pytest.mark.parametrize('argv, service', [
    (['models', '--unload', 'all-mpnet-base-v2'], 'unload_model'),
    (['models', '--load', 'all-mpnet-base-v2'], 'load_model'),
    (['embed', 'hello'], 'embed'),
])
def test_no_node_exits_2_within_the_timeout(argv, service):
    """``--unload ... --timeout 1`` used to wait 60 s for a node that is not there."""
    rc, _, err, took = _run(*argv, '--namespace', NOBODY, '--timeout', '1')
    assert rc == 2, err
    assert f'no node offers {NOBODY}/{service} within 1 s' in err
    assert took < 20, f'{took:.1f} s'       # 1 s of discovery + starting Python and rclpy


class _StandInNode:
    """load_model, unload_model and list_models in this process; load answers after delay_s.

    Calls are answered in parallel: the CLI's first-contact copies of a slow call
    (akidb_ros.ros.first_contact) hold up nothing. Answering a copy after the CLI has gone
    makes rclpy warn "failed to send response", which the tests below expect.
    """

    def __init__(self, namespace: str, delay_s: float, refusal=None):
        self.delay_s = delay_s
        self.refusal = refusal      # (error_code, message): load_model answers that instead
        self.stop = threading.Event()
        self.context = Context()
        rclpy.init(context=self.context, args=[])
        self.node = rclpy.create_node('akidb_cli_stand_in', namespace=namespace,
                                      context=self.context)
        group = ReentrantCallbackGroup()
        self.node.create_service(LoadModel, 'load_model', self._load, callback_group=group)
        self.node.create_service(UnloadModel, 'unload_model', self._load, callback_group=group)
        self.node.create_service(ListModels, 'list_models', self._list, callback_group=group)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _load(self, request, response):
        self.stop.wait(self.delay_s)
        if self.refusal is not None:
            response.error_code, response.message = self.refusal
            response.retry_after_s = 1.0
            response.model_info = ModelInfo(id=request.model, dimension=8, status='available')
            return response
        response.success, response.message = True, f'{request.model} loaded'
        response.model_info = ModelInfo(id=request.model, dimension=8, status='loaded')
        return response

    def _list(self, request, response):
        response.models = [ModelInfo(id='m', dimension=8, status='loaded', is_default=True)]
        response.default_model = 'm'
        return response

    def _spin(self):
        while not self.stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


_STAND_INS = itertools.count()
_LATE_REPLY = pytest.mark.filterwarnings('ignore:failed to send response:RuntimeWarning')


@pytest.fixture
def slow_node():
    ns = f'/akidb_cli_stand_in_{os.getpid()}_{next(_STAND_INS)}'
    node = _StandInNode(ns, delay_s=3.0)
    yield ns
    node.close()


@_LATE_REPLY
def test_a_load_may_take_longer_than_timeout(slow_node):
    rc, out, err, took = _run('models', '--namespace', slow_node, '--load', 'm', '--timeout', '1',
                              '--json')
    assert rc == 0, err
    assert took >= 3.0
    reply = json.loads(out)
    # a load's answer names no default model: no false "default_model": "" any more
    assert reply == {'success': True, 'message': 'm loaded', 'models': [{
        'id': 'm', 'name': '', 'dimension': 8, 'params': 0, 'memory_mb': 0, 'max_tokens': 0,
        'latency_p95_ms': 0.0, 'throughput_qps': 0.0, 'status': 'loaded', 'provider': '',
        'pooling': '', 'is_default': False, 'in_flight': 0, 'error': ''}]}
    rc, out, err, _ = _run('models', '--namespace', slow_node, '--json')
    assert rc == 0, err
    assert json.loads(out)['default_model'] == 'm'


@_LATE_REPLY
def test_load_timeout_bounds_the_answer(slow_node):
    rc, _, err, took = _run('models', '--namespace', slow_node, '--unload', 'm', '--timeout',
                            '1', '--load-timeout', '1')
    assert rc == 2, err
    assert f'{slow_node}/unload_model did not answer within 1 s' in err
    assert took < 20, f'{took:.1f} s'


RACED = ('UNAVAILABLE', 'm is not loaded (status available): it was unloaded by a concurrent '
         'unload_model while this load ran; load it again')


def test_a_load_the_node_answers_not_loaded_exits_1():
    """What the node now answers a load an unload_model overtook (it answered success,
    'm loaded', status available, and the CLI printed "m loaded", exit 0): the CLI says so,
    CODE: message on stderr, exit 1 (test_a_load_raced_by_an_unload_is_not_answered_loaded in
    test_node.py races a real one)."""
    ns = f'/akidb_cli_stand_in_{os.getpid()}_{next(_STAND_INS)}'
    node = _StandInNode(ns, delay_s=0.0, refusal=RACED)
    try:
        rc, out, err, _ = _run('models', '--namespace', ns, '--load', 'm')
        assert (rc, out) == (1, ''), (out, err)
        assert err.strip() == f'{RACED[0]}: {RACED[1]}'
        rc, out, err, _ = _run('models', '--namespace', ns, '--load', 'm', '--json')
        assert rc == 1 and json.loads(out) == {'success': False, 'error_code': RACED[0],
                                               'message': RACED[1]}, (out, err)
    finally:
        node.close()


def test_models_on_a_node_that_is_not_active_says_so_and_exits_1():
    """A node started without autostart (a lifecycle manager's to configure) lists nothing:
    akidb-models printed an empty table and exited 0. Now it names the node's state (stderr,
    and node_state in --json) and exits 1, as akidb-embed does (UNAVAILABLE)."""
    from ros_support import NodeProcess
    ns = f'/akidb_cli_inactive_{os.getpid()}'
    node = NodeProcess('-p', 'autostart:=false', namespace=ns)
    try:
        deadline = time.monotonic() + 60
        while True:     # no "ready" line before an activation: wait for its services instead
            rc, out, err, _ = _run('models', '--namespace', ns, '--json', '--timeout', '5')
            if rc != 2 or time.monotonic() > deadline:
                break
        assert rc == 1, (out, err, node.output)
        assert json.loads(out)['node_state'] == 'unconfigured'
        assert 'the node is unconfigured' in err
        rc, out, err, _ = _run('models', '--namespace', ns)
        assert rc == 1 and 'the node is unconfigured' in err, (out, err)
    finally:
        node.stop()


@pytest.mark.parametrize('value,fine', [('233', False), ('1000', False), ('abc', False),
                                        ('-1', False), ('٣', False), ('0', True),
                                        ('232', True), (' 42 ', True), ('', True)])
def test_domain_id_error(value, fine):
    from akidb_ros.dds_env import domain_id_error
    said = domain_id_error({'ROS_DOMAIN_ID': value})
    assert (said is None) == fine, said
    if not fine:
        assert said.startswith('ROS_DOMAIN_ID=') and 'from 0 to 232' in said


@pytest.mark.parametrize('entry', [
    [sys.executable, '-c', 'import sys; from akidb_ros.ros.cli import embed_main; '
     'sys.exit(embed_main())', 'hello'],
    [sys.executable, '-m', 'akidb_ros.ros.node'],
    [sys.executable, '-m', 'akidb_ros.server', '--mode', 'sidecar', '--rest-port', '0',
     '--grpc-port', '0', '--probe-port', 'off']], ids=['akidb-embed', 'node', 'sidecar'])
def test_a_domain_id_fast_dds_cannot_use_is_refused_in_one_line(entry):
    """ROS_DOMAIN_ID=233 (Fast DDS's ports run out above 232): the node, a bridge and the CLI
    exited 1 with only Fast DDS's own log line (the CLI's 1 reads "the node answered with an
    error"). Each now says what is wrong and exits 2, before joining DDS."""
    r = subprocess.run(entry, cwd=ROOT, env=dict(os.environ, ROS_DOMAIN_ID='233'),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "ROS_DOMAIN_ID='233' must be a whole number from 0 to 232" in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr
