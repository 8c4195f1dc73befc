"""Command-line clients of the embedding node (the ``ros2`` CLI is not on PyPI).

``akidb-embed "text" ["more text" ...] [--model ID] [--json]`` calls ``embed``;
``akidb-models [--json] [--load ID | --unload ID [--load-timeout S]]`` calls ``list_models``
(or load/unload). Both talk DDS: source ``scripts/dds_env.sh`` first so discovery stays on
loopback, and use ``--namespace`` (or ``--ros-args -r __ns:=/robot1``) when the node runs in a
namespace.

``--timeout S`` (default 10) bounds the wait for a node offering the service, then the wait for
its answer. A load or unload may take longer than a call (a model load takes seconds; the
engine gives up on one after its ``timeouts.model_load_s``, 60 s by default): its answer is
awaited ``--load-timeout`` seconds (default 90), and never less than ``--timeout``.
Every wait must be a number of seconds > 0 and <= 86400; bad arguments (a bad wait, an empty
model id, an invalid namespace, bad ``--ros-args``) are refused before any DDS traffic.

Exit codes: 0 success, 1 the node answered with an error (``CODE: message`` on stderr),
2 no node answered (not running, other ROS_DOMAIN_ID, or timeout) or bad arguments (usage
message on stderr).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import uuid
from typing import List, Optional

import rclpy
from rclpy.context import Context
from rclpy.exceptions import InvalidNamespaceException, ParameterException
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile
from rclpy.utilities import remove_ros_args
from rclpy.validate_namespace import validate_namespace

from akidb_ros.ros.conversions import embeddings_from_response
from akidb_ros.ros.first_contact import FirstContact
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

# Services a copy of a call cannot harm, so call_service re-sends a first call to them
# (FirstContact): the node's own (embed copies are joined by request_id, a load is
# deduplicated by the engine, an unload of an unloaded model answers its status) and ROS's
# read-only ones. Any other (lifecycle change_state, set_parameters ...) is called once: a
# re-sent configure was refused while the first one ran, and that refusal was the answer.
REPEATABLE_SERVICES = frozenset({
    'akidb_ros/srv/Embed', 'akidb_ros/srv/ListModels', 'akidb_ros/srv/LoadModel',
    'akidb_ros/srv/UnloadModel',
    'lifecycle_msgs/srv/GetState', 'lifecycle_msgs/srv/GetAvailableStates',
    'lifecycle_msgs/srv/GetAvailableTransitions',
    'rcl_interfaces/srv/GetParameters', 'rcl_interfaces/srv/GetParameterTypes',
    'rcl_interfaces/srv/ListParameters', 'rcl_interfaces/srv/DescribeParameters',
    'type_description_interfaces/srv/GetTypeDescription'})


# A client that sends each call once (not repeatable) pauses this long before its first call.
ONCE_FIRST_CALL_PAUSE_S = 0.25


def _type_name(srv_type) -> str:
    """``pkg/srv/Name`` of a generated service type, e.g. ``lifecycle_msgs/srv/GetState``."""
    return f'{srv_type.__module__.split(".")[0]}/srv/{srv_type.__name__}'


def repeatable(srv_type) -> bool:
    """Whether a second copy of a call of ``srv_type`` is harmless (``REPEATABLE_SERVICES``)."""
    return _type_name(srv_type) in REPEATABLE_SERVICES


DEFAULT_TIMEOUT_S = 10.0
# The engine abandons a load after timeouts.model_load_s (60 s by default) and the node then
# answers MODEL_LOAD_FAILED: wait a little longer than that, so that answer is what is shown.
DEFAULT_LOAD_TIMEOUT_S = 90.0
MAX_TIMEOUT_S = 86400.0   # rclpy's waits overflow (or return at once) beyond ~9.2e9 s
EPILOG = ('exit status: 0 success, 1 the node answered with an error (CODE: message on stderr), '
          '2 no node answered in time, or bad arguments')


def client_executor(kind: str, context: Context):
    """Create the executor a client spins: ``events`` (rclpy's C++ event queue) or ``single``.

    The EventsExecutor costs a client about 2 ms less per call than the Python wait-set
    ``SingleThreadedExecutor`` on a small CPU (the node spins on it too).
    """
    if kind == 'events':
        from rclpy.experimental import EventsExecutor
        return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


class NoAnswer(Exception):
    """No node offered the service, or it did not answer in time."""


class EmbeddingClient:
    """A small synchronous client of the node's services (CLI, tests, benchmarks)."""

    def __init__(self, namespace: str = '', args: Optional[List[str]] = None,
                 node_name: str = 'akidb_cli', qos_depth: int = 100, executor: str = 'events'):
        self.context = Context()
        rclpy.init(args=args if args is not None else [], context=self.context)
        try:
            self.node = rclpy.create_node(node_name, context=self.context)
        except BaseException:   # e.g. a -p override of the wrong type: leave no context behind
            rclpy.try_shutdown(context=self.context)
            raise
        self.executor = client_executor(executor, self.context)
        self.executor.add_node(self.node)
        self._base = namespace.rstrip('/')
        self._qos = QoSProfile(depth=qos_depth)
        self.clients = {name: self._client(srv, name) for name, srv in (
            ('embed', Embed), ('list_models', ListModels), ('load_model', LoadModel),
            ('unload_model', UnloadModel))}
        self._other_clients = {}   # call_service's, by (type, name, resend)

    def _client(self, srv_type, name: str, resend: bool = True) -> FirstContact:
        # A FirstContact: a request sent before the node has matched this new client would be
        # lost (akidb_ros.ros.first_contact); it is sent again instead. ``resend=False``: a
        # plain rclpy client behind the same interface (each call sent once).
        if self._base and not name.startswith('/'):
            name = f'{self._base}/{name}'
        return FirstContact(self.node.create_client(srv_type, name, qos_profile=self._qos),
                            **({} if resend else {'resend_s': 0.0}))

    def call(self, service: str, request, timeout_s: float = 10.0,
             discovery_s: Optional[float] = None):
        """Call one of the node's own services (``embed``, ``list_models`` ...).

        Waits ``discovery_s`` (default ``timeout_s``) for a node offering the service, then
        ``timeout_s`` for its answer; raises :class:`NoAnswer` when either runs out.
        """
        return self._wait(self.clients[service], request, timeout_s, discovery_s)

    def call_service(self, srv_type, name: str, request, timeout_s: float = 10.0,
                     resend: Optional[bool] = None):
        """Call any service, e.g. the node's parameter or lifecycle services.

        ``name`` is relative to the client's namespace unless it starts with ``/``; its
        client is made on first use and kept.

        ``resend``: whether a first call with no answer after 0.5 s is sent again
        (:class:`FirstContact`; DDS can lose a new client's first request). ``None`` (the
        default): only for services a copy cannot harm (:func:`repeatable`: the node's own and
        ROS's read-only ones). Any other, e.g. ``change_state`` or ``set_parameters``, is sent
        once: a copy of a ``configure`` arrives while the first one runs and is refused, and
        that refusal would be the answer to a configure that succeeds. Such a client's first
        call waits ``ONCE_FIRST_CALL_PAUSE_S`` (0.25 s) after discovery, for the node's side
        of it; a first request DDS lost all the same is a :class:`NoAnswer` after
        ``timeout_s``: look (``get_state``, ``get_parameters``) before calling again.
        """
        resend = repeatable(srv_type) if resend is None else resend
        key = (srv_type, name, resend)
        if key not in self._other_clients:
            self._other_clients[key] = self._client(srv_type, name, resend)
        return self._wait(self._other_clients[key], request, timeout_s)

    def _wait(self, client: FirstContact, request, timeout_s: float,
              discovery_s: Optional[float] = None):
        discovery_s = timeout_s if discovery_s is None else discovery_s
        for name, value in (('timeout_s', timeout_s), ('discovery_s', discovery_s)):
            # rclpy treats nan/<= 0 as "do not wait" and inf as "do not wait" or an overflow
            if not (0.0 < value <= MAX_TIMEOUT_S):
                raise ValueError(f'{name} must be > 0 and <= {MAX_TIMEOUT_S:g} s, not {value!r}')
        name = self._resolved(client.srv_name)
        if not client.wait_for_service(timeout_sec=discovery_s):
            raise NoAnswer(f'no node offers {name} within {discovery_s:g} s (is it running, '
                           f'same ROS_DOMAIN_ID, loopback DDS env sourced? discovering it can '
                           f'take a new process a second or more)')
        if client.resend_s <= 0 and not client.answered:
            # Sent once, with no copy to repair a loss: give the node's side of discovery a
            # moment to match this new client (wait_for_service saw only ours match), so a
            # first request is not sent into the gap (akidb_ros.ros.first_contact).
            end = time.monotonic() + ONCE_FIRST_CALL_PAUSE_S
            while (left := end - time.monotonic()) > 0:
                self.executor.spin_once(timeout_sec=left)
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            client.forget(future)
            raise NoAnswer(f'{name} did not answer within {timeout_s:g} s')
        client.answered = True
        return future.result()

    def _resolved(self, srv_name: str) -> str:
        """Return the full name of a service (for messages), e.g. ``embed`` -> ``/embed``."""
        try:
            return self.node.resolve_service_name(srv_name)
        except Exception:   # only a message: never fail a call for it
            return srv_name

    def embed(self, inputs: List[str], model: str = '', normalize: bool = True,
              truncate: bool = True, timeout_s: float = 10.0, input_type: str = '',
              request_id: str = ''):
        """Call ``embed`` once.

        ``request_id`` (default: a fresh one) is in the node's log line of a failed call, and
        lets the node run the copies of a re-sent first call once.
        """
        for i, text in enumerate([model, *inputs]):
            if '\x00' in text:     # rosidl would send the text cut at the NUL, with no error
                where = 'model' if i == 0 else f'inputs[{i - 1}]'
                raise ValueError(f'{where} contains U+0000 (NUL): a ROS string ends there')
        req = Embed.Request(model=model, inputs=list(inputs), normalize=normalize,
                            truncate=truncate, input_type=input_type,
                            request_id=request_id or f'cli-{uuid.uuid4().hex[:16]}')
        return self.call('embed', req, timeout_s)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> 'EmbeddingClient':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split_args(p: argparse.ArgumentParser, argv: Optional[List[str]]):
    """Split ``argv`` into the CLI's own arguments and the ROS ones (for rclpy.init)."""
    from akidb_ros.dds_env import domain_id_error
    bad_domain = domain_id_error()
    if bad_domain:      # before rclpy: Fast DDS alone said it, and the exit was 1 ("an error")
        p.error(bad_domain)
    argv = list(sys.argv if argv is None else argv)
    for arg in argv[1:]:
        try:
            arg.encode('utf-8')
        except UnicodeEncodeError:
            # bytes the locale could not decode (Python kept them as surrogates): rclpy's
            # refusal read "invalid --ros-args" when none were given
            shown = arg.encode('utf-8', 'surrogateescape')[:60]
            p.error(f'argument {shown!r} is not valid UTF-8 (texts and model ids are UTF-8)')
    ros_args = argv[:1] + argv[argv.index('--ros-args'):] if '--ros-args' in argv else argv[:1]
    try:
        return remove_ros_args(argv)[1:], ros_args
    except Exception as exc:   # rclpy's RCLInvalidROSArgsError, UnknownROSArgsError
        what = 'unknown ROS arguments' if type(exc).__name__ == 'UnknownROSArgsError' \
            else 'invalid --ros-args'
        p.error(f'{what}: {exc}')


def _seconds(text: str) -> float:
    """Parse a wait (argparse type): a finite number of seconds > 0 and <= MAX_TIMEOUT_S."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of seconds') from None
    if not (0.0 < value <= MAX_TIMEOUT_S):     # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f'{text!r}: must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}')
    return value


def _model_id(text: str) -> str:
    """Parse a model id of --load/--unload (argparse type): never empty or blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError('a model id must not be empty (see akidb-models)')
    return text


def _namespace(text: str) -> str:
    """Parse --namespace (argparse type): '' or '/' (none), or a valid ROS namespace."""
    ns = text.rstrip('/')
    if ns:
        try:
            validate_namespace(ns if ns.startswith('/') else '/' + ns)
        except InvalidNamespaceException as exc:
            why = str(exc).splitlines()[0].replace('Invalid namespace: ', '').rstrip(':')
            raise argparse.ArgumentTypeError(f'{text!r} is not a ROS namespace: {why}') from None
    return ns


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--namespace', default='', type=_namespace,
                   help='namespace of the node, e.g. /robot1 (default: none)')
    p.add_argument('--timeout', type=_seconds, default=DEFAULT_TIMEOUT_S, metavar='S',
                   help=f'seconds to wait for a node offering the service, then for its answer '
                        f'(default {DEFAULT_TIMEOUT_S:g}; > 0, <= {MAX_TIMEOUT_S:g})')
    p.add_argument('--json', action='store_true', help='print JSON')


def _client(p: argparse.ArgumentParser, namespace: str, ros_args: List[str]) -> EmbeddingClient:
    """Make the client; ``--ros-args`` rcl parsed but rclpy refuses are a usage error too.

    A ``-p`` override of the wrong type (``use_sim_time:=maybe``) passes rcl's parser and is
    refused only when the client's node declares the parameter.
    """
    try:
        return EmbeddingClient(namespace, ros_args)
    except ParameterException as exc:
        p.error(f'invalid --ros-args: {exc}')


def _fail(resp, as_json: bool) -> int:
    if as_json:
        print(json.dumps({'success': False, 'error_code': resp.error_code,
                          'message': resp.message}))
    print(f'{resp.error_code}: {resp.message}', file=sys.stderr)
    return 1


def _closed_pipe_is_fine(main):
    """``akidb-embed ... | head``: a reader that stops early is no error (exit 0, no traceback)."""
    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None) -> int:
        try:
            rc = main(argv)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            # Python flushes stdout once more at exit: point it at /dev/null, so that is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return wrapper


@_closed_pipe_is_fine
def embed_main(argv: Optional[List[str]] = None) -> int:
    """``akidb-embed``: embed texts with the node's ``embed`` service."""
    p = argparse.ArgumentParser(prog='akidb-embed', description=__doc__.split('\n')[0],
                                epilog=EPILOG)
    p.add_argument('texts', nargs='+', help='text(s) to embed')
    p.add_argument('--model', default='', help='model id (default: the node default)')
    p.add_argument('--no-normalize', action='store_true', help='raw pooled vectors')
    p.add_argument('--no-truncate', action='store_true',
                   help='fail with INPUT_TOO_LONG instead of truncating long input')
    p.add_argument('--input-type', default='', choices=['', 'none', 'query', 'passage'])
    _common(p)
    args, ros_args = _split_args(p, argv)
    opts = p.parse_args(args)
    try:
        with _client(p, opts.namespace, ros_args) as cli:
            resp = cli.embed(opts.texts, opts.model, not opts.no_normalize,
                             not opts.no_truncate, opts.timeout, opts.input_type)
    except NoAnswer as exc:
        print(f'akidb-embed: {exc}', file=sys.stderr)
        return 2
    if not resp.success:
        return _fail(resp, opts.json)
    vectors = embeddings_from_response(resp)
    if opts.json:
        print(json.dumps({
            'success': True, 'model': resp.model, 'dimension': resp.dimension,
            'total_tokens': resp.total_tokens, 'truncated_inputs': resp.truncated_inputs,
            'duration_ms': round(resp.duration_ms, 3),
            'embeddings': [[float(x) for x in v] for v in vectors]}))
        return 0
    print(f'model {resp.model}, dimension {resp.dimension}, {len(vectors)} vector(s), '
          f'{resp.total_tokens} tokens, {resp.duration_ms:.1f} ms in the node')
    for text, v in zip(opts.texts, vectors):
        head = ', '.join(f'{x:+.4f}' for x in v[:6])
        print(f'  {text[:40]!r}: [{head}, ...] |v|={float((v * v).sum()) ** 0.5:.4f}')
    return 0


@_closed_pipe_is_fine
def models_main(argv: Optional[List[str]] = None) -> int:
    """``akidb-models``: list the node's models, or load/unload one."""
    p = argparse.ArgumentParser(prog='akidb-models', description=__doc__.split('\n')[0],
                                epilog=EPILOG)
    g = p.add_mutually_exclusive_group()
    g.add_argument('--load', metavar='ID', type=_model_id, help='load (and warm) a model')
    g.add_argument('--unload', metavar='ID', type=_model_id, help='unload a model')
    p.add_argument('--load-timeout', type=_seconds, metavar='S',
                   help=f'with --load/--unload: seconds to wait for the answer once a node is '
                        f'found (a load takes seconds, and the engine gives up on one after its '
                        f'timeouts.model_load_s, 60 by default; default {DEFAULT_LOAD_TIMEOUT_S:g}'
                        f', never less than --timeout)')
    _common(p)
    args, ros_args = _split_args(p, argv)
    opts = p.parse_args(args)
    admin = opts.load is not None or opts.unload is not None
    if opts.load_timeout is not None and not admin:
        p.error('--load-timeout applies only to --load or --unload')
    try:
        with _client(p, opts.namespace, ros_args) as cli:
            if admin:
                service, srv = ('load_model', LoadModel) if opts.load is not None else \
                    ('unload_model', UnloadModel)
                answer_s = max(opts.timeout, DEFAULT_LOAD_TIMEOUT_S if opts.load_timeout is None
                               else opts.load_timeout)
                # discovery is bounded by --timeout, the answer by the load wait
                resp = cli.call(service, srv.Request(model=opts.load or opts.unload), answer_s,
                                discovery_s=opts.timeout)
                if not resp.success:
                    return _fail(resp, opts.json)
                models, default = [resp.model_info], None
                if not opts.json:
                    print(resp.message)
            else:
                resp = cli.call('list_models', ListModels.Request(), opts.timeout)
                models, default = resp.models, resp.default_model
    except NoAnswer as exc:
        print(f'akidb-models: {exc}', file=sys.stderr)
        return 2
    # a node that is not active lists nothing (no engine) and serves no embed call: say so,
    # and exit 1 as akidb-embed does (an empty table with 0 read as "no models, all fine")
    state = '' if admin else resp.node_state
    rc = 1 if state and state != 'active' else 0
    if rc:
        print(f'akidb-models: the node is {state}: it serves no embed call until it is active',
              file=sys.stderr)
    fields = ('id', 'name', 'dimension', 'params', 'memory_mb', 'max_tokens',
              'latency_p95_ms', 'throughput_qps', 'status', 'provider', 'pooling',
              'is_default', 'in_flight', 'error')
    if opts.json:
        rows = [{f: getattr(m, f) for f in fields} for m in models]
        # a load/unload answer names no default model: say what happened instead of a false ''
        head = ({'success': True, 'message': resp.message} if default is None
                else {'default_model': default, 'node_state': state})
        print(json.dumps({**head, 'models': rows}))
        return rc
    print(f'{"id":<24} {"dim":>5} {"status":<12} {"provider":<26} {"p95 ms":>8} '
          f'{"qps":>8}  default')
    for m in models:
        print(f'{m.id:<24} {m.dimension:>5} {m.status:<12} {m.provider or "-":<26} '
              f'{m.latency_p95_ms:>8.2f} {m.throughput_qps:>8.1f}  '
              f'{"*" if m.is_default else ""}')
    return rc
