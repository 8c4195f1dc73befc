"""gRPC client for ``akidb.embedding.v1.EmbeddingService`` (unary, streaming, health)."""
from __future__ import annotations

import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import grpc
import numpy as np

from akidb_ros.client.errors import (AkidbError, DeadlineExceededError, code_from_grpc,
                                     make_error)
from akidb_ros.client.rest import Embeddings
from akidb_ros.client.retry import RetryPolicy, call_with_retry
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc


def error_from_rpc(err: grpc.RpcError, request_id: str = '') -> AkidbError:
    status = err.code() if hasattr(err, 'code') else grpc.StatusCode.UNKNOWN
    md = {}
    try:
        md = {k: v for k, v in (err.trailing_metadata() or ())}
    except Exception:
        pass
    code = md.get('akidb-error-code') or code_from_grpc(status.name)
    retry_after = None
    if md.get('retry-after'):
        try:
            retry_after = float(md['retry-after'])
        except ValueError:
            pass
    details = err.details() if hasattr(err, 'details') else str(err)
    return make_error(details or status.name, code, status=status.name,
                      retry_after_s=retry_after, request_id=md.get('x-request-id', request_id))


def _to_embeddings(resp: pb.EmbedResponse, request_id: str = '') -> Embeddings:
    if resp.embeddings:
        emb = np.asarray([v.values for v in resp.embeddings], dtype=np.float32)
    else:
        emb = np.zeros((0, 0), np.float32)
    return Embeddings(embeddings=emb, model=resp.model, total_tokens=resp.usage.total_tokens,
                      duration_ms=float(resp.usage.duration_ms), request_id=request_id)


class GrpcClient:
    """Thread-safe. Deadlines on every call; retries only on retryable codes.

    >>> c = GrpcClient('127.0.0.1:9090')
    >>> c.embed(['hello robot'], normalize=True).embeddings.shape   # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, target: str = '127.0.0.1:9090', timeout_s: float = 10.0,
                 retry: Optional[RetryPolicy] = None,
                 metadata: Optional[Dict[str, str]] = None,
                 max_message_bytes: int = 16 * 1024 * 1024,
                 channel: Optional[grpc.Channel] = None):
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.metadata = list((metadata or {}).items())
        self._channel = channel or grpc.insecure_channel(target, options=[
            ('grpc.max_receive_message_length', max_message_bytes),
            ('grpc.max_send_message_length', max_message_bytes),
            ('grpc.enable_retries', 0),   # retries are ours (backoff + jitter + Retry-After)
        ])
        self.stub = pb_grpc.EmbeddingServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, method, request, timeout_s: Optional[float], retry: Optional[RetryPolicy],
               request_id: str):
        total = timeout_s if timeout_s is not None else self.timeout_s
        md = self.metadata + [('x-request-id', request_id)]

        def attempt(remaining: Optional[float]):
            budget = total if remaining is None else remaining
            if budget <= 0:
                raise DeadlineExceededError('deadline exceeded before the call', code='TIMEOUT',
                                            request_id=request_id)
            try:
                return method(request, timeout=budget, metadata=md)
            except grpc.RpcError as err:
                raise error_from_rpc(err, request_id) from None

        return call_with_retry(attempt, retry or self.retry, deadline_s=total)

    def embed(self, inputs: Sequence[str], model: str = '', normalize: bool = True,
              timeout_s: Optional[float] = None, request_id: Optional[str] = None,
              retry: Optional[RetryPolicy] = None) -> Embeddings:
        if isinstance(inputs, str):
            inputs = [inputs]
        rid = request_id or uuid.uuid4().hex
        req = pb.EmbedRequest(model=model, inputs=list(inputs), normalize=normalize)
        return _to_embeddings(self._unary(self.stub.Embed, req, timeout_s, retry, rid), rid)

    def embed_stream(self, batches: Iterable[Sequence[str]], model: str = '',
                     normalize: bool = True, timeout_s: Optional[float] = None
                     ) -> Iterator[Embeddings]:
        """Send one EmbedRequest per batch over one bidi stream; yield answers in order.

        No retry (a stream is not idempotent as a whole); the first error is raised.
        """
        rid = uuid.uuid4().hex
        reqs = (pb.EmbedRequest(model=model, inputs=list(b), normalize=normalize)
                for b in batches)
        call = self.stub.EmbedStream(reqs, timeout=timeout_s or None,
                                     metadata=self.metadata + [('x-request-id', rid)])
        try:
            for resp in call:
                yield _to_embeddings(resp, rid)
        except grpc.RpcError as err:
            raise error_from_rpc(err, rid) from None

    def list_models(self, timeout_s: Optional[float] = None) -> List[pb.ModelInfo]:
        return list(self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout_s, None,
                                uuid.uuid4().hex).models)

    def health(self, timeout_s: Optional[float] = None) -> pb.HealthResponse:
        return self._unary(self.stub.Health, pb.HealthRequest(), timeout_s, None,
                           uuid.uuid4().hex)

    def serving(self, service: str = '', timeout_s: float = 2.0) -> bool:
        """Ask the standard grpc.health.v1 service whether ``service`` is SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING
