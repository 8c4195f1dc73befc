"""REST bridge against the real engine over real HTTP on 127.0.0.1."""
from __future__ import annotations

import base64
import gzip
import json
import time

import numpy as np
import pytest
import requests

from akidb_ros.engine.types import EmbedRequest

from bridge_support import DEFAULT_MODEL, SECOND_MODEL, read_to_close, wait_until

SENTENCES = ['The autonomous vehicle detects pedestrians.', 'Emergency braking system activated.']


def post(url, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(url + path, data=data, headers={'Content-Type': 'application/json',
                                                         **(headers or {})}, timeout=30)


def test_embed_prd_shape_and_values(rest_url, engine):
    r = post(rest_url, '/api/v1/embed', {'inputs': SENTENCES, 'normalize': True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {'embeddings', 'model', 'usage'}
    assert body['model'] == DEFAULT_MODEL
    usage = body['usage']
    assert usage['total_tokens'] > 0 and usage['duration_ms'] >= 0
    # integers, as the PRD's (Rust u64) clients parse them
    assert type(usage['total_tokens']) is int and type(usage['duration_ms']) is int
    emb = np.asarray(body['embeddings'], dtype=np.float32)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    direct = engine.embed(EmbedRequest(inputs=SENTENCES, normalize=True)).embeddings
    np.testing.assert_allclose(emb, direct, atol=1e-5)   # same answer as the engine itself
    # related sentences are closer than unrelated ones (the model is real)
    e2 = np.asarray(post(rest_url, '/api/v1/embed', {'inputs': [
        'A car sees people crossing the street.', 'I like pancakes with syrup.']}).json()[
        'embeddings'])
    assert e2[0] @ emb[0] > e2[1] @ emb[0] + 0.2
    # `normalize` left out: true, the PRD's default
    np.testing.assert_allclose(np.linalg.norm(e2, axis=1), 1.0, atol=1e-4)


def test_normalize_false_and_model_by_name(rest_url):
    r = post(rest_url, '/api/v1/embed', {'inputs': ['hello'], 'normalize': False,
                                         'model': 'sentence-transformers/all-MiniLM-L6-v2'})
    assert r.status_code == 200, r.text
    assert r.json()['model'] == DEFAULT_MODEL
    assert abs(np.linalg.norm(r.json()['embeddings'][0]) - 1.0) > 1e-3


def test_request_id_echoed_and_generated(rest_url):
    r = post(rest_url, '/api/v1/embed', {'inputs': ['x']}, headers={'X-Request-ID': 'abc-123'})
    assert r.headers['X-Request-ID'] == 'abc-123'
    r = post(rest_url, '/api/v1/embed', {'inputs': ['x']})
    assert len(r.headers['X-Request-ID']) == 32
    r = post(rest_url, '/api/v1/embed', {'inputs': [1]}, headers={'X-Request-ID': 'bad id!'})
    assert r.status_code == 400 and r.headers['X-Request-ID'] != 'bad id!'


@pytest.mark.parametrize('raw,status,code', [
    (b'{"inputs": ["a"', 400, 'INVALID_INPUT'),                     # malformed JSON
    (b'', 400, 'INVALID_INPUT'),                                     # empty body
    (b'\xff\xfe', 400, 'INVALID_INPUT'),                             # not UTF-8
    (b'[1, 2]', 400, 'INVALID_INPUT'),                               # not an object
    (b'{"inputs": "a"}', 400, 'INVALID_INPUT'),                      # wrong type
    (b'{"inputs": []}', 400, 'INVALID_INPUT'),                       # empty list
    (b'{"inputs": ["a"], "normalize": "yes"}', 400, 'INVALID_INPUT'),
    (b'{"inputs": ["a"], "bogus": 1}', 400, 'INVALID_INPUT'),        # unknown field
    (b'{"inputs": ["   "]}', 400, 'INVALID_INPUT'),                  # blank text
    (b'{"inputs": ["\\ud800"]}', 400, 'INVALID_INPUT'),              # lone surrogate
    (b'{"inputs": ["a"], "model": "no-such-model"}', 400, 'MODEL_NOT_FOUND'),   # the PRD's 400
    (b'{"inputs": ["a"], "model": "qwen3-embedding-4b"}', 404, 'MODEL_UNAVAILABLE'),
    (b'[' * 100000, 400, 'INVALID_INPUT'),                           # nested too deep
])
def test_caller_mistakes_never_500(rest_url, raw, status, code):
    r = post(rest_url, '/api/v1/embed', raw=raw)
    assert r.status_code == status, r.text
    assert r.json()['code'] == code and r.json()['error']
    assert r.headers['Content-Type'].startswith('application/json')


def test_too_many_inputs_413(rest_url):
    r = post(rest_url, '/api/v1/embed', {'inputs': ['a'] * 257})
    assert r.status_code == 413 and r.json()['code'] == 'INPUT_TOO_LARGE'


def test_body_too_large_413(rest_url):
    big = b'{"inputs": ["' + b'a' * (17 * 1024 * 1024) + b'"]}'
    r = post(rest_url, '/api/v1/embed', raw=big)
    assert r.status_code == 413 and r.json()['code'] == 'INPUT_TOO_LARGE'


def test_truncation(rest_url):
    long_text = ' '.join(['robot'] * 600)
    r = post(rest_url, '/api/v1/embed', {'inputs': [long_text, 'short']})
    assert r.status_code == 200
    assert r.json()['usage']['truncated_inputs'] == 1
    r = post(rest_url, '/api/v1/embed', {'inputs': [long_text], 'truncate': False})
    # the engine's code for this (INPUT_TOO_LONG per its docstring) maps to 400 either way
    assert r.status_code == 400 and r.json()['code'] in ('INPUT_TOO_LONG', 'INVALID_INPUT')


def test_unknown_route_and_method(rest_url):
    r = requests.get(rest_url + '/nope', timeout=5)
    assert r.status_code == 404 and r.json()['code'] == 'NOT_FOUND'
    r = requests.get(rest_url + '/api/v1/embed', timeout=5)
    assert r.status_code == 405 and r.json()['code'] == 'METHOD_NOT_ALLOWED'


def test_timeout_header(rest_url):
    # a number of milliseconds, written plainly (float() would take the others)
    for bad in ('x', '1_000', '1e3', 'nan', '-5', '0x10', '٣'):
        r = post(rest_url, '/api/v1/embed', {'inputs': ['a']},
                 headers={'X-Request-Timeout-Ms': bad.encode()})
        assert (r.status_code, r.json()['code']) == (400, 'INVALID_INPUT'), (bad, r.text)
    # a budget longer than the server's is capped to it, as gRPC's deadline (it was refused)
    for good in ('5000', '2500.5', '700000', '9' * 400):
        r = post(rest_url, '/api/v1/embed', {'inputs': ['a']},
                 headers={'X-Request-Timeout-Ms': good})
        assert r.status_code == 200, (good, r.text)
    # 1 ms is too short for 64 long inputs on CPU: the engine answers TIMEOUT -> 504
    r = post(rest_url, '/api/v1/embed', {'inputs': [' '.join(['word'] * 200)] * 64},
             headers={'X-Request-Timeout-Ms': '1'})
    assert r.status_code == 504 and r.json()['code'] == 'TIMEOUT', r.text


def test_a_callers_budget_counts_a_cold_model_load(local_backend):
    """X-Request-Timeout-Ms counts the load of a model that is not loaded: TIMEOUT when it
    runs out meanwhile (a 500 ms budget was answered after load + 500 ms, 6 s); the load goes
    on, and the next call is served. An ask longer than the server's budget is the server's
    budget, which starts after the load."""
    from akidb_ros.server import Bridges
    bridges = Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=0,
                      timeout_s=0.5).start()
    url = f'http://127.0.0.1:{bridges.rest_port}'
    try:
        for ask, want in (('150', 504), ('60000', 200), (None, 200)):
            assert post(url, '/admin/models/unload', {'model': SECOND_MODEL}).status_code == 200
            t0 = time.monotonic()
            r = post(url, '/api/v1/embed', {'inputs': ['cold'], 'model': SECOND_MODEL},
                     headers={'X-Request-Timeout-Ms': ask} if ask else {})
            took = time.monotonic() - t0
            assert r.status_code == want, (ask, r.text)
            if want == 504:
                assert r.json()['code'] == 'TIMEOUT' and took < 0.15 + 1.0, took
                assert "budget ran out while its model loaded" in r.json()['error'], r.text
                r = post(url, '/api/v1/embed', {'inputs': ['warm'], 'model': SECOND_MODEL})
                assert r.status_code == 200, r.text
    finally:
        bridges.stop(grace_s=2)


def test_health_prd_shape(rest_url):
    r = requests.get(rest_url + '/health', timeout=5)
    assert r.status_code == 200
    h = r.json()
    assert h['status'] == 'healthy'
    assert {'embedding_provider', 'model_cache', 'gpu'} <= set(h['checks'])
    assert h['version']
    assert h['checks']['gpu'].startswith('unavailable') or h['checks']['gpu'] == 'ok'
    assert requests.get(rest_url + '/health/live', timeout=5).json() == {'status': 'alive'}
    r = requests.get(rest_url + '/health/ready', timeout=5)
    assert r.status_code == 200 and r.json()['status'] == 'ready'


def test_models_prd_fields(rest_url):
    body = requests.get(rest_url + '/models', timeout=5).json()
    by_id = {m['id']: m for m in body['models']}
    for m in body['models']:
        assert {'id', 'name', 'dimension', 'params', 'memory_mb', 'latency_p95_ms',
                'throughput_qps', 'status'} <= set(m)
    assert by_id[DEFAULT_MODEL]['status'] == 'loaded'
    assert by_id[DEFAULT_MODEL]['dimension'] == 384
    assert by_id['qwen3-embedding-4b']['status'] == 'unavailable'
    assert body['default_model'] == DEFAULT_MODEL


def test_admin_load_embed_unload(rest_url):
    r = post(rest_url, '/admin/models/load', {'model': SECOND_MODEL})
    assert r.status_code == 200, r.text
    assert r.json()['model']['status'] == 'loaded'
    r = post(rest_url, '/api/v1/embed', {'inputs': ['hello'], 'model': SECOND_MODEL})
    assert r.status_code == 200 and len(r.json()['embeddings'][0]) == 768
    r = post(rest_url, '/admin/models/unload', {'model': SECOND_MODEL})
    assert r.status_code == 200 and r.json()['model']['status'] == 'available'
    r = post(rest_url, '/admin/models/load', {'model': 'nope'})
    assert r.status_code == 400 and r.json()['code'] == 'MODEL_NOT_FOUND'
    r = post(rest_url, '/admin/models/load', {'model': 5})
    assert r.status_code == 400
    # a NUL in the name: INVALID_INPUT, as embed says (it was MODEL_NOT_FOUND)
    r = post(rest_url, '/admin/models/load', {'model': SECOND_MODEL + '\x00'})
    assert (r.status_code, r.json()['code']) == (400, 'INVALID_INPUT')


# --- OpenAI compatibility -------------------------------------------------------------------

def test_openai_float_and_base64(rest_url):
    r = post(rest_url, '/v1/embeddings', {'input': SENTENCES, 'model': DEFAULT_MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body['object'] == 'list' and body['model'] == DEFAULT_MODEL
    assert [d['index'] for d in body['data']] == [0, 1]
    assert body['usage']['prompt_tokens'] == body['usage']['total_tokens'] > 0
    floats = np.asarray([d['embedding'] for d in body['data']], dtype=np.float32)
    r = post(rest_url, '/v1/embeddings', {'input': SENTENCES, 'model': DEFAULT_MODEL,
                                          'encoding_format': 'base64'})
    b64 = np.stack([np.frombuffer(base64.b64decode(d['embedding']), dtype='<f4')
                    for d in r.json()['data']])
    np.testing.assert_array_equal(floats, b64)
    # single string input
    r = post(rest_url, '/v1/embeddings', {'input': SENTENCES[0], 'model': DEFAULT_MODEL})
    np.testing.assert_allclose(r.json()['data'][0]['embedding'], floats[0], atol=1e-6)


def test_openai_errors(rest_url):
    r = post(rest_url, '/v1/embeddings', {'input': 'x', 'model': 'text-embedding-3-small'})
    assert r.status_code == 404         # OpenAI's status (its SDKs raise NotFoundError)
    assert r.json()['error']['code'] == 'MODEL_NOT_FOUND' and r.json()['code'] == 'MODEL_NOT_FOUND'
    assert r.json()['error']['type'] == 'invalid_request_error'
    r = post(rest_url, '/v1/embeddings', {'input': [[1, 2, 3]], 'model': DEFAULT_MODEL})
    assert r.status_code == 400
    r = post(rest_url, '/v1/embeddings', {'input': 'x', 'model': DEFAULT_MODEL, 'dimensions': 7})
    assert r.status_code == 400


def test_openai_python_sdk_shape_roundtrip(rest_url):
    """What the OpenAI SDK does (POST /v1/embeddings with base64 by default) decodes right."""
    r = post(rest_url, '/v1/embeddings', {'input': ['a', 'b'], 'model': DEFAULT_MODEL,
                                          'encoding_format': 'base64', 'user': 'u1'})
    assert r.status_code == 200
    vecs = [np.frombuffer(base64.b64decode(d['embedding']), dtype=np.float32)
            for d in r.json()['data']]
    assert all(v.shape == (384,) for v in vecs)


def test_real_openai_sdk_unchanged(rest_url, engine):
    """The official OpenAI Python SDK, pointed at the bridge, works unchanged."""
    import openai
    client = openai.OpenAI(base_url=rest_url + '/v1', api_key='unused', max_retries=0)
    r = client.embeddings.create(model=DEFAULT_MODEL, input=SENTENCES)   # base64 on the wire
    got = np.asarray([d.embedding for d in r.data], dtype=np.float32)
    direct = engine.embed(EmbedRequest(inputs=SENTENCES)).embeddings
    np.testing.assert_allclose(got, direct, atol=1e-5)
    assert r.usage.total_tokens > 0 and r.model == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model='text-embedding-3-small', input='x')
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=DEFAULT_MODEL, input=[[1, 2, 3]])


def test_graceful_stop_finishes_in_flight(local_backend):
    """RestServer.stop(grace) stops accepting but answers the requests already in flight."""
    import threading
    import time
    from akidb_ros.server import Bridges
    b = Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=None).start()
    url = f'http://127.0.0.1:{b.rest_port}'
    codes = []

    def call():
        r = requests.post(url + '/api/v1/embed',
                          json={'inputs': [' '.join(['robot arm'] * 60)] * 4}, timeout=60)
        codes.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    b.stop(grace_s=30)
    for t in threads:
        t.join(60)
    assert codes == [200] * 4
    with pytest.raises(requests.ConnectionError):
        requests.get(url + '/health/live', timeout=2)


# --- transport: media types, body encoding, Upgrade, odd paths and methods ------------------
# Every POST route with a JSON body; the bodies would succeed (or fail after the media-type
# check) if the media type were right.
JSON_ROUTES = [('/api/v1/embed', {'inputs': ['hi']}),
               ('/v1/embeddings', {'input': 'hi', 'model': DEFAULT_MODEL}),
               ('/admin/models/load', {'model': SECOND_MODEL}),
               ('/admin/models/unload', {'model': SECOND_MODEL})]
NOT_JSON = ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x',
            'application/xml', None, 'application/jsonx', 'json', 'text/json',
            'application/json; charset=utf-16', 'application/json; charset="latin-1"']


def _model_status(rest_url, model):
    models = requests.get(rest_url + '/models', timeout=10).json()['models']
    return next(m['status'] for m in models if m['id'] == model)


@pytest.mark.parametrize('path,body', JSON_ROUTES)
@pytest.mark.parametrize('ctype', NOT_JSON)
def test_a_body_that_is_not_json_is_415(rest_url, path, body, ctype):
    """A browser's "simple" cross-origin POST (form or text/plain: no CORS preflight) reaches
    no handler: neither an embed nor a model load or unload happens."""
    before = _model_status(rest_url, SECOND_MODEL)
    r = requests.post(rest_url + path, data=json.dumps(body).encode(), timeout=30,
                      headers={} if ctype is None else {'Content-Type': ctype})
    assert r.status_code == 415, (path, ctype, r.status_code, r.text[:200])
    assert r.headers['Content-Type'].startswith('application/json')
    assert r.json()['code'] == 'UNSUPPORTED_MEDIA_TYPE' and r.json()['error']
    if path == '/v1/embeddings':        # the OpenAI shape, with the table code beside it
        assert r.json()['error']['code'] == 'UNSUPPORTED_MEDIA_TYPE'
        assert r.json()['error']['type'] == 'invalid_request_error'
    assert _model_status(rest_url, SECOND_MODEL) == before


@pytest.mark.parametrize('coding', ['gzip', 'br', 'deflate, gzip'])
def test_a_content_coded_body_is_415(rest_url, coding):
    """RFC 9110 §8.4.1: a gzip body was a misleading 400 "not UTF-8", and a plain body labelled
    br was served, the header ignored."""
    raw = json.dumps({'inputs': ['hi']}).encode()
    body = gzip.compress(raw) if coding == 'gzip' else raw
    for path in ('/api/v1/embed', '/v1/embeddings'):
        r = requests.post(rest_url + path, data=body, timeout=30,
                          headers={'Content-Type': 'application/json',
                                   'Content-Encoding': coding})
        assert r.status_code == 415, (path, coding, r.text[:200])
        assert 'Content-Encoding' in json.dumps(r.json())
    r = requests.post(rest_url + '/api/v1/embed', data=raw, timeout=30,
                      headers={'Content-Type': 'application/json',
                               'Content-Encoding': 'identity'})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize('ctype', ['application/json', 'application/json; charset=utf-8',
                                   'Application/JSON;Charset="UTF-8"', 'application/json;v=1',
                                   'application/vnd.akidb+json'])
def test_json_media_types_are_accepted(rest_url, ctype):
    r = post(rest_url, '/api/v1/embed', {'inputs': ['hi']}, headers={'Content-Type': ctype})
    assert r.status_code == 200, (ctype, r.text)
    r = post(rest_url, '/v1/embeddings', {'input': 'hi', 'model': DEFAULT_MODEL},
             headers={'Content-Type': ctype})
    assert r.status_code == 200, (ctype, r.text)


@pytest.mark.parametrize('raw,reason', [
    ('{"inputs": ["hi"]}'.encode('utf-16'), 'UTF-8'),   # with its byte-order mark
    ('{"inputs": ["hi"]}'.encode('utf-32'), 'UTF-8'),
    (b'{"inputs": ["caf\xe9"]}', 'UTF-8'),              # latin-1
    (b'{"inputs": ["\xed\xa0\x80"]}', 'UTF-8'),         # an encoded lone surrogate (CESU-8)
    # ASCII in UTF-16 without a byte-order mark is valid UTF-8 (with NULs), so malformed JSON
    ('{"inputs": ["hi"]}'.encode('utf-16-le'), 'malformed JSON'),
])
def test_json_bodies_must_be_utf8(rest_url, raw, reason):
    r = post(rest_url, '/api/v1/embed', raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()['code'] == 'INVALID_INPUT' and reason in r.json()['error']


def test_a_utf8_byte_order_mark_is_ignored(rest_url):
    r = post(rest_url, '/api/v1/embed', raw=b'\xef\xbb\xbf{"inputs": ["hi"]}')
    assert r.status_code == 200, r.text


H2C = {'Connection': 'Upgrade, HTTP2-Settings', 'Upgrade': 'h2c',
       'HTTP2-Settings': 'AAMAAABkAAQCAAAAAAIAAAAA'}    # what `curl --http2 http://...` adds


def test_an_upgrade_header_is_ignored(rest_url):
    r = post(rest_url, '/api/v1/embed', {'inputs': ['hi']}, headers=H2C)
    assert r.status_code == 200, r.text
    assert len(r.json()['embeddings'][0]) == 384
    r = requests.get(rest_url + '/health/live', timeout=10,
                     headers={'Connection': 'Upgrade', 'Upgrade': 'websocket',
                              'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==',
                              'Sec-WebSocket-Version': '13'})
    assert (r.status_code, r.json()) == (200, {'status': 'alive'})


@pytest.fixture(scope='module')
def with_probe(local_backend):
    from akidb_ros.server import Bridges
    b = Bridges(local_backend, host='127.0.0.1', rest_port=0, grpc_port=None,
                probe_port=0).start()
    yield b
    b.stop(grace_s=2)


ODD_PATHS = ['/', '//', '/api/v1//embed', '/api//v1/embed', '/api/v1/embed/', '/api/v1/embed//',
             '/health//live', '/health/live/', '/health//ready', '//metrics/', '/models/',
             '/API/V1/EMBED', '/api/v1/embed;x', '/api/v1/embed%2F', '/static/x', '/favicon.ico',
             '/../api/v1/embed', '/api/v1/./embed', '/%ff', '/a%00b', '*', '/openapi.json/',
             '/admin/models//load', '/admin/models/', '/v1//embeddings']
ODD_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'FOO']


def _assert_json_error(resp, method, what, path=''):
    """A refusal: JSON ``{error, code}`` (no werkzeug HTML, no redirect); under ``/v1/`` (the
    REST door's OpenAI surface; ``path`` is '' on the probe port, which has none) OpenAI's
    ``{"error": {message, type, param, code}, "code"}``."""
    assert not 300 <= resp.status < 400, (what, resp.status, resp.getheader('Location'))
    body = resp.read()
    if resp.status < 300:
        return
    assert resp.getheader('Content-Type', '').startswith('application/json'), (what, body[:200])
    if method != 'HEAD':
        got = json.loads(body)
        assert isinstance(got['code'], str), (what, got)
        # (a request line the parser refuses before its target, e.g. method FOO, has no path)
        if path.startswith('/v1/') and not str(got['error']).startswith('malformed HTTP'):
            assert set(got['error']) == {'message', 'type', 'param', 'code'}, (what, got)
            assert got['error']['code'] == got['code'], (what, got)
        else:
            assert isinstance(got['error'], str), (what, got)


def test_every_refusal_is_json_on_odd_paths_and_methods(with_probe):
    import http.client
    for port in (with_probe.rest_port, with_probe.probe_port):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        for path in ODD_PATHS:
            for method in ODD_METHODS:
                conn.request(method, path, body=b'{"inputs": ["x"]}',
                             headers={'Content-Type': 'application/json'})
                resp = conn.getresponse()
                _assert_json_error(resp, method, (port, method, path),
                                   path if port == with_probe.rest_port else '')
                if resp.getheader('Connection') == 'close':
                    conn.close()
        conn.close()
    # a doubled slash is not merged (nor redirected to the merged path): a JSON 404; nor are
    # leading slashes (werkzeug strips them before matching)
    for path in ('/api/v1//embed', '//api/v1/embed', '///v1/embeddings'):
        r = post(f'http://127.0.0.1:{with_probe.rest_port}', path, {'inputs': ['x']})
        assert (r.status_code, r.json()['code']) == (404, 'NOT_FOUND'), path
    for port in (with_probe.rest_port, with_probe.probe_port):
        for path in ('//health/live', '///metrics', '//models'):
            r = requests.get(f'http://127.0.0.1:{port}{path}', timeout=10)
            assert (r.status_code, r.json()['code']) == (404, 'NOT_FOUND'), (port, path)


def test_connect_is_a_json_405(with_probe):
    import socket
    for port in (with_probe.rest_port, with_probe.probe_port):
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(b'CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n')
            out = read_to_close(s)
        head, body = out.split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 405 '), head
        assert json.loads(body)['code'] == 'METHOD_NOT_ALLOWED'


# --- OpenAI route: errors in OpenAI's terms (audit 2026-11) ----------------------------------

def _openai_error(r, status, code):
    body = r.json()
    assert r.status_code == status, r.text
    assert set(body) == {'error', 'code'} and body['code'] == code, body
    assert set(body['error']) == {'message', 'type', 'param', 'code'}, body
    assert body['error']['code'] == code
    return body['error']


def test_server_413_on_the_openai_route_has_its_shape_and_the_documented_limit(rest_url):
    """A body over the server's own cap (2 x the limit) is refused before it is read, in the
    route's error shape, naming the documented limit (16 MiB), not the cap."""
    import socket
    port = int(rest_url.rsplit(':', 1)[1])
    for path, openai in (('/v1/embeddings', True), ('/api/v1/embed', False)):
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(f'POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                      f'Content-Length: {40 << 20}\r\n\r\n'.encode())
            out = read_to_close(s)
        head, body = out.split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 413 '), head
        got = json.loads(body)
        assert got['code'] == 'INPUT_TOO_LARGE'
        message = got['error']['message'] if openai else got['error']
        if openai:
            assert got['error']['type'] == 'invalid_request_error'
        assert message == f'request body larger than {16 << 20} bytes', message


def test_malformed_http_is_counted_logged_and_given_a_request_id(rest_url, caplog):
    """Malformed HTTP (an ESC in a header value) and a head over the limit were answered with
    the JSON 400/431 but left no trace: no access-log line, no count, no X-Request-ID."""
    import socket

    from prometheus_client import REGISTRY
    port = int(rest_url.rsplit(':', 1)[1])

    def refused() -> float:
        return REGISTRY.get_sample_value('akidb_request_errors_total',
                                         {'transport': 'rest', 'code': 'INVALID_INPUT'}) or 0.0
    for raw, status in ((b'GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x1bb\r\n\r\n', 400),
                        (b'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 70000
                         + b'\r\n\r\n', 431)):
        before = refused()
        caplog.clear()
        with caplog.at_level('INFO', logger='akidb_ros.access'):
            with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
                s.sendall(raw)
                head, body = read_to_close(s).split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 %d ' % status), head
        assert b'X-Request-ID: ' in head and json.loads(body)['code'] == 'INVALID_INPUT'
        assert refused() == before + 1
        assert any(getattr(r, 'code', None) == 'INVALID_INPUT' for r in caplog.records), \
            [r.getMessage() for r in caplog.records]


def test_openai_errors_name_the_input_field_and_param(rest_url):
    texts = ['a', 'b', 'c', '\ud800x']
    raw = json.dumps({'input': texts, 'model': DEFAULT_MODEL}).encode()   # a lone surrogate
    err = _openai_error(post(rest_url, '/v1/embeddings', raw=raw), 400, 'INVALID_INPUT')
    assert err['message'].startswith('input[3]'), err
    assert err['param'] == 'input'
    # the native route keeps its own field name
    raw = json.dumps({'inputs': texts}).encode()
    assert post(rest_url, '/api/v1/embed', raw=raw).json()['error'].startswith('inputs[3]')
    # one string: the field itself; over the character limit: 400 on this route (below)
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x' * 40000,
                                                          'model': DEFAULT_MODEL}),
                        400, 'INVALID_INPUT')
    assert err['message'].startswith('input has 40000 characters'), err
    assert err['param'] == 'input'
    # schema errors name their field
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x', 'model': DEFAULT_MODEL,
                                                          'encoding_format': 'hex'}),
                        400, 'INVALID_INPUT')
    assert err['param'] == 'encoding_format'
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x'}), 400, 'INVALID_INPUT')
    assert err['param'] == 'model'
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x', 'model': 'nope'}),
                        404, 'MODEL_NOT_FOUND')
    assert err['param'] == 'model'
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x', 'model': 'a\x00b'}),
                        400, 'INVALID_INPUT')      # the engine's refusal names the model
    assert err['message'].startswith('model contains U+0000') and err['param'] == 'model', err


def test_openai_too_many_inputs_is_a_400_and_the_sdk_raises_bad_request(rest_url):
    """OpenAI answers a batch over its limit 400 invalid_request_error: so does this route
    (the native route keeps the table's 413, test_too_many_inputs_413)."""
    import openai
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': ['a'] * 257,
                                                          'model': DEFAULT_MODEL}),
                        400, 'INVALID_INPUT')
    assert err['message'] == '257 inputs exceed the limit of 256'
    assert err['type'] == 'invalid_request_error' and err['param'] == 'input'
    client = openai.OpenAI(base_url=rest_url + '/v1', api_key='unused', max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=DEFAULT_MODEL, input=['a'] * 257)


def test_openai_dimensions_are_checked_before_the_model_runs(rest_url):
    """A ``dimensions`` the model does not have is refused from the catalogue, before the
    embedding is computed: a model not loaded stays unloaded."""
    requests.post(rest_url + '/admin/models/unload', json={'model': SECOND_MODEL}, timeout=60)
    assert _model_status(rest_url, SECOND_MODEL) == 'available'
    err = _openai_error(post(rest_url, '/v1/embeddings', {'input': 'x', 'model': SECOND_MODEL,
                                                          'dimensions': 384}),
                        400, 'INVALID_INPUT')
    assert _model_status(rest_url, SECOND_MODEL) == 'available'    # never loaded for it
    assert err['message'].startswith(f'dimensions=384: model {SECOND_MODEL} has 768'), err
    assert err['param'] == 'dimensions'
    r = post(rest_url, '/v1/embeddings', {'input': 'x', 'model': DEFAULT_MODEL,
                                          'dimensions': 384})
    assert r.status_code == 200 and len(r.json()['data'][0]['embedding']) == 384


@pytest.mark.parametrize('path,body', [
    ('/api/v1/embed', '{"inputs": ["a"], "model": "\\ud800"}'),
    ('/v1/embeddings', '{"input": "a", "model": "\\ud800"}'),
    ('/admin/models/load', '{"model": "\\ud800"}'),
])
def test_a_model_name_with_a_lone_surrogate_is_invalid_input(rest_url, path, body):
    r = post(rest_url, path, raw=body.encode())
    assert r.status_code == 400, r.text
    assert r.json()['code'] == 'INVALID_INPUT'


def test_options_is_204_with_allow(rest_url):
    for path, method in (('/api/v1/embed', 'POST'), ('/v1/embeddings', 'POST'),
                         ('/models', 'GET')):
        r = requests.options(rest_url + path, timeout=10)
        assert r.status_code == 204, (path, r.status_code, r.headers)
        assert r.content == b'' and 'Content-Type' not in r.headers, r.headers
        assert method in r.headers['Allow'] and 'OPTIONS' in r.headers['Allow']


def test_openapi_declares_itself_the_timeout_header_405_and_options(rest_url):
    import jsonschema
    doc = requests.get(rest_url + '/openapi.json', timeout=10).json()
    assert 'get' in doc['paths']['/openapi.json']
    for path in ('/api/v1/embed', '/v1/embeddings'):
        names = [p['name'] for p in doc['paths'][path]['post']['parameters']]
        assert 'X-Request-Timeout-Ms' in names, names
    for path, item in doc['paths'].items():
        assert '204' in item['options']['responses'], path
        for method, op in item.items():
            if method != 'options':
                assert '405' in op['responses'], (path, method)
    # and the 405 answered is the one declared (OpenAI's shape on the OpenAI route)
    r = requests.get(rest_url + '/v1/embeddings', timeout=10)
    assert r.status_code == 405 and 'POST' in r.headers['Allow']
    schema = doc['paths']['/v1/embeddings']['post']['responses']['405']['content'][
        'application/json']['schema']
    jsonschema.validate(r.json(), {**schema, 'components': doc['components']})
    assert r.json()['error']['type'] == 'invalid_request_error'


def test_a_client_that_closes_its_connection_has_its_work_dropped(
        rest_url, local_backend, caplog):
    """A REST client that gives up (closes its connection) while its long call is computed:
    the call's sentences not yet run are skipped and its queue slot freed within a fraction of
    a second, and the call is logged CANCELLED, instead of running to the end of its budget."""
    import logging
    import socket
    admission = local_backend.engine.admission
    port = int(rest_url.rsplit(':', 1)[1])
    long_text = ' '.join(['word'] * 300)
    body = json.dumps({'inputs': [f'{i} {long_text}' for i in range(96)]}).encode()

    assert wait_until(lambda: admission.pending == 0, 10, 0.01)
    with caplog.at_level(logging.INFO, logger='akidb_ros.access'):
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(b'POST /api/v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json'
                      b'\r\nX-Request-ID: walked-away\r\nContent-Length: %d\r\n\r\n' % len(body)
                      + body)
            assert wait_until(lambda: admission.pending == 1, 10, 0.01), \
                'the call was never accepted'
        # 96 sentences of 256 tokens take seconds here; only a run already started ends
        assert wait_until(lambda: admission.pending == 0, 3, 0.01), 'the abandoned work went on'
        assert wait_until(lambda: any(getattr(r, 'request_id', '') == 'walked-away'
                                      for r in caplog.records), 5, 0.01)
    (line,) = [r for r in caplog.records if getattr(r, 'request_id', '') == 'walked-away']
    assert line.code == 'CANCELLED', line.__dict__
