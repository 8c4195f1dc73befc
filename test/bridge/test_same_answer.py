"""One request, one answer, whatever the door: REST, OpenAI, gRPC and the engine itself, on the
real engine (in-process doors over loopback). The sidecar and the ROS node have their twins in
test_sidecar.py and test/ros/test_node.py.

Also the gRPC door's options that the PRD's EmbedRequest has no field for (truncate,
input_type: request metadata; the count of truncated inputs: trailing metadata).
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests

from akidb_ros.client import GrpcClient, InvalidRequestError, RestClient
from akidb_ros.client.retry import NO_RETRY
from akidb_ros.engine.errors import EngineError
from akidb_ros.engine.types import EmbedRequest, InputType
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc

from bridge_support import DEFAULT_MODEL, SECOND_MODEL

LONG = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 80)   # > 256 tokens


@pytest.fixture(scope='module', autouse=True)
def _second_model_as_found(engine):
    """Tests here load the second model on the shared engine: unload it after, if it was not."""
    loaded = engine.manager.loaded(SECOND_MODEL) is not None
    yield
    if not loaded and engine.manager.loaded(SECOND_MODEL) is not None:
        engine.unload_model(SECOND_MODEL)


def _rest(url: str, inputs, **body):
    r = requests.post(url + '/api/v1/embed', json={'inputs': inputs, **body}, timeout=30)
    return r.status_code, r.json()


def _openai(url: str, inputs, model=DEFAULT_MODEL):
    r = requests.post(url + '/v1/embeddings', json={'input': inputs, 'model': model}, timeout=30)
    return r.status_code, r.json()


def _grpc(target: str, inputs, model='', metadata=()):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))
    try:
        resp, call = stub.Embed.with_call(
            pb.EmbedRequest(inputs=inputs, model=model, normalize=True), timeout=30,
            metadata=list(metadata))
    except grpc.RpcError as err:
        return err.code(), dict(err.trailing_metadata()), err.details()
    return grpc.StatusCode.OK, dict(call.trailing_metadata()), resp


def _engine(engine, inputs, model=''):
    try:
        return 'OK', engine.embed(EmbedRequest(inputs=inputs, model=model))
    except EngineError as err:
        return err.code.name, err.message


def _codes(engine, rest_url, grpc_target, inputs, model='', openai=True):
    """The table code each door answers (OK for an answer)."""
    st, body = _rest(rest_url, inputs, model=model)
    out = {'rest': 'OK' if st == 200 else body['code'],
           'grpc': (lambda g: 'OK' if g[0] == grpc.StatusCode.OK else g[1]['akidb-error-code'])(
               _grpc(grpc_target, inputs, model)),
           'engine': _engine(engine, inputs, model)[0]}
    if openai:
        st, body = _openai(rest_url, inputs, model or DEFAULT_MODEL)
        out['openai'] = 'OK' if st == 200 else body['code']
    return out


# -- a NUL inside a text: refused on every door (a ROS string would end there) ---------------
def test_a_nul_inside_a_text_is_refused_naming_the_input_on_every_door(engine, rest_url,
                                                                       grpc_target):
    texts = ['fine', 'Go to the kitchen\x00 and bring me the red cup']
    st, body = _rest(rest_url, texts)
    assert (st, body['code']) == (400, 'INVALID_INPUT'), body
    assert body['error'].startswith('inputs[1] contains U+0000 (NUL) at character 17'), body
    st, body = _openai(rest_url, texts)
    assert (st, body['code']) == (400, 'INVALID_INPUT')
    assert body['error']['message'].startswith('input[1] contains U+0000'), body
    assert body['error']['param'] == 'input'
    status, md, details = _grpc(grpc_target, texts)
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert md['akidb-error-code'] == 'INVALID_INPUT'
    assert details.startswith('inputs[1] contains U+0000'), details
    assert _engine(engine, texts)[0] == 'INVALID_INPUT'
    # a model name with a NUL too (ROS would cut it to a known model)
    assert _codes(engine, rest_url, grpc_target, ['x'], model=DEFAULT_MODEL + '\x00x') == {
        'rest': 'INVALID_INPUT', 'grpc': 'INVALID_INPUT', 'engine': 'INVALID_INPUT',
        'openai': 'INVALID_INPUT'}


# -- the count first, then each input: the same code on every door -----------------------------
@pytest.mark.parametrize('bad', ['', '   ', '\x00', '\u0301'])
def test_too_many_inputs_is_input_too_large_whatever_else_is_wrong(engine, rest_url,
                                                                   grpc_target, bad):
    inputs = ['x'] * 299 + [bad]
    # OpenAI answers every limit with 400 INVALID_INPUT by design (docs/api.md): left out
    assert _codes(engine, rest_url, grpc_target, inputs, openai=False) == {
        'rest': 'INPUT_TOO_LARGE', 'grpc': 'INPUT_TOO_LARGE', 'engine': 'INPUT_TOO_LARGE'}


def test_a_lone_surrogate_among_too_many_inputs_is_input_too_large_on_rest(rest_url):
    raw = ('{"inputs": [' + '"x", ' * 299 + '"\\ud800"]}').encode()
    r = requests.post(rest_url + '/api/v1/embed', data=raw, timeout=30,
                      headers={'Content-Type': 'application/json'})
    assert (r.status_code, r.json()['code']) == (413, 'INPUT_TOO_LARGE')
    # alone, still INVALID_INPUT naming it (the engine's check, not a 500)
    r = requests.post(rest_url + '/api/v1/embed', data=b'{"inputs": ["a", "\\ud800"]}',
                      timeout=30, headers={'Content-Type': 'application/json'})
    assert (r.status_code, r.json()['code']) == (400, 'INVALID_INPUT')
    assert r.json()['error'].startswith('inputs[1] is not valid Unicode')


def test_an_empty_text_is_invalid_input_on_every_door(engine, rest_url, grpc_target):
    assert set(_codes(engine, rest_url, grpc_target, ['ok', '']).values()) == {'INVALID_INPUT'}


def test_a_model_name_is_taken_as_sent(engine, rest_url, grpc_target):
    for model in (' ' + DEFAULT_MODEL, DEFAULT_MODEL + ' '):
        assert set(_codes(engine, rest_url, grpc_target, ['x'], model).values()) == {
            'MODEL_NOT_FOUND'}


# -- texts the tokenizer reduces to nothing: refused like blank texts --------------------------
@pytest.mark.parametrize('model', [DEFAULT_MODEL, SECOND_MODEL])
@pytest.mark.parametrize('text', ['\u0301\u0308', '\ufe0f', '\ue000', '\ufffd'])
def test_a_text_that_tokenises_to_nothing_is_refused_on_every_door(engine, rest_url,
                                                                   grpc_target, model, text):
    assert set(_codes(engine, rest_url, grpc_target, ['ok', text], model).values()) == {
        'INVALID_INPUT'}
    st, body = _rest(rest_url, ['ok', text], model=model)
    assert body['error'].startswith('inputs[1] is empty once tokenised'), body


# -- gRPC: truncate and input_type as request metadata, truncated count as trailing metadata --
class _Recording:
    """The real LocalBackend, keeping the EmbedRequests the door built."""

    def __init__(self, inner):
        self.inner = inner
        self.requests = []

    def submit(self, req, caller_waits=False):
        self.requests.append(req)
        return self.inner.submit(req, caller_waits=caller_waits)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope='module')
def recorded(local_backend):
    from akidb_ros.grpc_api.server import GrpcServer
    backend = _Recording(local_backend)
    server = GrpcServer(backend, port=0, default_timeout_s=20.0).start()
    yield backend, f'127.0.0.1:{server.port}'
    server.stop(1.0)


def test_grpc_truncate_and_input_type_from_metadata(recorded, rest_url):
    backend, target = recorded
    status, md, resp = _grpc(target, [LONG, 'short'])
    assert status == grpc.StatusCode.OK and md['akidb-truncated-inputs'] == '1'
    assert (backend.requests[-1].truncate, backend.requests[-1].input_type) == (
        True, InputType.NONE)
    status, md, resp = _grpc(target, ['short'])
    assert status == grpc.StatusCode.OK and md['akidb-truncated-inputs'] == '0'
    # the same refusal as REST's truncate=false
    status, md, details = _grpc(target, ['short', LONG],
                                metadata=[('akidb-truncate', 'false')])
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert md['akidb-error-code'] == 'INPUT_TOO_LONG' and 'inputs[1]' in details
    st, body = _rest(rest_url, ['short', LONG], truncate=False)
    assert (st, body['code']) == (400, 'INPUT_TOO_LONG')
    for value, want in (('query', InputType.QUERY), ('passage', InputType.PASSAGE),
                        ('none', InputType.NONE)):
        status, md, _ = _grpc(target, ['x'], metadata=[('akidb-input-type', value),
                                                       ('akidb-truncate', 'true')])
        assert status == grpc.StatusCode.OK
        assert (backend.requests[-1].input_type, backend.requests[-1].truncate) == (want, True)


@pytest.mark.parametrize('key,value,fragment', [
    ('akidb-truncate', 'no', 'akidb-truncate must be true or false'),
    ('akidb-truncate', '', 'akidb-truncate must be true or false'),
    ('akidb-input-type', 'question', 'akidb-input-type must be none, query or passage'),
    # exact, as REST's schema and ROS take it (gRPC served 'QUERY' that REST refused)
    ('akidb-input-type', 'QUERY', 'akidb-input-type must be none, query or passage'),
    ('akidb-input-type', ' query ', 'akidb-input-type must be none, query or passage'),
])
def test_grpc_bad_option_metadata_is_invalid_argument(recorded, key, value, fragment):
    backend, target = recorded
    n = len(backend.requests)
    status, md, details = _grpc(target, ['x'], metadata=[(key, value)])
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert md['akidb-error-code'] == 'INVALID_INPUT' and fragment in details, details
    assert len(backend.requests) == n        # refused before the backend


def test_grpc_option_metadata_sent_twice(recorded):
    """gRPC keeps repeated metadata apart: two different values of an option are refused (one
    of them was used, silently: the last); the same value twice (a proxy's copy) is taken."""
    backend, target = recorded
    n = len(backend.requests)
    for key, a, b in (('akidb-truncate', 'true', 'false'),
                      ('akidb-input-type', 'query', 'passage')):
        status, md, details = _grpc(target, ['x'], metadata=[(key, a), (key, b)])
        assert status == grpc.StatusCode.INVALID_ARGUMENT, details
        assert md['akidb-error-code'] == 'INVALID_INPUT'
        assert f'metadata {key} sent with different values' in details, details
    assert len(backend.requests) == n        # refused before the backend
    status, md, _ = _grpc(target, ['x'], metadata=[('akidb-input-type', 'query'),
                                                   ('akidb-input-type', 'query')])
    assert status == grpc.StatusCode.OK and backend.requests[-1].input_type is InputType.QUERY


def test_grpc_stream_options_and_truncated_total(grpc_target):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    reqs = [pb.EmbedRequest(inputs=[LONG, 'a']), pb.EmbedRequest(inputs=['b']),
            pb.EmbedRequest(inputs=[LONG, LONG])]
    call = stub.EmbedStream(iter(reqs), timeout=30)
    assert len(list(call)) == 3
    assert dict(call.trailing_metadata())['akidb-truncated-inputs'] == '3'
    call = stub.EmbedStream(iter(reqs), timeout=30, metadata=[('akidb-truncate', 'false')])
    with pytest.raises(grpc.RpcError) as ei:
        list(call)
    md = dict(ei.value.trailing_metadata())
    assert (md['akidb-error-code'], md['akidb-stream-index']) == ('INPUT_TOO_LONG', '0')


def test_grpc_client_truncate_input_type_and_truncated_count(grpc_target, rest_url):
    with GrpcClient(grpc_target, timeout_s=30, retry=NO_RETRY) as g, \
            RestClient(rest_url, timeout_s=30, retry=NO_RETRY) as r:
        got, ref = g.embed([LONG, 'short']), r.embed([LONG, 'short'])
        assert got.truncated_inputs == ref.truncated_inputs == 1
        np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-6)
        assert g.embed(['short']).truncated_inputs == 0
        for client in (g, r):
            with pytest.raises(InvalidRequestError) as ei:
                client.embed(['short', LONG], truncate=False)
            assert ei.value.code == 'INPUT_TOO_LONG'
            with pytest.raises(InvalidRequestError) as ei:
                client.embed(['x'], input_type='question')
            assert ei.value.code == 'INVALID_INPUT'
        q = g.embed(['x'], input_type='query', truncate=False)
        assert q.embeddings.shape == (1, 384)
        with pytest.raises(TypeError):
            g.embed(['x'], truncate='false')
        outs = list(g.embed_stream([['a'], ['b']], input_type='passage'))
        assert [o.embeddings.shape for o in outs] == [(1, 384), (1, 384)]
        with pytest.raises(InvalidRequestError) as ei:
            list(g.embed_stream([['a'], [LONG]], truncate=False))
        assert (ei.value.code, ei.value.stream_index) == ('INPUT_TOO_LONG', 1)


def test_client_and_server_agree_on_the_metadata_names():
    from akidb_ros.client import grpc as client
    from akidb_ros.grpc_api import server
    assert (client.TRUNCATE_MD, client.INPUT_TYPE_MD, client.TRUNCATED_MD) == (
        server.TRUNCATE_MD, server.INPUT_TYPE_MD, server.TRUNCATED_MD)
