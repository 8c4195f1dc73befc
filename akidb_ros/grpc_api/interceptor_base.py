"""The one base of the server's interceptors: each method's handler wrapped once, not per call."""
from __future__ import annotations

import abc

import grpc


def with_conventions(run, behavior):
    """Give ``run`` the calling conventions of ``behavior`` (gRPC reads them off the function:
    ``experimental_non_blocking`` handlers get a send callback and hold no thread,
    ``experimental_thread_pool`` ones run on their own pool)."""
    for attr in ('experimental_non_blocking', 'experimental_thread_pool'):
        if hasattr(behavior, attr):
            setattr(run, attr, getattr(behavior, attr))
    return run


def is_non_blocking(behavior) -> bool:
    return bool(getattr(behavior, 'experimental_non_blocking', False))


class WrappingInterceptor(grpc.ServerInterceptor):
    """Wrap each method's handler once (``_wrap``), and again only when the handler it wraps
    changes: ``intercept_service`` runs on gRPC's one polling thread for every call."""

    def __init__(self):
        self._wrapped: dict = {}

    @abc.abstractmethod
    def _wrap(self, method: str, handler):
        """Return the handler that serves ``method`` in place of ``handler``."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
