"""akidb_ros.client refuses a caller's mistake at once, before anything is sent, with a
TypeError/ValueError naming the argument — the same on both clients (docs/api.md, "Caller
mistakes"). No engine here: a small HTTP server logs what reaches it, and the gRPC client
points at a closed port (a call that got as far as the network would fail UNAVAILABLE)."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from akidb_ros.client import NO_RETRY, GrpcClient, RestClient, RetryPolicy
from bridge_support import Scripted, free_port

OK_BODY = {'embeddings': [[1.0, 0.0]], 'model': 'm',
           'usage': {'total_tokens': 1, 'duration_ms': 1}}


def _answer(request_body: bytes):
    """One 2-d vector per input the request carried."""
    inputs = json.loads(request_body)['inputs']
    return 200, {'Content-Type': 'application/json'}, \
        dict(OK_BODY, embeddings=[[1.0, 0.0]] * len(inputs))


class _Server(Scripted):
    """HTTP on 127.0.0.1 answering every embed with one 2-d vector per input; ``sent``: the
    JSON bodies that reached it."""

    def __init__(self):
        super().__init__([_answer])

    @property
    def sent(self):
        return [json.loads(b) for b in self.bodies]


@pytest.fixture(scope='module')
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(scope='module')
def clients(server):
    rest = RestClient(server.url, timeout_s=5, retry=NO_RETRY)
    grpc_client = GrpcClient(f'127.0.0.1:{free_port()}', timeout_s=2, retry=NO_RETRY)
    yield rest, grpc_client
    rest.close()
    grpc_client.close()


def _gen():
    yield 'a'


# -- inputs: a str or a sequence of str -----------------------------------------------------------
@pytest.mark.parametrize('bad', [
    {'b', 'a', 'c'}, frozenset({'a'}), {'a': 1}, {'a': 1}.keys(), {'a': 'x'}.values(),
    collections.OrderedDict(a=1), _gen(), iter(['a']), map(str, [1]), np.array([['a']]),
], ids=lambda v: type(v).__name__)
def test_inputs_that_are_not_a_sequence_are_refused(server, clients, bad):
    before = len(server.sent)
    for c in clients:
        with pytest.raises(TypeError, match='inputs') as ei:
            c.embed(bad)
        assert 'list' in str(ei.value)              # says what to pass instead
    assert len(server.sent) == before


def test_sequences_of_str_are_accepted(server, clients):
    rest = clients[0]
    for ok, sent in ((['b', 'a'], ['b', 'a']), (('b', 'a'), ['b', 'a']), ('one', ['one']),
                     (collections.UserList(['u']), ['u']),
                     (np.array(['n1', 'n2']), ['n1', 'n2'])):
        assert rest.embed(ok).embeddings.shape == (len(sent), 2)
        assert server.sent[-1]['inputs'] == sent


def test_embed_stream_batches_must_be_sequences(clients):
    g = clients[1]
    for bad in ([{'a', 'b'}], [{'a': 1}], (_gen(),)):
        with pytest.raises(TypeError, match='batch 0'):
            g.embed_stream(bad)


# -- the other arguments of embed -----------------------------------------------------------------
@pytest.mark.parametrize('kw', [
    dict(model=5), dict(model=b'm'), dict(model=['m']), dict(normalize='no'),
    dict(normalize=None), dict(normalize=1), dict(truncate='x'), dict(truncate=None),
    dict(input_type=5), dict(input_type=b'query'), dict(request_id=5),
    dict(request_id='two\nlines'), dict(request_id='x' * 129),
    dict(retry='x'), dict(retry=3),
], ids=lambda kw: '-'.join(f'{k}={v!r:.12}' for k, v in kw.items()))
def test_embed_arguments_of_the_wrong_type_are_refused_alike(server, clients, kw):
    name = next(iter(kw))
    before = len(server.sent)
    for c in clients:
        with pytest.raises((TypeError, ValueError), match=name) as ei:
            c.embed(['x'], **kw)
        assert 'bad argument type for built-in operation' not in str(ei.value)
    assert len(server.sent) == before


def test_embed_arguments_that_are_fine(server, clients):
    rest = clients[0]
    rest.embed(['x'], model='m', normalize=False, truncate=False, input_type='query',
               request_id='abc-123', retry=RetryPolicy(max_attempts=1))
    assert server.sent[-1] == {'inputs': ['x'], 'normalize': False, 'truncate': False,
                               'model': 'm', 'input_type': 'query'}
    rest.embed(['x'], model=None, input_type=None)       # None: the server's default
    assert server.sent[-1] == {'inputs': ['x'], 'normalize': True, 'truncate': True}


def test_load_and_unload_name_a_model(server, clients):
    for call in (clients[0].load_model, clients[0].unload_model):
        with pytest.raises(TypeError, match='model'):
            call(None)


# -- construction ---------------------------------------------------------------------------------
@pytest.mark.parametrize('url', [
    'http://127.0.0.1:99999', 'http://127.0.0.1:0', 'http://127.0.0.1:-1',
    'http://127.0.0.1:port', 'http://:8080', 'http://', 'https://:443/x', 'http://[::1',
    'http://127.0.0.1:8080?x=1', 'http://127.0.0.1:8080#top', 'http://127.0.0.1 :8080',
])
def test_rest_base_url_is_checked_at_construction(url):
    with pytest.raises(ValueError, match='base_url'):
        RestClient(url)


def test_rest_base_urls_that_are_fine():
    for url in ('http://127.0.0.1:1', 'http://127.0.0.1:65535', 'https://localhost',
                'http://[::1]:8080/', 'http://127.0.0.1:8080/akidb', 'HTTP://127.0.0.1:8080'):
        RestClient(url).close()


@pytest.mark.parametrize('kw,exc', [
    (dict(retry='x'), TypeError), (dict(retry=3), TypeError),
    (dict(headers=['X-API-Key']), TypeError), (dict(headers={'X-API-Key': 5}), TypeError),
    (dict(headers={'X-API-Key': 'a\nb'}), ValueError),
])
def test_rest_options_are_checked_at_construction(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        RestClient('http://127.0.0.1:1', **kw)


@pytest.mark.parametrize('args,kw,exc,name', [
    ((None,), {}, TypeError, 'target'), ((5,), {}, TypeError, 'target'),
    (('',), {}, ValueError, 'target'), (('  ',), {}, ValueError, 'target'),
    (('127.0.0.1:1',), dict(retry='x'), TypeError, 'retry'),
    (('127.0.0.1:1',), dict(metadata=['k']), TypeError, 'metadata'),
    (('127.0.0.1:1',), dict(metadata={'k': 5}), TypeError, 'metadata'),
    (('127.0.0.1:1',), dict(max_message_bytes=0), ValueError, 'max_message_bytes'),
    (('127.0.0.1:1',), dict(max_message_bytes='1'), ValueError, 'max_message_bytes'),
])
def test_grpc_options_are_checked_at_construction(args, kw, exc, name):
    with pytest.raises(exc, match=name):
        GrpcClient(*args, **kw)
