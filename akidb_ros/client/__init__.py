"""Clients for the akidb_ros bridges.

    from akidb_ros.client import RestClient, GrpcClient
    rest = RestClient('http://127.0.0.1:8080')
    vecs = rest.embed(['pick up the red cup']).embeddings      # np.float32 [1, 384]
    grpc_client = GrpcClient('127.0.0.1:9090')
    vecs = grpc_client.embed(['pick up the red cup']).embeddings

Timeouts on every call, retries (exponential backoff with full jitter) only on retryable codes,
the server's Retry-After honoured, and typed errors (:mod:`akidb_ros.client.errors`).
"""
from akidb_ros.client.errors import (AkidbError, AuthenticationError, ConflictError,
                                     DeadlineExceededError, InvalidRequestError,
                                     ModelNotFoundError, OverloadedError, PermissionDeniedError,
                                     RateLimitedError, ServerError, ServiceUnavailableError)
from akidb_ros.client.retry import NO_RETRY, RetryPolicy
from akidb_ros.client.rest import Embeddings, RestClient


def __getattr__(name):   # the gRPC client imports grpc lazily
    if name == 'GrpcClient':
        from akidb_ros.client.grpc import GrpcClient
        return GrpcClient
    raise AttributeError(name)


__all__ = ['AkidbError', 'AuthenticationError', 'ConflictError', 'DeadlineExceededError',
           'Embeddings', 'GrpcClient', 'InvalidRequestError', 'ModelNotFoundError',
           'NO_RETRY', 'OverloadedError', 'PermissionDeniedError', 'RateLimitedError',
           'RestClient', 'RetryPolicy', 'ServerError', 'ServiceUnavailableError']
