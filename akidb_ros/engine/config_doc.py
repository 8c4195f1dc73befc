"""Render the configuration reference (docs/configuration.md) from the one config schema.

``python -m akidb_ros.engine.config_doc > docs/configuration.md``; a test keeps the file equal
to this output, so the reference cannot drift from the code.
"""
from __future__ import annotations

from .config import CONFIG_SCHEMA, FALLBACK_MAX_TOKENS, EngineSettings

ENV_VARS = [
    ('AKIDB_CONFIG', 'path of the YAML file (default `config/models.yaml`)'),
    ('AKIDB_MODEL_PATH',
     'ONNX file of the model to serve as the default model. A catalogue entry\'s file (the '
     'same file as its `path`), or any file with AKIDB_MODEL_NAME naming a catalogue entry, '
     'is served with that entry\'s settings (`max_tokens`, `pooling`, prefixes); otherwise it '
     'adds a model'),
    ('AKIDB_TOKENIZER_PATH',
     "its tokenizer.json (default: the catalogue entry's when AKIDB_MODEL_PATH is that "
     "entry's own file, else `tokenizer.json` beside the ONNX file: another file named for "
     "an entry by AKIDB_MODEL_NAME keeps the entry's settings, not its tokenizer); only with "
     'AKIDB_MODEL_PATH (set alone: a config error)'),
    ('AKIDB_MODEL_NAME',
     'its name: with AKIDB_MODEL_PATH, the name (and id: the part after the last `/`, '
     'lower-cased) it is served under, or a catalogue entry\'s id or name (served under that '
     'entry\'s id); without AKIDB_MODEL_PATH, picks a catalogue model (id or name) as the '
     'default model'),
    ('AKIDB_MODEL_DIMENSION',
     'its dimension: required for a model outside the catalogue; for a catalogue model (with '
     'no other model variable: the default model) it must equal the catalogue\'s, else a '
     'config error at start'),
    ('AKIDB_MODEL_MAX_TOKENS',
     f'its `max_tokens`. A model outside the catalogue otherwise takes what its files say '
     f'(`sentence_bert_config.json` max_seq_length, `tokenizer.json` truncation.max_length, '
     f'`config.json` max_position_embeddings), else {FALLBACK_MAX_TOKENS} (logged)'),
    ('AKIDB_TENSORRT_CACHE', '`engine.tensorrt_cache`'),
    ('AKIDB_MODELS_DIR', '`models_dir`'),
    ('AKIDB_DEVICE', '`engine.device`'),
    ('AKIDB_DEFAULT_MODEL',
     '`default_model`; with AKIDB_MODEL_PATH or AKIDB_MODEL_NAME it must name the same '
     'model (else a config error)'),
]

NOTES = [
    'Model `path` and `tokenizer` are relative to `models_dir`, which is relative to the config '
    "file's folder; a relative path in a variable is relative to the working directory.",
    '',
    'Integers are written as integers (`2`, not `2.0` nor `true`) and numbers are finite (no '
    '`.nan` or `.inf`); a key appears at most once in a mapping. Any of these mistakes, and a '
    'variable that cannot apply, is a config error that names the key (or the variable) and '
    'stops the start. A variable set empty or to blanks counts as unset; values are stripped.',
    '',
    "A model's `max_tokens` may not exceed the positions its graph has (its position-embedding "
    'table): loading it fails `MODEL_LOAD_FAILED`, naming the limit, instead of failing each '
    'long input later (models with rotary positions, e.g. Qwen, have no table to check). Nor '
    'may it leave no room for text: it must be above the tokens the tokenizer adds to any text '
    '(special tokens and the prompt prefix; 2 for MiniLM), else the load fails the same way. '
    "A `tokenizer` with more tokens than the graph's word-embedding table has rows is another "
    "model's: the load fails the same way; one with under half as many loads with a warning "
    '(its vectors are meaningless if it is not the model\'s own).',
    '',
    'A request names a model by its `id` or its `name`, so each must pick one model: two models '
    'with the same `name`, or a `name` that is another model\'s `id`, is a config error. A '
    'mistake in an override (a ROS node parameter) is reported as the file "as overridden by" '
    'that parameter.',
]


def _type(spec: dict) -> str:
    if 'enum' in spec:
        return ' \\| '.join(f'`{v}`' for v in spec['enum'])
    kind = spec.get('type', 'object')
    bounds = []
    for key, sym in (('minimum', '≥'), ('exclusiveMinimum', '>'), ('maximum', '≤')):
        if key in spec:
            bounds.append(f'{sym} {spec[key]}')
    return kind + (f" ({', '.join(bounds)})" if bounds else '')


def _defaults() -> dict:
    s = EngineSettings()
    out = {f'engine.{k}': v for k, v in vars(s).items() if not hasattr(v, '__dataclass_fields__')}
    for section in ('cache', 'batching', 'queue', 'timeouts', 'limits'):
        for k, v in vars(getattr(s, section)).items():
            out[f'engine.{section}.{k}'] = v
    out['models_dir'] = 'models'
    out['engine.tensorrt_cache'] = '~/.cache/akidb/trt'   # not this machine's home
    return out


def _rows(schema: dict, prefix: str, required: set, defaults: dict):
    for name, spec in schema.get('properties', {}).items():
        key = f'{prefix}{name}'
        if spec.get('type') == 'object' and 'properties' in spec:
            yield from _rows(spec, key + '.', set(spec.get('required', [])), defaults)
        elif spec.get('type') == 'array':
            yield key, 'list of models (below)', 'yes' if name in required else '', ''
        else:
            default = defaults.get(key, '')
            yield key, _type(spec), 'yes' if name in required else '', (
                f'`{default}`' if default != '' else '')


def render() -> str:
    defaults = _defaults()
    lines = ['# Configuration reference', '',
             'Generated from `akidb_ros/engine/config.py` (`CONFIG_SCHEMA`) by '
             '`python -m akidb_ros.engine.config_doc`; a test keeps it in step.', '',
             '## Top level and `engine`', '',
             '| key | type | required | default |', '|---|---|---|---|']
    lines += [f'| `{k}` | {t} | {r} | {d} |' for k, t, r, d in
              _rows(CONFIG_SCHEMA, '', set(CONFIG_SCHEMA['required']), defaults)]
    model = CONFIG_SCHEMA['properties']['models']['items']
    lines += ['', '## Each entry of `models`', '', '| key | type | required |', '|---|---|---|']
    lines += [f'| `{k}` | {t} | {r} |' for k, t, r, _ in
              _rows(model, '', set(model['required']), {})]
    lines += ['', *NOTES, '', '## Environment overrides', '', '| variable | sets |',
              '|---|---|']
    lines += [f'| `{k}` | {v} |' for k, v in ENV_VARS]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    print(render(), end='')
