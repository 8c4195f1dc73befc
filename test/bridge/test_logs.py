"""Structured JSON access logs: request id, model, latency, outcome (and the trace id)."""
from __future__ import annotations

import io
import json
import logging
import uuid

from contextlib import contextmanager

import grpc
import pytest
import requests

from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
from akidb_ros.observability.logs import ACCESS_LOGGER, JsonFormatter, configure_logging


@contextmanager
def _access_lines():
    """The access-log lines written inside the block, as dicts (appended when it ends)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        lines.extend(json.loads(x) for x in stream.getvalue().splitlines())


def test_access_log_is_json_with_request_fields(rest_url):
    trace_id = uuid.uuid4().hex
    with _access_lines() as lines:
        requests.post(rest_url + '/api/v1/embed', json={'inputs': ['log me']}, timeout=10,
                      headers={'X-Request-ID': 'log-ok-1',
                               'traceparent': f'00-{trace_id}-{"cd" * 8}-01'})
        requests.post(rest_url + '/api/v1/embed', json={'inputs': ['x'], 'model': 'nope'},
                      headers={'X-Request-ID': 'log-err-1'}, timeout=10)
    ok = next(x for x in lines if x.get('request_id') == 'log-ok-1')
    assert ok['outcome'] == 'success' and ok['model'] == 'all-minilm-l6-v2'
    assert ok['transport'] == 'rest' and ok['latency_ms'] > 0 and ok['level'] == 'info'
    assert ok['trace_id'] == trace_id and ok['tokens'] > 0
    err = next(x for x in lines if x.get('request_id') == 'log-err-1')
    assert err['outcome'] == 'error' and err['code'] == 'MODEL_NOT_FOUND' and err['error']


def test_stream_access_lines_carry_the_trace_id(grpc_target):
    """Each EmbedStream request's line carries the caller's trace id and a span id of its
    own, as a unary call's (docs/api.md: trace ids in every line). They carried neither: the
    request's span had ended before its answer was logged."""
    trace_id = uuid.uuid4().hex
    reqs = [pb.EmbedRequest(inputs=['one']), pb.EmbedRequest(inputs=['two']),
            pb.EmbedRequest(inputs=['x'], model='nope')]
    md = [('x-request-id', 'log-stream'), ('traceparent', f'00-{trace_id}-{"cd" * 8}-01')]
    with grpc.insecure_channel(grpc_target) as ch, _access_lines() as lines:
        with pytest.raises(grpc.RpcError):
            list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(iter(reqs), timeout=10, metadata=md))
    ours = {x['request_id']: x for x in lines if x['request_id'].startswith('log-stream-')}
    assert [ours[f'log-stream-{i}']['outcome'] for i in range(3)] == \
        ['success', 'success', 'error']
    assert {x.get('trace_id') for x in ours.values()} == {trace_id}
    assert len({x['span_id'] for x in ours.values()}) == 3


def test_configure_logging_json_and_text():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        out = io.StringIO()
        configure_logging(level='INFO', fmt='json', stream=out)
        logging.getLogger('akidb_ros.test').info('hello', extra={'k': 1})
        rec = json.loads(out.getvalue().splitlines()[-1])
        assert rec['msg'] == 'hello' and rec['k'] == 1 and rec['logger'] == 'akidb_ros.test'
        out = io.StringIO()
        configure_logging(level='INFO', fmt='text', stream=out)
        logging.getLogger('akidb_ros.test').info('plain', extra={'request_id': 'rid\n2'})
        text = out.getvalue()
        assert 'plain' in text and not text.lstrip().startswith('{')
        # an access line in text is its fields, one line whatever they hold
        assert text.rstrip('\n').endswith('plain request_id="rid\\n2"') and \
            text.count('\n') == 1, text
    finally:
        for h in list(root.handlers):
            if getattr(h, '_akidb', False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_caller_cannot_split_a_log_record_with_unicode_line_breaks(rest_url):
    """json.dumps escapes controls below U+0020 only; U+2028, U+2029, U+0085 (line breaks to
    many readers, Python's splitlines among them) and C1 controls (U+009B starts a terminal
    escape) in a caller's model name reached the line raw."""
    name = 'a\u2028b\u2029c\u0085d\u009b31m'
    with _access_lines() as lines:
        r = requests.post(rest_url + '/api/v1/embed', json={'inputs': ['x'], 'model': name},
                          headers={'X-Request-ID': 'log-linesep'}, timeout=10)
        assert r.status_code == 400
    (rec,) = [x for x in lines if x.get('request_id') == 'log-linesep']
    assert name in rec['error']          # decoded back exactly
    raw = JsonFormatter().format(logging.makeLogRecord({'msg': name}))
    assert not any(c in raw for c in '\u2028\u2029\u0085\u009b') and len(raw.splitlines()) == 1


def test_every_admin_call_gets_its_access_line(rest_url):
    """A failed load/unload was missing from the access log (only successes had a line, with
    no latency nor code)."""
    with _access_lines() as lines:
        for rid, model in (('adm-ok', 'all-minilm-l6-v2'), ('adm-bad', 'no-such-model')):
            requests.post(rest_url + '/admin/models/load', json={'model': model},
                          headers={'X-Request-ID': rid}, timeout=60)
    got = {x['request_id']: x for x in lines if x.get('request_id', '').startswith('adm-')}
    assert got['adm-ok']['outcome'] == 'success' and got['adm-ok']['op'] == 'load_model'
    assert got['adm-bad']['outcome'] == 'error' and got['adm-bad']['code'] == 'MODEL_NOT_FOUND'
    assert all(x['latency_ms'] >= 0 and x['transport'] == 'rest' for x in got.values())
