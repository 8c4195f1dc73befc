"""Config validation errors name the key; AKIDB_* env vars override the file."""
import json
import shutil

import pytest

from akidb_ros.engine import ConfigError, load_config
from akidb_ros.engine.config import DEFAULT_CONFIG_PATH
from engine_support import MINILM, MODELS, MPNET, write_config


def test_shipped_config_is_valid():
    cfg = load_config(DEFAULT_CONFIG_PATH, env={})
    assert cfg.default_model == MINILM
    assert {m.id for m in cfg.models} >= {MINILM, 'all-mpnet-base-v2', 'e5-small-v2',
                                          'bge-small-en-v1.5', 'qwen3-embedding-0.6b'}
    pool = {m.id: m.pooling for m in cfg.models}
    assert pool['bge-small-en-v1.5'] == 'cls' and pool['qwen3-embedding-0.6b'] == 'last_token'
    e5 = cfg.model('e5-small-v2')
    assert (e5.query_prefix, e5.passage_prefix) == ('query: ', 'passage: ')
    assert cfg.model('bge-small-en-v1.5').query_prefix == (
        'Represent this sentence for searching relevant passages: ')   # BGE's query instruction
    # the PRD's thresholds, as shipped: queue 1000 shedding at 95 %, 5 s inference deadline,
    # 60 s model load timeout, 10 MB of input per request
    e = cfg.engine
    assert (e.queue.capacity, e.queue.shed_threshold) == (1000, 0.95)
    assert (e.timeouts.inference_s, e.timeouts.model_load_s) == (5.0, 60.0)
    assert e.limits.max_total_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize('mutate, fragment', [
    (lambda r: r['engine'].update(device='gpu'), "engine.device: 'gpu' is not one of"),
    (lambda r: r['engine']['batching'].update(max_batch_size=0),
     'engine.batching.max_batch_size: 0 is less than the minimum of 1'),
    (lambda r: r['engine']['queue'].update(shed_threshold=1.5), 'engine.queue.shed_threshold'),
    (lambda r: r['engine'].update(colour='red'),
     "Additional properties are not allowed ('colour'"),
    (lambda r: r['models'][0].pop('dimension'), "models[0]: 'dimension' is a required property"),
    (lambda r: r['models'][1].update(pooling='max'), "models[1].pooling: 'max' is not one of"),
    (lambda r: r.update(default_model='ghost'), "default_model: 'ghost' is not one of the models"),
    (lambda r: r['models'].append(dict(r['models'][0])), "duplicate model id 'all-minilm-l6-v2'"),
    # a request may name a model by its name: two alike were served as different models by the
    # engine (first) and the REST/gRPC doors (last); another's id was shadowed by it
    (lambda r: r['models'].append(dict(r['models'][0], id='mini-copy')),
     ".name: 'sentence-transformers/all-MiniLM-L6-v2' is already the name of model "
     "'all-minilm-l6-v2'"),
    (lambda r: r['models'][1].update(name='all-minilm-l6-v2'),
     "models[1].name: 'all-minilm-l6-v2' is the id of another model"),
    # integers written as floats, and NaN/infinity, passed the schema and then broke the engine
    # (a float runner count killed the process at the load, a float dimension failed every
    # request INTERNAL, a NaN load timeout read "did not load within nan s")
    (lambda r: r['engine']['batching'].update(runners=2.0),
     'engine.batching.runners: 2.0 is not an integer (write 2)'),
    (lambda r: r['models'][0].update(dimension=384.0),
     'models[0].dimension: 384.0 is not an integer (write 384)'),
    (lambda r: r['models'][0].update(max_tokens=256.5), 'models[0].max_tokens: 256.5 is not an'),
    (lambda r: r['models'][0].update(dimension=True),
     'models[0].dimension: True is a boolean, not an integer'),
    (lambda r: r['engine']['timeouts'].update(model_load_s=float('nan')),
     'engine.timeouts.model_load_s: nan is not a finite number'),
    (lambda r: r['engine']['queue'].update(shed_threshold=float('nan')),
     'engine.queue.shed_threshold: nan is not a finite number'),
    (lambda r: r['engine'].update(gpu_metrics_interval_s=float('-inf')),
     'engine.gpu_metrics_interval_s: -inf is not a finite number'),
])
def test_invalid_config_names_the_key(tmp_path, mutate, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, mutate), env={})
    assert fragment in str(err.value)


def test_a_mistake_in_an_override_names_the_override_not_the_file(tmp_path):
    """The node's parameters reach the config as overrides: `-p default_model:=nope` was
    reported as a mistake of the (valid) config file."""
    path = write_config(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, {'default_model': 'nope'}, env={})
    assert str(err.value).startswith(f'invalid config {path} as overridden by default_model: '
                                     "default_model: 'nope' is not one of the models"), err.value


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match='cannot read config'):
        load_config(tmp_path / 'missing.yaml', env={})
    bad = tmp_path / 'bad.yaml'
    bad.write_text('models: [unclosed\n')
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_config(bad, env={})
    bad.write_text('- a list\n')
    with pytest.raises(ConfigError, match='top level must be a mapping'):
        load_config(bad, env={})


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``default_model:`` lower down silently
    won. Each mapping, nested ones too, takes a key once; merge keys still work."""
    text = DEFAULT_CONFIG_PATH.read_text().replace('models_dir: ../models',
                                                   f'models_dir: {MODELS}')
    path = tmp_path / 'models.yaml'
    path.write_text(text + '\ndefault_model: all-mpnet-base-v2\n')
    with pytest.raises(ConfigError, match="found duplicate key 'default_model' "
                                          r'\(first given on line \d+\)'):
        load_config(path, env={})
    path.write_text(text.replace('    runners: 2 ', '    runners: 2\n    runners: 1 '))
    with pytest.raises(ConfigError, match="duplicate key 'runners'"):
        load_config(path, env={})
    # a merge key's entries may be overridden by the mapping's own keys: not a duplicate
    path.write_text(text.replace('  - id: all-minilm-l6-v2', '  - &mini\n    id: all-minilm-l6-v2')
                    + '\n  - <<: *mini\n    id: mini-copy\n    name: test/mini-copy\n')
    assert load_config(path, env={}).model('mini-copy').dimension == 384


def test_prd_env_vars_define_the_default_model(tmp_path):
    env = {
        'AKIDB_MODEL_PATH': str(MODELS / 'all-mpnet-base-v2' / 'model.onnx'),
        'AKIDB_TOKENIZER_PATH': str(MODELS / 'all-mpnet-base-v2' / 'tokenizer.json'),
        'AKIDB_MODEL_NAME': 'sentence-transformers/all-mpnet-base-v2',
        'AKIDB_MODEL_DIMENSION': '768',
        'AKIDB_TENSORRT_CACHE': str(tmp_path / 'trt'),
    }
    cfg = load_config(write_config(tmp_path), env=env)
    assert cfg.default_model == 'all-mpnet-base-v2'
    m = cfg.model('all-mpnet-base-v2')
    assert m.dimension == 768 and m.installed and m.max_tokens == 384   # catalogue entry kept
    assert str(cfg.engine.tensorrt_cache) == str(tmp_path / 'trt')
    env2 = dict(env, AKIDB_MODEL_NAME='my-org/custom-model', AKIDB_MODEL_DIMENSION='768')
    cfg2 = load_config(write_config(tmp_path), env=env2)
    assert cfg2.default_model == 'custom-model'
    m2 = cfg2.model('custom-model')      # the catalogue's file under the operator's own name
    assert (m2.name, m2.dimension, m2.max_tokens) == ('my-org/custom-model', 768, 384)
    assert cfg2.model('all-mpnet-base-v2') is None      # one entry per file
    # a catalogue model's dimension is known: the variable may be left out
    env3 = {k: v for k, v in env.items() if k != 'AKIDB_MODEL_DIMENSION'}
    assert load_config(write_config(tmp_path), env=env3).model('all-mpnet-base-v2').dimension \
        == 768


def test_env_model_path_of_a_catalogue_file_serves_that_entry(tmp_path, monkeypatch):
    """AKIDB_MODEL_PATH alone, on a catalogue model's file: that entry, with its max_tokens
    (sentence-transformers' 384 for mpnet; it was served as a new model 'model' with 512), and a
    relative path is taken from the working directory (it was taken from models_dir)."""
    monkeypatch.chdir(MODELS.parent)
    for path in (str(MODELS / 'all-mpnet-base-v2' / 'model.onnx'),
                 'models/all-mpnet-base-v2/model.onnx'):
        cfg = load_config(write_config(tmp_path), env={'AKIDB_MODEL_PATH': path})
        assert cfg.default_model == 'all-mpnet-base-v2'
        m = cfg.model('all-mpnet-base-v2')
        assert (m.name, m.dimension, m.max_tokens, m.pooling) == (
            'sentence-transformers/all-mpnet-base-v2', 768, 384, 'mean')
        assert m.installed and m.tokenizer == MODELS / 'all-mpnet-base-v2' / 'tokenizer.json'
        assert len(cfg.models) == len(load_config(write_config(tmp_path), env={}).models)


def _outside_model(folder, *extra):
    """A model outside the catalogue: its own copy of MiniLM's graph (the weights linked)."""
    folder.mkdir()
    src = MODELS / 'all-MiniLM-L6-v2'
    shutil.copy(src / 'model.onnx', folder / 'model.onnx')
    (folder / 'model.onnx.data').symlink_to(src / 'model.onnx.data')
    tok = json.loads((src / 'tokenizer.json').read_text())
    tok['truncation'] = None
    (folder / 'tokenizer.json').write_text(json.dumps(tok))
    for name, data in extra:
        (folder / name).write_text(json.dumps(data))
    return {'AKIDB_MODEL_PATH': str(folder / 'model.onnx'), 'AKIDB_MODEL_DIMENSION': '384'}


def test_env_model_outside_the_catalogue_takes_max_tokens_from_its_files(tmp_path, caplog):
    """max_tokens was always 512: the variable, then what the model's files say, then 512 with
    a warning. Its id is its folder's name when the file is just model.onnx."""
    cases = [
        ([], 512),
        ([('config.json', {'model_type': 'bert', 'max_position_embeddings': 512})], 512),
        ([('config.json', {'model_type': 'mpnet', 'max_position_embeddings': 514,
                           'pad_token_id': 1})], 512),
        ([('config.json', {'max_position_embeddings': 512}),
          ('sentence_bert_config.json', {'max_seq_length': 256})], 256),
    ]
    for i, (files, tokens) in enumerate(cases):
        env = _outside_model(tmp_path / f'my-model-{i}', *files)
        with caplog.at_level('INFO', logger='akidb_ros.engine.config'):
            caplog.clear()
            cfg = load_config(write_config(tmp_path), env=env)
        m = cfg.model(cfg.default_model)
        assert (m.id, m.name, m.dimension, m.max_tokens) == (
            f'my-model-{i}', f'my-model-{i}', 384, tokens), files
        assert ('AKIDB_MODEL_MAX_TOKENS' in caplog.text) and (
            ('neither' in caplog.text) == (not files)), caplog.text
        assert load_config(write_config(tmp_path), env=dict(
            env, AKIDB_MODEL_MAX_TOKENS='200')).model(m.id).max_tokens == 200
    # the tokenizer's own truncation comes after sentence-transformers' setting
    tok = json.loads((MODELS / 'all-MiniLM-L6-v2' / 'tokenizer.json').read_text())
    env = _outside_model(tmp_path / 'truncating')
    (tmp_path / 'truncating' / 'tokenizer.json').write_text(json.dumps(tok))    # max_length 128
    assert load_config(write_config(tmp_path), env=env).model('truncating').max_tokens == 128


def test_env_model_variables_are_never_silently_ignored(tmp_path):
    """The PRD's Helm values set AKIDB_MODEL_NAME + AKIDB_MODEL_DIMENSION only: a dimension that
    is not the model's (or a tokenizer without a model file) was accepted without a word."""
    minilm = str(MODELS / 'all-MiniLM-L6-v2' / 'model.onnx')
    cases = [
        ({'AKIDB_MODEL_NAME': MINILM, 'AKIDB_MODEL_DIMENSION': '768'},
         'AKIDB_MODEL_DIMENSION=768, but the model served (all-minilm-l6-v2, file '
         'all-MiniLM-L6-v2/model.onnx) has dimension 384'),
        ({'AKIDB_MODEL_DIMENSION': '4096'}, 'AKIDB_MODEL_DIMENSION=4096, but the model served '
                                            '(all-minilm-l6-v2'),
        ({'AKIDB_MODEL_PATH': minilm, 'AKIDB_MODEL_NAME': 'Qwen/Qwen2.5-4B',
          'AKIDB_MODEL_DIMENSION': '4096'}, 'AKIDB_MODEL_DIMENSION=4096, but the model served '
                                            '(qwen2.5-4b'),
        ({'AKIDB_TOKENIZER_PATH': str(MODELS / 'all-MiniLM-L6-v2' / 'tokenizer.json')},
         'AKIDB_TOKENIZER_PATH is set without AKIDB_MODEL_PATH'),
        ({'AKIDB_MODEL_PATH': minilm, 'AKIDB_MODEL_NAME': 'all-mpnet-base-v2'},
         'is the file of catalogue model all-minilm-l6-v2, but AKIDB_MODEL_NAME='
         "'all-mpnet-base-v2' names catalogue model all-mpnet-base-v2"),
        ({'AKIDB_MODEL_PATH': minilm, 'AKIDB_MODEL_NAME': 'my-org/all-mpnet-base-v2'},
         "would get the id 'all-mpnet-base-v2' of catalogue model "
         'sentence-transformers/all-mpnet-base-v2'),
        ({'AKIDB_MODEL_NAME': 'all-mpnet-base-v2', 'AKIDB_DEFAULT_MODEL': MINILM},
         "AKIDB_MODEL_NAME makes all-mpnet-base-v2 the default model, but AKIDB_DEFAULT_MODEL="
         "'all-minilm-l6-v2' picks another"),
        ({'AKIDB_MODEL_PATH': str(MODELS / 'all-mpnet-base-v2' / 'model.onnx'),
          'AKIDB_DEFAULT_MODEL': MINILM}, 'AKIDB_MODEL_PATH makes all-mpnet-base-v2 the default'),
        ({'AKIDB_MODEL_PATH': minilm, 'AKIDB_TOKENIZER_PATH': str(tmp_path / 'none.json')},
         f'no tokenizer file {tmp_path / "none.json"} (AKIDB_TOKENIZER_PATH)'),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(write_config(tmp_path), env=env)
        assert message in str(err.value), env
    # what does apply: the dimension that matches, a max_tokens for the model NAME picks
    cfg = load_config(write_config(tmp_path), env={'AKIDB_MODEL_DIMENSION': '384'})
    assert cfg.default_model == MINILM
    cfg = load_config(write_config(tmp_path), env={   # they agree (by id or name)
        'AKIDB_MODEL_NAME': MPNET,
        'AKIDB_DEFAULT_MODEL': 'sentence-transformers/all-mpnet-base-v2'})
    assert cfg.default_model == MPNET
    cfg = load_config(write_config(tmp_path), env={
        'AKIDB_MODEL_NAME': 'sentence-transformers/all-mpnet-base-v2',
        'AKIDB_MODEL_DIMENSION': '768', 'AKIDB_MODEL_MAX_TOKENS': '128'})
    assert cfg.default_model == 'all-mpnet-base-v2'
    assert cfg.model('all-mpnet-base-v2').max_tokens == 128


def test_env_errors_are_clear(tmp_path, monkeypatch):
    env = _outside_model(tmp_path / 'custom')
    del env['AKIDB_MODEL_DIMENSION']
    with pytest.raises(ConfigError, match='AKIDB_MODEL_DIMENSION must be a positive integer'):
        load_config(write_config(tmp_path), env=env)
    for bad in ('0', '-3', 'big', '384.0', '70000'):
        with pytest.raises(ConfigError, match='AKIDB_MODEL_DIMENSION must be an integer from '
                                              f"1 to 65536 \\(got '{bad}'\\)"):
            load_config(write_config(tmp_path), env=dict(env, AKIDB_MODEL_DIMENSION=bad))
    with pytest.raises(ConfigError, match='AKIDB_MODEL_MAX_TOKENS must be an integer'):
        load_config(write_config(tmp_path), env=dict(env, AKIDB_MODEL_DIMENSION='384',
                                                     AKIDB_MODEL_MAX_TOKENS='256.0'))
    # a missing file is named (it read "model nope is in the catalogue but its files are not
    # installed" at the first load)
    with pytest.raises(ConfigError, match='AKIDB_MODEL_PATH: no such file /x/model.onnx$'):
        load_config(write_config(tmp_path), env={'AKIDB_MODEL_PATH': '/x/model.onnx'})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f'no such file {tmp_path}/nope.onnx \\(a relative '
                                          'path is taken from the working directory'):
        load_config(write_config(tmp_path), env={'AKIDB_MODEL_PATH': 'nope.onnx'})
    with pytest.raises(ConfigError, match="AKIDB_MODEL_NAME='nope' names no model"):
        load_config(write_config(tmp_path), env={'AKIDB_MODEL_NAME': 'nope'})


def test_overrides_win_and_are_validated(tmp_path):
    cfg = load_config(write_config(tmp_path), env={},
                      overrides={'engine': {'batching': {'max_batch_size': 8}}})
    assert cfg.engine.batching.max_batch_size == 8
    assert cfg.engine.batching.max_batch_tokens == 8192
    with pytest.raises(ConfigError, match='max_batch_size'):
        load_config(write_config(tmp_path), env={},
                    overrides={'engine': {'batching': {'max_batch_size': -3}}})


def test_configuration_reference_is_current():
    from akidb_ros.engine.config import REPO_ROOT
    from akidb_ros.engine.config_doc import render
    doc = (REPO_ROOT / 'docs' / 'configuration.md').read_text()
    assert doc == render(), 'regenerate: python -m akidb_ros.engine.config_doc > docs/...'


def test_a_file_python_cannot_read_is_a_config_error(tmp_path):
    """Bytes that are not UTF-8, an integer over Python's 4300 digits and a date that is none
    raised UnicodeDecodeError or ValueError (a traceback at start-up): a ConfigError naming the
    file, and the line of the value."""
    text = write_config(tmp_path).read_text()
    path = tmp_path / 'odd.yaml'
    path.write_bytes(text.encode() + b'# caf\xe9\n')
    with pytest.raises(ConfigError, match=f'cannot read config {path}: not UTF-8 text '
                                          r'\(byte 0xe9 at offset \d+\)$'):
        load_config(path, env={})
    assert 'runners: 2' in text
    for value, says in (('9' * 5000, 'Exceeds the limit (4300 digits) for integer string '
                                     'conversion: value has 5000 digits'),
                        ('2024-13-01', 'month must be in 1..12')):
        path.write_text(text.replace('runners: 2', f'runners: {value}'))
        with pytest.raises(ConfigError) as err:
            load_config(path, env={})
        message = str(err.value)
        assert message.startswith(f'config {path} is not valid YAML: cannot read this value '
                                  f'({says})') and 'line ' in message, message
        assert len(message) < 400 and 'set_int_max_str_digits' not in message, message


def test_an_integer_variable_with_too_many_digits_is_a_config_error(tmp_path):
    env = _outside_model(tmp_path / 'custom')
    for name, maximum in (('AKIDB_MODEL_DIMENSION', 65536), ('AKIDB_MODEL_MAX_TOKENS', 131072)):
        for extra in ({}, {'AKIDB_MODEL_PATH': ''}):    # a model of its own, or the default
            with pytest.raises(ConfigError) as err:
                load_config(write_config(tmp_path), env={**env, name: '9' * 5000, **extra})
            assert str(err.value) == (f'{name} must be an integer from 1 to {maximum} (got '
                                      f"'99999999999999999999...' (5000 characters))"), name
    # leading zeros are still a number in range
    assert load_config(write_config(tmp_path), env={
        'AKIDB_MODEL_MAX_TOKENS': '0' * 5000 + '128'}).model(MINILM).max_tokens == 128


@pytest.mark.parametrize('env, message', [
    ({'AKIDB_DEVICE': 'tpu'},
     "AKIDB_DEVICE='tpu': engine.device must be one of auto, cpu, cuda, tensorrt"),
    ({'AKIDB_DEFAULT_MODEL': 'garbage'},
     "AKIDB_DEFAULT_MODEL='garbage': default_model must be one of the models "
     '(all-minilm-l6-v2, all-mpnet-base-v2, '),
    ({'AKIDB_MODEL_PATH': str(MODELS / 'all-MiniLM-L6-v2' / 'model.onnx'),
      'AKIDB_MODEL_NAME': 'org/.hidden'},
     "AKIDB_MODEL_NAME='org/.hidden': the model id it gives, '.hidden' (the part after the "
     "last '/', lower-cased), must match "),
    ({'AKIDB_MODEL_PATH': str(MODELS / 'all-MiniLM-L6-v2' / 'model.onnx'),
      'AKIDB_MODEL_NAME': 'x' * 200},
     "AKIDB_MODEL_NAME='xxxxxxxxxxxxxxxxxxxx...' (200 characters): the model id it gives, "
     "'xxxxxxxxxxxxxxxxxxxx...' (200 characters)"),
])
def test_a_variable_that_cannot_apply_is_named_not_the_file(tmp_path, env, message):
    """An AKIDB_* value the schema refuses was reported as the file's key ("invalid config
    .../models.yaml: engine.device: 'tpu' is not one of ..."): the operator looked for it in a
    file that does not have it."""
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path), env=env)
    assert str(err.value).startswith(message) and 'invalid config' not in str(err.value), \
        str(err.value)


MINILM_FILE = str(MODELS / 'all-MiniLM-L6-v2' / 'model.onnx')


@pytest.mark.parametrize('mutate, env, message', [
    (lambda r: r['models'][0].pop('id'), {'AKIDB_MODEL_PATH': MINILM_FILE},
     "models[0]: 'id' is a required property"),                     # was KeyError('id')
    (lambda r: r['models'][0].update(dimension='384'), {'AKIDB_MODEL_DIMENSION': '384'},
     "models[0].dimension: '384' is not of type 'integer'"),      # was "=384, but ... has 384"
    (lambda r: r['models'][0].update(tokenizer=5), {'AKIDB_MODEL_PATH': MINILM_FILE},
     "models[0].tokenizer: 5 is not of type 'string'"),
    (lambda r: r.update(models_dir=5), {'AKIDB_MODEL_PATH': MINILM_FILE},
     "models_dir: 5 is not of type 'string'"),
    (lambda r: r['models'][0].update(id=5), {'AKIDB_MODEL_PATH': MINILM_FILE},
     "models[0].id: 5 is not of type 'string'"),
])
def test_the_files_own_mistakes_are_named_before_variables_apply(tmp_path, mutate, env, message):
    """The variables read the entries they apply to: a broken entry gave a traceback or blamed
    the variable. The file is checked first, so its key is named."""
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, mutate), env=env)
    assert str(err.value).startswith('invalid config ') and message in str(err.value), \
        str(err.value)


def test_a_default_model_from_the_variable_may_be_missing_from_the_file(tmp_path):
    cfg = load_config(write_config(tmp_path, lambda r: r.pop('default_model')),
                      env={'AKIDB_DEFAULT_MODEL': MPNET})
    assert cfg.default_model == MPNET


def test_a_file_nested_too_deep_is_a_config_error(tmp_path):
    path = tmp_path / 'deep.yaml'
    path.write_text('default_model: ' + '[' * 2000 + ']' * 2000 + '\nmodels: []\n')
    with pytest.raises(ConfigError, match='nests too deep'):
        load_config(path, env={})


def test_a_model_id_made_from_the_file_path_names_the_variable(tmp_path):
    env = _outside_model(tmp_path / '.hidden')
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path), env=env)
    assert str(err.value).startswith(
        f"AKIDB_MODEL_PATH='{tmp_path}/.hidden/model.onnx': the model id its path gives, "
        "'.hidden' (set AKIDB_MODEL_NAME), must match "), str(err.value)
    cfg = load_config(write_config(tmp_path), env=dict(env, AKIDB_MODEL_NAME='hidden'))
    assert cfg.default_model == 'hidden'


def test_blank_variables_count_as_unset_and_values_are_stripped(tmp_path):
    """Whitespace-only (as a template may render an empty value) is unset, for every AKIDB_*
    variable alike: AKIDB_MODELS_DIR and AKIDB_TENSORRT_CACHE set to spaces failed with
    "models_dir: None is not of type 'string'"; AKIDB_DEVICE=' cpu ' was not stripped."""
    plain = load_config(write_config(tmp_path), env={})
    blank = load_config(write_config(tmp_path), env={
        name: '   ' for name in ('AKIDB_MODELS_DIR', 'AKIDB_TENSORRT_CACHE', 'AKIDB_DEVICE',
                                 'AKIDB_DEFAULT_MODEL', 'AKIDB_MODEL_NAME', 'AKIDB_MODEL_PATH',
                                 'AKIDB_TOKENIZER_PATH', 'AKIDB_MODEL_DIMENSION',
                                 'AKIDB_MODEL_MAX_TOKENS')})
    assert blank == plain
    cfg = load_config(write_config(tmp_path), env={
        'AKIDB_DEVICE': ' cpu ', 'AKIDB_DEFAULT_MODEL': f' {MPNET}\n',
        'AKIDB_TENSORRT_CACHE': f' {tmp_path / "trt"} '})
    assert (cfg.engine.device, cfg.default_model, cfg.engine.tensorrt_cache) == (
        'cpu', MPNET, tmp_path / 'trt')


def test_a_config_file_named_by_akidb_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f'cannot read config {tmp_path}/nope.yaml '
                                          r'\(AKIDB_CONFIG\): No such file'):
        load_config(env={'AKIDB_CONFIG': str(tmp_path / 'nope.yaml')})


def test_a_tensorrt_cache_that_is_a_file_is_refused_on_every_host(tmp_path):
    """It was accepted here (a CPU host never opens it), and the same config failed every model
    load on a GPU robot: the engines go in a folder per model under it."""
    taken = tmp_path / 'trt'
    taken.write_text('not a folder')
    with pytest.raises(ConfigError, match=r"AKIDB_TENSORRT_CACHE: '.*trt' is a file, not a "
                                          'folder'):
        load_config(write_config(tmp_path), env={'AKIDB_TENSORRT_CACHE': str(taken)})

    def in_file(raw):
        raw.setdefault('engine', {})['tensorrt_cache'] = str(taken)
    with pytest.raises(ConfigError, match=r'engine.tensorrt_cache: .* is a file, not a folder'):
        load_config(write_config(tmp_path, in_file), env={})
    # a folder, or one not made yet, is fine
    taken.unlink()
    assert load_config(write_config(tmp_path, in_file), env={}).engine.tensorrt_cache == taken


@pytest.mark.parametrize('key,value', [('memory_mb', 3_000_000_000), ('params', 2 ** 64)])
def test_model_sizes_are_bounded_as_the_doors_carry_them(tmp_path, key, value):
    """memory_mb 3e9 (or params 2^64) loaded, and gRPC ListModels failed UNKNOWN ("Value out of
    range") for every caller: its memory_mb is an int32. Refused, naming the key."""
    def mutate(raw):
        raw['models'][1][key] = value
    with pytest.raises(ConfigError, match=rf'models\[1\]\.{key}: {value} is greater than the '
                                          'maximum'):
        load_config(write_config(tmp_path, mutate), env={})
