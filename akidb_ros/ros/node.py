"""The akidb_ros embedding node: a managed (lifecycle) ROS 2 node serving the engine.

Services (relative names, so namespaces and remaps apply): ``embed``, ``list_models``,
``load_model``, ``unload_model``. Diagnostics on ``/diagnostics``.

Lifecycle: once created the services stay until the node is destroyed and answer in every
state, so no caller hangs and no reply is sent on a destroyed service; they are created with the
node (``autostart: false``), or when autostart's first configure ends (:meth:`ensure_services`).
``configure`` builds the :class:`EmbeddingEngine` and loads (and warms) the default model;
``activate`` serves; ``deactivate`` answers new calls with ``UNAVAILABLE``; ``cleanup``/
``shutdown`` stop serving at once and close the engine on a helper thread (``engine.close``
answers every call it accepted). Out of the active state (before a lifecycle manager's first
``configure`` too, and while ``configure_retry_s`` retries a failed one) ``embed``,
``load_model`` and ``unload_model`` answer ``UNAVAILABLE`` and ``list_models`` the node's state
with the configured engine's models (none when unconfigured).
Run directly, the node configures and activates itself (parameter ``autostart``, default true).

Callbacks never block the executor: an ``Embed`` call is validated and submitted to the engine
(``engine.submit`` returns a ``concurrent.futures.Future``) and the callback returns at once. The
response is sent when the future resolves, from a responder thread (see
:mod:`akidb_ros.ros.replies`, which also re-sends a reply DDS dropped on first contact). So
concurrent calls reach the engine together and are batched, with no executor thread parked per
call and no polling. A large call (over ``LARGE_CALL_CHARS`` characters) or one for a model that
is not loaded is submitted from a helper thread instead: tokenising or loading never holds the
executor.

SIGINT/SIGTERM: stop accepting (new calls get ``UNAVAILABLE``), let the engine finish the calls
in flight for up to ``shutdown_timeout_s`` from the signal, answer those still unfinished then
``UNAVAILABLE``, exit 0.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from typing import Callable, Dict, Optional

from akidb_ros.early_signals import exit_quietly_while_starting, started_as

if started_as(__name__, 'embedding_node'):
    # the imports below take about half a second; run() installs the graceful handlers
    # before it starts anything
    exit_quietly_while_starting()

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from lifecycle_msgs.msg import Transition
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import LoggingSeverity
from rclpy.qos import QoSProfile
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import String

from akidb_ros.dds_env import clean_zombie_shm_at_start
from akidb_ros.doors import caller_deadline
from akidb_ros.engine import EmbeddingEngine, load_config
from akidb_ros.engine.config import ConfigError
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.manager import ModelNotLoaded
from akidb_ros.guard.breaker import BreakerRegistry, State as BreakerState
from akidb_ros.observability import metrics as M
from akidb_ros.observability.logs import one_line
from akidb_ros.ros import conversions as conv
from akidb_ros.ros import params as P
from akidb_ros.ros.replies import Deferred, DeferringService, Responder
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

NODE_NAME = 'embedding_node'
# EmbeddingNode(breakers=...) not given: build them from the breaker.* parameters at configure
BREAKERS_FROM_PARAMS = object()
CONFIGURE_RETRY_CAP_S = 60.0    # longest wait between autostart's configure retries
# An Embed call with more characters than this (all inputs together) is submitted from a helper
# thread: tokenising it would hold the executor (about 1 ms per 5,000 characters on the 2-core
# development machine; a 256 x 32,000-character call held every service for 1.7 s). Calls of a
# few sentences stay on the executor's fast path.
LARGE_CALL_CHARS = 4096
CANCEL_TOPIC = conv.CANCEL_TOPIC
CANCEL_QOS_DEPTH = 1000     # withdrawals kept for the subscription, as the services' depth
# Large calls waiting for a helper thread; one more is refused OVERLOADED (each holds its text).
MAX_LARGE_WAITING = 16
_DEBUG = LoggingSeverity.DEBUG


def process_uptime_s() -> float:
    """Seconds since this process started (the kernel's start time, so imports count)."""
    try:
        with open('/proc/self/stat') as f:
            start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
        with open('/proc/uptime') as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError):
        return float('nan')


PY_LOGGER = 'akidb_ros.ros.node'     # the node's lines in Python logging (NodeLog)
DISABLE_STDOUT_LOGS = '--disable-stdout-logs'
ENABLE_STDOUT_LOGS = '--enable-stdout-logs'


class NodeLog:
    """The node's log lines: to its rclpy logger and, with ``to_python``, to Python logging.

    rclpy's logger writes to /rosout, the ROS log files and rcl's console (stderr, rcutils'
    text format) unless the process passed ``--disable-stdout-logs``. The node's process and
    the in-process server pass it when their logs are JSON (``AKIDB_LOG_FORMAT``, default
    ``json``; :func:`ros_console_args`), so that stderr stays one JSON object per line; the
    node's lines then reach stderr through the Python logger ``akidb_ros.ros.node``, as JSON
    with the rest of the process' lines. A line goes to Python only when rclpy logged it:
    ``--log-level`` keeps deciding which of the node's lines are written. One rclpy call site
    per severity (rclpy refuses a site that changes severity). Line breaks and control
    characters are escaped (``one_line``): a model name or request id in a failed call's line
    could forge log lines, or drive a terminal.
    """

    def __init__(self, ros_logger, to_python: bool = False):
        """Wrap ``ros_logger`` (a node's ``get_logger()``)."""
        self.ros = ros_logger
        self.name = ros_logger.name
        self._py = logging.getLogger(PY_LOGGER) if to_python else None
        if self._py is not None and self._py.level == logging.NOTSET:
            self._py.setLevel(logging.DEBUG)    # rclpy's level has filtered already

    def is_enabled_for(self, severity) -> bool:
        """Whether rclpy writes lines of ``severity`` (a ``LoggingSeverity``)."""
        return self.ros.is_enabled_for(severity)

    def debug(self, message: str) -> None:
        """Log ``message`` at DEBUG."""
        message = one_line(message)
        self._forward(self.ros.debug(message), logging.DEBUG, message)

    def info(self, message: str) -> None:
        """Log ``message`` at INFO."""
        message = one_line(message)
        self._forward(self.ros.info(message), logging.INFO, message)

    def warning(self, message: str) -> None:
        """Log ``message`` at WARN."""
        message = one_line(message)
        self._forward(self.ros.warning(message), logging.WARNING, message)

    def error(self, message: str) -> None:
        """Log ``message`` at ERROR."""
        message = one_line(message)
        self._forward(self.ros.error(message), logging.ERROR, message)

    def fatal(self, message: str) -> None:
        """Log ``message`` at FATAL (Python's CRITICAL)."""
        message = one_line(message)
        self._forward(self.ros.fatal(message), logging.CRITICAL, message)

    def _forward(self, logged: bool, level: int, message: str) -> None:
        if logged and self._py is not None:
            self._py.log(level, message, extra={'ros_logger': self.name})


def ros_console_args(args) -> tuple:
    """``(args for rclpy.init, whether the node's lines go to Python logging)``.

    With JSON logs (``AKIDB_LOG_FORMAT``, default ``json``) rcl's console output is turned
    off (``--disable-stdout-logs``: its text lines would break the JSON stream) and the node's
    lines go through Python logging instead (:class:`NodeLog`); /rosout and the ROS log files
    keep them either way. With ``text``, or an explicit ``--enable-stdout-logs``, ROS's usual
    console output stays. ``args``: the process' arguments (``None``: ``sys.argv``).
    """
    from akidb_ros.observability.logs import log_format
    args = list(sys.argv if args is None else args)
    if ENABLE_STDOUT_LOGS in args:
        return args, False
    if DISABLE_STDOUT_LOGS in args:
        return args, True
    if log_format() != 'json':
        return args, False
    return [*args, '--ros-args', DISABLE_STDOUT_LOGS], True


class EmbeddingNode(LifecycleNode):
    """Managed node exposing the embedding engine over ROS 2 services."""

    def __init__(self, node_name: str = NODE_NAME, engine: Optional[EmbeddingEngine] = None,
                 python_logs: bool = False, breakers=BREAKERS_FROM_PARAMS, **kwargs):
        """Create the node; ``engine``: serve a started engine owned by the caller.

        ``python_logs``: write the node's log lines to Python logging too (see
        :class:`NodeLog`), where rcl's console output is off (:func:`ros_console_args`).
        ``breakers``: the circuit breakers of ``embed`` — by default built at configure from
        the ``breaker.*`` parameters; a :class:`BreakerRegistry` shared with other doors of
        this process (the in-process server's, so a model has one breaker whichever door its
        calls come through), or ``None`` for none.
        """
        super().__init__(node_name, **kwargs)
        self._log = NodeLog(self.get_logger(), python_logs)
        self.engine: Optional[EmbeddingEngine] = None
        self._given_breakers = breakers
        self.breakers: Optional[BreakerRegistry] = None     # set at configure
        self._diag_timer = None
        self._configure_error = ''      # why the latest configure failed (for /diagnostics)
        self._declared = False          # built: from then on _check_models checks a set at once
        # registered first, so values from params files and -p go through the same checks
        self.add_on_set_parameters_callback(self._on_set_parameters)
        P.declare_all(self)
        self._external_engine = engine
        self._ak_services = []
        self._serving = False          # active and accepting calls
        self._twins_logged = 1         # servers of embed seen at the last diagnostics
        self.instance = uuid.uuid4().hex[:16]   # ListModels.node_instance: new at each start
        self._shutting_down = False
        self._cb = ReentrantCallbackGroup()
        self._diag_cb = MutuallyExclusiveCallbackGroup()
        unknown = P.unknown_overrides(self)
        if unknown:
            self._log.warning(f'unknown parameter(s) ignored: {", ".join(unknown)} (misspelt? '
                              '`embedding_node --help` lists the parameters)')
        # model loads (load_model, calls for a model not loaded yet) and large calls' tokenising
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix='akidb-ros-admin')
        self._prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix='akidb-ros-prep')
        self._large_waiting = 0
        # embed calls in flight by request id and content: copies join them (_submit_once)
        self._in_flight: Dict[tuple, Future] = {}
        self.joined_copies = 0
        # load_model/unload_model in flight by (op, engine, model): a client's first call is
        # re-sent until answered, and a load of the same model running already answers alike
        self._admin_in_flight: Dict[tuple, Future] = {}
        self._closers = []              # (engine, thread) closing engines the node let go of
        self._closers_lock = threading.Lock()
        self.responder = Responder(self._log,
                                   self.get_parameter('resend_window_s').value)
        self._configuring: Optional[threading.Thread] = None   # a configure off the executor
        self._defer_configure()
        self._stats_lock = threading.Lock()
        self.calls_ok = 0
        self.calls_failed = 0
        self.ready_s: Optional[float] = None
        # the executable's node prints its ready line at its first activation, autostarted or
        # activated by a lifecycle manager (it printed it only when autostarted)
        self.announce_ready = False
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._reset_diagnostics_timer(self.get_parameter('diagnostics_period_s').value)
        self._metrics_server = None
        port = self.get_parameter('metrics_port').value
        if port:    # a port it cannot bind is a start error (ValueError), as a bad range is
            try:
                self._start_metrics(port, self.get_parameter('metrics_address').value)
            except BaseException:
                self.destroy_node()
                raise
        if not self.get_parameter('autostart').value:
            self.ensure_services()      # a lifecycle manager's node: answer from the start
        self._declared = True

    # --- parameters ------------------------------------------------------------------------
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        # Ranges and read-only flags are enforced by the descriptors before this runs.
        for p in parameters:
            reason = P.validate_value(p.name, p.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if self._declared and self._external_engine is None:
            # At start a bad model id is configure's to report (exit 1, or with
            # configure_retry_s the node stays up saying why); later, a typo is refused here
            # rather than found by the next configure, which takes the node out of service.
            reason = self._check_models(parameters)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        new = {p.name: p.value for p in parameters}
        if self._declared and any(n.startswith('breaker.') for n in new):
            # each in range alone; together min_calls may not exceed window
            try:
                P.breaker_settings(lambda n: new[n] if n in new else self.get_parameter(n).value)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        for p in parameters:
            if p.name == 'diagnostics_period_s' and hasattr(self, '_diag_pub'):
                self._reset_diagnostics_timer(p.value)
            elif p.name == 'resend_window_s' and hasattr(self, 'responder'):
                self.responder.resend_window_s = p.value
            elif P.PARAMS_BY_NAME.get(p.name) and P.PARAMS_BY_NAME[p.name].read_at_configure \
                    and self.engine is not None:
                self._log.info(
                    f'{p.name}={p.value!r} takes effect at the next configure')
        return SetParametersResult(successful=True)

    def _check_models(self, parameters) -> str:
        """Why ``config_path``/``default_model``/``preload_models`` in ``parameters`` are refused.

        Checked against the catalogue the next configure would read (the config file, then
        ``AKIDB_*`` and the engine overrides): a ``config_path`` whose file is not a valid
        config, and a ``default_model`` or ``preload_models`` id the catalogue does not have.
        A new ``config_path`` is not refused for the models already set (set it first, then
        them); a catalogue that cannot be read is not this change's fault: not refused either.
        Costs one read of the config file, only when one of those three is set.
        """
        new = {p.name: p.value for p in parameters
               if p.name in ('config_path', 'default_model', 'preload_models')}
        if not new:
            return ''

        def value(name):
            return new[name] if name in new else self.get_parameter(name).value
        # the catalogue without default_model: a new file's may rightly lack the old one
        overrides = P.engine_overrides(value)
        overrides.pop('default_model', None)
        try:
            cfg = load_config(self._config_file(value('config_path')), overrides)
        except ConfigError as exc:
            return f'config_path: {exc}' if 'config_path' in new else ''
        known = {m.id for m in cfg.models} | {m.name for m in cfg.models}
        ids = ', '.join(m.id for m in cfg.models)
        default = P.unset_if_null(new.get('default_model', ''))
        if default and default not in known:
            return (f'default_model: {default!r} is not in the catalogue of {cfg.source} '
                    f'(ids: {ids})')
        unknown = [m for m in P.model_list(new.get('preload_models', '')) if m not in known]
        if unknown:
            return (f'preload_models: {", ".join(map(repr, unknown))} not in the catalogue of '
                    f'{cfg.source} (ids: {ids})')
        return ''

    def _reset_diagnostics_timer(self, period: float) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        if period and period > 0:
            self._diag_timer = self.create_timer(period, self.publish_diagnostics,
                                                 callback_group=self._diag_cb)

    def _start_metrics(self, port: int, address: str) -> None:
        """Serve /metrics; ``ValueError`` naming both parameters when it cannot.

        A port in use or an address that is not this host's (``metrics_address:=999.1.1.1``)
        ends the start (``run``: exit 2, one line), like any other bad start-only parameter:
        the node used to log an error and serve on without /metrics.
        """
        from prometheus_client import start_http_server
        try:
            self._metrics_server = start_http_server(port, addr=address)
        except Exception as exc:    # OSError (in use, not ours), gaierror (not an address)
            raise ValueError(f'metrics_port {port} on metrics_address {address!r}: cannot '
                             f'serve /metrics there: {exc}') from None
        self._log.info(f'metrics on http://{address}:{port}/metrics')

    def ensure_services(self) -> None:
        """Create ``embed``, ``list_models``, ``load_model`` and ``unload_model`` (once).

        They then answer in every lifecycle state until the node is destroyed (``_refusal``:
        ``UNAVAILABLE`` unless active), so a caller gets an answer, never a wait for its
        timeout. When: at creation with ``autostart: false`` (a lifecycle manager's node);
        with autostart, when its first configure ends (before activating, or when it failed
        and ``configure_retry_s`` retries): a caller started with the node waits in discovery
        while it loads, as before, rather than being answered ``UNAVAILABLE``; and at the
        latest at ``activate`` (the in-process node).
        """
        if self._ak_services:
            return
        qos = QoSProfile(depth=self.get_parameter('qos_depth').value)
        for srv_type, name, cb in ((Embed, 'embed', self._on_embed),
                                   (ListModels, 'list_models', self._on_list_models),
                                   (LoadModel, 'load_model', self._on_load_model),
                                   (UnloadModel, 'unload_model', self._on_unload_model)):
            srv = self.create_service(srv_type, name, cb, qos_profile=qos,
                                      callback_group=self._cb)
            srv.__class__ = DeferringService
            srv.responder = self.responder
            self._ak_services.append(srv)
        # a caller that gave up (the sidecar bridge, for a client that cancelled or hung up)
        # withdraws its embed call by request id: a ROS service call itself cannot be withdrawn
        self._cancel_sub = self.create_subscription(
            String, CANCEL_TOPIC, self._on_cancel, QoSProfile(depth=CANCEL_QOS_DEPTH),
            callback_group=self._cb)

    @staticmethod
    def _config_file(config_path: str) -> Optional[str]:
        """Return the file ``config_path`` names; ``None``: the default ($AKIDB_CONFIG ...).

        ``''`` and a YAML null (``config_path: ~`` reaches the node as the text ``~``) both mean
        the default config.
        """
        return P.unset_if_null(config_path) or _installed_config()

    def engine_config(self):
        """Engine config: the YAML file, AKIDB_* env, then the node's parameter overrides."""
        path = self._config_file(self.get_parameter('config_path').value)
        overrides = P.engine_overrides(lambda n: self.get_parameter(n).value)
        return load_config(path, overrides)

    # --- lifecycle -------------------------------------------------------------------------
    def _defer_configure(self) -> None:
        """Answer ``change_state``'s ``configure`` from a helper thread, not the executor.

        rclpy runs a transition inside the ``change_state`` service callback, and ``configure``
        loads and warms the models: seconds, minutes for a first TensorRT engine build. On the
        (single-threaded, default) executor the node then answered nothing meanwhile, not even
        ``get_state``, and published no ``/diagnostics``. Now ``configure`` runs on its own
        thread and its reply is sent when it ends (the responder, as for ``embed``); meanwhile
        the node answers, ``get_state`` says ``configuring``, and another ``change_state`` is
        refused at once (``success=false``: no transition starts from a transition state). The
        other transitions take milliseconds and stay on the executor.
        """
        service = getattr(self, '_service_change_state', None)
        if service is None:                     # no lifecycle services on this node
            return
        rclpy_callback = service.callback
        service.__class__ = DeferringService
        service.responder = self.responder

        def on_change_state(request, response):
            tid = request.transition.id
            if self.configuring:
                # before the label lookup, which fails in 'configuring' (no transition leaves
                # it): rcl_lifecycle would log two warnings about the label instead of this line
                self._log.warning(f'change_state {request.transition.label or tid} refused: '
                                  'configure is still running')
                response.success = False
                return response
            if request.transition.label:
                try:
                    tid = self._state_machine.get_transition_by_label(request.transition.label)
                except Exception:
                    return rclpy_callback(request, response)    # rclpy answers it (false)
            if tid != Transition.TRANSITION_CONFIGURE:
                return rclpy_callback(request, response)

            def build(fut: Future):
                response.success = (not fut.exception()
                                    and fut.result() == TransitionCallbackReturn.SUCCESS)
                return response
            return Deferred(self.configure_async(), build)
        service.callback = on_change_state

    @property
    def configuring(self) -> bool:
        """A ``configure`` started by :meth:`configure_async` is still running."""
        thread = self._configuring
        return thread is not None and thread.is_alive()

    def configure_async(self) -> Future:
        """Run the ``configure`` transition on a helper thread; a Future of its return code.

        The caller keeps the executor turning meanwhile (the node answers, /diagnostics goes
        on). One at a time: :attr:`configuring` tells whether one is still running.
        """
        fut: Future = Future()

        def configure():
            try:
                fut.set_result(self.trigger_configure())
            except BaseException as exc:    # answered (success=false), never lost
                self._log.error(f'configure failed: {exc!r}')
                fut.set_exception(exc)
        self._configuring = threading.Thread(target=configure, name='akidb-ros-configure',
                                             daemon=True)
        self._configuring.start()
        return fut

    def wait_configured(self, timeout: float) -> bool:
        """Wait for a running :meth:`configure_async` to end; whether none is running."""
        thread = self._configuring
        if thread is not None:
            thread.join(timeout)
        return not self.configuring

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t0 = time.monotonic()
        try:
            self._retire_breakers()
            self.breakers = self._make_breakers()
        except ValueError as exc:
            self._configure_error = str(exc)
            self._log.error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        if self._external_engine is not None:
            self.engine = self._external_engine
            self._log.info(
                f'serving a shared engine (default model {self.engine.default_model}); '
                'engine parameters of this node do not apply')
            return TransitionCallbackReturn.SUCCESS
        try:
            cfg = self.engine_config()
            engine = EmbeddingEngine(cfg)
            extra = P.model_list(self.get_parameter('preload_models').value)
            preload = [cfg.default_model] + [m for m in extra if m != cfg.default_model]
            try:
                engine.start(preload=preload)
            except BaseException:
                engine.close(timeout=1.0)
                raise
        except Exception as exc:
            self._configure_error = str(exc)
            self._log.error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self._configure_error = ''
        self.engine = engine
        health = engine.health()
        loaded = [m.id for m in engine.list_models() if m.status.value == 'loaded']
        evicted = [m for m in preload if m not in loaded]
        self._log.info(
            f'engine ready: default model {engine.default_model} on {health.provider}'
            f'{" (" + health.provider_note + ")" if health.provider_note else ""}'
            f', loaded {", ".join(loaded)} in {time.monotonic() - t0:.2f} s'
            f'{"; over the cache budget, not kept: " + ", ".join(evicted) if evicted else ""}')
        return TransitionCallbackReturn.SUCCESS

    def _retire_breakers(self) -> None:
        """Let the breakers the node built go, their state series with them.

        A registry shared with other doors (the in-process server's) stays theirs.
        """
        breakers, self.breakers = self.breakers, None
        if breakers is not None and breakers is not self._given_breakers:
            breakers.close()

    def _make_breakers(self) -> Optional[BreakerRegistry]:
        """Return the embed breakers: the ones given, or new ones from the parameters."""
        if self._given_breakers is not BREAKERS_FROM_PARAMS:
            return self._given_breakers
        settings = P.breaker_settings(lambda name: self.get_parameter(name).value)
        if settings is None:
            return None
        return BreakerRegistry(settings, on_transition=self._breaker_transition)

    def _breaker_transition(self, model: str, old: BreakerState, new: BreakerState) -> None:
        line = f'circuit breaker {model}: {old.name} -> {new.name}'
        if new is BreakerState.OPEN:
            self._log.warning(f'{line}: its embed calls are answered CIRCUIT_OPEN for the '
                              'next breaker.open_s')
        else:
            self._log.info(line)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.ensure_services()
        self._serving = True
        first = self.ready_s is None
        self.ready_s = process_uptime_s()
        self._log.info(
            f'serving {", ".join(s.srv_name for s in self._ak_services)} '
            f'({self.ready_s:.2f} s after start)')
        if first and self.announce_ready:
            print(f'akidb_ros embedding node ready in {self.ready_s:.2f} s', flush=True)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._serving = False
        self._log.info('inactive: new calls are answered UNAVAILABLE')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine('cleanup')
        self._retire_breakers()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine('shutdown')
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine('error')
        return TransitionCallbackReturn.SUCCESS

    def _release_engine(self, why: str) -> None:
        """Stop serving at once and let the engine go; never blocks the executor.

        An engine the node owns is closed on a helper thread: ``engine.close`` finishes (or fails
        ``UNAVAILABLE``) every call it accepted, and the responder sends those replies on the
        services, which stay up (answering ``UNAVAILABLE``) for the node's lifetime.
        """
        self._serving = False
        engine, self.engine = self.engine, None
        if engine is not None and engine is not self._external_engine:
            self._close_engine(engine)
        if engine is not None and not self._shutting_down:
            self._log.info(f'{why}: not serving; calls in flight are answered as they finish')

    def _close_engine(self, engine: EmbeddingEngine) -> None:
        """Close ``engine`` on a helper thread (once), bounded by ``shutdown_timeout_s``."""
        timeout = self.get_parameter('shutdown_timeout_s').value
        with self._closers_lock:
            if any(e is engine for e, _ in self._closers):
                return
            thread = threading.Thread(target=self._run_close, args=(engine, timeout),
                                      name='akidb-ros-close', daemon=True)
            self._closers.append((engine, thread))
            thread.start()

    def _run_close(self, engine: EmbeddingEngine, timeout: float) -> None:
        try:
            engine.close(timeout=timeout)
        except Exception as exc:
            self._log.error(f'closing the engine failed: {exc!r}')

    @property
    def closing(self) -> bool:
        """True while an engine the node let go of is still being closed (answering calls)."""
        with self._closers_lock:
            self._closers = [(e, t) for e, t in self._closers if t.is_alive()]
            return bool(self._closers)

    def idle(self) -> bool:
        """Every accepted call has been answered and every released engine is closed."""
        return self.responder.outstanding == 0 and not self.closing

    @property
    def log(self) -> NodeLog:
        """The node's logger (rclpy's, and Python logging's where the console is off)."""
        return self._log

    @property
    def lifecycle_state(self) -> str:
        """Label of the current lifecycle state ('unconfigured', 'active', 'finalized', ...)."""
        return self._state_machine.current_state[1]

    def begin_shutdown(self) -> None:
        """First step of a signal shutdown: refuse new calls (UNAVAILABLE) from now on.

        An engine the node owns starts closing now (it finishes the calls it accepted); it stays
        attached, so ``list_models`` still answers until the ``shutdown`` transition.
        """
        self._shutting_down = True
        self._serving = False
        engine = self.engine
        if engine is not None and engine is not self._external_engine:
            self._close_engine(engine)

    def finish_calls(self, timeout: float,
                     spin: Optional[Callable[[float], None]] = None) -> int:
        """Wait up to ``timeout`` s until :meth:`idle`, then answer the calls still unfinished.

        Those get ``UNAVAILABLE`` (their engine work, if any, is abandoned). ``spin(seconds)``
        keeps the executor turning meanwhile, when the caller's thread is the one spinning it.
        Returns how many calls were cut short.
        """
        pause = spin or time.sleep
        if _wait_until(self.idle, timeout, pause):
            return 0
        cut = self.responder.expire(EngineError(
            ErrorCode.UNAVAILABLE, 'the node stopped before this call finished '
            f'(shutdown_timeout_s={timeout:g})', retry_after_s=1.0))
        # the responder thread sends those at once; re-sends still pending are given up later
        _wait_until(lambda: self.responder.outstanding == 0, 0.5, pause)
        return cut

    # --- services --------------------------------------------------------------------------
    def _refusal(self, engine: Optional[EmbeddingEngine]) -> Optional[EngineError]:
        # ``engine``: read once by the caller (a transition may let it go meanwhile)
        if self._shutting_down:
            return EngineError(ErrorCode.UNAVAILABLE, 'embedding node is shutting down',
                               retry_after_s=1.0)
        if not self._serving or engine is None:
            return EngineError(ErrorCode.UNAVAILABLE, 'embedding node is not active',
                               retry_after_s=1.0)
        return None

    def _on_cancel(self, msg) -> None:
        """Withdraw the embed calls in flight with the request id ``cancel_embed`` carries.

        Their engine work is dropped (sentences not yet run skipped, queue slot freed) and each
        is answered ``CANCELLED``; a call already answered, or an unknown id, is left alone.
        Every call with a request id is in ``_in_flight`` until answered (``_submit_once``):
        a withdrawal, rare, looks through it rather than each call keeping a second index.
        """
        with self._stats_lock:
            futs = [f for key, f in self._in_flight.items() if key[0] == msg.data]
        withdrawn = sum(1 for f in futs if f.cancel())
        if withdrawn:
            self._log.debug(f'cancel_embed: withdrew {withdrawn} call(s) with request_id='
                            f'{msg.data[:128]!r}')

    def _submit_once(self, engine: EmbeddingEngine, req, request, span=None) -> tuple:
        """Submit ``req``, unless the same call is already in flight: then its future.

        Returns ``(future, copy)``: ``copy`` when it joined a call in flight, which alone is
        counted and logged (a client's one call, however many times DDS carried it).

        A client re-sends its first calls until the node has answered it once (DDS may lose a
        request sent before the node's reader matched it: ``first_contact``), so a slow first
        call arrives several times. Copies carry the caller's ``request_id``: a call with the
        same non-empty request id and the same content, still in flight, is answered from the
        one computation (before, a 10 s first call ran 7 times). Calls without a request id
        are never joined.
        """
        if not request.request_id:
            return self._submit_guarded(engine, req, span), False
        key = (request.request_id, request.model, tuple(request.inputs), request.normalize,
               request.truncate, request.input_type, request.timeout_s)
        with self._stats_lock:
            shared = self._in_flight.get(key)
            if shared is not None:
                self.joined_copies += 1
                return shared, True
            shared = self._in_flight[key] = Future()
        self._forget_when_done(self._in_flight, key, shared)
        try:
            inner = self._submit_guarded(engine, req, span)
        except BaseException as exc:    # refused at once: so is every copy waiting on it
            shared.set_exception(exc)
            raise
        inner.add_done_callback(lambda f: _chain(f, shared))
        _cancel_with(shared, inner)
        return shared, False

    def _submit_guarded(self, engine: EmbeddingEngine, req, span=None) -> Future:
        """``_submit_any`` through the model's circuit breaker, when the node has breakers.

        Keyed like the other doors' (``akidb_ros.doors.ModelLabels.breaker_key``): the model
        that serves the call, the default's id for none, ``unknown`` for a name the catalogue
        lacks (MODEL_NOT_FOUND, neutral). Raises CIRCUIT_OPEN before any work while the
        model's breaker is open. The outcome is recorded once per call (a re-sent copy joins
        the call, not the breaker): MODEL_LOAD_FAILED, TIMEOUT and INTERNAL count against
        the model; a withdrawn call, a caller's mistake, and a TIMEOUT within a deadline the
        caller set well below the engine's (``timeout_s``) are neutral, as on REST and gRPC.
        """
        breakers = self.breakers
        if breakers is None:
            return self._submit_any(engine, req, span)
        breaker = breakers.get(engine.manager.label(req.model))   # as sent: ' x' is unknown
        permit = breaker.allow()
        try:
            fut = self._submit_any(engine, req, span)
        except BaseException as exc:
            breaker.record(permit, exc)
            raise
        return breaker.track(fut, permit, own_deadline=req.timeout_s is not None and
                             caller_deadline(req.timeout_s,
                                             engine.config.engine.timeouts.inference_s))

    def _submit_any(self, engine: EmbeddingEngine, req, span=None) -> Future:
        if sum(map(len, req.inputs)) > LARGE_CALL_CHARS:
            return self._submit_large(engine, req, span)
        return self._submit(engine, req, span)

    def _submit(self, engine: EmbeddingEngine, req, span=None) -> Future:
        """engine.submit without blocking the executor on a (lazy) model load."""
        try:
            # validates + tokenises a small call: sub-millisecond; never loads here (load=False),
            # so a model evicted or unloaded a moment ago cannot hold the executor for a load
            if span is None:
                return engine.submit(req, load=False)
            return _in_span(span, lambda: engine.submit(req, load=False))
        except ModelNotLoaded:
            pass                  # nothing was admitted: load it on the pool, answer later
        return self._off_executor(self._pool, engine, req, span)

    def _submit_large(self, engine: EmbeddingEngine, req, span=None) -> Future:
        """Submit a large call from a helper thread (tokenising it would hold the executor)."""
        with self._stats_lock:
            waiting = self._large_waiting
            if waiting >= MAX_LARGE_WAITING:
                M.LOAD_SHED.labels(reason='tokenise').inc()     # an OVERLOADED like the engine's
                raise EngineError(ErrorCode.OVERLOADED,
                                  f'{waiting} large calls are already waiting to be tokenised',
                                  retry_after_s=1.0)
            self._large_waiting += 1

        def started() -> None:
            with self._stats_lock:
                self._large_waiting -= 1
        return self._off_executor(self._prep_pool, engine, req, span, started)

    def _off_executor(self, pool: ThreadPoolExecutor, engine: EmbeddingEngine, req, span=None,
                      started: Optional[Callable[[], None]] = None) -> Future:
        """``engine.submit`` (loading the model if need be) on a ``pool`` thread."""
        outer: Future = Future()

        def submit():
            if started is not None:
                started()
            if outer.cancelled():       # withdrawn before it was submitted: nothing to run
                return
            try:
                inner = engine.submit(req) if span is None else _in_span(
                    span, engine.submit, req)
            except BaseException as exc:
                _settle(outer, exc=exc)
                return
            inner.add_done_callback(lambda f: _chain(f, outer))
            _cancel_with(outer, inner)
        try:
            pool.submit(submit)
        except BaseException:
            if started is not None:
                started()
            raise
        return outer

    def _on_embed(self, request, response):
        t0 = time.perf_counter()
        span = _start_span(request) if request.traceparent else None
        # a call the sidecar bridge forwards was counted by its door: 'sidecar', not 'ros'
        rid, forwarded = conv.split_forwarded(request.request_id)
        transport = conv.FORWARDED_TRANSPORT if forwarded else 'ros'
        model = request.model
        try:
            engine = self.engine
            refusal = self._refusal(engine)
            if refusal:
                raise refusal
            req = conv.embed_request_from_msg(request, transport)
            fut, copy = self._submit_once(engine, req, request, span)
        except Exception as exc:
            return self._embed_failed(response, exc, t0, span, rid, model, transport)

        def build(f: Future):
            try:
                conv.fill_embed_response(response, f.result())
            except CancelledError:
                return self._embed_failed(response, EngineError(
                    ErrorCode.CANCELLED, f'withdrawn by its caller ({CANCEL_TOPIC})'),
                    t0, span, rid, model, transport, counted=not copy)
            except Exception as exc:
                return self._embed_failed(response, exc, t0, span, rid, model, transport,
                                          counted=not copy)
            response.duration_ms = (time.perf_counter() - t0) * 1000.0
            if copy:        # a re-sent copy of a call in flight: its first arrival counts
                _end_span(span, None, response.model)
                return response
            self._record(response.model, None, t0, transport)
            if self._log.is_enabled_for(_DEBUG):
                self._log.debug(
                    f'embed ok: request_id={rid[:128]!r} model={response.model} '
                    f'inputs={len(response.embeddings)} tokens={response.total_tokens} '
                    f'latency_ms={response.duration_ms:.1f}')
            _end_span(span, None, response.model)
            return response
        return Deferred(fut, build)

    def _embed_failed(self, response, exc: BaseException, t0: float, span=None,
                      request_id: str = '', model: str = '', transport: str = 'ros',
                      counted: bool = True):
        """Fill the error answer.

        ``counted`` False: a re-sent copy (neither counted nor logged: the call it joined is).
        """
        err = exc if isinstance(exc, EngineError) else _internal(self, exc)
        conv.fill_error(response, err)
        response.duration_ms = (time.perf_counter() - t0) * 1000.0
        if counted:
            self._record(self._model_label(model), err, t0, transport)
            self._log_failure(err, f'embed failed: request_id={request_id[:128]!r} '
                              f'model={model[:128] or "(default)"!r}',
                              response.duration_ms)
        if span is not None:
            _end_span(span, err, self._model_label(model))
        return response

    def _log_failure(self, err: EngineError, what: str, latency_ms: float) -> None:
        """One line per failed call, at its code's level in the error table (errors.py)."""
        message = err.message if len(err.message) <= 300 else err.message[:297] + '...'
        line = f'{what} code={err.code.name} latency_ms={latency_ms:.1f}: {message}'
        # one call site per severity: rclpy's logger refuses a site that changes severity
        level = err.code.log_level
        if level == 'error':
            self._log.error(line)
        elif level == 'warning':
            self._log.warning(line)
        else:
            self._log.info(line)

    def _model_label(self, model: str) -> str:
        """Label a failed call with the model that would have served it.

        That is the default's id when it names none (as its success would be labelled),
        ``unknown`` for a name the catalogue does not have, or when no engine is configured:
        bounded.
        """
        engine = self.engine
        if engine is None:
            return 'unknown'
        try:
            return engine.manager.label(model)     # as sent, as REST labels it
        except Exception:   # metrics must never fail a call
            return 'unknown'

    def _record(self, model: str, err: Optional[EngineError], t0: float,
                transport: str = 'ros') -> None:
        """Record door metrics; ``model``: an engine model id or 'unknown' (bounded).

        Transport 'ros', or 'sidecar' for a call the bridge forwarded (its door counted it).
        """
        with self._stats_lock:
            if err is None:
                self.calls_ok += 1
            else:
                self.calls_failed += 1
        try:
            label = model or 'unknown'
            M.EMBED_REQUESTS.labels(label, transport, 'error' if err else 'success').inc()
            M.EMBED_LATENCY.labels(label, transport).observe(time.perf_counter() - t0)
            if err is not None:
                M.REQUEST_ERRORS.labels(transport, err.code.name).inc()
        except Exception:  # metrics must never fail a call
            pass

    def _on_list_models(self, request, response):
        engine = self.engine
        state = self.lifecycle_state
        response.node_state = 'stopping' if state == 'active' and not self._serving else state
        response.node_instance = self.instance
        if engine is not None:
            try:
                if self._serving:       # a readiness look: bring an unloaded default back
                    engine.keep_default_loaded()
                response.models = [conv.model_info_to_msg(m) for m in engine.list_models()]
                response.default_model = engine.default_model
            except Exception as exc:
                _internal(self, exc)
        return response

    def _admin(self, op: str, request, response):
        t0 = time.perf_counter()
        model = request.model      # taken as sent, as embed takes it (' x' is not 'x')
        try:
            engine = self.engine
            refusal = self._refusal(engine)
            if refusal:
                raise refusal
            if not model.strip():
                raise EngineError(ErrorCode.INVALID_INPUT, 'model must not be empty')
            fut, copy = self._admin_once(op, engine, model)
        except Exception as exc:
            return self._admin_failed(op, model, response, exc, t0)

        def build(f: Future):
            try:
                info = f.result()
                if self.engine is not engine:
                    # cleanup/shutdown let that engine go meanwhile: what it loaded is gone
                    raise EngineError(ErrorCode.UNAVAILABLE, (
                        f'the node was cleaned up or shut down while {model} was being '
                        f'{op}ed: the engine it was {op}ed in is closed; call {op}_model '
                        'again once the node is active'), retry_after_s=1.0)
                response.model_info = conv.model_info_to_msg(info)
                status = response.model_info.status
                if op == 'load' and status != 'loaded':
                    # the engine's load answers the model's status as it stands when an
                    # unload_model that came meanwhile won (manager.load): not loaded
                    raise EngineError(ErrorCode.UNAVAILABLE, (
                        f'{model} is not loaded (status {status}): it was unloaded by a '
                        'concurrent unload_model while this load ran; load it again'),
                        retry_after_s=1.0)
                response.success = True
                response.error_code = ''
                response.message = f'{model} {op}ed'
                breakers = self.breakers
                if op == 'load' and breakers is not None:
                    breakers.reprieve(info.id)      # mended: its probes go through now
                if not copy:
                    self._log.info(response.message)
            except Exception as exc:
                self._admin_failed(op, model, response, exc, t0, logged=not copy)
            return response
        return Deferred(fut, build)

    def _admin_once(self, op: str, engine: EmbeddingEngine, model: str) -> tuple:
        """Run the load or unload on the pool, unless the same one is in flight: then join it.

        Returns ``(future, copy)``; a copy is answered alike but not logged again (a new
        client's first load_model, re-sent until answered, was loaded and logged 4 times).
        """
        key = (op, id(engine), model)
        with self._stats_lock:
            shared = self._admin_in_flight.get(key)
            if shared is not None:
                return shared, True
            fn = engine.load_model if op == 'load' else engine.unload_model
            shared = self._admin_in_flight[key] = self._pool.submit(fn, model)
        self._forget_when_done(self._admin_in_flight, key, shared)
        return shared, False

    def _forget_when_done(self, in_flight: dict, key, fut: Future) -> None:
        """Drop ``in_flight[key]`` once ``fut`` is done (if it still names ``fut``)."""
        def forget(_f) -> None:
            with self._stats_lock:
                if in_flight.get(key) is fut:
                    del in_flight[key]
        fut.add_done_callback(forget)

    def _admin_failed(self, op: str, model: str, response, exc: BaseException, t0: float,
                      logged: bool = True):
        err = exc if isinstance(exc, EngineError) else _internal(self, exc)
        conv.fill_error(response, err)
        if logged:
            self._log_failure(err, f'{op}_model failed: model={model[:128]!r}',
                              (time.perf_counter() - t0) * 1000.0)
        return response

    def _on_load_model(self, request, response):
        return self._admin('load', request, response)

    def _on_unload_model(self, request, response):
        return self._admin('unload', request, response)

    # --- diagnostics -----------------------------------------------------------------------
    def diagnostic_status(self) -> DiagnosticStatus:
        """One DiagnosticStatus: lifecycle state, model, provider, queue depth, counters."""
        st = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: embedding engine',
                              hardware_id='akidb_ros')
        values = {'serving': str(self._serving).lower(),
                  'responses_pending': str(self.responder.outstanding),
                  'replies_resent': str(self.responder.resent),
                  'replies_undelivered': str(self.responder.undelivered),
                  'calls_ok': str(self.calls_ok), 'calls_failed': str(self.calls_failed)}
        engine = self.engine
        twins = self._embed_servers() if self._serving else 1
        if engine is None and self._configure_error and not self._shutting_down:
            # a lifecycle manager's configure failed: say why where the robot's monitors look
            st.level = DiagnosticStatus.ERROR
            st.message = f'configure failed: {self._configure_error}'
            values['configure_error'] = self._configure_error
        elif engine is None:
            st.level, st.message = DiagnosticStatus.WARN, (
                'shutting down' if self._shutting_down else self.lifecycle_state)
        else:
            try:
                h = engine.health()
                loaded = [m.id for m in engine.list_models() if m.status.value == 'loaded']
                values.update({'status': h.status, 'default_model': h.default_model,
                               'provider': h.provider, 'provider_note': h.provider_note,
                               'queue_size': str(h.queue_size),
                               'queue_capacity': str(h.queue_capacity),
                               'loaded_models': ','.join(loaded), 'version': h.version})
                values.update({f'check.{k}': v for k, v in h.checks.items()})
                tripped = self._tripped_breakers()
                values['circuit_open'] = ','.join(tripped)
                if self._shutting_down:
                    st.level, st.message = DiagnosticStatus.WARN, 'shutting down'
                elif not self._serving:
                    st.level, st.message = DiagnosticStatus.WARN, 'inactive'
                elif twins > 1:
                    st.level, st.message = DiagnosticStatus.WARN, (
                        f'{twins} servers of embed on this ROS domain and namespace: every '
                        'call runs on each of them')
                elif h.status == 'healthy' and tripped:
                    st.level, st.message = DiagnosticStatus.WARN, (
                        f'circuit open for {", ".join(tripped)}: their embed calls are '
                        'answered CIRCUIT_OPEN')
                elif h.status == 'healthy':
                    st.level, st.message = DiagnosticStatus.OK, \
                        f'serving {h.default_model} on {h.provider}'
                elif h.status == 'degraded':
                    st.level, st.message = DiagnosticStatus.WARN, 'degraded'
                else:
                    st.level, st.message = DiagnosticStatus.ERROR, h.status
            except Exception as exc:
                st.level, st.message = DiagnosticStatus.ERROR, f'health check failed: {exc}'
        values['embed_servers'] = str(twins)
        st.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        return st

    def _tripped_breakers(self) -> list:
        """Models whose breaker is open or half-open (probing), sorted."""
        breakers = self.breakers
        if breakers is None:
            return []
        return sorted(m for m, snap in breakers.snapshot().items()
                      if snap['state'] != 'closed')

    def _embed_servers(self) -> int:
        """Count the servers of our ``embed`` in the graph (ours included).

        More than one is logged once per change: DDS delivers each request to every server, so
        two nodes in one namespace both run every call and the caller takes whichever answer
        comes first, with no error.
        """
        try:
            # the name as served: count_services expands a relative name but applies no remap
            # (-r embed:=other), so it would look for servers of a name nobody serves
            name = self.resolve_service_name('embed')
            n = self.count_services(name)
        except Exception:       # graph query during shutdown
            return 1
        if n != self._twins_logged:
            self._twins_logged = n
            if n > 1:
                self._log.warning(f'{n} servers of {name} on '
                                  'this ROS domain: every call runs on each of them and the '
                                  'caller takes the first answer (give each node its own '
                                  'namespace)')
        return n

    def publish_diagnostics(self) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [self.diagnostic_status()]
        self._diag_pub.publish(msg)

    def destroy_node(self) -> None:
        # also called by the context on a node whose __init__ failed half-way
        if getattr(self, 'responder', None) is not None:
            self.responder.stop()
        for pool in (getattr(self, '_pool', None), getattr(self, '_prep_pool', None)):
            if pool is not None:
                pool.shutdown(wait=False)
        if getattr(self, '_metrics_server', None) is not None:
            try:
                self._metrics_server[0].shutdown()
            except Exception:
                pass
        super().destroy_node()


def _installed_config() -> Optional[str]:
    """In a colcon/ament install the source tree's config/ is absent: use the package share.

    ``None`` keeps the engine's own default ($AKIDB_CONFIG, else the repo's config/models.yaml).
    """
    from akidb_ros.engine.config import DEFAULT_CONFIG_PATH
    if os.environ.get('AKIDB_CONFIG') or DEFAULT_CONFIG_PATH.exists():
        return None
    try:
        from ament_index_python.packages import get_package_share_directory
        path = os.path.join(get_package_share_directory('akidb_ros'), 'config', 'models.yaml')
    except Exception:
        return None
    return path if os.path.exists(path) else None


def _start_span(request):
    """SERVER span continuing the caller's W3C trace (sidecar hop); None if tracing is off."""
    try:
        from opentelemetry import trace
        from akidb_ros.observability.tracing import extract_traceparent, tracer
        rid, forwarded = conv.split_forwarded(request.request_id)
        return tracer().start_span(
            'ros /embed', context=extract_traceparent(request.traceparent),
            kind=trace.SpanKind.SERVER,
            attributes={'rpc.system': 'ros2', 'rpc.service': 'akidb_ros/srv/Embed',
                        'akidb.transport': conv.FORWARDED_TRANSPORT if forwarded else 'ros',
                        'akidb.inputs': len(request.inputs), 'akidb.request_id': rid[:128]})
    except Exception:
        return None


def _in_span(span, fn, *args):
    """Call ``fn`` with ``span`` current (the engine may read the context at submit time)."""
    from opentelemetry import trace
    with trace.use_span(span, end_on_exit=False):
        return fn(*args)


def _end_span(span, err: Optional[EngineError], model: str) -> None:
    """End the call's span, naming ``model`` in it.

    ``model``: the model that served the call, or the bounded label of the one asked for (as
    on the metrics, never the caller's text).
    """
    if span is None:
        return
    try:
        span.set_attribute('akidb.model', model)
        if err is not None:
            from opentelemetry import trace
            span.set_attribute('akidb.error_code', err.code.name)
            span.set_status(trace.StatusCode.ERROR, err.code.name)
        span.end()
    except Exception:
        pass


def _setup_tracing() -> bool:
    """Install the OTLP/console exporter when the OTEL_* environment asks for one."""
    if not (os.environ.get('OTEL_TRACES_EXPORTER') or os.environ.get(
            'OTEL_EXPORTER_OTLP_ENDPOINT') or os.environ.get(
            'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT')):
        return False
    try:
        from akidb_ros.observability.tracing import setup_tracing
        return setup_tracing('akidb-ros-node') is not None
    except ValueError:
        raise               # a bad OTEL_* value: the caller refuses it, as the server does
    except Exception as exc:
        print(f'embedding_node: tracing not set up: {exc}', file=sys.stderr)
        return False


def _chain(src: Future, dst: Future) -> None:
    """Give ``dst`` the outcome of ``src`` (a ``dst`` its caller cancelled stays so)."""
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        _settle(dst, exc=exc)
    else:
        _settle(dst, result=src.result())


def _settle(fut: Future, result=None, exc: Optional[BaseException] = None) -> None:
    """Set ``fut``'s outcome unless it is already settled (cancelled by its caller)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def _cancel_with(outer: Future, inner: Future) -> None:
    """Cancel ``inner`` (the engine's job) with ``outer`` (a withdrawn call).

    The job is then settled at once, its sentences not yet run skipped.
    """
    outer.add_done_callback(lambda o: inner.cancel() if o.cancelled() else None)


def _internal(node: EmbeddingNode, exc: BaseException) -> EngineError:
    node.log.error(f'internal error: {exc!r}')
    return EngineError(ErrorCode.INTERNAL, f'internal error: {type(exc).__name__}: {exc}')


class _Stop:
    """Turns SIGINT/SIGTERM into an event (rclpy's own handlers would kill calls in flight)."""

    def __init__(self):
        self.event = threading.Event()
        self.count = 0
        self.signame = ''

    def __call__(self, signum, frame) -> None:
        self.count += 1
        self.signame = signal.Signals(signum).name
        self.event.set()
        if self.count > 1:          # a second signal: stop waiting for calls in flight
            raise KeyboardInterrupt


def make_executor(node: EmbeddingNode, context=None):
    """Create the executor named by the node's ``executor`` parameter."""
    if node.get_parameter('executor').value == 'events':
        from rclpy.experimental import EventsExecutor
        return EventsExecutor(context=context)
    return MultiThreadedExecutor(num_threads=node.get_parameter('executor_threads').value,
                                 context=context)


def checked_node(args, **kwargs) -> EmbeddingNode:
    """``EmbeddingNode(**kwargs)``, checked against the ``-p`` overrides ROS dropped.

    Raises ``ValueError`` where ROS dropped a ``-p`` of ``args`` for one of the node's
    parameters (:func:`params.dropped_overrides`).
    """
    node = EmbeddingNode(**kwargs)
    dropped = P.dropped_overrides(args, node._parameter_overrides)    # no public accessor
    if dropped:
        node.destroy_node()
        raise ValueError('; '.join(dropped))
    return node


class InProcessNode:
    """The node hosted on a caller's engine, spinning in a background thread.

    See :func:`start_in_process`. ``stop()`` answers the calls in flight, leaves the engine open.
    """

    def __init__(self, engine: EmbeddingEngine, args=None, namespace: str = '',
                 breakers=BREAKERS_FROM_PARAMS):
        from rclpy.context import Context
        self.context = Context()
        args, python_logs = ros_console_args(args)
        # the node's own process answers these with exit 2 (run); here they are the config
        # errors of the process that hosts it, one line each
        try:
            rclpy.init(args=args, context=self.context,
                       signal_handler_options=SignalHandlerOptions.NO)
        except Exception as exc:
            raise ConfigError(f'embedding node: invalid --ros-args: {exc}') from None
        kwargs = {'namespace': namespace} if namespace else {}
        try:
            self.node = checked_node(args, engine=engine, context=self.context,
                                     breakers=breakers,
                                     python_logs=python_logs, **kwargs)
        except Exception as exc:
            rclpy.try_shutdown(context=self.context)
            raise ConfigError(f'embedding node: invalid parameters: {exc}') from None
        self.executor = make_executor(self.node, self.context)
        self.executor.add_node(self.node)
        if self.node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self._close()
            raise RuntimeError('embedding node did not configure')
        self.node.trigger_activate()
        self._running = True
        self._thread = threading.Thread(target=self._spin, name='akidb-ros-node', daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self._running and self.context.ok():
            self.executor.spin_once(timeout_sec=0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new calls, answer those in flight, then tear the node down."""
        if not self._running:
            return
        self.node.begin_shutdown()
        self.node.finish_calls(timeout)     # the executor keeps spinning in its thread
        self._running = False
        self._thread.join(timeout=5.0)
        try:
            self.node.trigger_shutdown()
        except Exception:
            pass
        self._close()

    def _close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def start_in_process(engine: EmbeddingEngine, args=None, namespace: str = '',
                     breakers=BREAKERS_FROM_PARAMS) -> InProcessNode:
    """Serve ``engine`` (already started, owned by the caller) over ROS in this process.

    Used by ``akidb_ros.server --mode inprocess`` so REST, gRPC and ROS share one engine (and,
    given ``breakers``, one circuit breaker per model: see :class:`EmbeddingNode`).
    Returns a handle whose ``stop()`` stops the node (the engine stays open).
    """
    return InProcessNode(engine, args=args, namespace=namespace, breakers=breakers)


def _wait_until(cond: Callable[[], bool], timeout: float, pause: Callable[[float], None],
                step: float = 0.02) -> bool:
    """Pause until ``cond()`` holds or ``timeout`` has passed; return whether it holds.

    ``pause(seconds)`` is a sleep, or a spin of the executor.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pause(min(left, step))
    return True


def _spin_until(executor, cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    return _wait_until(cond, timeout, lambda s: executor.spin_once(timeout_sec=s), step)


def _autostart(node: EmbeddingNode, executor, stop: '_Stop') -> int:
    """Configure and activate at start; the exit code so far (1: configure failed).

    ``configure`` runs off the executor, which keeps turning (``get_state``, /diagnostics); a
    signal meanwhile stops at once (a first TensorRT build can take minutes). With
    ``configure_retry_s`` > 0 a failed configure is tried again, the wait doubling up to
    ``CONFIGURE_RETRY_CAP_S`` (or ``configure_retry_s`` if larger), while the node stays up
    unconfigured with the reason on /diagnostics: a restarter (launch's respawn, systemd) would
    repeat the same error every second instead, and a parameter fixed meanwhile
    (``set_parameters``) is read at the next try. A lifecycle manager's transition meanwhile
    ends the retries.
    """
    wait = 0.0
    while not stop.event.is_set():
        configured = node.configure_async()
        _spin_until(executor, lambda: configured.done() or stop.event.is_set(),
                    float('inf'), step=0.1)
        if not configured.done():
            return 0            # stopped by a signal: the graceful stop follows
        if not configured.exception() and \
                configured.result() == TransitionCallbackReturn.SUCCESS:
            if not stop.event.is_set():
                node.trigger_activate()     # creates the services, prints the ready line
            return 0
        retry = node.get_parameter('configure_retry_s').value
        if retry <= 0:
            node.log.fatal('could not configure the embedding engine; exiting')
            return 1
        wait = retry if not wait else min(wait * 2, max(CONFIGURE_RETRY_CAP_S, retry))
        node.ensure_services()      # meanwhile callers are answered: UNAVAILABLE, node_state
        node.log.error('could not configure the embedding engine; staying up unconfigured, '
                       f'next try in {wait:g} s (configure_retry_s)')

        def moved() -> bool:
            return node.configuring or node.lifecycle_state != 'unconfigured'
        _spin_until(executor, lambda: stop.event.is_set() or moved(), wait, step=0.1)
        if moved():
            node.log.info('a lifecycle transition came meanwhile: no more configure retries')
            return 0
    return 0


def run(args=None) -> int:
    """Run the node until SIGINT/SIGTERM; returns the process exit code."""
    stop = _Stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = 0
    forced = False
    try:
        traced = _setup_tracing()
    except ValueError as exc:
        print(f'embedding_node: tracing (OTEL_* variables): {exc}', file=sys.stderr, flush=True)
        return 2
    args, python_logs = ros_console_args(args)
    clean_zombie_shm_at_start(logging.getLogger('akidb_ros.dds'))     # before joining DDS
    try:
        ros = rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as exc:    # RCLError: a params file that does not parse, a bad --ros-args
        print(f'embedding_node: invalid --ros-args: {exc}', file=sys.stderr, flush=True)
        return 2
    with ros:
        try:
            node = checked_node(args, python_logs=python_logs)
        except Exception as exc:    # e.g. a parameter override outside its descriptor's range
            print(f'embedding_node: invalid parameters: {exc}', file=sys.stderr, flush=True)
            return 2
        node.announce_ready = True
        executor = make_executor(node)
        executor.add_node(node)
        log = node.log
        try:
            if node.get_parameter('autostart').value:
                rc = _autostart(node, executor, stop)
            while rc == 0 and rclpy.ok() and not stop.event.is_set():
                executor.spin_once(timeout_sec=0.1)
            # Graceful stop, one budget from the signal: refuse new calls, let the engine finish
            # the accepted ones (engines released by earlier cleanups too) and keep answering
            # meanwhile; at the deadline answer the calls still unfinished UNAVAILABLE.
            t_stop = time.monotonic()
            node.begin_shutdown()
            cut = node.finish_calls(node.get_parameter('shutdown_timeout_s').value,
                                    spin=lambda s: executor.spin_once(timeout_sec=s))
            # Answer calls still in transit (UNAVAILABLE) for a moment, then go.
            _spin_until(executor, lambda: False, 0.1)
            node.responder.stop()       # sends what is queued; re-sends still due are given up
            if stop.signame:
                log.info(f'{stop.signame}: stopped in {time.monotonic() - t_stop:.2f} s '
                         f'({node.calls_ok} calls answered ok, {node.calls_failed} failed'
                         f'{f", {cut} of them cut short by shutdown_timeout_s" if cut else ""}'
                         f', {node.responder.undelivered} replies undelivered)')
        except (KeyboardInterrupt, ExternalShutdownException):
            forced = True
            log.warning('interrupted again: exiting without waiting for calls in flight')
        finally:
            # (a node a lifecycle manager already shut down is 'finalized': nothing to do)
            if not forced and not node.wait_configured(
                    node.get_parameter('shutdown_timeout_s').value):
                log.warning('exiting while a configure is still loading models')
            elif not forced and node.lifecycle_state in ('unconfigured', 'inactive', 'active'):
                try:
                    node.trigger_shutdown()
                except Exception as exc:
                    log.error(f'shutdown transition failed: {exc}')
            executor.shutdown(timeout_sec=1.0)
            node.destroy_node()
    if traced:
        from akidb_ros.observability.tracing import shutdown_tracing
        shutdown_tracing()          # flush spans before the process ends
    return rc


def usage() -> str:
    """``embedding_node --help``: how to run it and every parameter with its range."""
    lines = ['usage: embedding_node [--ros-args --params-file FILE -p NAME:=VALUE '
             '-r __ns:=/NAMESPACE --log-level LEVEL]', '',
             'The akidb_ros embedding node: services embed, list_models, load_model, '
             'unload_model and /diagnostics.',
             'Source scripts/dds_env.sh (or set FASTDDS_DEFAULT_PROFILES_FILE) first so DDS '
             'stays where you want it.', '', 'parameters (config/params.yaml):']
    for spec in P.PARAMS:
        rng = f' [{spec.range[0]}..{spec.range[1]}]' if spec.range else ''
        ro = ' (read-only)' if spec.read_only else ''
        said = f' ({spec.constraints})' if spec.constraints else ''
        lines.append(f'  {spec.name} = {spec.default!r}{rng}{ro}: {spec.description}{said}')
    return '\n'.join(lines)


def main(args=None) -> int:
    """Entry point of ``embedding_node`` / ``python -m akidb_ros.ros.node``.

    After a clean stop (every call answered, node destroyed, ROS context and its logging shut
    down) the process ends with ``os._exit``: interpreter finalisation of ONNX Runtime and
    Fast DDS objects otherwise adds 0.3-0.8 s, and the PRD wants an idle exit within 1 s.
    """
    argv = args if args is not None else sys.argv
    user_args = argv[1:argv.index('--ros-args')] if '--ros-args' in argv else argv[1:]
    if '-h' in user_args or '--help' in user_args:
        # Print, never start: a node started here would join DDS with whatever env it has.
        print(usage())
        return 0
    from akidb_ros.observability.logs import configure_logging, log_settings_error
    from akidb_ros.dds_env import domain_id_error
    bad_logs = log_settings_error() or domain_id_error()
    if bad_logs:            # one line, exit 2, like a bad parameter (was a traceback)
        print(f'embedding_node: {bad_logs}', file=sys.stderr)
        return 2
    configure_logging()     # the engine's Python loggers, and the node's lines (NodeLog)
    try:
        rc = run(argv)
    except KeyboardInterrupt:
        rc = 0
    if args is None or args is sys.argv:
        # The node, its executor and the ROS context sit in reference cycles: collected, the
        # context is finalized and Fast DDS deletes its participant. os._exit skips that, and
        # the participant's shared-memory segment stayed in /dev/shm at every clean exit.
        gc.collect()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == '__main__':
    sys.exit(main())
