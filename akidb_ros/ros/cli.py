"""Command-line clients of the embedding node (the ``ros2`` CLI is not on PyPI).

``akidb-embed "text" ["more text" ...] [--model ID] [--json]`` calls ``embed``;
``akidb-models [--json] [--load ID | --unload ID]`` calls ``list_models`` (or load/unload).
Both talk DDS: source ``scripts/dds_env.sh`` first so discovery stays on loopback, and use
``--namespace`` (or ``--ros-args -r __ns:=/robot1``) when the node runs in a namespace.

Exit codes: 0 success, 1 the node answered with an error (``CODE: message`` on stderr),
2 no node answered (not running, other ROS_DOMAIN_ID, or timeout).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile
from rclpy.utilities import remove_ros_args

from akidb_ros.ros.conversions import embeddings_from_response
from akidb_ros.ros.first_contact import FirstContact
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel


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
        self.node = rclpy.create_node(node_name, context=self.context)
        self.executor = client_executor(executor, self.context)
        self.executor.add_node(self.node)
        self._base = namespace.rstrip('/')
        self._qos = QoSProfile(depth=qos_depth)
        self.clients = {name: self._client(srv, name) for name, srv in (
            ('embed', Embed), ('list_models', ListModels), ('load_model', LoadModel),
            ('unload_model', UnloadModel))}
        self._other_clients = {}   # call_service's, by (type, name)

    def _client(self, srv_type, name: str) -> FirstContact:
        # A FirstContact: a request sent before the node has matched this new client would be
        # lost (akidb_ros.ros.first_contact); it is sent again instead.
        if self._base and not name.startswith('/'):
            name = f'{self._base}/{name}'
        return FirstContact(self.node.create_client(srv_type, name, qos_profile=self._qos))

    def call(self, service: str, request, timeout_s: float = 10.0):
        """Call one of the node's own services (``embed``, ``list_models`` ...)."""
        return self._wait(self.clients[service], request, timeout_s)

    def call_service(self, srv_type, name: str, request, timeout_s: float = 10.0):
        """Call any service, e.g. the node's parameter or lifecycle services.

        ``name`` is relative to the client's namespace unless it starts with ``/``; its
        client is made on first use and kept.
        """
        key = (srv_type, name)
        if key not in self._other_clients:
            self._other_clients[key] = self._client(srv_type, name)
        return self._wait(self._other_clients[key], request, timeout_s)

    def _wait(self, client: FirstContact, request, timeout_s: float):
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise NoAnswer(f'no node offers {client.srv_name} (is it running, same '
                           f'ROS_DOMAIN_ID, loopback DDS env sourced?)')
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            client.forget(future)
            raise NoAnswer(f'{client.srv_name} did not answer within {timeout_s:.1f} s')
        return future.result()

    def embed(self, inputs: List[str], model: str = '', normalize: bool = True,
              truncate: bool = True, timeout_s: float = 10.0, input_type: str = ''):
        req = Embed.Request(model=model, inputs=list(inputs), normalize=normalize,
                            truncate=truncate, input_type=input_type)
        return self.call('embed', req, timeout_s)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> 'EmbeddingClient':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split_args(argv: Optional[List[str]]):
    argv = list(sys.argv if argv is None else argv)
    ros_args = argv[:1] + argv[argv.index('--ros-args'):] if '--ros-args' in argv else argv[:1]
    return remove_ros_args(argv)[1:], ros_args


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--namespace', default='', help='namespace of the node (default: none)')
    p.add_argument('--timeout', type=float, default=10.0, help='seconds to wait (default 10)')
    p.add_argument('--json', action='store_true', help='print JSON')


def _fail(resp, as_json: bool) -> int:
    if as_json:
        print(json.dumps({'success': False, 'error_code': resp.error_code,
                          'message': resp.message}))
    print(f'{resp.error_code}: {resp.message}', file=sys.stderr)
    return 1


def embed_main(argv: Optional[List[str]] = None) -> int:
    """``akidb-embed``: embed texts with the node's ``embed`` service."""
    args, ros_args = _split_args(argv)
    p = argparse.ArgumentParser(prog='akidb-embed', description=__doc__.split('\n')[0])
    p.add_argument('texts', nargs='+', help='text(s) to embed')
    p.add_argument('--model', default='', help='model id (default: the node default)')
    p.add_argument('--no-normalize', action='store_true', help='raw pooled vectors')
    p.add_argument('--no-truncate', action='store_true',
                   help='fail with INPUT_TOO_LONG instead of truncating long input')
    p.add_argument('--input-type', default='', choices=['', 'none', 'query', 'passage'])
    _common(p)
    opts = p.parse_args(args)
    try:
        with EmbeddingClient(opts.namespace, ros_args) as cli:
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


def models_main(argv: Optional[List[str]] = None) -> int:
    """``akidb-models``: list the node's models, or load/unload one."""
    args, ros_args = _split_args(argv)
    p = argparse.ArgumentParser(prog='akidb-models', description=__doc__.split('\n')[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument('--load', metavar='ID', help='load (and warm) a model')
    g.add_argument('--unload', metavar='ID', help='unload a model')
    _common(p)
    opts = p.parse_args(args)
    try:
        with EmbeddingClient(opts.namespace, ros_args) as cli:
            if opts.load or opts.unload:
                service, srv = ('load_model', LoadModel) if opts.load else \
                    ('unload_model', UnloadModel)
                resp = cli.call(service, srv.Request(model=opts.load or opts.unload),
                                max(opts.timeout, 60.0))
                if not resp.success:
                    return _fail(resp, opts.json)
                models, default = [resp.model_info], ''
                if not opts.json:
                    print(resp.message)
            else:
                resp = cli.call('list_models', ListModels.Request(), opts.timeout)
                models, default = resp.models, resp.default_model
    except NoAnswer as exc:
        print(f'akidb-models: {exc}', file=sys.stderr)
        return 2
    fields = ('id', 'name', 'dimension', 'params', 'memory_mb', 'max_tokens',
              'latency_p95_ms', 'throughput_qps', 'status', 'provider', 'pooling',
              'is_default', 'in_flight', 'error')
    if opts.json:
        print(json.dumps({'default_model': default,
                          'models': [{f: getattr(m, f) for f in fields} for m in models]}))
        return 0
    print(f'{"id":<24} {"dim":>5} {"status":<12} {"provider":<26} {"p95 ms":>8} '
          f'{"qps":>8}  default')
    for m in models:
        print(f'{m.id:<24} {m.dimension:>5} {m.status:<12} {m.provider or "-":<26} '
              f'{m.latency_p95_ms:>8.2f} {m.throughput_qps:>8.1f}  '
              f'{"*" if m.is_default else ""}')
    return 0
