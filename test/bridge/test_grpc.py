"""gRPC bridge against the real engine over real gRPC on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from akidb_ros.client import (DeadlineExceededError, GrpcClient, InvalidRequestError,
                              ModelNotFoundError, RestClient)
from akidb_ros.client.retry import NO_RETRY
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
from akidb_ros.grpc_api.codegen import check as codegen_check

from bridge_support import DEFAULT_MODEL

SENTENCES = ['The autonomous vehicle detects pedestrians.', 'Emergency braking system activated.']


def test_generated_code_matches_proto():
    """The checked-in embedding_pb2*.py are exactly what grpcio-tools makes from the proto."""
    assert codegen_check()


# The Week 5 PRD's akidb.embedding.v1 messages, field by field: (name, number, type, repeated).
# A map field is a repeated message of its entry type.
PRD_MESSAGES = {
    'EmbedRequest': [('model', 1, 'STRING', False), ('inputs', 2, 'STRING', True),
                     ('normalize', 3, 'BOOL', False)],
    'EmbedResponse': [('embeddings', 1, 'MESSAGE', True), ('model', 2, 'STRING', False),
                      ('usage', 3, 'MESSAGE', False)],
    'Vector': [('values', 1, 'FLOAT', True)],
    'Usage': [('total_tokens', 1, 'INT32', False), ('duration_ms', 2, 'INT32', False)],
    'HealthRequest': [],
    'HealthResponse': [('status', 1, 'ENUM', False), ('checks', 2, 'MESSAGE', True),
                       ('version', 3, 'STRING', False)],
    'ListModelsRequest': [],
    'ListModelsResponse': [('models', 1, 'MESSAGE', True)],
    'ModelInfo': [('id', 1, 'STRING', False), ('name', 2, 'STRING', False),
                  ('dimension', 3, 'INT32', False), ('params', 4, 'INT64', False),
                  ('memory_mb', 5, 'INT32', False), ('latency_p95_ms', 6, 'INT32', False),
                  ('throughput_qps', 7, 'INT32', False), ('status', 8, 'STRING', False)],
}


def test_prd_messages_unchanged():
    from google.protobuf.descriptor import FieldDescriptor
    type_names = {v: k[5:] for k, v in vars(FieldDescriptor).items() if k.startswith('TYPE_')}
    assert pb.DESCRIPTOR.package == 'akidb.embedding.v1'
    got = {m.name: [(f.name, f.number, type_names[f.type], f.is_repeated) for f in m.fields]
           for m in pb.DESCRIPTOR.message_types_by_name.values()}
    assert got == PRD_MESSAGES
    refs = {(m, f.name): f.message_type.name for m in ('EmbedResponse', 'ListModelsResponse')
            for f in pb.DESCRIPTOR.message_types_by_name[m].fields if f.message_type}
    assert refs == {('EmbedResponse', 'embeddings'): 'Vector', ('EmbedResponse', 'usage'): 'Usage',
                    ('ListModelsResponse', 'models'): 'ModelInfo'}
    checks = pb.HealthResponse.DESCRIPTOR.fields_by_name['checks'].message_type
    assert checks.GetOptions().map_entry and [f.type for f in checks.fields] == [
        FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_STRING]
    status = pb.HealthResponse.DESCRIPTOR.enum_types_by_name['Status']
    assert [(v.name, v.number) for v in status.values] == [
        ('UNKNOWN', 0), ('HEALTHY', 1), ('UNHEALTHY', 2)]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming,
                        m.server_streaming)
               for m in pb.DESCRIPTOR.services_by_name['EmbeddingService'].methods}
    assert methods == {'Embed': ('EmbedRequest', 'EmbedResponse', False, False),
                       'Health': ('HealthRequest', 'HealthResponse', False, False),
                       'ListModels': ('ListModelsRequest', 'ListModelsResponse', False, False),
                       'EmbedStream': ('EmbedRequest', 'EmbedResponse', True, True)}


def test_embed_same_answer_as_rest(grpc_client, rest_url):
    g = grpc_client.embed(SENTENCES, normalize=True)
    r = RestClient(rest_url).embed(SENTENCES, normalize=True)
    assert g.model == r.model == DEFAULT_MODEL
    assert g.embeddings.shape == (2, 384)
    np.testing.assert_allclose(g.embeddings, r.embeddings, atol=1e-6)
    assert g.total_tokens == r.total_tokens > 0


def test_error_codes_from_table(grpc_target):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    cases = [
        (pb.EmbedRequest(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, 'INVALID_INPUT'),
        (pb.EmbedRequest(inputs=['a', '']), grpc.StatusCode.INVALID_ARGUMENT, 'INVALID_INPUT'),
        (pb.EmbedRequest(inputs=['a'], model='nope'), grpc.StatusCode.NOT_FOUND,
         'MODEL_NOT_FOUND'),
        (pb.EmbedRequest(inputs=['a'] * 300), grpc.StatusCode.INVALID_ARGUMENT,
         'INPUT_TOO_LARGE'),
    ]
    for req, status, code in cases:
        with pytest.raises(grpc.RpcError) as ei:
            stub.Embed(req, timeout=10)
        assert ei.value.code() == status
        assert dict(ei.value.trailing_metadata())['akidb-error-code'] == code


def test_typed_client_errors(grpc_client):
    with pytest.raises(ModelNotFoundError):
        grpc_client.embed(['a'], model='nope')
    with pytest.raises(InvalidRequestError) as ei:
        grpc_client.embed([])
    assert not ei.value.retryable


def test_deadline_honoured(grpc_target):
    c = GrpcClient(grpc_target, retry=NO_RETRY)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        c.embed([' '.join(['word'] * 200)] * 64, timeout_s=0.005)
    assert time.monotonic() - t0 < 2.0
    c.close()


def test_message_size_limit(grpc_target):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    with pytest.raises(grpc.RpcError) as ei:
        stub.Embed(pb.EmbedRequest(inputs=['a' * (17 * 1024 * 1024)]), timeout=10)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_in_order(grpc_client):
    batches = [[f'sentence number {i}'] * (1 + i % 3) for i in range(24)]
    outs = list(grpc_client.embed_stream(batches, normalize=True))
    assert [o.embeddings.shape[0] for o in outs] == [len(b) for b in batches]
    single = grpc_client.embed(batches[5], normalize=True).embeddings
    np.testing.assert_allclose(outs[5].embeddings, single, atol=1e-6)


def test_stream_error_carries_index(grpc_target):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    reqs = [pb.EmbedRequest(inputs=['ok']), pb.EmbedRequest(inputs=['ok']),
            pb.EmbedRequest(inputs=['x'], model='nope'), pb.EmbedRequest(inputs=['never'])]
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for resp in stub.EmbedStream(iter(reqs), timeout=10):
            got.append(resp)
    assert len(got) == 2
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-stream-index'] == '2' and md['akidb-error-code'] == 'MODEL_NOT_FOUND'


def test_health_list_models_and_standard_health(grpc_target, grpc_client):
    h = grpc_client.health()
    assert h.status == pb.HealthResponse.HEALTHY and h.version
    assert {'embedding_provider', 'model_cache', 'gpu'} <= set(h.checks)
    models = {m.id: m for m in grpc_client.list_models()}
    assert models[DEFAULT_MODEL].status == 'loaded' and models[DEFAULT_MODEL].dimension == 384
    ch = grpc.insecure_channel(grpc_target)
    hs = health_pb2_grpc.HealthStub(ch)
    for svc in ('', 'akidb.embedding.v1.EmbeddingService'):
        assert hs.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(grpc_target):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(grpc_target))
    resp = next(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services='')]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {'akidb.embedding.v1.EmbeddingService', 'grpc.health.v1.Health'} <= names


def test_graceful_stop_finishes_in_flight(local_backend):
    """stop(grace) refuses new calls but lets accepted ones complete."""
    from akidb_ros.grpc_api.server import GrpcServer
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0).start()
    target = f'127.0.0.1:{srv.port}'
    results, errors = [], []

    def worker():
        c = GrpcClient(target, retry=NO_RETRY)
        try:
            results.append(c.embed([' '.join(['robot arm'] * 60)] * 4, timeout_s=30))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)   # calls are in flight in the engine
    srv.stop(grace_s=20)
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 4
    c = GrpcClient(target, retry=NO_RETRY)
    with pytest.raises(Exception):
        c.embed(['after stop'], timeout_s=2)
    c.close()


def test_request_id_echoed_in_trailing_metadata(grpc_target):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    _, call = stub.Embed.with_call(pb.EmbedRequest(inputs=['id please']), timeout=10,
                                   metadata=[('x-request-id', 'grpc-rid-7')])
    assert dict(call.trailing_metadata())['x-request-id'] == 'grpc-rid-7'
    with pytest.raises(grpc.RpcError) as ei:
        stub.Embed(pb.EmbedRequest(inputs=['x'], model='nope'), timeout=10,
                   metadata=[('x-request-id', 'grpc-rid-8')])
    assert dict(ei.value.trailing_metadata())['x-request-id'] == 'grpc-rid-8'


def test_request_id_on_every_rpc(grpc_target):
    """docs/api.md: ``x-request-id`` on every answer. Only Embed had it: an EmbedStream (ended
    or failed), Health and ListModels answered without it."""
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(grpc_target))
    _, call = stub.Health.with_call(pb.HealthRequest(), timeout=10,
                                    metadata=[('x-request-id', 'rid-health')])
    assert dict(call.trailing_metadata())['x-request-id'] == 'rid-health'
    _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10,
                                        metadata=[('x-request-id', 'rid-list')])
    assert dict(call.trailing_metadata())['x-request-id'] == 'rid-list'
    health_stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(grpc_target))
    _, call = health_stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10,
                                          metadata=[('x-request-id', 'rid-check')])
    assert dict(call.trailing_metadata())['x-request-id'] == 'rid-check'
    _, call = health_stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
    assert len(dict(call.trailing_metadata())['x-request-id']) == 32     # one of its own
    stream = stub.EmbedStream(iter([pb.EmbedRequest(inputs=['a']), pb.EmbedRequest(inputs=['b'])]),
                              timeout=10, metadata=[('x-request-id', 'rid-stream')])
    assert len(list(stream)) == 2
    assert dict(stream.trailing_metadata())['x-request-id'] == 'rid-stream'
    stream = stub.EmbedStream(iter([pb.EmbedRequest(inputs=['a']),
                                    pb.EmbedRequest(inputs=['b'], model='nope')]),
                              timeout=10, metadata=[('x-request-id', 'rid-stream-2')])
    with pytest.raises(grpc.RpcError) as ei:
        list(stream)
    md = dict(ei.value.trailing_metadata())
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert (md['x-request-id'], md['akidb-stream-index']) == ('rid-stream-2', '1')
