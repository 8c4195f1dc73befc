"""ROS parameters of the embedding node: declarations, descriptors and the engine mapping.

Every parameter is declared with a :class:`ParameterDescriptor` (description, constraints and,
for numbers, an ``IntegerRange``/``FloatingPointRange`` that rclpy enforces on every set).

The engine's single source of configuration is ``config/models.yaml`` (see
``akidb_ros.engine.config``). Engine parameters here are *overrides*: their default is a
sentinel (``''``, ``0`` or ``-1``) meaning "keep the file's value", so the YAML stays the one
place that documents the defaults. Engine overrides take effect at the next ``configure``
transition (the engine is built there); ``diagnostics_period_s`` applies at once.

A YAML null for a text parameter whose ``''`` means "the default" (``config_path: ~`` in a
params file, ``-p config_path:=~``) reaches the node as the text ``~`` (or ``null``): it means
``''`` too (:func:`unset_if_null`), not a file or model of that name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType)

from akidb_ros.engine.config import DEVICES   # the engine's list is the one source
from akidb_ros.guard.breaker import BreakerSettings   # its defaults are the breaker's own

INT_MAX = 2 ** 31 - 1
EXECUTORS = ('multi_threaded', 'events')
# Shortest /diagnostics period: the timer runs on the node's executor, and a period of
# microseconds would keep it (and a core) busy publishing.
MIN_DIAGNOSTICS_PERIOD_S = 0.1
# How YAML writes null; rcl hands a text parameter set to null over as this text.
YAML_NULLS = ('~', 'null', 'Null', 'NULL')
# Text parameters whose '' means "the default": a YAML null means the same.
NULL_MEANS_UNSET = ('config_path', 'default_model', 'preload_models', 'device')
_BREAKER = BreakerSettings()
# numbers a descriptor's closed range cannot keep above 0
POSITIVE = ('breaker.failure_ratio', 'breaker.open_s')


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: name, default, description and range."""

    name: str
    default: Any
    description: str
    # (from, to) for numbers; None: no range
    range: Optional[tuple] = None
    read_only: bool = False
    constraints: str = ''
    # dotted path into the engine config dict (models.yaml shape); None: node-only parameter
    engine_key: Optional[str] = None
    # value meaning "not set, keep the config file's value"
    unset: Any = None
    # read when the node configures (builds its engine), not at once: every engine_key parameter
    # and the two that choose the file and the models to load
    at_configure: bool = False

    @property
    def read_at_configure(self) -> bool:
        return self.at_configure or self.engine_key is not None

    @property
    def type(self) -> int:
        if isinstance(self.default, bool):
            return ParameterType.PARAMETER_BOOL
        if isinstance(self.default, int):
            return ParameterType.PARAMETER_INTEGER
        if isinstance(self.default, float):
            return ParameterType.PARAMETER_DOUBLE
        return ParameterType.PARAMETER_STRING

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, type=self.type, description=self.description,
                                read_only=self.read_only)
        constraints = self.constraints
        if self.engine_key:
            note = (f'overrides {self.engine_key} of the engine config'
                    f' ({self.unset!r} = keep the file value); applied at the next configure')
            constraints = f'{constraints}; {note}' if constraints else note
        elif self.read_at_configure:
            note = 'applied at the next configure'
            constraints = f'{constraints}; {note}' if constraints else note
        d.additional_constraints = constraints
        if self.range is not None:
            lo, hi = self.range
            if self.type == ParameterType.PARAMETER_INTEGER:
                d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
            else:
                d.floating_point_range = [FloatingPointRange(from_value=float(lo),
                                                             to_value=float(hi), step=0.0)]
        return d


PARAMS: List[ParamSpec] = [
    # --- engine (applied when the node configures) ---
    ParamSpec('config_path', '', 'Engine config file (models catalogue + engine settings)',
              constraints="'' (or a YAML null, ~) = $AKIDB_CONFIG or the package's "
              "config/models.yaml; set at run time: must be a valid config",
              at_configure=True),
    ParamSpec('default_model', '', 'Model used when a request leaves `model` empty',
              constraints="'' = the config file's; set at run time: refused if the catalogue "
              "lacks it",
              engine_key='default_model', unset=''),
    ParamSpec('preload_models', '', 'Extra model ids loaded (and warmed) at configure',
              constraints='comma-separated catalogue ids (set at run time: refused if the '
              'catalogue lacks one); the default model is always loaded',
              at_configure=True),
    ParamSpec('device', '', 'Execution provider preference',
              constraints="one of '', auto, cpu, cuda, tensorrt (auto: TensorRT > CUDA > CPU)",
              engine_key='engine.device', unset=''),
    ParamSpec('intra_op_threads', -1,
              'ONNX Runtime threads per session (0 = one per core, or the CPU limit)',
              range=(-1, 256), engine_key='engine.intra_op_threads', unset=-1),
    ParamSpec('cache.max_loaded_models', 0, 'LRU limit: models kept loaded at once',
              range=(0, 64), engine_key='engine.cache.max_loaded_models', unset=0),
    ParamSpec('cache.max_memory_mb', 0, 'LRU limit: memory budget of loaded models (MB)',
              range=(0, INT_MAX), engine_key='engine.cache.max_memory_mb', unset=0),
    ParamSpec('batching.max_batch_size', 0, 'Sentences per inference batch',
              range=(0, 1024), engine_key='engine.batching.max_batch_size', unset=0),
    ParamSpec('batching.max_batch_tokens', 0, 'Padded tokens per inference batch',
              range=(0, INT_MAX), engine_key='engine.batching.max_batch_tokens', unset=0),
    ParamSpec('batching.max_wait_ms', -1.0, 'How long a batch stays open for concurrent callers '
              '(not where runners overlap on a CPU)',
              range=(-1.0, 1000.0), engine_key='engine.batching.max_wait_ms', unset=-1.0),
    ParamSpec('batching.runners', 0, 'Threads per model that take and run batches concurrently',
              range=(0, 16), engine_key='engine.batching.runners', unset=0),
    ParamSpec('queue.capacity', 0, 'Requests the engine queue accepts before OVERLOADED',
              range=(0, 1_000_000), engine_key='engine.queue.capacity', unset=0),
    ParamSpec('limits.max_inputs', 0, 'Most inputs in one Embed call (INPUT_TOO_LARGE above)',
              range=(0, 100_000), engine_key='engine.limits.max_inputs', unset=0),
    ParamSpec('limits.max_input_chars', 0, 'Longest input in characters (INPUT_TOO_LARGE above)',
              range=(0, INT_MAX), engine_key='engine.limits.max_input_chars', unset=0),
    ParamSpec('timeouts.inference_s', 0.0, 'Default per-call deadline (TIMEOUT after it)',
              range=(0.0, 3600.0), engine_key='engine.timeouts.inference_s', unset=0.0),
    # --- circuit breaker of embed (read at configure; in-process, the security config's) ---
    ParamSpec('breaker.enabled', True, 'Circuit breaker per model on embed: once failure_ratio '
              'of the last `window` calls of a model failed (MODEL_LOAD_FAILED, TIMEOUT, '
              'INTERNAL), its calls are answered CIRCUIT_OPEN at once for open_s, then '
              'half_open_probes calls test it', at_configure=True),
    ParamSpec('breaker.window', _BREAKER.window, 'Breaker: the last calls of a model it judges',
              range=(1, 10_000), at_configure=True),
    ParamSpec('breaker.min_calls', _BREAKER.min_calls,
              'Breaker: calls in the window before it may open', range=(1, 10_000),
              constraints='at most breaker.window', at_configure=True),
    ParamSpec('breaker.failure_ratio', _BREAKER.failure_ratio,
              'Breaker: share of failed calls in the window that opens it', range=(0.0, 1.0),
              constraints='above 0', at_configure=True),
    ParamSpec('breaker.open_s', _BREAKER.open_s,
              'Breaker: seconds it answers CIRCUIT_OPEN before letting probes through',
              range=(0.0, 86_400.0), constraints='above 0', at_configure=True),
    ParamSpec('breaker.half_open_probes', _BREAKER.half_open_probes,
              'Breaker: probe calls that must succeed to close it again', range=(1, 1000),
              at_configure=True),
    # --- node ---
    ParamSpec('autostart', True, 'Configure and activate at start (False: wait for lifecycle '
              'transitions, e.g. from a lifecycle manager)', read_only=True),
    ParamSpec('configure_retry_s', 0.0, 'When autostart\'s configure fails: 0 = exit 1; '
              '> 0 = stay up unconfigured (/diagnostics ERROR with the reason) and configure '
              'again after this many seconds, the wait doubling up to 60 s (or this value if '
              'larger); applies at once',
              range=(0.0, 3600.0)),
    ParamSpec('diagnostics_period_s', 1.0, 'Period of /diagnostics (0 = off, else at least '
              f'{MIN_DIAGNOSTICS_PERIOD_S} s); applies at once',
              range=(0.0, 3600.0),
              constraints=f'0 (off) or {MIN_DIAGNOSTICS_PERIOD_S}..3600'),
    ParamSpec('metrics_port', 0, 'Prometheus /metrics port (0 = off)', range=(0, 65535),
              read_only=True),
    ParamSpec('metrics_address', '127.0.0.1', 'Address the metrics server binds',
              read_only=True),
    ParamSpec('qos_depth', 1000, 'History depth of the service QoS (>= peak calls in flight: '
              'DDS drops the oldest untaken request beyond it, silently)',
              range=(16, 100_000), read_only=True),
    ParamSpec('executor', 'events', 'Executor spinning the node',
              constraints="multi_threaded (MultiThreadedExecutor, executor_threads threads) | "
              "events (rclpy.experimental.EventsExecutor, C++ event queue, one thread)",
              read_only=True),
    ParamSpec('executor_threads', 4, 'Threads of the MultiThreadedExecutor', range=(2, 64),
              read_only=True),
    ParamSpec('resend_window_s', 2.0, 'How long a reply DDS dropped (client not matched by '
              'discovery yet) is sent again before it is given up and logged (0 = never '
              'again); applies at once',
              range=(0.0, 60.0)),
    ParamSpec('shutdown_timeout_s', 10.0, 'On SIGINT/SIGTERM: how long, from the signal, calls in '
              'flight may take to finish (then they are answered UNAVAILABLE); also bounds the '
              'wait of an engine closed by cleanup/shutdown for its calls',
              range=(0.0, 600.0)),
]

PARAMS_BY_NAME: Dict[str, ParamSpec] = {p.name: p for p in PARAMS}


def declare_all(node) -> None:
    """Declare every parameter (with its descriptor) on ``node``."""
    node.declare_parameters('', [(p.name, p.default, p.descriptor()) for p in PARAMS])


# Parameters every rclpy node has (or is given by its tools), never a misspelling of ours.
_STANDARD_PARAMS = ('use_sim_time', 'start_type_description_service')


def unknown_overrides(node) -> List[str]:
    """Names given to ``node`` (params file, ``-p``) that it never declared.

    rclpy drops them silently, so a misspelt name (``max_batch_sise``) would leave the default
    in force with no sign. They are warned about, not refused: a params file's ``/**``
    section may rightly hold parameters for other nodes too.
    """
    given = getattr(node, '_parameter_overrides', {})     # rclpy has no public accessor
    return sorted(n for n in given if not node.has_parameter(n)
                  and n not in _STANDARD_PARAMS and not n.startswith('qos_overrides.'))


def dropped_overrides(args: Sequence[str], overrides: Mapping[str, Any]) -> List[str]:
    """Why each ``-p NAME:=VALUE`` for one of our parameters was dropped by ROS, if any was.

    rcl merges ``--params-file`` and ``-p`` into one table, and a ``-p`` value of another type
    than the file's value for the same name is dropped without a word: the file's value is
    used (``-p batching.max_batch_size:=abc`` beside a file that sets it to 0). Without a file
    the declaration's type check refuses that value; with one it is refused here, the same.
    ``overrides``: rclpy's resolved table (name -> Parameter).
    """
    given: Dict[str, str] = {}
    in_ros = False
    tokens = iter(args)
    for tok in tokens:
        if tok in ('--ros-args', '--'):
            in_ros = tok == '--ros-args'
        elif in_ros and tok in ('-p', '--param'):
            name, sep, text = next(tokens, '').partition(':=')
            if sep:
                given[name] = text          # the last -p of a name wins, as in rcl
    reasons = []
    for name, text in given.items():
        if name not in PARAMS_BY_NAME or name not in overrides:
            continue
        value = getattr(overrides[name], 'value', overrides[name])
        if not _same_value(text, value):
            reasons.append(f'-p {name}:={text} was dropped by ROS: the params file gives '
                           f'{name} as {type(value).__name__} {value!r}, and a -p value must '
                           'be of the same type')
    return reasons


def _same_value(text: str, value: Any) -> bool:
    """Whether ``value`` is what ``-p NAME:=text`` asked for (rcl reads the text as YAML)."""
    if isinstance(value, str) and value == text:
        return True
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = text
    if type(parsed) is type(value) and parsed == value:
        return True
    try:    # number spellings PyYAML reads otherwise than rcl (1e3, 0x10)
        if type(value) is float:
            return float(text) == value
        if type(value) is int:
            return int(text, 0) == value
    except ValueError:
        pass
    return False


def unset_if_null(value: Any) -> Any:
    """``''`` for a YAML null (``~``, ``null``: how rcl hands it over), else ``value``."""
    return '' if isinstance(value, str) and value.strip() in YAML_NULLS else value


def model_list(text: str) -> List[str]:
    """Split ``preload_models`` into model ids (comma-separated; '' or a YAML null: none)."""
    return [m.strip() for m in unset_if_null(text).split(',') if m.strip()]


def validate_value(name: str, value: Any) -> Optional[str]:
    """Check what a descriptor cannot express; return why a value is refused, or None."""
    if name == 'executor' and value not in EXECUTORS:
        return f"executor must be one of {', '.join(EXECUTORS)} (got {value!r})"
    if name == 'device' and unset_if_null(value) not in ('',) + DEVICES:
        return f"device must be one of '', {', '.join(DEVICES)} (got {value!r})"
    if name == 'diagnostics_period_s' and isinstance(value, (int, float)) \
            and 0 < value < MIN_DIAGNOSTICS_PERIOD_S:
        return (f'diagnostics_period_s must be 0 (off) or in range '
                f'{MIN_DIAGNOSTICS_PERIOD_S}..3600 (got {value})')
    if name in POSITIVE and isinstance(value, (int, float)) and value <= 0:
        return f'{name} must be above 0 (got {value})'
    spec = PARAMS_BY_NAME.get(name)
    if spec is not None and spec.engine_key and spec.range is not None \
            and isinstance(value, (int, float)) and value != spec.unset and value < 0:
        # The range lets the "keep the file's value" sentinel (-1) through; the engine's own
        # minimum is 0, so anything else below it would only fail at the next configure.
        return (f'{name} must be {spec.unset} (keep the config file value) or in range '
                f'0..{spec.range[1]} (got {value})')
    return None


def flatten(tree: Dict[str, Any], prefix: str = '') -> Iterator[Tuple[str, Any]]:
    """(dotted name, value) pairs of a nested ``ros__parameters`` mapping, as rclpy names them."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split('.')
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def engine_overrides(get: Callable[[str], Any]) -> Dict[str, Any]:
    """Nested overrides for ``load_config(path, overrides)`` from the set parameters."""
    out: Dict[str, Any] = {}
    for p in PARAMS:
        if not p.engine_key:
            continue
        value = get(p.name)
        if p.name in NULL_MEANS_UNSET:
            value = unset_if_null(value)
        if value == p.unset:
            continue
        _set_path(out, p.engine_key, value)
    return out


def breaker_settings(get: Callable[[str], Any]) -> Optional[BreakerSettings]:
    """Return the embed breaker's settings from the set parameters (``None``: breaker off).

    Raises ``ValueError`` naming the parameters when ``breaker.min_calls`` is above
    ``breaker.window`` (each is in range alone; together they are not).
    """
    if not get('breaker.enabled'):
        return None
    window, min_calls = get('breaker.window'), get('breaker.min_calls')
    if min_calls > window:
        raise ValueError(f'breaker.min_calls ({min_calls}) must be at most breaker.window '
                         f'({window})')
    return BreakerSettings(window=window, min_calls=min_calls,
                           failure_ratio=get('breaker.failure_ratio'),
                           open_s=get('breaker.open_s'),
                           half_open_probes=get('breaker.half_open_probes'))
