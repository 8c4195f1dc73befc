"""Every PRD metric family is exposed on the bridge's /metrics and moves when its event happens.

GPU (akidb_gpu_memory_used_bytes, akidb_gpu_utilization_percent) and TensorRT
(akidb_tensorrt_engine_builds_total / _cache_hits_total) families only move on a GPU host; here
(CPU-only) they are asserted to be exposed (HELP/TYPE) and to stay empty.
akidb_circuit_breaker_state is set by the guard's breaker (akidb_ros.guard), not by the bridges.
"""
from __future__ import annotations

import threading

import requests

from akidb_ros.client import GrpcClient, RestClient

from bridge_support import SECOND_MODEL, scrape, total


def metrics_text(url):
    r = requests.get(url + '/metrics', timeout=10)
    from prometheus_client import CONTENT_TYPE_LATEST
    # exactly the exposition format's type (one charset: Flask's mimetype= appended a second)
    assert r.status_code == 200 and r.headers['Content-Type'] == CONTENT_TYPE_LATEST
    return r.text


def test_request_and_engine_families_move(rest_url, grpc_target):
    before = scrape(metrics_text(rest_url))
    RestClient(rest_url).embed(['metrics please', 'and more'])
    GrpcClient(grpc_target).embed(['metrics over grpc'])
    requests.post(rest_url + '/api/v1/embed', json={'inputs': [3]}, timeout=5)
    after = scrape(metrics_text(rest_url))

    def moved(name, **labels):
        return total(after, name, **labels) > total(before, name, **labels)

    assert moved('akidb_embed_requests_total', transport='rest', status='success')
    assert moved('akidb_embed_requests_total', transport='grpc', status='success')
    assert moved('akidb_embed_requests_total', transport='rest', status='error')
    assert moved('akidb_embed_latency_seconds_count', transport='rest')
    assert moved('akidb_embed_latency_seconds_count', transport='grpc')
    assert moved('akidb_request_errors_total', transport='rest', code='INVALID_INPUT')
    assert moved('akidb_model_cache_hits_total')
    assert moved('akidb_batch_size_count')
    assert moved('akidb_inference_batch_size_count')
    assert moved('akidb_tokens_processed_total')
    assert moved('akidb_inference_seconds_count')
    assert moved('akidb_queue_wait_seconds_count')
    assert moved('akidb_backend_latency_seconds_count', backend='inprocess')
    assert total(after, 'akidb_queue_capacity') > 0
    assert total(after, 'akidb_model_cache_size') >= 1
    requests.get(rest_url + '/health', timeout=5)
    assert total(scrape(metrics_text(rest_url)), 'akidb_backend_up', backend='inprocess') == 1


def test_model_cache_families_move(small_bridges):
    url = f'http://127.0.0.1:{small_bridges.rest_port}'
    before = scrape(metrics_text(url))
    c = RestClient(url, timeout_s=120)
    c.embed(['warm the default'])
    out = c.embed(['load on demand'], model=SECOND_MODEL)   # miss → load → evicts the default
    assert out.embeddings.shape == (1, 768)
    mid = scrape(metrics_text(url))
    c.embed(['default again'])                              # miss again (it was evicted)
    after = scrape(metrics_text(url))
    # one request, one miss and no hit (it was counted a hit too once its load was done)
    assert [total(mid, f'akidb_model_cache_{kind}_total', model=SECOND_MODEL) -
            total(before, f'akidb_model_cache_{kind}_total', model=SECOND_MODEL)
            for kind in ('misses', 'hits')] == [1, 0]
    assert total(after, 'akidb_model_load_seconds_count') > \
        total(before, 'akidb_model_load_seconds_count')
    assert total(after, 'akidb_model_evictions_total') > \
        total(before, 'akidb_model_evictions_total')
    # the process' engines added up (the session engine's models too): at least this one's
    assert total(mid, 'akidb_model_cache_size') >= 1


def test_queue_and_load_shed_families_move(small_bridges):
    url = f'http://127.0.0.1:{small_bridges.rest_port}'
    before = scrape(metrics_text(url))
    seen_queue = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            seen_queue.append(total(scrape(metrics_text(url)), 'akidb_queue_size'))

    def flood():
        for _ in range(3):
            requests.post(url + '/api/v1/embed', json={'inputs': [
                ' '.join(['busy robot'] * 40)] * 8}, timeout=60)

    s = threading.Thread(target=sampler)
    s.start()
    threads = [threading.Thread(target=flood) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    s.join(10)
    after = scrape(metrics_text(url))
    assert total(after, 'akidb_load_shed_total') > total(before, 'akidb_load_shed_total')
    assert total(after, 'akidb_request_errors_total', code='OVERLOADED') > \
        total(before, 'akidb_request_errors_total', code='OVERLOADED')
    assert max(seen_queue) >= 1


def test_gpu_and_tensorrt_families_exposed(rest_url):
    text = metrics_text(rest_url)
    for fam in ('akidb_gpu_memory_used_bytes', 'akidb_gpu_utilization_percent',
                'akidb_tensorrt_engine_builds_total', 'akidb_tensorrt_engine_cache_hits_total',
                'akidb_circuit_breaker_state'):
        assert f'# HELP {fam}' in text
    samples = scrape(text)
    # CPU-only host: no GPU samples (they only move where a GPU exists)
    assert total(samples, 'akidb_gpu_memory_used_bytes') == 0


def test_failed_calls_are_labelled_with_the_model_that_would_serve_them(rest_url, grpc_target):
    """A failed call that names no model is labelled with the default model's id, as its
    successes are (it was 'default'); an unknown name is 'unknown' (bounded labels)."""
    import grpc

    from akidb_ros.grpc_api import embedding_pb2 as pb
    from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
    from bridge_support import DEFAULT_MODEL

    before = scrape(metrics_text(rest_url))
    long = 'word ' * 400
    r = requests.post(rest_url + '/api/v1/embed', json={'inputs': [long], 'truncate': False},
                      timeout=10)
    assert r.json()['code'] == 'INPUT_TOO_LONG'
    r = requests.post(rest_url + '/api/v1/embed', data=b'{not json',
                      headers={'Content-Type': 'application/json'}, timeout=10)
    assert r.json()['code'] == 'INVALID_INPUT'
    r = requests.post(rest_url + '/api/v1/embed', json={'inputs': ['x'], 'model': 'no-such'},
                      timeout=10)
    assert r.json()['code'] == 'MODEL_NOT_FOUND'
    # a name refused before it is looked up (over 256 characters) is 'unknown' too, not the
    # default model's error series
    r = requests.post(rest_url + '/api/v1/embed', json={'inputs': ['x'], 'model': 'm' * 300},
                      timeout=10)
    assert r.json()['code'] == 'INVALID_INPUT'
    with grpc.insecure_channel(grpc_target) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        for req in (pb.EmbedRequest(inputs=['']), pb.EmbedRequest(inputs=['x'], model='nope')):
            try:
                stub.Embed(req, timeout=10)
            except grpc.RpcError:
                pass
    after = scrape(metrics_text(rest_url))

    def errors(transport, model):
        return total(after, 'akidb_embed_requests_total', transport=transport, model=model,
                     status='error') - total(before, 'akidb_embed_requests_total',
                                             transport=transport, model=model, status='error')

    assert errors('rest', DEFAULT_MODEL) == 2 and errors('rest', 'unknown') == 2
    assert errors('grpc', DEFAULT_MODEL) == 1 and errors('grpc', 'unknown') == 1
    assert errors('rest', 'default') == errors('grpc', 'default') == 0


def test_backend_up_is_exported_from_the_start_and_follows_the_engine(engine, local_backend):
    """akidb_backend_up (AkidbBackendDown) was set only by a /health call, which no probe makes
    (they ask /health/ready): the series never existed. It is read at each scrape now."""
    from prometheus_client import REGISTRY
    from akidb_ros.backends import LocalBackend
    from akidb_ros.engine import EmbeddingEngine, load_config

    def up():
        return REGISTRY.get_sample_value('akidb_backend_up', {'backend': 'inprocess'})
    assert up() == 1                    # no /health call made it appear
    closed = EmbeddingEngine(load_config())
    closed.close()
    gone = LocalBackend(closed)
    assert gone._up() == 0 and up() == 1    # 1 while one backend of the process serves


def test_the_latency_slo_is_a_bucket_edge():
    """histogram_quantile interpolates inside a bucket: with no edge at the p95 alert's
    threshold, a true p95 of 27 ms read 48.8 ms and one of 45 ms read 29.2 ms."""
    import re
    from bridge_support import ROOT
    from akidb_ros.observability.metrics import LATENCY_BUCKETS
    rules = (ROOT / 'deploy' / 'prometheus' / 'akidb-alerts.rules.yml').read_text()
    (threshold,) = re.findall(r'akidb:latency_seconds:p95_5m > ([0-9.]+)', rules)
    assert float(threshold) in LATENCY_BUCKETS
