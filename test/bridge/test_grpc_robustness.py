"""gRPC door robustness: one caller never starves the others, undecodable bytes get the table's
answer, and health Watch speaks only on a change. Real gRPC on 127.0.0.1, real engine."""
from __future__ import annotations

import logging
import re
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
from akidb_ros.grpc_api.server import GrpcServer
from bridge_support import wait_until

EMBED = '/akidb.embedding.v1.EmbeddingService/Embed'
EMBED_STREAM = '/akidb.embedding.v1.EmbeddingService/EmbedStream'
LIST_MODELS = '/akidb.embedding.v1.EmbeddingService/ListModels'
HEALTH_CHECK = '/grpc.health.v1.Health/Check'
BAD_UTF8 = b'\x12\x02\xff\xfe'          # EmbedRequest.inputs = [b'\xff\xfe']: not UTF-8
CORRUPT = b'\xff\xff\xff\xff'           # not a protobuf message at all


def _raw(channel, method):
    return channel.unary_unary(method, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)


class _Idle:
    """A request iterator that sends nothing until released."""

    def __init__(self, release: threading.Event):
        self.release = release

    def __iter__(self):
        return self

    def __next__(self):
        self.release.wait()
        raise StopIteration


@pytest.fixture()
def small_pool(local_backend):
    """A gRPC server with a pool of 4 handler threads (the default stream share: 2)."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4).start()
    yield srv
    srv.stop(grace_s=0)


def _wait_done(calls, n, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and sum(c.done() for c in calls) < n:
        time.sleep(0.02)
    return [c for c in calls if c.done()]


def _assert_others_served(target):
    """Embed, ListModels and grpc.health.v1 Check all answer promptly."""
    ch = grpc.insecure_channel(target)
    try:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        t0 = time.monotonic()
        assert len(stub.Embed(pb.EmbedRequest(inputs=['still served']), timeout=3).embeddings) == 1
        assert stub.ListModels(pb.ListModelsRequest(), timeout=3).models
        assert health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=3).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - t0 < 3
    finally:
        ch.close()


def test_idle_streams_do_not_starve_unary_calls_or_health(small_pool):
    """Idle EmbedStreams beyond the stream share are refused at once, OVERLOADED; the rest of
    the pool keeps serving unary calls and the health probe."""
    target = f'127.0.0.1:{small_pool.port}'
    release = threading.Event()
    ch = grpc.insecure_channel(target)
    stub = pb_grpc.EmbeddingServiceStub(ch)
    calls = [stub.EmbedStream(_Idle(release), timeout=30,
                              metadata=[('x-request-id', f'idle-{i}')]) for i in range(6)]
    try:
        _wait_done(calls, 4)
        time.sleep(0.3)     # no more than the share's excess ends
        refused = [c for c in calls if c.done()]
        assert len(refused) == 4
        for c in refused:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            md = dict(c.trailing_metadata())
            assert md['akidb-error-code'] == 'OVERLOADED'
            assert int(md['retry-after']) >= 1
            assert md['x-request-id'].startswith('idle-')
        _assert_others_served(target)
    finally:
        release.set()
        for c in calls:
            c.cancel()
        ch.close()
    # the slots are given back when the streams end: a new stream is served
    ch = grpc.insecure_channel(target)
    try:
        end = time.monotonic() + 5
        while True:
            try:
                outs = list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                    iter([pb.EmbedRequest(inputs=['again'])] * 2), timeout=5))
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and \
                    time.monotonic() < end
                time.sleep(0.05)
        assert len(outs) == 2
    finally:
        ch.close()


def test_idle_reflection_streams_do_not_starve_unary_calls(small_pool):
    """Every long-lived stream counts against the share, not only EmbedStream."""
    target = f'127.0.0.1:{small_pool.port}'
    release = threading.Event()
    ch = grpc.insecure_channel(target)
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    calls = [stub.ServerReflectionInfo(_Idle(release), timeout=30) for _ in range(6)]
    try:
        assert len(_wait_done(calls, 4)) >= 4
        _assert_others_served(target)
        # the share is taken: an EmbedStream is refused, not queued
        with pytest.raises(grpc.RpcError) as ei:
            list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                iter([pb.EmbedRequest(inputs=['x'])]), timeout=3))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        for c in calls:
            c.cancel()
        ch.close()


def test_health_watches_behind_the_guard_hold_no_thread(local_backend, tmp_path):
    """The guard keeps Watch's non-blocking form: Watches hold neither a handler thread nor a
    stream slot (one viewer cannot fill the share with them), and each still meets the guard."""
    from akidb_ros.guard import Guard, GuardInterceptor
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    keys = str(tmp_path / 'keys.yaml')
    viewer = create_key(keys, Role('viewer'), 'watcher')[1]
    dev = create_key(keys, Role('developer'), 'streamer')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'enabled': False}, 'audit': {'enabled': False}})
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4,
                     interceptors=[GuardInterceptor(guard)]).start()
    target = f'127.0.0.1:{srv.port}'
    ch = grpc.insecure_channel(target)
    hs = health_pb2_grpc.HealthStub(ch)
    calls = [hs.Watch(health_pb2.HealthCheckRequest(service=''), timeout=30,
                      metadata=[('x-api-key', viewer)]) for _ in range(8)]
    try:
        for c in calls:         # 8 Watches on a pool of 4 threads, 2 stream slots
            assert next(c).status == health_pb2.HealthCheckResponse.SERVING
        assert srv.stream_slots.active == 0
        with pytest.raises(grpc.RpcError) as ei:
            next(hs.Watch(health_pb2.HealthCheckRequest(service=''), timeout=5))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        outs = list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
            iter([pb.EmbedRequest(inputs=['served'])] * 2), timeout=10,
            metadata=[('x-api-key', dev)]))
        assert len(outs) == 2
        stub = pb_grpc.EmbeddingServiceStub(ch)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=3,
                               metadata=[('x-api-key', dev)]).models
    finally:
        for c in calls:
            c.cancel()
        ch.close()
        srv.stop(grace_s=0)


def test_an_idle_reflection_stream_gives_its_slot_back(local_backend):
    """gRPC's request iterator cannot time out: the door cancels a reflection stream whose
    client sent nothing for the idle limit, and its slot serves the next stream."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4, max_streams=1,
                     stream_idle_timeout_s=1.0).start()
    release = threading.Event()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    try:
        idle = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            _Idle(release), timeout=30)
        end = time.monotonic() + 5
        while srv.stream_slots.active < 1:
            assert time.monotonic() < end
            time.sleep(0.02)
        t0 = time.monotonic()
        assert _wait_done([idle], 1, timeout_s=5)
        assert idle.code() == grpc.StatusCode.CANCELLED and time.monotonic() - t0 < 4
        end = time.monotonic() + 3
        while srv.stream_slots.active:
            assert time.monotonic() < end, 'the slot was not given back'
            time.sleep(0.02)
        outs = list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
            iter([pb.EmbedRequest(inputs=['next'])]), timeout=10))
        assert len(outs) == 1
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)


def test_a_stream_whose_client_reads_no_answer_gives_its_slot_back(local_backend):
    """A client that sends its requests, then neither reads the answers nor sends more, blocks
    the server's sends in flow control: the stream held its slot and a handler thread for good
    (every later EmbedStream refused OVERLOADED, 30 s and more in the prober's runs), and a
    graceful stop waited its whole grace for it. Past the idle limit it is cancelled now."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4, max_streams=1,
                     stream_idle_timeout_s=2.0).start()
    hold = threading.Event()

    def requests():
        for i in range(20):      # 20 x 200 vectors of 384 floats: past HTTP/2's windows
            yield pb.EmbedRequest(inputs=[f'a b c {i} {j}' for j in range(200)])
        hold.wait(60)           # then silent, never half-closed
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    try:
        unread = pb_grpc.EmbeddingServiceStub(ch).EmbedStream(requests())   # never read
        assert wait_until(lambda: srv.stream_slots.active == 1, 10)
        assert wait_until(lambda: srv.stream_slots.active == 0, 20), \
            'the slot of a stream nobody reads was never given back'
        with grpc.insecure_channel(f'127.0.0.1:{srv.port}') as ch2:
            outs = list(pb_grpc.EmbeddingServiceStub(ch2).EmbedStream(
                iter([pb.EmbedRequest(inputs=['next'])]), timeout=10))
        assert len(outs) == 1
        with pytest.raises(grpc.RpcError) as ei:
            for _ in unread:
                pass
        assert ei.value.code() == grpc.StatusCode.CANCELLED
    finally:
        hold.set()
        ch.close()
        srv.stop(grace_s=0)


def test_metadata_has_one_limit_and_the_client_does_not_retry_it(local_backend):
    """gRPC's own metadata limits (soft 8 KiB, hard 16 KiB) refused a call whose headers fell
    between them at random (12 KB: 6 of 20; 15 KB: 19 of 20), and the client read the refusal
    as OVERLOADED and retried it for 2 s. One limit now, REST's 64 KiB head; over it, every
    call is refused, and the client raises InvalidRequestError at once."""
    from akidb_ros.client import GrpcClient, InvalidRequestError
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4).start()
    try:
        with grpc.insecure_channel(f'127.0.0.1:{srv.port}') as ch:
            stub = pb_grpc.EmbeddingServiceStub(ch)
            for _ in range(10):
                stub.Embed(pb.EmbedRequest(inputs=['a']), timeout=10,
                           metadata=[('x-note', 'a' * 15000)])
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as ei:
                    stub.Embed(pb.EmbedRequest(inputs=['a']), timeout=10,
                               metadata=[('x-note', 'a' * 70000)])
                assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        client = GrpcClient(f'127.0.0.1:{srv.port}', timeout_s=10,
                            metadata={'x-note': 'a' * 70000})
        try:
            t0 = time.monotonic()
            with pytest.raises(InvalidRequestError) as err:
                client.embed(['a'])
            assert err.value.code == 'INVALID_INPUT' and not err.value.retryable
            assert time.monotonic() - t0 < 1.0      # not retried
        finally:
            client.close()
    finally:
        srv.stop(grace_s=0)


def test_each_stream_message_takes_a_rate_limit_token(local_backend, tmp_path):
    """An EmbedStream cannot go past the caller's rate limit: each message takes a token and
    the first one over the limit ends the stream RATE_LIMITED at its index."""
    from akidb_ros.guard import Guard, GuardInterceptor
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    keys = str(tmp_path / 'keys.yaml')
    dev = create_key(keys, Role('developer'), 'streamer')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'per_client': {'rate': 0.1, 'burst': 5}},
                   'audit': {'enabled': False}})
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, guard=guard.door_hook,
                     interceptors=[GuardInterceptor(guard)]).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    got = []
    try:
        with pytest.raises(grpc.RpcError) as ei:
            for resp in pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                    iter([pb.EmbedRequest(inputs=[f'text {i}']) for i in range(12)]),
                    timeout=20, metadata=[('x-api-key', dev)]):
                got.append(resp)
    finally:
        ch.close()
        srv.stop(grace_s=0)
    assert len(got) == 5            # the burst: 5 tokens, the stream's own check included
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-error-code'] == 'RATE_LIMITED' and md['akidb-stream-index'] == '5'
    assert int(md['retry-after']) >= 1


def _server_with_a_revocable_key(backend, tmp_path):
    """A gRPC server behind API keys read at every check: (server, channel, a developer's key,
    a function that revokes that key)."""
    from akidb_ros.guard import Guard, GuardInterceptor
    from akidb_ros.guard.apikeys import create_key, revoke_key
    from akidb_ros.guard.identity import Role
    keys = str(tmp_path / 'keys.yaml')
    rec, dev = create_key(keys, Role('developer'), 'leaky')
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys,
                                                          'reload_interval_s': 0}},
                   'audit': {'enabled': False}})
    srv = GrpcServer(backend, host='127.0.0.1', port=0, guard=guard.door_hook,
                     interceptors=[GuardInterceptor(guard)]).start()
    return srv, grpc.insecure_channel(f'127.0.0.1:{srv.port}'), dev, \
        lambda: revoke_key(keys, rec.id)


def test_a_key_revoked_while_its_stream_is_open_ends_the_stream(local_backend, tmp_path):
    """A leaked key cannot outlive its revocation in a stream opened before it: the next
    message after ``akidb-keys revoke`` ends the stream UNAUTHENTICATED at its index."""
    srv, ch, dev, revoke = _server_with_a_revocable_key(local_backend, tmp_path)
    answered = threading.Semaphore(0)

    def requests():
        for i in range(4):
            if i == 2:
                answered.acquire(timeout=10)
                answered.acquire(timeout=10)    # both answers are in: revoke the key
                revoke()
            yield pb.EmbedRequest(inputs=[f'text {i}'])

    got = []
    try:
        with pytest.raises(grpc.RpcError) as ei:
            for resp in pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                    requests(), timeout=20, metadata=[('x-api-key', dev)]):
                got.append(resp)
                answered.release()
    finally:
        ch.close()
        srv.stop(grace_s=0)
    assert len(got) == 2
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ei.value.details() == 'API key revoked'
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-error-code'] == 'UNAUTHENTICATED' and md['akidb-stream-index'] == '2'


def test_a_key_revoked_before_a_streams_first_message_ends_the_stream(local_backend, tmp_path,
                                                                      monkeypatch):
    """The first message of a stream opened a while before it is checked again (it was served
    on the decision made when the stream opened, with a key revoked since)."""
    from akidb_ros.guard import chain
    monkeypatch.setattr(chain, 'STALE_DECISION_S', 0.2)
    srv, ch, dev, revoke = _server_with_a_revocable_key(local_backend, tmp_path)

    def late_first():
        time.sleep(0.5)             # the stream is open (its decision made): revoke, then send
        revoke()
        yield pb.EmbedRequest(inputs=['first, but late'])
    try:
        with pytest.raises(grpc.RpcError) as ei:
            list(pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                late_first(), timeout=20, metadata=[('x-api-key', dev)]))
    finally:
        ch.close()
        srv.stop(grace_s=0)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ei.value.details() == 'API key revoked'
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-error-code'] == 'UNAUTHENTICATED' and md['akidb-stream-index'] == '0'


def test_stream_share_is_configurable_and_checked(local_backend):
    with pytest.raises(ValueError):
        GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4, max_streams=4)
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, max_workers=4,
                     max_streams=1).start()
    release = threading.Event()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    stub = pb_grpc.EmbeddingServiceStub(ch)
    try:
        calls = [stub.EmbedStream(_Idle(release), timeout=30) for _ in range(3)]
        _wait_done(calls, 2)
        time.sleep(0.3)
        assert sum(c.done() for c in calls) == 2
        _assert_others_served(f'127.0.0.1:{srv.port}')
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)


def test_idle_stream_times_out(local_backend, caplog):
    """A stream with nothing in flight that sends nothing for the idle limit ends TIMEOUT (its
    access-log line says how long it lasted); one that keeps sending is not cut."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0,
                     stream_idle_timeout_s=1.0).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    stub = pb_grpc.EmbeddingServiceStub(ch)
    release = threading.Event()

    def first_then_idle():
        yield pb.EmbedRequest(inputs=['one'])
        release.wait(10)

    def steady():
        for i in range(6):
            yield pb.EmbedRequest(inputs=[f'tick {i}'])
            time.sleep(0.25)

    try:
        t0 = time.monotonic()
        got = []
        with caplog.at_level('INFO', logger='akidb_ros.access'), \
                pytest.raises(grpc.RpcError) as ei:
            for resp in stub.EmbedStream(first_then_idle(), timeout=10,
                                         metadata=[('x-request-id', 'idle-stream')]):
                got.append(resp)
        assert len(got) == 1 and 0.9 < time.monotonic() - t0 < 5
        (line,) = [r for r in caplog.records if getattr(r, 'request_id', '') == 'idle-stream']
        assert line.code == 'TIMEOUT' and line.latency_ms >= 900, line.__dict__
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert dict(ei.value.trailing_metadata())['akidb-error-code'] == 'TIMEOUT'
        assert len(list(stub.EmbedStream(steady(), timeout=10))) == 6
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)


def _stop_promptly(srv, threads, ready, grace_s: float = 8.0):
    """Start ``threads`` (each holding a call open), wait until ``ready()``, then stop ``srv``
    with a long grace: the stop must not wait that grace for the calls held open."""
    for t in threads:
        t.start()
    end = time.monotonic() + 10
    while not ready() and time.monotonic() < end:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop(grace_s=grace_s)
    assert time.monotonic() - t0 < grace_s / 2
    for t in threads:
        t.join(10)


def test_graceful_stop_ends_open_streams_after_their_answers(local_backend):
    """stop(grace): an open EmbedStream, idle or still sending, takes no more requests, answers
    those it took and ends UNAVAILABLE at the first request not taken, at once. Both held the
    stop for its whole grace and were then cut off ('Cancelling all calls', no code, no index),
    the sending one with a request taken, answered and logged but never sent."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    stub = pb_grpc.EmbeddingServiceStub(ch)
    release = threading.Event()
    counts = {'idle': 0, 'steady': 0}
    outcomes = {}

    def first_then_idle():
        yield pb.EmbedRequest(inputs=['one'])
        release.wait(20)

    def steady():
        i = 0
        while not release.is_set():
            yield pb.EmbedRequest(inputs=[f'tick {i}'])
            i += 1
            time.sleep(0.02)

    def consume(name, requests):
        try:
            for _ in stub.EmbedStream(requests, timeout=30):
                counts[name] += 1
            outcomes[name] = (counts[name], 'OK', {})
        except grpc.RpcError as e:
            outcomes[name] = (counts[name], e.code(), dict(e.trailing_metadata() or ()))

    threads = [threading.Thread(target=consume, args=('idle', first_then_idle())),
               threading.Thread(target=consume, args=('steady', steady()))]
    try:
        _stop_promptly(srv, threads, lambda: counts['idle'] >= 1 and counts['steady'] >= 3)
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)
    for name, (got, code, md) in outcomes.items():
        assert code == grpc.StatusCode.UNAVAILABLE, (name, code, md)
        assert md['akidb-error-code'] == 'UNAVAILABLE' and md['retry-after'] == '1'
        assert md['akidb-stream-index'] == str(got), (name, got, md)   # nothing taken unanswered
    assert outcomes['idle'][0] == 1


class _HeldBackend:
    """The engine's backend, whose embed answers wait until ``release`` is set."""

    def __init__(self, backend):
        self._backend = backend
        self.release = threading.Event()
        self.submitted = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def submit(self, request, caller_waits=False):
        from concurrent.futures import Future
        inner = self._backend.submit(request)
        out = Future()
        self.submitted += 1

        def hand_over():
            self.release.wait(30)
            try:
                result = inner.result(30)
            except Exception as exc:
                result = exc
            if out.set_running_or_notify_cancel():      # False: the door cancelled it
                (out.set_exception if isinstance(result, Exception) else out.set_result)(result)
        threading.Thread(target=hand_over, daemon=True).start()
        return out


def test_a_cancelled_stream_logs_the_requests_it_took_and_never_answered(local_backend, caplog):
    """A client that cancels its EmbedStream never sees the answers to the requests the server
    had taken: their request ids are logged (they went without a word)."""
    held = _HeldBackend(local_backend)
    srv = GrpcServer(held, host='127.0.0.1', port=0).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    release = threading.Event()

    def three_then_idle():
        for i in range(3):
            yield pb.EmbedRequest(inputs=[f'held {i}'])
        release.wait(20)
    try:
        with caplog.at_level('INFO', logger='akidb_ros.grpc'):
            call = pb_grpc.EmbeddingServiceStub(ch).EmbedStream(
                three_then_idle(), timeout=30, metadata=[('x-request-id', 'cancelled-stream')])
            end = time.monotonic() + 10
            while held.submitted < 3:
                assert time.monotonic() < end, 'the stream never took its 3 requests'
                time.sleep(0.02)
            call.cancel()
            held.release.set()
            end = time.monotonic() + 10
            while 'not answered' not in caplog.text and time.monotonic() < end:
                time.sleep(0.05)
    finally:
        release.set()
        held.release.set()
        ch.close()
        srv.stop(grace_s=0)
    (line,) = [r for r in caplog.records if 'not answered' in r.getMessage()]
    count, ids = re.search(r'with (\d+) request\(s\) taken and not answered: (.*)$',
                           line.getMessage()).groups()
    ids = ids.split(', ')
    # the first was (almost always) being answered when the cancel came; the others waited
    assert ids[-2:] == ['cancelled-stream-1', 'cancelled-stream-2'] and int(count) == len(ids)
    assert set(ids) <= {f'cancelled-stream-{i}' for i in range(3)}, ids
    assert line.request_id == 'cancelled-stream'


# ------------------------------------------------------------------ requests that cannot decode
def test_full_stream_share_still_meets_the_guard_first(local_backend, tmp_path):
    """With every stream slot taken, a caller the guard refuses hears the guard's answer
    (UNAUTHENTICATED, PERMISSION_DENIED), one it admits hears OVERLOADED."""
    from akidb_ros.guard import Guard, GuardInterceptor
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    keys = str(tmp_path / 'keys.yaml')
    dev = create_key(keys, Role('developer'), 'streams')[1]
    viewer = create_key(keys, Role('viewer'), 'streams')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'enabled': False}, 'audit': {'enabled': False}})
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, guard=guard.door_hook,
                     max_workers=4, max_streams=1,
                     interceptors=[GuardInterceptor(guard)]).start()
    release = threading.Event()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    stub = pb_grpc.EmbeddingServiceStub(ch)
    held = stub.EmbedStream(_Idle(release), timeout=30, metadata=[('x-api-key', dev)])
    try:
        end = time.monotonic() + 5
        while srv.stream_slots.active < 1:
            assert time.monotonic() < end, 'the first stream never took its slot'
            time.sleep(0.02)
        for metadata, status, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED, 'UNAUTHENTICATED'),
                ((('x-api-key', viewer),), grpc.StatusCode.PERMISSION_DENIED, 'PERMISSION_DENIED'),
                ((('x-api-key', dev),), grpc.StatusCode.RESOURCE_EXHAUSTED, 'OVERLOADED')):
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=['x'])]), timeout=5,
                                      metadata=metadata))
            assert ei.value.code() == status, metadata
            assert dict(ei.value.trailing_metadata())['akidb-error-code'] == code
        assert not held.done()
    finally:
        release.set()
        held.cancel()
        ch.close()
        srv.stop(grace_s=0)


@pytest.mark.parametrize('payload', [BAD_UTF8, CORRUPT], ids=['bad-utf8', 'corrupt'])
def test_undecodable_unary_embed_is_invalid_input(grpc_target, payload):
    ch = grpc.insecure_channel(grpc_target)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            _raw(ch, EMBED)(payload, timeout=5, metadata=[('x-request-id', 'undecodable-1')])
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-error-code'] == 'INVALID_INPUT'
    assert md['x-request-id'] == 'undecodable-1'
    assert 'decode' in ei.value.details()


@pytest.mark.parametrize('method', [LIST_MODELS, HEALTH_CHECK])
def test_undecodable_request_to_other_methods_is_invalid_input(grpc_target, method):
    ch = grpc.insecure_channel(grpc_target)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            _raw(ch, method)(CORRUPT, timeout=5)
    finally:
        ch.close()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(ei.value.trailing_metadata())['akidb-error-code'] == 'INVALID_INPUT'


def test_undecodable_request_meets_the_guard_first(local_backend, tmp_path):
    """Credentials are checked before the request is: no key, UNAUTHENTICATED; a valid key,
    INVALID_INPUT."""
    from akidb_ros.guard import Guard, GuardInterceptor
    from akidb_ros.guard.apikeys import create_key
    from akidb_ros.guard.identity import Role
    keys = str(tmp_path / 'keys.yaml')
    key = create_key(keys, Role('developer'), 'robustness')[1]
    guard = Guard({'auth': {'enabled': True, 'api_keys': {'enabled': True, 'file': keys}},
                   'rate_limit': {'enabled': False}, 'audit': {'enabled': False}})
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, guard=guard.door_hook,
                     interceptors=[GuardInterceptor(guard)]).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    try:
        for method in (EMBED, LIST_MODELS):
            for metadata, code in (((), 'UNAUTHENTICATED'), ((('x-api-key', key),),
                                                             'INVALID_INPUT')):
                with pytest.raises(grpc.RpcError) as ei:
                    _raw(ch, method)(CORRUPT, timeout=5, metadata=metadata)
                assert dict(ei.value.trailing_metadata())['akidb-error-code'] == code, method
    finally:
        ch.close()
        srv.stop(grace_s=0)


@pytest.mark.parametrize('payload', [BAD_UTF8, CORRUPT], ids=['bad-utf8', 'corrupt'])
def test_undecodable_stream_message_answers_earlier_ones_first(grpc_target, payload):
    good = pb.EmbedRequest(inputs=['fine']).SerializeToString()
    ch = grpc.insecure_channel(grpc_target)
    raw = ch.stream_stream(EMBED_STREAM, request_serializer=lambda b: b,
                           response_deserializer=pb.EmbedResponse.FromString)
    got = []
    try:
        with pytest.raises(grpc.RpcError) as ei:
            for resp in raw(iter([good, good, payload, good]), timeout=10):
                got.append(resp)
    finally:
        ch.close()
    assert len(got) == 2 and all(len(r.embeddings) == 1 for r in got)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    md = dict(ei.value.trailing_metadata())
    assert md['akidb-error-code'] == 'INVALID_INPUT' and md['akidb-stream-index'] == '2'


# ------------------------------------------------------------------------------ health Watch
class _Switchable:
    """The shared backend, with a readiness the test turns off and on."""

    def __init__(self, backend):
        self._backend = backend
        self.is_ready = True

    def ready(self):
        return self.is_ready

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_health_watch_sends_only_changes(local_backend):
    backend = _Switchable(local_backend)
    srv = GrpcServer(backend, host='127.0.0.1', port=0, health_poll_s=0.05).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    got = []

    def watch():
        try:
            for r in health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=''), timeout=3):
                got.append(r.status)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    t = threading.Thread(target=watch)
    try:
        t.start()
        time.sleep(0.8)                 # ~16 polls, nothing changes
        backend.is_ready = False
        time.sleep(0.6)
        backend.is_ready = True
        t.join(5)
    finally:
        ch.close()
        srv.stop(grace_s=0)
    S = health_pb2.HealthCheckResponse
    assert got == [S.SERVING, S.NOT_SERVING, S.SERVING]


def test_graceful_stop_ends_health_watches_and_idle_reflection_streams(local_backend):
    """stop(grace): a health Watch hears NOT_SERVING and then ends (OK), an idle reflection
    stream is cancelled, both at once. Each held the stop for its whole grace: one health
    watcher connected kept every rolling update waiting."""
    from grpc_reflection.v1alpha import reflection_pb2
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    release = threading.Event()
    S = health_pb2.HealthCheckResponse
    got, ends = {'watch': [], 'reflection': []}, {}

    def watch():
        try:
            for r in health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=''), timeout=30):
                got['watch'].append(r.status)
            ends['watch'] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            ends['watch'] = e.code()

    def first_then_idle():
        yield reflection_pb2.ServerReflectionRequest(list_services='')
        release.wait(20)

    def reflect():
        try:
            for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    first_then_idle(), timeout=30):
                got['reflection'].append(r)
            ends['reflection'] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            ends['reflection'] = e.code()

    threads = [threading.Thread(target=watch), threading.Thread(target=reflect)]
    try:
        _stop_promptly(srv, threads, lambda: got['watch'] and got['reflection'])
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)
    assert got['watch'] == [S.SERVING, S.NOT_SERVING] and ends['watch'] == grpc.StatusCode.OK
    assert len(got['reflection']) == 1 and ends['reflection'] == grpc.StatusCode.CANCELLED


def test_server_options(monkeypatch):
    """``--grpc-max-streams`` / ``AKIDB_GRPC_MAX_STREAMS`` and ``--grpc-stream-idle`` /
    ``AKIDB_GRPC_STREAM_IDLE_S`` reach the parsed arguments (defaults: half the pool, 60 s)."""
    from akidb_ros.server import build_parser
    for k in ('AKIDB_GRPC_MAX_STREAMS', 'AKIDB_GRPC_STREAM_IDLE_S'):
        monkeypatch.delenv(k, raising=False)
    args = build_parser().parse_args([])
    assert args.grpc_max_streams is None and args.grpc_stream_idle == 60.0
    args = build_parser().parse_args(['--grpc-max-streams', '3', '--grpc-stream-idle', '0'])
    assert args.grpc_max_streams == 3 and args.grpc_stream_idle == 0.0
    monkeypatch.setenv('AKIDB_GRPC_MAX_STREAMS', '5')
    monkeypatch.setenv('AKIDB_GRPC_STREAM_IDLE_S', '12.5')
    args = build_parser().parse_args([])
    assert args.grpc_max_streams == 5 and args.grpc_stream_idle == 12.5


def test_health_watches_cancelled_while_status_changes_never_hang_the_server():
    """Watches opened and cancelled while the status flips and the server stops: no deadlock
    (grpc_health sent under its lock, which a cancelled Watch's close callback on gRPC's
    polling thread needs) and no two sends at once on one Watch (that kills the polling
    thread)."""
    from concurrent import futures
    from akidb_ros.grpc_api.server import _HealthServicer
    hs = _HealthServicer()
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
    port = srv.add_insecure_port('127.0.0.1:0')
    srv.start()
    stop = threading.Event()

    def flip():
        statuses = (health_pb2.HealthCheckResponse.SERVING,
                    health_pb2.HealthCheckResponse.NOT_SERVING)
        i = 0
        while not stop.is_set():
            hs.set('', statuses[i % 2])
            i += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    ch = grpc.insecure_channel(f'127.0.0.1:{port}')
    stub = health_pb2_grpc.HealthStub(ch)
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            calls = [stub.Watch(health_pb2.HealthCheckRequest(service=''), timeout=5)
                     for _ in range(8)]
            for c in calls:
                try:
                    next(c)
                except grpc.RpcError:
                    pass
                c.cancel()
        stop.set()
        flipper.join(5)
        assert not flipper.is_alive(), 'set() is stuck'
        stopped = threading.Event()
        threading.Thread(target=lambda: (hs.enter_graceful_shutdown(), srv.stop(0).wait(2),
                                         stopped.set()), daemon=True).start()
        assert stopped.wait(10), 'the server did not stop'
    finally:
        stop.set()
        ch.close()
        srv.stop(0)


def test_max_body_bytes_is_the_grpc_request_limit_too(local_backend):
    """``--max-body-bytes`` bounds gRPC requests as it bounds REST bodies (RESOURCE_EXHAUSTED
    over it); a reply larger than that limit is still sent."""
    from akidb_ros.server import Bridges
    bridges = Bridges(local_backend, rest_port=None, grpc_port=0, max_body_bytes=20_000).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{bridges.grpc_port}')
    try:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Embed(pb.EmbedRequest(inputs=['x' * 25_000]), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # 64 short inputs: a ~10 KB request, a ~100 KB reply (64 × 384 floats)
        reply = stub.Embed(pb.EmbedRequest(inputs=[f'sentence {i}' for i in range(64)]),
                           timeout=20)
        assert len(reply.embeddings) == 64
    finally:
        ch.close()
        bridges.stop(grace_s=0)


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, 'big') + bytes((kind, flags)) + stream.to_bytes(4, 'big') \
        + payload


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing, new name, no Huffman (< 127 bytes)."""
    return b'\x00' + bytes((len(name),)) + name + bytes((len(value),)) + value


def _raw_h2_unary(port: int, path: bytes, message: bytes, extra_headers) -> bytes:
    """One gRPC unary call written by hand over HTTP/2 (grpcio's client refuses metadata that is
    not ASCII); returns every frame the server sent until the call's END_STREAM."""
    import socket
    import struct
    headers = [(b':method', b'POST'), (b':scheme', b'http'), (b':path', path),
               (b':authority', b'127.0.0.1'), (b'content-type', b'application/grpc'),
               (b'te', b'trailers'), *extra_headers]
    block = b''.join(_hpack_literal(n, v) for n, v in headers)
    sock = socket.create_connection(('127.0.0.1', port), timeout=10)
    try:
        sock.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + _h2_frame(4, 0, 0, b'')
                     + _h2_frame(1, 0x4, 1, block)
                     + _h2_frame(0, 0x1, 1, struct.pack('>BI', 0, len(message)) + message))
        got = b''
        while True:
            chunk = sock.recv(65536)
            assert chunk, f'the server closed without ending the call: {got!r}'
            got += chunk
            at, ended = 0, False
            while at + 9 <= len(got):
                size = int.from_bytes(got[at:at + 3], 'big')
                kind, flags, stream = got[at + 3], got[at + 4], \
                    int.from_bytes(got[at + 5:at + 9], 'big')
                if kind == 4 and not flags & 0x1:       # the server's SETTINGS: acknowledge
                    sock.sendall(_h2_frame(4, 0x1, 0, b''))
                    got = got[:at + 3] + bytes((kind, 0x1)) + got[at + 5:]
                ended |= stream == 1 and bool(flags & 0x1)
                at += 9 + size
            if ended:
                return got
    finally:
        sock.close()


def test_metadata_that_is_not_utf8_is_served_and_logged_at_info(local_backend, caplog):
    """HTTP/2 lets a metadata value carry any byte; grpcio reads one that is not UTF-8 as
    latin-1 and serves the call, but logs an error with a traceback each time: a caller could
    flood the log and fire alerts. The door turns that into one info line."""
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0).start()
    try:
        with caplog.at_level('INFO'):
            frames = _raw_h2_unary(srv.port, EMBED.encode(),
                                   pb.EmbedRequest(inputs=['hello']).SerializeToString(),
                                   [(b'x-note', b'caf\xe9')])
    finally:
        srv.stop(grace_s=0)
    assert len(frames) > 384 * 4, frames        # served: the reply carries 384 floats
    noted = [r for r in caplog.records if r.name == 'grpc._cython.cygrpc']
    assert noted, 'grpcio did not log the metadata (its behaviour changed: check the filter)'
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in noted), \
        [(r.levelname, r.getMessage()) for r in noted]
    assert 'not UTF-8' in noted[0].getMessage()


def test_a_cancelled_embed_drops_its_work_and_is_recorded_cancelled(local_backend, caplog):
    """A caller that cancels a long Embed frees the engine at once (its sentences not yet run
    are skipped, its queue slot is released) and the call is logged and counted CANCELLED, not
    left to run for the whole budget and recorded a TIMEOUT (or a success nobody heard)."""
    from akidb_ros.observability import metrics as m
    admission = local_backend.engine.admission
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, default_timeout_s=30).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    long_text = ' '.join(['word'] * 300)        # truncated to the model's 256 tokens
    cancelled = m.REQUEST_ERRORS.labels('grpc', 'CANCELLED')
    before = cancelled._value.get()
    try:
        assert wait_until(lambda: admission.pending == 0, 10, 0.01)
        with caplog.at_level('INFO', logger='akidb_ros.access'):
            call = pb_grpc.EmbeddingServiceStub(ch).Embed.future(
                pb.EmbedRequest(inputs=[f'{i} {long_text}' for i in range(96)]), timeout=30,
                metadata=[('x-request-id', 'cancelled-unary')])
            assert wait_until(lambda: admission.pending == 1, 10, 0.01), \
                'the call was never accepted'
            time.sleep(0.05)
            call.cancel()
            # 96 sentences of 256 tokens take seconds here; only a run already started ends
            assert wait_until(lambda: admission.pending == 0, 3, 0.01), \
                'the cancelled work went on'
            assert wait_until(lambda: any(getattr(r, 'request_id', '') == 'cancelled-unary'
                                          for r in caplog.records), 5, 0.01)
        (line,) = [r for r in caplog.records if getattr(r, 'request_id', '') == 'cancelled-unary']
        assert line.code == 'CANCELLED' and line.levelno == logging.INFO, line.__dict__
        assert cancelled._value.get() == before + 1
        # the engine still serves
        assert len(pb_grpc.EmbeddingServiceStub(ch).Embed(
            pb.EmbedRequest(inputs=['after the cancel']), timeout=10).embeddings) == 1
    finally:
        ch.close()
        srv.stop(grace_s=0)


def test_a_cancelled_stream_drops_the_work_it_took(local_backend):
    """Cancelling an EmbedStream drops the engine work of every request it took and had not
    answered: the one being waited on and those queued behind it."""
    admission = local_backend.engine.admission
    srv = GrpcServer(local_backend, host='127.0.0.1', port=0, default_timeout_s=30).start()
    ch = grpc.insecure_channel(f'127.0.0.1:{srv.port}')
    long_text = ' '.join(['word'] * 300)
    release = threading.Event()

    def two_then_wait():
        for k in range(2):
            yield pb.EmbedRequest(inputs=[f'{k} {i} {long_text}' for i in range(64)])
        release.wait(20)
    try:
        assert wait_until(lambda: admission.pending == 0, 10, 0.01)
        call = pb_grpc.EmbeddingServiceStub(ch).EmbedStream(two_then_wait(), timeout=30)
        assert wait_until(lambda: admission.pending == 2, 10, 0.01), \
            'the stream never took both'
        time.sleep(0.05)
        call.cancel()
        assert wait_until(lambda: admission.pending == 0, 3, 0.01), \
            'the cancelled work went on'
    finally:
        release.set()
        ch.close()
        srv.stop(grace_s=0)
