"""Config validation errors name the key; AKIDB_* env vars override the file."""
import pytest

from akidb_ros.engine import ConfigError, load_config
from akidb_ros.engine.config import DEFAULT_CONFIG_PATH
from engine_support import MINILM, MODELS, write_config


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
])
def test_invalid_config_names_the_key(tmp_path, mutate, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, mutate), env={})
    assert fragment in str(err.value)


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
    assert cfg2.default_model == 'custom-model' and cfg2.model('custom-model').dimension == 768
    # a catalogue model's dimension is known: the variable may be left out
    env3 = {k: v for k, v in env.items() if k != 'AKIDB_MODEL_DIMENSION'}
    assert load_config(write_config(tmp_path), env=env3).model('all-mpnet-base-v2').dimension \
        == 768


def test_env_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match='AKIDB_MODEL_DIMENSION must be a positive integer'):
        load_config(write_config(tmp_path), env={'AKIDB_MODEL_PATH': '/x/model.onnx'})
    for bad in ('0', '-3', 'big'):
        with pytest.raises(ConfigError, match='AKIDB_MODEL_DIMENSION'):
            load_config(write_config(tmp_path), env={'AKIDB_MODEL_PATH': '/x/model.onnx',
                                                     'AKIDB_MODEL_DIMENSION': bad})
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
