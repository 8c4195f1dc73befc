"""Prometheus metric families (names from the Week 5/6 PRDs), created once per process.

The engine records where the work happens (queue, batch, runtime, model cache); doors record
requests and latency. All families live in the default registry so one ``/metrics`` shows all;
a process without an engine (the sidecar bridge) drops the engine's (``ENGINE_FAMILIES``,
``drop_engine_families``).
"""
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

# 0.03 is the PRD's p95 SLO (AkidbLatencyP95High): histogram_quantile interpolates inside a
# bucket, so without that edge a true p95 of 27 ms read 48.8 ms and one of 45 ms read 29.2 ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)

# --- requests (doors) ---
EMBED_REQUESTS = Counter(
    'akidb_embed_requests_total', 'Total embedding requests',
    ['model', 'transport', 'status'])
EMBED_LATENCY = Histogram(
    'akidb_embed_latency_seconds', 'Embedding latency (request in to response out)',
    ['model', 'transport'], buckets=LATENCY_BUCKETS)

# --- model cache (engine) ---
MODEL_CACHE_HITS = Counter('akidb_model_cache_hits_total', 'Model cache hits', ['model'])
MODEL_CACHE_MISSES = Counter('akidb_model_cache_misses_total', 'Model cache misses', ['model'])
MODEL_CACHE_SIZE = Gauge('akidb_model_cache_size', 'Models currently loaded')
MODEL_LOAD_SECONDS = Histogram(
    'akidb_model_load_seconds', 'Time to load and warm a model', ['model'],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
MODEL_EVICTIONS = Counter('akidb_model_evictions_total', 'Models evicted by the LRU', ['model'])

# --- batching and runtime (engine) ---
BATCH_SIZE = Histogram(
    'akidb_batch_size', 'Sentences a batcher runner took from the queue at once: one run planned '
    'from everything queued once the model\'s run cost is learnt (then equal to '
    'akidb_inference_batch_size); before that, with split_policy padding, or for admin work, a '
    'batch it cuts into length-sorted runs', ['model'], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
INFERENCE_BATCH_SIZE = Histogram(
    'akidb_inference_batch_size', 'Sentences per ONNX Runtime run', ['model'],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
TOKENS_PROCESSED = Counter('akidb_tokens_processed_total', 'Tokens embedded', ['model'])
INFERENCE_SECONDS = Histogram(
    'akidb_inference_seconds', 'ONNX Runtime time per batch', ['model'], buckets=LATENCY_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram(
    'akidb_queue_wait_seconds', 'Time a request waited in the queue', ['model'],
    buckets=LATENCY_BUCKETS)

# --- admission (engine) ---
QUEUE_SIZE = Gauge('akidb_queue_size', 'Requests waiting in the engine queue')
QUEUE_CAPACITY = Gauge('akidb_queue_capacity', 'Engine queue capacity')
LOAD_SHED = Counter('akidb_load_shed_total', 'Requests shed by admission control', ['reason'])

# --- accelerators ---
GPU_MEMORY_USED = Gauge('akidb_gpu_memory_used_bytes', 'GPU memory used', ['device'])
GPU_UTILIZATION = Gauge('akidb_gpu_utilization_percent', 'GPU utilisation', ['device'])
TENSORRT_ENGINE_BUILDS = Counter(
    'akidb_tensorrt_engine_builds_total', 'TensorRT engines built', ['model'])
TENSORRT_ENGINE_CACHE_HITS = Counter(
    'akidb_tensorrt_engine_cache_hits_total', 'TensorRT engines loaded from the cache',
    ['model'])

# --- bridges (REST / gRPC doors, sidecar hop) ---
REQUEST_ERRORS = Counter(
    'akidb_request_errors_total', 'Failed requests by error-table code',
    ['transport', 'code'])
INFLIGHT_REQUESTS = Gauge(
    'akidb_inflight_requests', 'Requests being served by a door', ['transport'])
BACKEND_LATENCY = Histogram(
    'akidb_backend_latency_seconds', 'Time spent in the backend call (engine or DDS hop)',
    ['backend'], buckets=LATENCY_BUCKETS)
BACKEND_UP = Gauge(
    'akidb_backend_up', '1 when the backend (engine, or the node over DDS) answers', ['backend'])

# --- ROS node: replies rmw_fastrtps dropped before discovery matched the client ---
ROS_REPLIES_RESENT = Counter(
    'akidb_ros_replies_resent_total',
    'ROS service replies delivered on a later try (the client was not matched yet)', ['service'])
ROS_REPLIES_UNDELIVERED = Counter(
    'akidb_ros_replies_undelivered_total',
    'ROS service replies given up after resend_window_s (the client never matched)', ['service'])

# --- guard chain (akidb_ros/guard) ---
CIRCUIT_BREAKER_STATE = Gauge(
    'akidb_circuit_breaker_state',
    'Circuit breaker state per model: 0 closed, 1 half-open, 2 open', ['model'])
CIRCUIT_BREAKER_TRANSITIONS = Counter(
    'akidb_circuit_breaker_transitions_total', 'Circuit breaker state changes', ['model', 'to'])
RATE_LIMITED = Counter(
    'akidb_rate_limited_total', 'Requests refused by a rate limit', ['scope', 'transport'])
AUTH_FAILURES = Counter(
    'akidb_auth_failures_total', 'Refused credentials (401) and permission denials (403)',
    ['method', 'reason', 'transport'])


def summed(members, value) -> float:
    """``value(m)`` added up over a WeakSet's ``members``, for a gauge read at scrape time (a
    copy first: another thread may add one meanwhile, which a live iteration refuses)."""
    for _ in range(10):
        try:
            live = list(members)
            break
        except RuntimeError:    # changed size during the copy: look again
            continue
    else:
        return 0.0
    return float(sum(value(m) for m in live))


# Families only a process with an engine (the node, the in-process server) ever moves. A
# sidecar bridge would export the unlabelled ones as zeros next to the node's real values
# (0 models loaded, a queue of capacity 0, so NaN queue ratios on its dashboards): it drops
# them all. The guard's (breaker, rate limits, credentials) and the doors' stay: the bridge
# records those itself, and its own sheds (akidb_load_shed_total{reason="bridge"}: calls
# already waiting on the node at the DDS service's limit).
ENGINE_FAMILIES = (
    MODEL_CACHE_HITS, MODEL_CACHE_MISSES, MODEL_CACHE_SIZE, MODEL_LOAD_SECONDS, MODEL_EVICTIONS,
    BATCH_SIZE, INFERENCE_BATCH_SIZE, TOKENS_PROCESSED, INFERENCE_SECONDS, QUEUE_WAIT_SECONDS,
    QUEUE_SIZE, QUEUE_CAPACITY,
    GPU_MEMORY_USED, GPU_UTILIZATION, TENSORRT_ENGINE_BUILDS, TENSORRT_ENGINE_CACHE_HITS,
)


def drop_engine_families(registry=REGISTRY) -> None:
    """Stop exporting ``ENGINE_FAMILIES`` from ``registry`` (a process that has no engine);
    idempotent. Anything recorded on them afterwards is simply not exported."""
    for family in ENGINE_FAMILIES:
        try:
            registry.unregister(family)
        except KeyError:    # dropped already
            pass
