"""``akidb-server``: the bridges (REST :8080 + gRPC :9090), in one of two modes.

* ``--mode inprocess``: ROS node, REST and gRPC in ONE process sharing ONE engine
  (``make run``). For hosts where the DDS hop costs too much, and for non-ROS servers
  (``--no-ros``).
* ``--mode sidecar``: REST and gRPC forward to a separately running embedding node over DDS
  (``/embed``, ``/list_models``, ``/load_model``, ``/unload_model``). The product's main shape.

Environment (PRD): ``AKIDB_HOST`` (127.0.0.1; containers set 0.0.0.0 together with the prod
security profile), ``AKIDB_REST_PORT`` (8080), ``AKIDB_GRPC_PORT`` (9090), ``AKIDB_PROBE_PORT``
(8081, ``off`` = none: the plain-HTTP probe listener with ``/health/live``, ``/health/ready`` and
``/metrics`` only, for kubelet, Docker ``HEALTHCHECK`` and Prometheus under the prod profile;
see ``akidb_ros.rest.probe``); ``AKIDB_CONFIG`` and
the engine's ``AKIDB_*`` overrides; ``AKIDB_SECURITY_PROFILE`` (dev|prod) or
``AKIDB_SECURITY_CONFIG`` (a file) for the guard chain (authentication, RBAC, TLS 1.3, rate
limits, circuit breakers, audit; see docs/security.md); ``OTEL_*`` for tracing;
``AKIDB_LOG_FORMAT``/``AKIDB_LOG_LEVEL`` for logs. SIGTERM/SIGINT stop gracefully: health goes
NOT_SERVING, new calls are refused, in-flight calls finish (``--grace``), then the engine closes.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from akidb_ros.early_signals import exit_quietly_while_starting, started_as

if started_as(__name__, 'akidb-server'):
    exit_quietly_while_starting()       # until main() installs its graceful handlers

log = logging.getLogger('akidb_ros.server')

PROG = 'akidb-server'
# the longest wait an option may ask for, a day: threading's waits overflow past ~9.2e9 s
MAX_SECONDS = 86400
MAX_THREADS = 4096      # more is a typo: each may become an OS thread
# a body limit below a small request refuses every call; gRPC's message limit is a C int
MIN_BODY_BYTES = 1024
MAX_BODY_BYTES = 1 << 30


class BadVariable(SystemExit):
    """A variable an option reads that the server cannot run with; its message names it."""


def _in_range(kind, low, high, low_open: bool = False):
    """An argparse ``type``: ``kind(text)`` from ``low`` (above it with ``low_open``) to
    ``high``. Its variable is checked with it (``_env_option``): argparse never checks a
    default."""
    noun = 'an integer' if kind is int else 'a number'
    span = f'> {low} and <= {high}' if low_open else f'from {low} to {high}'

    def parse(text: str):
        said = repr(text if len(text) <= 40 else text[:20] + '...')
        try:
            value = kind(text)
        except ValueError:      # int() also refuses over 4300 digits
            raise argparse.ArgumentTypeError(f'{said} is not {noun}') from None
        # written so that NaN (every comparison False: it answered each call 400 and broke
        # SIGTERM) fails it
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f'{said} is not {noun} {span}')
        return value
    return parse


def _env_option(name: str, default, parse):
    """``parse(os.environ[name])`` for an option's default; unset, empty or blank keeps
    ``default``; a value ``parse`` refuses stops the start in one line naming the variable."""
    raw = os.environ.get(name, '')
    if not raw.strip():
        return default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise BadVariable(f'{name}={exc}') from None


def _env_choice(name: str, default: str, choices) -> str:
    """A variable that stands for a ``choices=`` option: argparse never checks a default, so a
    typo (``AKIDB_MODE=inproces``) would otherwise run as whatever the code does with it."""
    raw = os.environ.get(name, '').strip()
    if not raw:
        return default
    if raw not in choices:
        raise BadVariable(f'{name}={raw!r} is not one of {", ".join(choices)}')
    return raw


def _bind_host(text: str) -> str:
    """An address to bind. A blank one is refused: Python reads ``''`` as every interface,
    which no operator writes on purpose (an unset variable in a template does)."""
    host = text.strip()
    if not host:
        raise argparse.ArgumentTypeError(
            f'{text!r} is blank (write 127.0.0.1, or 0.0.0.0 for every interface)')
    return host


PROBE_OFF = 'off'
# bind failures a start reports in one line: the operator's to fix (another server on the port)
BIND_ERRNOS = frozenset((errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES))
MODES = ('inprocess', 'sidecar')
# After a graceful stop's grace, the time the doors get to send the answers a backend gave its
# calls still waiting (Bridges.stop)
ANSWER_S = 1.0
ROS_EXECUTORS = ('events', 'single')


def _probe_port(raw: str):
    """``--probe-port`` / ``AKIDB_PROBE_PORT``: a port, ``0`` = a free one, ``off`` = none."""
    text = str(raw).strip().lower()
    if text == PROBE_OFF:
        return PROBE_OFF
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{raw!r} is not a port number or "off"') from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f'{port} is not a port number (0-65535)')
    return port


def _ready_file(path: str) -> str:
    """``--ready-file``: checked before anything loads, as it is written only once serving (a
    folder that is not there failed a server that had started)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f'{path!r} is a directory')
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f'{path!r}: no such directory {folder}')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f'{path!r}: directory {folder} is not writable')
    return path


def probe_port_of(args) -> Optional[int]:
    """The probe listener's port for parsed ``args``; None when it is turned off.

    Not given: 8081, except when the doors themselves take free ports (``--rest-port 0``, as
    tests and benchmarks that run several servers side by side do), where a fixed probe port
    would collide, so the probe takes a free one too (reported in ``--ready-file``).
    """
    from akidb_ros.rest.probe import DEFAULT_PROBE_PORT
    if args.no_probe or args.probe_port == PROBE_OFF:
        return None
    if args.probe_port is not None:
        return args.probe_port
    door_port = args.grpc_port if args.no_rest else args.rest_port
    return 0 if door_port == 0 else DEFAULT_PROBE_PORT


def build_parser() -> argparse.ArgumentParser:
    """The options; each variable an option reads is checked here (``BadVariable``), each flag
    when parsed (exit 2), against the same range."""
    port = _in_range(int, 0, 65535)
    seconds = _in_range(float, 0, MAX_SECONDS)
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    ap.add_argument('--mode', choices=MODES, default=_env_choice('AKIDB_MODE', 'inprocess', MODES))
    ap.add_argument('--host', type=_bind_host,
                    default=_env_option('AKIDB_HOST', '127.0.0.1', _bind_host),
                    help='bind address (default 127.0.0.1; a non-loopback address needs '
                         'the prod security profile)')
    ap.add_argument('--rest-port', type=port, default=_env_option('AKIDB_REST_PORT', 8080, port),
                    help='0 = pick a free port')
    ap.add_argument('--grpc-port', type=port, default=_env_option('AKIDB_GRPC_PORT', 9090, port),
                    help='0 = pick a free port')
    # unset: None, automatic (see probe_port_of)
    ap.add_argument('--probe-port', type=_probe_port,
                    default=_env_option('AKIDB_PROBE_PORT', None, _probe_port),
                    help='plain-HTTP probe listener (GET /health/live, /health/ready, '
                         '/metrics; no authentication) on --host: a port, 0 = pick a free '
                         'port, off = none (default 8081; a free port when --rest-port is 0)')
    ap.add_argument('--no-rest', action='store_true')
    ap.add_argument('--no-grpc', action='store_true')
    ap.add_argument('--no-probe', action='store_true', help='same as --probe-port off')
    ap.add_argument('--no-ros', action='store_true',
                    help='inprocess mode without the ROS node (non-ROS hosts)')
    ap.add_argument('--config', default=None, help='engine config (default config/models.yaml)')
    ap.add_argument('--ros-prefix', type=_ros_namespace,
                    default=_env_option('AKIDB_ROS_PREFIX', '', _ros_namespace),
                    help="sidecar: namespace of the node's services (default '' = /embed)")
    ap.add_argument('--ros-executor', choices=ROS_EXECUTORS,
                    default=_env_choice('AKIDB_ROS_EXECUTOR', 'events', ROS_EXECUTORS),
                    help="sidecar: the bridge's rclpy executor: events (rclpy's C++ "
                         'EventsExecutor) or single (SingleThreadedExecutor)')
    ap.add_argument('--discovery-grace', type=seconds,
                    default=_env_option('AKIDB_DISCOVERY_GRACE_S', 5.0, seconds),
                    help='sidecar: seconds after start during which a call waits (within its '
                         'budget) for DDS discovery to find the node instead of failing '
                         'UNAVAILABLE; the doors bind at once either way (default 5)')
    timeout = _in_range(float, 0, MAX_SECONDS, low_open=True)
    ap.add_argument('--timeout', type=timeout,
                    default=_env_option('AKIDB_TIMEOUT_S', 5.0, timeout),
                    help='default per-request timeout in seconds (clients may ask for less)')
    threads = _in_range(int, 1, MAX_THREADS)
    ap.add_argument('--rest-threads', type=threads,
                    default=_env_option('AKIDB_REST_THREADS', 32, threads))
    # two at least: streams get one thread at least and fewer than all (--grpc-max-streams)
    workers = _in_range(int, 2, MAX_THREADS)
    ap.add_argument('--grpc-workers', type=workers,
                    default=_env_option('AKIDB_GRPC_WORKERS', 64, workers))
    streams = _in_range(int, 1, MAX_THREADS - 1)
    ap.add_argument('--grpc-max-streams', type=streams,
                    default=_env_option('AKIDB_GRPC_MAX_STREAMS', None, streams),
                    help='long-lived gRPC streams (EmbedStream, reflection) served at once, '
                         'each holding a handler thread; the excess is refused OVERLOADED '
                         '(default: half of --grpc-workers; must be less than it)')
    ap.add_argument('--grpc-stream-idle', type=seconds,
                    default=_env_option('AKIDB_GRPC_STREAM_IDLE_S', 60.0, seconds),
                    help='seconds an EmbedStream with nothing in flight may send nothing '
                         'before it ends TIMEOUT, or read no answer before it is cancelled '
                         '(default 60; 0 = never)')
    body_bytes = _in_range(int, MIN_BODY_BYTES, MAX_BODY_BYTES)
    ap.add_argument('--max-body-bytes', type=body_bytes,
                    default=_env_option('AKIDB_MAX_BODY_BYTES', 16 * 1024 * 1024, body_bytes))
    ap.add_argument('--grace', type=seconds, default=None,
                    help='graceful-stop budget, seconds (default: --timeout + 2, so every call '
                         'accepted before the stop is answered, with its result or TIMEOUT)')
    ap.add_argument('--ros-args', nargs=argparse.REMAINDER, default=[],
                    help='inprocess: parameters for the node, e.g. '
                         '--ros-args -p metrics_port:=9100')
    ap.add_argument('--ready-file', type=_ready_file, default=None,
                    help='write {"rest_port", "grpc_port", "probe_port", "pid", ...} as JSON '
                         'here once serving (its folder must exist and be writable)')
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The options, every one checked before anything loads: a value the server cannot run
    with, flag or variable, is a usage error (exit 2) in one line naming it."""
    from akidb_ros.observability.logs import log_settings_error
    try:
        parser = build_parser()
        bad_logs = log_settings_error()
        if bad_logs:
            raise BadVariable(bad_logs)
    except BadVariable as exc:
        argparse.ArgumentParser(prog=PROG).exit(2, f'{PROG}: error: {exc}\n')
    args = parser.parse_args(argv)
    if args.mode == 'sidecar' or not args.no_ros:      # this process joins DDS
        from akidb_ros.dds_env import domain_id_error
        bad_domain = domain_id_error()
        if bad_domain:
            parser.error(bad_domain)
    if args.grpc_max_streams is not None and not args.grpc_max_streams < args.grpc_workers:
        given = ('--grpc-max-streams' if _flag_given(argv, '--grpc-max-streams')
                 else 'AKIDB_GRPC_MAX_STREAMS')
        parser.error(f'{given} must be at least 1 and less than --grpc-workers '
                     f'({args.grpc_workers}): unary calls need threads too')
    return args


def _flag_given(argv, flag: str) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + '=') for a in argv)


def _ros_namespace(text: str) -> str:
    """--ros-prefix: '' or a valid ROS namespace, checked like the CLIs' --namespace (rclpy
    only imported when one is given)."""
    if not text.strip('/'):
        return ''
    from akidb_ros.ros.cli import _namespace
    return _namespace(text)


class Bridges:
    """Everything one ``akidb-server`` process runs; usable from tests and benchmarks."""

    def __init__(self, backend, host: str = '127.0.0.1', rest_port: Optional[int] = 0,
                 grpc_port: Optional[int] = 0, guard=None, timeout_s: Optional[float] = None,
                 rest_threads: int = 32, grpc_workers: int = 64,
                 grpc_max_streams: Optional[int] = None, grpc_stream_idle_s: float = 60.0,
                 max_body_bytes: int = 16 * 1024 * 1024,
                 rest_app_hook: Optional[Callable] = None, grpc_interceptors=(),
                 security=None, probe_port: Optional[int] = None):
        """Build the doors around ``backend``; ``None`` for a port leaves that door out.

        ``probe_port``: the plain-HTTP probe listener (``akidb_ros.rest.probe``) on ``host``,
        outside the guard and TLS by design (health and metrics only); ``None`` = none.

        Guard seam: ``guard`` (a ``akidb_ros.doors.GuardHook``, e.g. ``Guard.door_hook``) runs
        before every backend call; ``rest_app_hook(app)`` may add Flask hooks to the app (e.g.
        ``akidb_ros.guard.integrations.install_flask``) and ``grpc_interceptors`` are passed
        to the gRPC server (e.g. ``GuardInterceptor``).

        ``security``: an ``akidb_ros.guard.Guard`` wires all of that at once: its ``door_hook``,
        ``install_flask`` on every route, ``GuardInterceptor`` on every RPC and, when its config
        turns TLS on, TLS 1.3 on both doors (REST through a ``TLSFront`` in front of a
        loopback-only REST server, gRPC through ``grpc_server_credentials``).
        """
        self.backend = backend
        self.rest = None
        self.grpc = None
        self.tls_front = None
        self.probe = None
        self._closers: List[Callable[[], None]] = []
        self._grace_end: Optional[float] = None     # monotonic end of a stop's grace
        tls = None
        grpc_credentials = None
        if security is not None:
            from akidb_ros.guard import GuardInterceptor, ReloadingTLSContext, TLSFront, \
                grpc_server_credentials, install_flask
            guard = security.door_hook
            tls = security.tls_settings()
            if grpc_port is not None:
                grpc_interceptors = [GuardInterceptor(security), *grpc_interceptors]
                if tls is not None:
                    grpc_credentials = grpc_server_credentials(tls)
            user_hook = rest_app_hook

            def rest_app_hook(app):
                install_flask(app, security, front=self.tls_front)
                if user_hook is not None:
                    user_hook(app)
        if rest_port is not None:
            from akidb_ros.rest.app import create_app
            from akidb_ros.rest.server import RestServer
            app = create_app(backend, guard=guard, max_body_bytes=max_body_bytes,
                             default_timeout_s=timeout_s)
            if tls is not None:
                # plaintext HTTP on loopback ONLY, reachable through the TLS 1.3 front
                self.rest = RestServer(app, host='127.0.0.1', port=0, threads=rest_threads,
                                       max_body_bytes=max_body_bytes)
                self.tls_front = TLSFront(ReloadingTLSContext(tls), listen=(host, rest_port),
                                          upstream=('127.0.0.1', self.rest.port))
            else:
                self.rest = RestServer(app, host=host, port=rest_port, threads=rest_threads,
                                       max_body_bytes=max_body_bytes)
            if rest_app_hook is not None:
                rest_app_hook(app)
            self.rest_app = app
        if grpc_port is not None:
            from akidb_ros.grpc_api.server import GrpcServer
            self.grpc = GrpcServer(backend, host=host, port=grpc_port, guard=guard,
                                   max_workers=grpc_workers, default_timeout_s=timeout_s,
                                   max_message_bytes=max_body_bytes,
                                   max_streams=grpc_max_streams,
                                   stream_idle_timeout_s=grpc_stream_idle_s,
                                   interceptors=grpc_interceptors,
                                   credentials=grpc_credentials)
        if probe_port is not None:
            from akidb_ros.rest.probe import ProbeServer
            try:
                self.probe = ProbeServer(backend, host=host, port=probe_port)
            except Exception:
                self._close_doors()     # e.g. the probe port is taken: free what was bound
                raise

    @property
    def rest_port(self) -> Optional[int]:
        """The port clients use (the TLS front's when REST is served over TLS)."""
        if self.tls_front is not None:
            return self.tls_front.port
        return self.rest.port if self.rest else None

    @property
    def grpc_port(self) -> Optional[int]:
        return self.grpc.port if self.grpc else None

    @property
    def probe_port(self) -> Optional[int]:
        return self.probe.port if self.probe else None

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def grace_left(self) -> Optional[float]:
        """Seconds left of the running stop's grace (None before a stop)."""
        return None if self._grace_end is None else self._grace_end - time.monotonic()

    def start(self) -> 'Bridges':
        if self.grpc:
            self.grpc.start()
        if self.rest:
            self.rest.start()
        if self.tls_front is not None:
            self.tls_front.start()
        if self.probe is not None:
            self.probe.start()
        return self

    def _close_doors(self) -> None:
        """Release the sockets of doors built but never started (a failed construction)."""
        if self.rest:
            self.rest.stop(0)
        if self.grpc:
            self.grpc.stop(0)
        if self.tls_front is not None:
            self.tls_front.stop()

    def stop(self, grace_s: float = 5.0) -> None:
        """Doors first (finish in-flight calls), then whatever they sit on (node, engine).

        The probe listener stops with the doors: a draining server is not ready, and the
        backend it asks is closed right after. A backend whose calls wait on another process
        (the sidecar's node: ``RosBackend.fail_waiting``) answers those still waiting when
        ``grace_s`` is over, ``UNAVAILABLE``, and the doors get ``ANSWER_S`` more to send the
        answers (they used to close first: a REST caller's connection was reset unanswered).
        The engine closes within what is left of ``grace_s`` (``grace_left``).
        """
        self._grace_end = time.monotonic() + grace_s
        stoppers = []
        door_grace = grace_s
        fail_waiting = getattr(self.backend, 'fail_waiting', None)
        timer = None
        if fail_waiting is not None:
            timer = threading.Timer(grace_s, fail_waiting)
            timer.daemon = True
            timer.start()
            door_grace = grace_s + ANSWER_S
        if self.tls_front is not None:
            self.tls_front.stop()     # no new TLS connections; open ones finish upstream
        if self.grpc:
            stoppers.append(threading.Thread(target=self.grpc.stop, args=(door_grace,)))
        if self.rest:
            stoppers.append(threading.Thread(target=self.rest.stop, args=(door_grace,)))
        if self.probe:
            stoppers.append(threading.Thread(target=self.probe.stop, args=(min(grace_s, 2.0),)))
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(door_grace + 5)
        if timer is not None:
            timer.cancel()
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception('error while stopping')
        self._closers.clear()


def start_inprocess_node(engine, node_args: Optional[List[str]] = None, security=None
                         ) -> Optional[Callable[[], None]]:
    """Host the ROS embedding node on the SHARED engine; returns its stopper.

    ``akidb_ros.ros.node.start_in_process`` adopts the engine the REST and gRPC doors already
    use, so one process has one engine (one ONNX session per model, one batcher) behind all
    three doors. The node's ``stop()`` answers its calls in flight and leaves the engine open
    (the engine is closed by its owner, the LocalBackend, afterwards). ``security`` (the
    doors' ``Guard``): the node's embed calls go through its circuit breakers, so a model has
    one breaker whichever door its calls come through (its ``breaker`` section governs; the
    node's ``breaker.*`` parameters do not apply).
    """
    try:
        from akidb_ros.ros.node import start_in_process
    except ImportError as exc:
        log.warning('ROS node not available (%s): serving REST/gRPC only', exc)
        return None
    args = ['akidb-server', '--ros-args', *node_args] if node_args else None
    kwargs = {}
    if security is not None:
        kwargs['breakers'] = security.breakers if security.breakers_enabled else None
    handle = start_in_process(engine, args=args, **kwargs)
    log.info('ROS embedding node serving (in-process, shared engine)')
    return handle.stop


def build(args, security=None, stop: Optional[threading.Event] = None) -> Bridges:
    """Create backend (+ engine/node for in-process mode) and the doors, not yet started.

    ``security``: the ``akidb_ros.guard.Guard`` in front of every door (None: unguarded).
    ``stop``: set by a signal meanwhile; the in-process node, which serves as soon as it
    starts, is then not started (it came up serving after a signal during the model loads,
    and was torn down at once, its callers unanswered).
    """
    if args.mode == 'sidecar' or not args.no_ros:
        from akidb_ros.dds_env import clean_zombie_shm_at_start
        clean_zombie_shm_at_start(log)      # before this process joins DDS
    if args.mode == 'inprocess':
        from akidb_ros.backends import LocalBackend
        from akidb_ros.engine import EmbeddingEngine, load_config
        engine = EmbeddingEngine(load_config(args.config))
        try:
            engine.start()
        except BaseException:
            # A load that failed or timed out may still be running inside ONNX Runtime; the
            # process must not exit before close() has waited for it (it would abort).
            engine.close()
            raise
        backend = LocalBackend(engine, own_engine=True)
    else:
        from akidb_ros.backends import RosBackend
        from akidb_ros.observability.metrics import drop_engine_families
        # no engine in this process: its families would be exported as zeros next to the
        # node's real ones (the node's metrics port has them)
        drop_engine_families()
        engine = None
        backend = RosBackend(prefix=args.ros_prefix, timeout_s=args.timeout,
                             discovery_timeout_s=args.discovery_grace, executor=args.ros_executor)
    try:
        bridges = Bridges(backend, host=args.host,
                          rest_port=None if args.no_rest else args.rest_port,
                          grpc_port=None if args.no_grpc else args.grpc_port,
                          guard=None,   # the door hook comes from ``security`` (see Bridges)
                          timeout_s=args.timeout, rest_threads=args.rest_threads,
                          grpc_workers=args.grpc_workers, max_body_bytes=args.max_body_bytes,
                          grpc_max_streams=args.grpc_max_streams,
                          grpc_stream_idle_s=args.grpc_stream_idle,
                          security=security, probe_port=probe_port_of(args))
    except Exception:
        backend.close()     # LocalBackend(own_engine=True) closes its engine too
        raise
    bridges.on_close(lambda: backend.close(timeout=bridges.grace_left()))
    if engine is not None and not args.no_ros and not (stop is not None and stop.is_set()):
        try:
            stop_node = start_inprocess_node(engine, args.ros_args, security)
        except Exception:
            bridges.stop(0)
            raise
        if stop_node:
            bridges.on_close(stop_node)
    return bridges


def load_security(args):
    """Security config + bind check; returns the Guard (exits on a refusal or a bad config)."""
    from akidb_ros.guard import Guard, SecurityConfigError, check_bind, load_security_config
    try:
        cfg = load_security_config()          # AKIDB_SECURITY_CONFIG / AKIDB_SECURITY_PROFILE
        check_bind(cfg, args.host)            # no authentication => loopback only
    except SecurityConfigError as exc:
        raise SystemExit(f'akidb-server: {exc}')
    if cfg.tls_enabled:
        # close TLS 1.2 in gRPC's TLS stack before anything imports grpc (nothing has yet):
        # process-wide, so only where the doors serve TLS; it also closed TLS 1.2 to the OTLP
        # exporter's collector on hosts serving none (the credentials refuse to build, should
        # grpc ever be imported first)
        from akidb_ros.guard import mtls
        mtls.prepare_grpc_tls13()
    try:
        return Guard(cfg)
    except (OSError, ValueError, SecurityConfigError) as exc:   # unreadable key/cert files
        raise SystemExit(f'akidb-server: security config {cfg.source}: {exc}')


def grace_for(args) -> float:
    """The graceful-stop budget: by default the request budget plus the doors' wait margin, so
    a call accepted just before SIGTERM is answered (result or TIMEOUT) before connections
    close; a shorter ``--grace`` is the operator's choice, said once at start."""
    from akidb_ros.backends import WAIT_MARGIN_S
    needed = args.timeout + WAIT_MARGIN_S
    if args.grace is None:
        return needed
    if args.grace < needed:
        log.warning('--grace %.1f s is shorter than the request budget (--timeout %.1f s + '
                    '%.1f s): calls accepted just before a stop may be cut off',
                    args.grace, args.timeout, WAIT_MARGIN_S)
    return args.grace


def expected_start_error(exc: BaseException) -> bool:
    """Whether a failed start is the operator's to fix, told in one line (no traceback).

    A bad config file or variable, TLS files, an engine error, a port that cannot be bound (in
    use, not this host's address), and a value no check before the start caught (a library's
    own range check: ValueError, OverflowError) say all in their message; anything else is a
    bug.
    """
    from akidb_ros.doors import BindError
    from akidb_ros.engine.config import ConfigError
    from akidb_ros.guard import mtls
    return hasattr(exc, 'code') or isinstance(exc, (
        mtls.TLSFilesError, ConfigError, BindError, ValueError, OverflowError)) \
        or isinstance(exc, OSError) and exc.errno in BIND_ERRNOS


def ignore_signals() -> None:
    """Once the stop has begun, a further SIGINT/SIGTERM changes nothing: ignore it. Python's
    own handlers are reset to the default action as the interpreter finalises, and a second
    signal in those last tenths of a second killed the process (exit 130/143 after a clean
    stop); an ignored signal stays ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv=None) -> int:
    # gRPC's C core logs each failed TLS handshake (a collector on another TLS version, a
    # client without a certificate) as a plain-text line on stderr, which is JSON lines
    os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
    from akidb_ros.observability.logs import configure_logging
    from akidb_ros.observability.tracing import setup_tracing, shutdown_tracing

    args = parse_args(argv)
    configure_logging()
    args.grace = grace_for(args)
    security = load_security(args)
    try:
        setup_tracing(os.environ.get('OTEL_SERVICE_NAME') or f'akidb-{args.mode}')
    except ValueError as exc:   # ours, or the SDK's (OTEL_BSP_*, OTEL_EXPORTER_OTLP_TIMEOUT)
        argparse.ArgumentParser(prog=PROG).exit(
            2, f'{PROG}: error: tracing (OTEL_* variables): {exc}\n')   # was a traceback
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info('signal %s: stopping gracefully', signal.Signals(signum).name)
        stop.set()

    # before the build: a signal while the models load was a KeyboardInterrupt traceback
    # (exit 130) or a bare exit 143; now the start-up ends, nothing is served, exit 0
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    try:
        bridges = build(args, security=security, stop=stop)
    except Exception as exc:
        expected = expected_start_error(exc)
        log.error('startup failed: %s', exc, exc_info=not expected)
        if expected:
            log.debug('startup failure', exc_info=True)     # should it be a bug after all
        return 1
    if stop.is_set():
        ignore_signals()
        bridges.stop(0)
        shutdown_tracing()
        log.info('akidb-server stopped during start-up')
        return 0
    bridges.start()
    from akidb_ros.guard import startup_banner
    log.warning(startup_banner(security.cfg, args.host,
                               bridges.rest_port if bridges.rest_port is not None
                               else bridges.grpc_port))
    if bridges.probe is not None:
        log.info('probe listener on http://%s:%s (GET /health/live, /health/ready, /metrics; '
                 'no authentication, no TLS by design)', args.host, bridges.probe_port)
    info = {'rest_port': bridges.rest_port, 'grpc_port': bridges.grpc_port,
            'probe_port': bridges.probe_port, 'pid': os.getpid(),
            'mode': args.mode, 'tls': bridges.tls_front is not None,
            'security_profile': security.cfg['profile']}
    log.info('akidb-server serving', extra={**info, 'startup_s': round(time.monotonic() - t0, 3)})
    rc = 0
    if args.ready_file:
        try:
            tmp = Path(args.ready_file + '.tmp')
            tmp.write_text(json.dumps(info))
            tmp.replace(args.ready_file)
        except OSError as exc:
            # its folder was checked when parsed, yet the write failed: whoever waits for the
            # file would wait for ever, so the start fails
            log.error('startup failed: cannot write --ready-file %s: %s', args.ready_file, exc)
            rc = 1
            stop.set()
    while not stop.wait(0.5):
        pass
    ignore_signals()
    bridges.stop(args.grace)
    shutdown_tracing()
    log.info('akidb-server stopped')
    return rc


if __name__ == '__main__':
    sys.exit(main())
