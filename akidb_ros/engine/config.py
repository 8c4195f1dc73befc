"""Engine configuration: one JSON schema, YAML file + ``AKIDB_*`` env overrides, validated once.

The schema (``CONFIG_SCHEMA``) is the single source of truth: it validates the file, gives every
error a path (``engine.batching.max_batch_size: -1 is less than the minimum of 1``) and is rendered
into the configuration reference.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / 'config' / 'models.yaml'

POOLING_MODES = ('mean', 'cls', 'last_token')
DEVICES = ('auto', 'cpu', 'cuda', 'tensorrt')


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


def _int(minimum: int, maximum: Optional[int] = None) -> dict:
    spec = {'type': 'integer', 'minimum': minimum}
    if maximum is not None:
        spec['maximum'] = maximum
    return spec


def _num(minimum: float, maximum: Optional[float] = None, exclusive: bool = False) -> dict:
    spec = {'type': 'number', ('exclusiveMinimum' if exclusive else 'minimum'): minimum}
    if maximum is not None:
        spec['maximum'] = maximum
    return spec


MODEL_SCHEMA = {
    'type': 'object',
    'additionalProperties': False,
    'required': ['id', 'name', 'path', 'tokenizer', 'dimension', 'max_tokens'],
    'properties': {
        'id': {'type': 'string', 'pattern': r'^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$'},
        'name': {'type': 'string', 'minLength': 1},
        'path': {'type': 'string', 'minLength': 1},
        'tokenizer': {'type': 'string', 'minLength': 1},
        'dimension': _int(1, 65536),
        'max_tokens': _int(1, 131072),
        'pooling': {'enum': list(POOLING_MODES)},
        'normalize': {'type': 'boolean'},
        'query_prefix': {'type': 'string'},
        'passage_prefix': {'type': 'string'},
        'params': _int(0),
        'memory_mb': _int(0),
    },
}

CONFIG_SCHEMA = {
    '$schema': 'https://json-schema.org/draft/2020-12/schema',
    'type': 'object',
    'additionalProperties': False,
    'required': ['default_model', 'models'],
    'properties': {
        'default_model': {'type': 'string', 'minLength': 1},
        'models_dir': {'type': 'string'},
        'engine': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'device': {'enum': list(DEVICES)},
                'intra_op_threads': _int(0, 256),
                'inter_op_threads': _int(0, 256),
                'allow_spinning': {'type': 'boolean'},
                'tensorrt_cache': {'type': 'string'},
                'tensorrt_fp16': {'type': 'boolean'},
                'cuda_tf32': {'type': 'boolean'},
                'gpu_metrics_interval_s': _num(0, 3600),
                'cache': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'max_loaded_models': _int(1, 64),
                        'max_memory_mb': _int(1),
                    },
                },
                'batching': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'max_batch_size': _int(1, 1024),
                        'max_batch_tokens': _int(1),
                        'max_wait_ms': _num(0, 1000),
                        'max_padding_ratio': _num(1.0, 100.0),
                        'split_policy': {'enum': ['cost', 'padding']},
                        'runners': _int(1, 16),
                    },
                },
                'queue': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'capacity': _int(1, 1_000_000),
                        'shed_threshold': _num(0, 1, exclusive=True),
                    },
                },
                'timeouts': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'inference_s': _num(0, 3600, exclusive=True),
                        'model_load_s': _num(0, 3600, exclusive=True),
                    },
                },
                'limits': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'max_inputs': _int(1, 100_000),
                        'max_input_chars': _int(1),
                        'max_total_bytes': _int(1),
                    },
                },
            },
        },
        'models': {'type': 'array', 'minItems': 1, 'items': MODEL_SCHEMA},
    },
}


@dataclass
class ModelConfig:
    id: str
    name: str
    path: Path
    tokenizer: Path
    dimension: int
    max_tokens: int
    pooling: str = 'mean'
    normalize: bool = True
    query_prefix: str = ''
    passage_prefix: str = ''
    params: int = 0
    memory_mb: int = 0

    @property
    def installed(self) -> bool:
        return self.path.is_file() and self.tokenizer.is_file()

    def memory_estimate_mb(self) -> int:
        """Configured size, else the ONNX files' size (weights dominate resident memory)."""
        if self.memory_mb:
            return self.memory_mb
        files = (self.path, self.path.with_name(self.path.name + '.data'))
        size = sum(f.stat().st_size for f in files if f.is_file())
        return max(1, size >> 20) if size else 0


@dataclass
class CacheConfig:
    max_loaded_models: int = 2
    max_memory_mb: int = 2048


@dataclass
class BatchingConfig:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait_ms: float = 2.0
    max_padding_ratio: float = 1.25
    split_policy: str = 'cost'
    runners: int = 2


@dataclass
class QueueConfig:
    capacity: int = 1000
    shed_threshold: float = 0.95


@dataclass
class TimeoutConfig:
    inference_s: float = 5.0
    model_load_s: float = 60.0


@dataclass
class LimitsConfig:
    max_inputs: int = 256
    max_input_chars: int = 32768
    max_total_bytes: int = 10 * 1024 * 1024


@dataclass
class EngineSettings:
    device: str = 'auto'
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    tensorrt_cache: Path = Path('~/.cache/akidb/trt').expanduser()
    tensorrt_fp16: bool = True
    cuda_tf32: bool = False
    gpu_metrics_interval_s: float = 5.0
    cache: CacheConfig = field(default_factory=CacheConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class EngineConfig:
    default_model: str
    models: List[ModelConfig]
    engine: EngineSettings = field(default_factory=EngineSettings)
    source: str = '<dict>'

    def model(self, model_id: str) -> Optional[ModelConfig]:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


def _error_path(err: jsonschema.ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f'[{p}]' for p in err.absolute_path]
    return '.'.join(parts).replace('.[', '[') or '<root>'


def validate(raw: Any, source: str = '<dict>') -> None:
    """Raise ConfigError listing every schema violation with its key path."""
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f'{_error_path(e)}: {e.message}' for e in errors]
        raise ConfigError(f'invalid config {source}:\n  ' + '\n  '.join(lines))


def _deep_merge(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _slug(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '-', name.split('/')[-1]).strip('-').lower() or 'model'


def apply_env(raw: dict, env: Mapping[str, str]) -> dict:
    """Apply the PRD's AKIDB_* variables on top of the file (env wins)."""
    raw = copy.deepcopy(raw)
    engine = raw.setdefault('engine', {})
    if env.get('AKIDB_TENSORRT_CACHE'):
        engine['tensorrt_cache'] = env['AKIDB_TENSORRT_CACHE']
    if env.get('AKIDB_DEVICE'):
        engine['device'] = env['AKIDB_DEVICE']
    if env.get('AKIDB_MODELS_DIR'):
        raw['models_dir'] = env['AKIDB_MODELS_DIR']
    if env.get('AKIDB_MODEL_PATH'):
        name = env.get('AKIDB_MODEL_NAME') or Path(env['AKIDB_MODEL_PATH']).stem
        tok = env.get('AKIDB_TOKENIZER_PATH') or str(
            Path(env['AKIDB_MODEL_PATH']).with_name('tokenizer.json'))
        known = next((m for m in raw.get('models', []) if m.get('name') == name
                      or m.get('id') == name), None)
        dim_text = env.get('AKIDB_MODEL_DIMENSION', '')
        if not dim_text and known and known.get('dimension'):
            dim_text = str(known['dimension'])     # a catalogue model: its dimension is known
        if not dim_text.isdigit() or int(dim_text) == 0:
            raise ConfigError(
                f'AKIDB_MODEL_DIMENSION must be a positive integer when AKIDB_MODEL_PATH names '
                f'a model outside the catalogue (got {dim_text!r})')
        entry = dict(known) if known else {'id': _slug(name), 'name': name, 'max_tokens': 512}
        entry.update({'path': env['AKIDB_MODEL_PATH'], 'tokenizer': tok,
                      'dimension': int(dim_text)})
        raw['models'] = [m for m in raw.get('models', []) if m is not known] + [entry]
        raw['default_model'] = entry['id']
    elif env.get('AKIDB_MODEL_NAME'):
        wanted = env['AKIDB_MODEL_NAME']
        match = next((m for m in raw.get('models', [])
                      if wanted in (m.get('id'), m.get('name'))), None)
        if match is None:
            raise ConfigError(f'AKIDB_MODEL_NAME={wanted!r} names no model in the catalogue')
        raw['default_model'] = match['id']
    if env.get('AKIDB_DEFAULT_MODEL'):
        raw['default_model'] = env['AKIDB_DEFAULT_MODEL']
    return raw


def build(raw: dict, base_dir: Path, source: str = '<dict>') -> EngineConfig:
    """Validate a raw dict and turn it into typed config (paths resolved)."""
    validate(raw, source)
    models_dir = Path(os.path.expanduser(raw.get('models_dir', 'models')))
    if not models_dir.is_absolute():
        models_dir = (base_dir / models_dir).resolve()

    def resolve(p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else models_dir / path

    models, seen = [], set()
    for m in raw['models']:
        if m['id'] in seen:
            raise ConfigError(f'invalid config {source}: models: duplicate model id {m["id"]!r}')
        seen.add(m['id'])
        models.append(ModelConfig(
            id=m['id'], name=m['name'], path=resolve(m['path']),
            tokenizer=resolve(m['tokenizer']), dimension=m['dimension'],
            max_tokens=m['max_tokens'], pooling=m.get('pooling', 'mean'),
            normalize=m.get('normalize', True), query_prefix=m.get('query_prefix', ''),
            passage_prefix=m.get('passage_prefix', ''), params=m.get('params', 0),
            memory_mb=m.get('memory_mb', 0)))
    if raw['default_model'] not in seen:
        raise ConfigError(
            f'invalid config {source}: default_model: {raw["default_model"]!r} is not one of '
            f'the models ({", ".join(sorted(seen))})')

    e = raw.get('engine', {})
    settings = EngineSettings(
        device=e.get('device', 'auto'),
        intra_op_threads=e.get('intra_op_threads', 0),
        inter_op_threads=e.get('inter_op_threads', 1),
        allow_spinning=e.get('allow_spinning', False),
        tensorrt_cache=Path(os.path.expanduser(e.get('tensorrt_cache', '~/.cache/akidb/trt'))),
        tensorrt_fp16=e.get('tensorrt_fp16', True),
        cuda_tf32=e.get('cuda_tf32', False),
        gpu_metrics_interval_s=e.get('gpu_metrics_interval_s', 5.0),
        cache=CacheConfig(**e.get('cache', {})),
        batching=BatchingConfig(**e.get('batching', {})),
        queue=QueueConfig(**e.get('queue', {})),
        timeouts=TimeoutConfig(**e.get('timeouts', {})),
        limits=LimitsConfig(**e.get('limits', {})),
    )
    return EngineConfig(default_model=raw['default_model'], models=models, engine=settings,
                        source=source)


def load_config(path: Optional[os.PathLike] = None,
                overrides: Optional[Mapping[str, Any]] = None,
                env: Optional[Mapping[str, str]] = None) -> EngineConfig:
    """Load ``path`` (default ``config/models.yaml`` or ``$AKIDB_CONFIG``), env, then overrides.

    ``overrides`` is a nested dict in the file's shape (e.g. from ROS parameters) and wins over
    both the file and the environment.
    """
    env = os.environ if env is None else env
    path = Path(path or env.get('AKIDB_CONFIG') or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f'cannot read config {path}: {exc.strerror or exc}') from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f'config {path} is not valid YAML: {exc}') from exc
    if not isinstance(raw, dict):
        raise ConfigError(f'invalid config {path}: the top level must be a mapping')
    raw = apply_env(raw, env)
    if overrides:
        raw = _deep_merge(raw, overrides)
    return build(raw, path.resolve().parent, str(path))
