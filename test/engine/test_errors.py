"""Every bad input gets its stable code; the error table maps each code once for every door."""
import pytest

from akidb_ros.engine import EmbedRequest, EngineError, ErrorCode
from akidb_ros.engine.errors import error_from_code


@pytest.mark.parametrize('request_kwargs, code, fragment', [
    (dict(inputs=[]), ErrorCode.INVALID_INPUT, 'must not be empty'),
    (dict(inputs=['ok', '']), ErrorCode.INVALID_INPUT, 'inputs[1] is empty'),
    (dict(inputs=['ok', '   ']), ErrorCode.INVALID_INPUT, 'inputs[1] is empty'),
    # only characters a tokeniser drops: it would embed the empty string (audit, stop 24)
    (dict(inputs=['ok', '\u200b']), ErrorCode.INVALID_INPUT, 'inputs[1] is empty'),
    # a ROS string ends at a NUL: refused wherever it is, so every door answers alike
    (dict(inputs=['\x00']), ErrorCode.INVALID_INPUT, 'inputs[0] contains U+0000 (NUL)'),
    (dict(inputs=['ok', 'Go to the kitchen\x00 and bring me the red cup']),
     ErrorCode.INVALID_INPUT, 'inputs[1] contains U+0000 (NUL) at character 17'),
    (dict(inputs=['x'], model='all-minilm-l6-v2\x00'), ErrorCode.INVALID_INPUT,
     'model contains U+0000 (NUL)'),
    # the count comes first, then each input in turn: the same code on every door
    (dict(inputs=['x'] * 299 + ['']), ErrorCode.INPUT_TOO_LARGE, '300 inputs exceed'),
    (dict(inputs=['x'] * 299 + ['a\x00b']), ErrorCode.INPUT_TOO_LARGE, '300 inputs exceed'),
    # a model name is taken as sent: a stray space is an unknown model on every door
    (dict(inputs=['x'], model=' all-minilm-l6-v2'), ErrorCode.MODEL_NOT_FOUND,
     'all-minilm-l6-v2'),
    (dict(inputs=['\ufeff \u2060\x07\u3000']), ErrorCode.INVALID_INPUT, 'inputs[0] is empty'),
    (dict(inputs=['\U000e0001\u200c']), ErrorCode.INVALID_INPUT, 'inputs[0] is empty'),
    (dict(inputs=['x'], model='m' * 257), ErrorCode.INVALID_INPUT, 'at most 256 characters'),
    (dict(inputs='not a list'), ErrorCode.INVALID_INPUT, 'must be a list'),
    (dict(inputs=['ok', 7]), ErrorCode.INVALID_INPUT, 'inputs[1] is not a string'),
    (dict(inputs=['bad \ud800 surrogate']), ErrorCode.INVALID_INPUT, 'not valid Unicode'),
    (dict(inputs=['x'] * 257), ErrorCode.INPUT_TOO_LARGE, '257 inputs exceed the limit of 256'),
    (dict(inputs=['y' * 40000]), ErrorCode.INPUT_TOO_LARGE, 'inputs[0] has 40000 characters'),
    (dict(inputs=['€' * 30000] * 200), ErrorCode.INPUT_TOO_LARGE, 'bytes in total'),
    (dict(inputs=['x'], model='no-such-model'), ErrorCode.MODEL_NOT_FOUND, 'no-such-model'),
    (dict(inputs=['x'], model='e5-small-v2'), ErrorCode.MODEL_UNAVAILABLE, 'not installed'),
    (dict(inputs=['x'], timeout_s=-1), ErrorCode.INVALID_INPUT, 'timeout_s'),
    # a TypeError before; priority='admin' also left the model pinned for good (unevictable)
    (dict(inputs=['x'], timeout_s='5'), ErrorCode.INVALID_INPUT, 'timeout_s'),
    (dict(inputs=['x'], timeout_s=float('inf')), ErrorCode.INVALID_INPUT, 'timeout_s'),
    (dict(inputs=['x'], timeout_s=float('nan')), ErrorCode.INVALID_INPUT, 'timeout_s'),
    (dict(inputs=['x'], timeout_s=True), ErrorCode.INVALID_INPUT, 'timeout_s'),
    (dict(inputs=['x'], priority='admin'), ErrorCode.INVALID_INPUT, 'priority'),
])
def test_bad_input_codes(engine, request_kwargs, code, fragment):
    pending = engine.admission.pending
    with pytest.raises(EngineError) as err:
        engine.embed(EmbedRequest(**request_kwargs))
    assert err.value.code is code
    assert fragment in err.value.message
    assert engine.admission.pending == pending   # nothing half-accepted
    assert all(m.in_flight == 0 for m in engine.list_models())      # no model left pinned


def test_visible_text_check_matches_unicode_tables():
    """Every control/format character is invisible; letters, marks, symbols and emoji are not."""
    import unicodedata
    from akidb_ros.engine.engine import has_text
    for c in (*range(0x20000), *range(0xE0000, 0xE1000)):
        ch = chr(c)
        invisible = ch.isspace() or unicodedata.category(ch) in ('Cc', 'Cf')
        if 0xD800 <= c <= 0xDFFF:
            continue    # lone surrogates are refused as invalid Unicode before this check
        assert has_text(ch) is not invisible, hex(c)
    assert has_text('\u200b\u200b x') and has_text('\u0301') and has_text('\U0001F600')


def test_error_table_is_complete():
    for code in ErrorCode:
        assert 400 <= code.http_status <= 599
        assert code.grpc_status.isupper()
        assert code.log_level in ('info', 'warning', 'error')
    # Caller mistakes are 4xx, never 500.
    for code in (ErrorCode.INVALID_INPUT, ErrorCode.INPUT_TOO_LONG, ErrorCode.INPUT_TOO_LARGE,
                 ErrorCode.MODEL_NOT_FOUND):
        assert 400 <= code.http_status < 500
    assert ErrorCode.INPUT_TOO_LARGE.http_status == 413
    assert ErrorCode.OVERLOADED.http_status == 503 and ErrorCode.OVERLOADED.retryable
    assert ErrorCode.TIMEOUT.http_status == 504
    assert ErrorCode.RATE_LIMITED.http_status == 429


def test_codes_round_trip_by_name():
    assert error_from_code('TIMEOUT', 'm').code is ErrorCode.TIMEOUT
    assert error_from_code('SOMETHING_NEW', 'm').code is ErrorCode.INTERNAL
    assert EngineError(ErrorCode.OVERLOADED, 'busy').to_dict() == {'error': 'busy',
                                                                   'code': 'OVERLOADED'}


def test_codes_with_equal_mappings_stay_distinct():
    # A spec-valued Enum would alias these and put the wrong name on the wire.
    assert ErrorCode.UNAVAILABLE.name == 'UNAVAILABLE'
    assert ErrorCode.INPUT_TOO_LONG.name == 'INPUT_TOO_LONG'
    assert len({c.name for c in ErrorCode}) == len(ErrorCode.__members__)


# Texts the tokenizer reduces to nothing (its normaliser drops every character) but that hold a
# visible character: embedded as the empty string before; refused like a blank text now.
NOTHING_ONCE_TOKENISED = {'combining marks': '\u0301\u0308', 'variation selector': '\ufe0f',
                          'private use': '\ue000\uf8ff', 'replacement char': '\ufffd',
                          'mixed': '\u0301 \ufffd \ue000'}


@pytest.mark.parametrize('model', ['all-minilm-l6-v2', 'all-mpnet-base-v2'])
@pytest.mark.parametrize('name', list(NOTHING_ONCE_TOKENISED))
def test_a_text_the_tokenizer_reduces_to_nothing_is_refused(engine, model, name):
    pending = engine.admission.pending
    with pytest.raises(EngineError) as err:
        engine.embed(EmbedRequest(inputs=['ok', NOTHING_ONCE_TOKENISED[name]], model=model))
    assert err.value.code is ErrorCode.INVALID_INPUT
    assert err.value.message.startswith('inputs[1] is empty once tokenised'), err.value.message
    assert engine.admission.pending == pending


@pytest.mark.parametrize('text', ['\U0001F916\U0001F50B', 'x' * 200, '\uffff', '[SEP]', '<s>',
                                  '</s>', '[PAD]', 'cafe\u0301', '\u0301a'])
def test_texts_made_of_unknown_or_special_looking_tokens_are_still_embedded(engine, text):
    """[UNK] (an emoji, a 200-letter word) and a literal "[SEP]" are the text's own tokens."""
    for model in ('all-minilm-l6-v2', 'all-mpnet-base-v2'):
        res = engine.embed(EmbedRequest(inputs=[text], model=model))
        assert res.embeddings.shape[0] == 1 and res.total_tokens >= 3, (model, text)


def test_nothing_once_tokenised_is_found_after_a_prompt_prefix_too():
    """With a prefix the ids are the prefix's, not only special tokens: still refused."""
    import dataclasses
    from akidb_ros.engine import load_config
    from akidb_ros.engine.text import TextEncoder
    from akidb_ros.engine.types import InputType
    cfg = load_config().model('all-minilm-l6-v2')
    enc = TextEncoder(dataclasses.replace(cfg, query_prefix='query: ', passage_prefix='p:'))
    for input_type in InputType:
        with pytest.raises(EngineError) as err:
            enc.encode(['fine', 'also fine', '\u0301'], input_type)
        assert err.value.message.startswith('inputs[2] is empty once tokenised')
        assert len(enc.encode(['\u0301a'], input_type)) == 1
    # past a slice boundary (a deadline makes encode() go in slices): the index is the request's
    many = ['word ' * 4000] * 5 + ['\ufe0f']
    with pytest.raises(EngineError) as err:
        enc.encode(many, InputType.QUERY, deadline=float('inf'))
    assert err.value.message.startswith('inputs[5] is empty once tokenised')


def _documented_error_table(path):
    """The rows of a markdown table of the error table: {code: (http, grpc, retryable)}."""
    import re
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not line.startswith('| ') or len(cells) != 4:
            continue
        plain = [re.sub(r'\([^)]*\)', '', c) for c in cells]
        names = [w for w in re.findall(r'[A-Z][A-Z_]+[A-Z]', plain[0])
                 if w in ErrorCode.__members__]
        if not names:
            continue
        https = [int(s) for s in re.findall(r'\b\d{3}\b', plain[1])]
        grpcs = names if plain[2] == 'same names' else re.findall(r'[A-Z][A-Z_]+', plain[2])
        retry = cells[3].startswith('yes')
        for i, name in enumerate(names):
            assert name not in rows, f'{path.name}: {name} is in the table twice'
            rows[name] = (https[i if len(https) > 1 else 0], grpcs[i if len(grpcs) > 1 else 0],
                          retry)
    return rows


@pytest.mark.parametrize('doc', ['README.md', 'docs/api.md'])
def test_the_documented_error_table_is_the_code_table(doc):
    """The README's and docs/api.md's tables say what ``ErrorCode`` says, for every code."""
    from pathlib import Path
    documented = _documented_error_table(Path(__file__).resolve().parents[2] / doc)
    actual = {c.name: (c.http_status, c.grpc_status, c.retryable) for c in ErrorCode}
    assert documented == actual
