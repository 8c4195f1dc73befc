"""Engine configuration: one JSON schema, YAML file + ``AKIDB_*`` env overrides, validated once.

The schema (``CONFIG_SCHEMA``) is the single source of truth: it validates the file, gives every
error a path (``engine.batching.max_batch_size: -1 is less than the minimum of 1``) and is rendered
into the configuration reference.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / 'config' / 'models.yaml'

POOLING_MODES = ('mean', 'cls', 'last_token')
DEVICES = ('auto', 'cpu', 'cuda', 'tensorrt')
# max_tokens of a model from AKIDB_MODEL_PATH when neither the environment nor its files say
FALLBACK_MAX_TOKENS = 512

log = logging.getLogger('akidb_ros.engine.config')


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
        # bounded as the doors carry them (gRPC int32 memory_mb, counted once per session:
        # a larger number broke ListModels with UNKNOWN); far above any real model
        'params': _int(0, 10 ** 13),
        'memory_mb': _int(0, 1 << 20),
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
                        'tensorrt_build_s': _num(0, 86400, exclusive=True),
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
    # a load that builds a TensorRT engine (none cached for the model yet: minutes for a large
    # model on a Jetson) gets this instead of model_load_s
    tensorrt_build_s: float = 1800.0


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


def _is_integer(_checker, value) -> bool:
    # JSON Schema counts 2.0 as an integer; the engine would then compute with a float
    # (range(2.0) raises in a loader thread, a float dimension fails every request).
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker, value) -> bool:
    # NaN passes every minimum/maximum comparison (all are False) and infinity is no timeout.
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {'integer': _is_integer, 'number': _is_number}))


def _error_path(err: jsonschema.ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f'[{p}]' for p in err.absolute_path]
    return '.'.join(parts).replace('.[', '[') or '<root>'


def _error_message(err: jsonschema.ValidationError) -> str:
    value = err.instance
    if err.validator == 'type' and isinstance(value, bool) \
            and err.validator_value in ('integer', 'number'):
        kind = 'an integer' if err.validator_value == 'integer' else 'a number'
        return f'{value} is a boolean, not {kind}'
    if err.validator == 'type' and isinstance(value, float):
        if not math.isfinite(value):
            return f'{value} is not a finite number'
        if err.validator_value == 'integer':
            hint = f' (write {int(value)})' if value.is_integer() else ''
            return f'{value} is not an integer{hint}'
    return err.message


def validate(raw: Any, source: str = '<dict>', env_may_add: bool = False) -> None:
    """Raise ConfigError listing every schema violation with its key path.

    Integers must be ints (``2``, not ``2.0`` nor ``true``); numbers must be finite.
    ``env_may_add``: the file before the variables are applied; a top-level key missing from it
    may still come from one (``AKIDB_DEFAULT_MODEL``), so only that is let pass.
    """
    try:
        errors = sorted((e for e in _Validator(CONFIG_SCHEMA).iter_errors(raw)
                         if not (env_may_add and e.validator == 'required'
                                 and not e.absolute_path)),
                        key=lambda e: list(e.absolute_path))
    except RecursionError:
        raise ConfigError(f'invalid config {source}: values nest too deep') from None
    if errors:
        lines = [f'{_error_path(e)}: {_error_message(e)}' for e in errors]
        raise ConfigError(f'invalid config {source}:\n  ' + '\n  '.join(lines))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, so
    a repeated ``default_model:`` further down would silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == 'tag:yaml.org,2002:merge':
                    continue        # '<<' merges: explicit keys may override merged ones
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue        # an unhashable key: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        'while constructing a mapping', node.start_mark,
                        f'found duplicate key {key!r} (first given on line {first.line + 1})',
                        key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            # a scalar Python refuses (an integer over int()'s 4300 digits, a date such as
            # 2024-13-01): said with its line, like any YAML error, less int()'s advice
            reason = str(exc).split(';')[0]
            raise yaml.constructor.ConstructorError(
                None, None, f'cannot read this value ({reason})', node.start_mark) from exc


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


MODEL_ID_PATTERN = MODEL_SCHEMA['properties']['id']['pattern']
MAX_DIMENSION = MODEL_SCHEMA['properties']['dimension']['maximum']
MAX_TOKENS = MODEL_SCHEMA['properties']['max_tokens']['maximum']
# config.json model types whose position ids start after the padding index (RoBERTa's scheme):
# of their max_position_embeddings rows, the first pad_token_id + 1 are never a token's
_PADDING_OFFSET_TYPES = ('roberta', 'xlm-roberta', 'camembert', 'mpnet')


def _shown(value: str) -> str:
    """``value`` quoted for an error message, a long one cut (a 5000-digit number)."""
    return repr(value) if len(value) <= 40 else f"{value[:20] + '...'!r} ({len(value)} characters)"


def _env_text(env: Mapping[str, str], name: str) -> Optional[str]:
    """A variable's value, stripped; None when unset, empty or blank (a template that renders
    an empty value leaves a variable set), for every AKIDB_* variable alike."""
    return env.get(name, '').strip() or None


def _env_path(env: Mapping[str, str], name: str) -> Optional[str]:
    """A path from the environment, made absolute: ``~`` expanded, a relative one taken from the
    working directory (where whoever set the variable stands; the file's own paths are relative
    to the file)."""
    value = _env_text(env, name)
    return os.path.abspath(os.path.expanduser(value)) if value else None


def _env_int(env: Mapping[str, str], name: str, maximum: int) -> Optional[int]:
    text = _env_text(env, name)
    if text is None:
        return None
    # compared by length first: int() refuses more than 4300 digits (ValueError)
    digits = text.lstrip('0')
    if not re.fullmatch(r'[0-9]+', text) or len(digits) > len(str(maximum)) \
            or not 1 <= int(digits or '0') <= maximum:
        raise ConfigError(f'{name} must be an integer from 1 to {maximum} (got {_shown(text)})')
    return int(digits)


def _models_dir(raw: dict, base_dir: Path) -> Path:
    models_dir = Path(os.path.expanduser(raw.get('models_dir', 'models')))
    return models_dir if models_dir.is_absolute() else (base_dir / models_dir).resolve()


def _in_models_dir(path: str, models_dir: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else models_dir / p


def _same_file(a: Path, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):       # not installed, or not a path at all
        return False


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token_count(value: Any) -> Optional[int]:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TOKENS
    return value if ok else None


def max_tokens_from_files(model_path: str, tokenizer_path: str) -> Tuple[Optional[int], str]:
    """What a model's own files say its max_tokens is: (tokens, where it was read) or (None, '').

    In this order: sentence-transformers' ``sentence_bert_config.json`` (``max_seq_length``,
    what sentence-transformers truncates at) next to the ONNX file or the tokenizer, the
    tokenizer's saved truncation (``tokenizer.json`` ``truncation.max_length``), then the
    architecture's limit (``config.json`` ``max_position_embeddings``, less the positions
    RoBERTa-style models reserve for padding).
    """
    folders = list(dict.fromkeys((Path(model_path).parent, Path(tokenizer_path).parent)))
    for folder in folders:
        st = _read_json(folder / 'sentence_bert_config.json') or {}
        if _token_count(st.get('max_seq_length')):
            return st['max_seq_length'], f'{folder / "sentence_bert_config.json"} max_seq_length'
    truncation = (_read_json(Path(tokenizer_path)) or {}).get('truncation')
    if isinstance(truncation, dict) and _token_count(truncation.get('max_length')):
        return truncation['max_length'], f'{tokenizer_path} truncation.max_length'
    for folder in folders:
        cfg = _read_json(folder / 'config.json') or {}
        tokens = _token_count(cfg.get('max_position_embeddings'))
        if tokens and cfg.get('model_type') in _PADDING_OFFSET_TYPES \
                and _token_count(cfg.get('pad_token_id')) is not None:
            tokens = _token_count(tokens - cfg['pad_token_id'] - 1)
        if tokens:
            return tokens, f'{folder / "config.json"} max_position_embeddings'
    return None, ''


def _env_model(raw: dict, models: List[dict], env: Mapping[str, str],
               base_dir: Path) -> Optional[dict]:
    """The catalogue entry the model variables add or pick (it becomes the default), or None."""
    name = _env_text(env, 'AKIDB_MODEL_NAME') or ''
    named = next((m for m in models if name in (m.get('id'), m.get('name'))), None) \
        if name else None
    model_path = _env_path(env, 'AKIDB_MODEL_PATH')
    tokenizer = _env_path(env, 'AKIDB_TOKENIZER_PATH')
    if model_path is None:
        if tokenizer is not None:
            raise ConfigError(
                'AKIDB_TOKENIZER_PATH is set without AKIDB_MODEL_PATH: it is the tokenizer of '
                'the ONNX file AKIDB_MODEL_PATH names (a catalogue model\'s tokenizer is its '
                '`tokenizer` key in the config file)')
        if not name:
            return None
        if named is None:
            raise ConfigError(
                f'AKIDB_MODEL_NAME={name!r} names no model in the catalogue (ids: '
                f'{", ".join(str(m.get("id")) for m in models)}); to serve a model from '
                'another file set AKIDB_MODEL_PATH too')
        raw['default_model'] = named['id']
        return named
    if not os.path.isfile(model_path):
        where = '' if os.path.isabs(env['AKIDB_MODEL_PATH'].strip()) else \
            f' (a relative path is taken from the working directory, {os.getcwd()})'
        raise ConfigError(f'AKIDB_MODEL_PATH: no such file {model_path}{where}')
    models_dir = _models_dir(raw, base_dir) if isinstance(raw.get('models_dir', ''), str) \
        else None
    in_file = next((m for m in models if models_dir is not None and isinstance(m.get('path'), str)
                    and _same_file(_in_models_dir(m['path'], models_dir), model_path)), None)
    if in_file is not None and named is not None and named is not in_file:
        raise ConfigError(
            f'AKIDB_MODEL_PATH {model_path} is the file of catalogue model {in_file.get("id")}, '
            f'but AKIDB_MODEL_NAME={name!r} names catalogue model {named.get("id")}')
    beside = str(Path(model_path).with_name('tokenizer.json'))
    known = in_file or named
    if known is not None:
        # The catalogue's settings for it (max_tokens, pooling, prefixes); a name of the
        # operator's own relabels the catalogue entry of this very file.
        entry = dict(known, path=model_path)
        if in_file is not None and named is None and name:
            entry.update(id=_slug(name), name=name)
        if tokenizer is not None or in_file is None:    # another file: its own tokenizer
            entry['tokenizer'] = tokenizer or beside
    else:
        stem = Path(model_path).stem
        label = name or (Path(model_path).parent.name if stem == 'model' else stem)
        entry = {'id': _slug(label), 'name': name or _slug(label), 'path': model_path,
                 'tokenizer': tokenizer or beside}
        dimension = _env_int(env, 'AKIDB_MODEL_DIMENSION', MAX_DIMENSION)
        if dimension is None:
            raise ConfigError(
                'AKIDB_MODEL_DIMENSION must be a positive integer when AKIDB_MODEL_PATH names '
                f'a model outside the catalogue ({model_path})')
        entry['dimension'] = dimension
    tok_path = _in_models_dir(str(entry.get('tokenizer', '')), models_dir or Path.cwd())
    if not tok_path.is_file():
        said = 'AKIDB_TOKENIZER_PATH' if tokenizer else (
            'beside AKIDB_MODEL_PATH; set AKIDB_TOKENIZER_PATH' if in_file is None else
            f'catalogue model {in_file.get("id")}\'s tokenizer; set AKIDB_TOKENIZER_PATH')
        raise ConfigError(f'no tokenizer file {tok_path} ({said})')
    if known is None and _env_int(env, 'AKIDB_MODEL_MAX_TOKENS', MAX_TOKENS) is None:
        tokens, source = max_tokens_from_files(model_path, str(tok_path))
        if tokens:
            log.info('model %s: max_tokens %d from %s (AKIDB_MODEL_MAX_TOKENS overrides it)',
                     entry['id'], tokens, source)
        else:
            tokens = FALLBACK_MAX_TOKENS
            log.warning('model %s: max_tokens %d: neither AKIDB_MODEL_MAX_TOKENS nor the '
                        "model's files (sentence_bert_config.json, tokenizer.json truncation, "
                        'config.json) say; set AKIDB_MODEL_MAX_TOKENS', entry['id'], tokens)
        entry['max_tokens'] = tokens
    if (known is None or entry['id'] != known.get('id')) \
            and not re.search(MODEL_ID_PATTERN, entry['id']):
        # an id made from the variables: the error is theirs, not the file's
        if name:
            said = f"AKIDB_MODEL_NAME={_shown(name)}: the model id it gives, " \
                f"{_shown(entry['id'])} (the part after the last '/', lower-cased)"
        else:
            said = f"AKIDB_MODEL_PATH={model_path!r}: the model id its path gives, " \
                f"{_shown(entry['id'])} (set AKIDB_MODEL_NAME)"
        raise ConfigError(f'{said}, must match {MODEL_ID_PATTERN}')
    for other in models:
        if other is not known and other.get('id') == entry['id']:
            raise ConfigError(
                f'the model AKIDB_MODEL_PATH names ({model_path}) would get the id '
                f'{entry["id"]!r} of catalogue model {other.get("name")}, whose file is '
                f'another: set AKIDB_MODEL_NAME to another name (or to {entry["id"]} to serve '
                'this file with that catalogue entry\'s settings)')
    raw['models'] = [m for m in models if m is not known] + [entry]
    raw['default_model'] = entry['id']
    return entry


def apply_env(raw: dict, env: Mapping[str, str], base_dir: Optional[Path] = None) -> dict:
    """Apply the PRD's AKIDB_* variables on top of the file (env wins).

    Paths in variables are relative to the working directory; ``base_dir`` (the config file's
    folder) only places the catalogue's own files. The model variables describe one model, which
    becomes the default: ``AKIDB_MODEL_PATH`` names its ONNX file (a catalogue entry's file
    keeps that entry's settings), or ``AKIDB_MODEL_NAME`` alone picks a catalogue model (else the
    default model is meant); ``AKIDB_MODEL_DIMENSION`` must match that model and
    ``AKIDB_MODEL_MAX_TOKENS`` sets its max_tokens.

    Values are stripped, and a variable that is empty or blank counts as unset. A variable that
    cannot apply is an error naming it (``AKIDB_DEVICE='tpu': engine.device must be one of
    ...``), never ignored, and never reported as the file's key.
    """
    raw = copy.deepcopy(raw)
    base_dir = Path.cwd() if base_dir is None else base_dir
    device = _env_text(env, 'AKIDB_DEVICE')
    if device is not None and device not in DEVICES:
        raise ConfigError(f'AKIDB_DEVICE={_shown(device)}: engine.device must be one of '
                          f'{", ".join(DEVICES)}')
    engine = raw.setdefault('engine', {})
    if isinstance(engine, dict):            # else the schema check says what is wrong
        if _env_text(env, 'AKIDB_TENSORRT_CACHE'):
            engine['tensorrt_cache'] = _env_path(env, 'AKIDB_TENSORRT_CACHE')
            _check_cache_folder(engine['tensorrt_cache'], 'AKIDB_TENSORRT_CACHE')
        if device is not None:
            engine['device'] = device
    if _env_text(env, 'AKIDB_MODELS_DIR'):
        raw['models_dir'] = _env_path(env, 'AKIDB_MODELS_DIR')
    models = raw.get('models')
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        return raw                          # the schema check reports it
    entry = _env_model(raw, models, env, base_dir)
    default = _env_text(env, 'AKIDB_DEFAULT_MODEL')
    if default and entry is None:
        ids = sorted(str(m.get('id')) for m in models)
        if default not in ids:
            raise ConfigError(f'AKIDB_DEFAULT_MODEL={_shown(default)}: default_model must be one '
                              f'of the models ({", ".join(ids)})')
        raw['default_model'] = default
    elif default and default not in (entry.get('id'), entry.get('name')):
        var = 'AKIDB_MODEL_PATH' if _env_text(env, 'AKIDB_MODEL_PATH') else 'AKIDB_MODEL_NAME'
        raise ConfigError(
            f'{var} makes {entry.get("id")} the default model, but AKIDB_DEFAULT_MODEL='
            f'{default!r} picks another: make them agree or unset AKIDB_DEFAULT_MODEL (the Helm '
            'chart sets it from defaultModel)')
    if entry is None:       # no model variable picked one: the rest describe the default model
        entry = next((m for m in raw['models'] if m.get('id') == raw.get('default_model')), None)
    dimension = _env_int(env, 'AKIDB_MODEL_DIMENSION', MAX_DIMENSION)
    max_tokens = _env_int(env, 'AKIDB_MODEL_MAX_TOKENS', MAX_TOKENS)
    if entry is not None and dimension is not None and entry.get('dimension') != dimension:
        raise ConfigError(
            f'AKIDB_MODEL_DIMENSION={dimension}, but the model served ({entry.get("id")}, file '
            f'{entry.get("path")}) has dimension {entry.get("dimension")} in the catalogue')
    if entry is not None and max_tokens is not None:
        entry['max_tokens'] = max_tokens
    return raw


def _check_cache_folder(path: str, said: str) -> None:
    # Checked on every host: a CPU host never opens it, but the same config on a GPU robot
    # would fail every model load there (the engines go in a folder per model under it).
    full = Path(os.path.expanduser(path))
    if full.exists() and not full.is_dir():
        raise ConfigError(f'{said}: {str(full)!r} is a file, not a folder (TensorRT keeps a '
                          'folder of engine and timing caches per model under it)')


def build(raw: dict, base_dir: Path, source: str = '<dict>') -> EngineConfig:
    """Validate a raw dict and turn it into typed config (paths resolved)."""
    validate(raw, source)
    models_dir = _models_dir(raw, base_dir)

    def resolve(p: str) -> Path:
        return _in_models_dir(p, models_dir)

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
    # a request may name a model by its name: each name must pick one model (two alike were
    # served as different models by different doors), and not another model's id (shadowed)
    named: Dict[str, str] = {}
    for i, m in enumerate(models):
        if m.name in named:
            raise ConfigError(
                f'invalid config {source}: models[{i}].name: {m.name!r} is already the name of '
                f'model {named[m.name]!r} (a request names a model by its id or its name: each '
                'must pick one model)')
        if m.name != m.id and m.name in seen:
            raise ConfigError(
                f'invalid config {source}: models[{i}].name: {m.name!r} is the id of another '
                'model (a request names a model by its id or its name: each must pick one '
                'model)')
        named[m.name] = m.id

    e = raw.get('engine', {})
    if 'tensorrt_cache' in e:
        _check_cache_folder(e['tensorrt_cache'], f'invalid config {source}: engine.tensorrt_cache')
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
    both the file and the environment. The file is UTF-8; anything it cannot be read as is a
    ConfigError naming it.
    """
    env = os.environ if env is None else env
    named = '' if path or not _env_text(env, 'AKIDB_CONFIG') else ' (AKIDB_CONFIG)'
    path = Path(path or _env_text(env, 'AKIDB_CONFIG') or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as exc:
        raise ConfigError(f'cannot read config {path}{named}: {exc.strerror or exc}') from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f'cannot read config {path}{named}: not UTF-8 text (byte '
                          f'0x{exc.object[exc.start]:02x} at offset {exc.start})') from exc
    try:
        loader = _UniqueKeyLoader(text)     # a SafeLoader that refuses duplicate keys
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f'config {path} is not valid YAML: {exc}') from exc
    except RecursionError:
        raise ConfigError(f'config {path} is not valid YAML: it nests too deep') from None
    if not isinstance(raw, dict):
        raise ConfigError(f'invalid config {path}: the top level must be a mapping')
    base_dir = path.resolve().parent
    # the file's own mistakes first, each naming its key: the variables read the entries they
    # apply to (an entry without an id, a dimension written '384') and would blame themselves
    validate(raw, str(path), env_may_add=True)
    raw = apply_env(raw, env, base_dir)
    if overrides:
        raw = _deep_merge(raw, overrides)
        # a mistake in an override (a ROS parameter) is not the file's
        return build(raw, base_dir, f'{path} as overridden by {", ".join(_dotted(overrides))}')
    return build(raw, base_dir, str(path))


def _dotted(tree: Dict[str, Any], prefix: str = '') -> List[str]:
    """The dotted keys of a nested mapping's leaves (``engine.device``)."""
    keys: List[str] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += _dotted(value, f'{prefix}{key}.')
        else:
            keys.append(f'{prefix}{key}')
    return keys
