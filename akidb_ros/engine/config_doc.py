"""Render the configuration reference (docs/configuration.md) from the one config schema.

``python -m akidb_ros.engine.config_doc > docs/configuration.md``; a test keeps the file equal
to this output, so the reference cannot drift from the code.
"""
from __future__ import annotations

from .config import CONFIG_SCHEMA, EngineSettings

ENV_VARS = [
    ('AKIDB_CONFIG', 'path of the YAML file (default `config/models.yaml`)'),
    ('AKIDB_MODEL_PATH', 'ONNX file of a model that becomes the default model'),
    ('AKIDB_TOKENIZER_PATH', "its tokenizer.json (default: beside the model)"),
    ('AKIDB_MODEL_NAME', 'its name; alone, picks a catalogue model (id or name) as default'),
    ('AKIDB_MODEL_DIMENSION',
     'its dimension (required with AKIDB_MODEL_PATH unless the model is in the catalogue)'),
    ('AKIDB_TENSORRT_CACHE', '`engine.tensorrt_cache`'),
    ('AKIDB_MODELS_DIR', '`models_dir`'),
    ('AKIDB_DEVICE', '`engine.device`'),
    ('AKIDB_DEFAULT_MODEL', '`default_model`'),
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
    lines += ['', 'Model `path` and `tokenizer` are relative to `models_dir`, which is '
              'relative to the config file\'s folder.', '', '## Environment overrides', '',
              '| variable | sets |', '|---|---|']
    lines += [f'| `{k}` | {v} |' for k, v in ENV_VARS]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    print(render(), end='')
