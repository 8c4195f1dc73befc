"""Clients for the akidb_ros bridges.

    from akidb_ros.client import RestClient, GrpcClient
    rest = RestClient('http://127.0.0.1:8080')
    vecs = rest.embed(['pick up the red cup']).embeddings      # np.float32 [1, 384]
    grpc_client = GrpcClient('127.0.0.1:9090')
    vecs = grpc_client.embed(['pick up the red cup']).embeddings

An overall budget on every call (``timeout_s``: connect, wait, read the whole answer and every
retry), retries (exponential backoff with ±25 % jitter) only on retryable codes, the server's
Retry-After honoured, TLS options (``ca_file``, ``client_cert``, ``client_key``), typed errors
(:mod:`akidb_ros.client.errors`) for everything the server or the network does, and
``TypeError``/``ValueError`` at once for a caller's mistake (bytes for text, a set or dict of
inputs, ``model=5``, ``timeout_s=None``, a URL without ``http://`` or with port 99999,
``retry='x'``, a closed client), naming the argument, the same on both clients.
"""
from akidb_ros.client.errors import (AkidbError, AuthenticationError, ConflictError,
                                     DeadlineExceededError, InvalidRequestError,
                                     ModelNotFoundError, OverloadedError, PermissionDeniedError,
                                     ProtocolError, RateLimitedError, ServerError,
                                     ServiceUnavailableError, TLSError)
from akidb_ros.client.retry import NO_RETRY, RetryPolicy
from akidb_ros.client.rest import Embeddings, RestClient


def __getattr__(name):   # the gRPC client imports grpc lazily
    if name == 'GrpcClient':
        from akidb_ros.client.grpc import GrpcClient
        return GrpcClient
    raise AttributeError(name)


__all__ = ['AkidbError', 'AuthenticationError', 'ConflictError', 'DeadlineExceededError',
           'Embeddings', 'GrpcClient', 'InvalidRequestError', 'ModelNotFoundError',
           'NO_RETRY', 'OverloadedError', 'PermissionDeniedError', 'ProtocolError',
           'RateLimitedError', 'RestClient', 'RetryPolicy', 'ServerError',
           'ServiceUnavailableError', 'TLSError']
