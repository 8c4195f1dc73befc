"""Transport-level enforcement of the one permission table, for every route and method.

REST (Flask)::

    app = create_app(backend, guard=guard.door_hook)
    install_flask(app, guard, front=tls_front)        # before_request on EVERY route

gRPC::

    server = grpc.server(pool, interceptors=[GuardInterceptor(guard)])

Both run authenticate -> authorise (by the route rule / full method name) -> rate limit before
any handler, so routes that the door code does not guard by itself (health, metrics, OpenAPI,
reflection, grpc.health Watch) are covered too, and an undeclared route is admin-only. The
decision is kept in a context variable for the rest of the request: ``Guard.door_hook`` then
reuses it (no second token taken, same identity) and only adds the per-operation check, the
circuit breaker and the admin audit.
"""

from __future__ import annotations

import contextvars
import json
import math
import time
from typing import Any, Optional

from akidb_ros.engine.errors import EngineError

from .chain import Decision, Guard
from .identity import credentials_from_grpc, credentials_from_wsgi

_CURRENT: contextvars.ContextVar[Optional[Decision]] = contextvars.ContextVar(
    'akidb_guard_decision', default=None
)

SECURITY_HEADERS = {
    'X-Content-Type-Options': 'nosniff',
    'X-Frame-Options': 'DENY',
    'Content-Security-Policy': "default-src 'none'; frame-ancestors 'none'",
    'Referrer-Policy': 'no-referrer',
    'Cache-Control': 'no-store',
}


def current_decision() -> Optional[Decision]:
    """The decision of the request being served in this context (None outside one)."""
    return _CURRENT.get()


def count_refusal(transport: str, exc: EngineError, request_id: str = '',
                  started: Optional[float] = None, route: str = '') -> None:
    """A call refused before its handler (401, 403, 429) is a failed call by its table code
    (``akidb_request_errors_total``) with its one access-log line (``route``: the route or full
    method name); ``akidb_embed_requests_total`` counts the embed calls the doors handled, so
    that SLO ratios are not moved by callers' credentials or rate limits."""
    from akidb_ros.doors import record_refusal

    record_refusal(transport, request_id, exc,
                   time.perf_counter() if started is None else started, route=route)


def error_headers(exc: EngineError) -> dict:
    h = dict(getattr(exc, 'headers', {}) or {})
    if exc.retry_after_s is not None and 'Retry-After' not in h:
        h['Retry-After'] = str(max(1, math.ceil(exc.retry_after_s)))
    return h


# ------------------------------------------------------------------------------------ Flask
def _add_missing(headers: Any, pairs) -> None:
    """Add each (name, value) whose name ``headers`` lacks: what the handler set wins (one
    pass over the response's headers, not one per name)."""
    present = {k.lower() for k in headers.keys()}
    for k, v in pairs:
        if k.lower() not in present:
            headers.add(k, v)
            present.add(k.lower())


_NO_BODY_METHODS = frozenset(('GET', 'HEAD', 'OPTIONS'))


def install_flask(
    app: Any,
    guard: Guard,
    front: Any = None,
    security_headers: bool = True,
    hsts: Optional[bool] = None,
) -> None:
    """Guard every Flask route by ``'<METHOD> <url_rule>'`` (register after the app's own hooks).

    ``front``: the :class:`~akidb_ros.guard.tls_front.TLSFront` when REST is served over TLS
    (the peer certificate and the real client address come from it; requests that did not
    pass through it are refused). Unmatched URLs are left to Flask (404/405).

    Refusals are rendered by the app's ``extensions['akidb_error_response']`` (``create_app``
    sets it: the error shape of the route, OpenAI's on ``/v1/...``), else as ``{error, code}``.

    With authentication on, also sets ``app.extensions['akidb_early_check']``, which the REST
    server (``akidb_ros.rest.server``) calls when a request's head is complete and a body follows,
    before the body is read: a caller whose credentials are missing or refused for the route is
    answered 401/403 there, without its body ever being buffered (authentication and
    authorisation only: no rate-limit token is taken; the full chain runs in Flask as before).
    """
    from flask import Response, g, request
    from werkzeug.exceptions import HTTPException

    from akidb_ros.doors import REQUEST_ID_HEADER, request_id_from

    from . import rbac
    from .rbac import Permission

    if hsts is None:
        hsts = front is not None
    # names the header this config reads (auth.api_keys.header), not the default one
    www_authenticate = f'Bearer realm="akidb", ApiKey header="{guard.api_key_header}"'

    def credentials(environ):
        if front is not None:
            return front.credentials(environ, api_key_header=guard.api_key_header)
        return credentials_from_wsgi(
            {k: v for k, v in environ.items() if k != 'SSL_CLIENT_CERT'},
            api_key_header=guard.api_key_header,
        )

    def refusal(exc: EngineError, path: str, request_id: str, started: Optional[float],
                route: str):
        count_refusal('rest', exc, request_id, started, route)
        render = app.extensions.get('akidb_error_response')
        if render is not None:
            resp = render(exc, path)
        else:
            resp = Response(
                json.dumps(exc.to_dict()), status=exc.code.http_status, mimetype='application/json'
            )
            resp.headers.update(error_headers(exc))
        if resp.status_code == 401:
            resp.headers['WWW-Authenticate'] = www_authenticate
        return resp

    @app.before_request
    def _akidb_guard():
        rule = request.url_rule
        if rule is None:
            return None
        key = f'{request.method} {rule.rule}'
        rid = getattr(g, 'request_id', '') or ''
        try:
            creds = credentials(request.environ)
            d = guard.check(key, creds, transport='rest', request_id=rid)
        except EngineError as exc:
            # (the app's own before_request, which runs first, set g.request_id and g.t0)
            return refusal(exc, request.path, rid, g.get('t0'), key)
        g.akidb_guard_token = _CURRENT.set(d)
        g.akidb_guard = d
        return None

    fixed = list(SECURITY_HEADERS.items()) if security_headers else []
    if security_headers and hsts:
        fixed.append(('Strict-Transport-Security', 'max-age=31536000'))

    def run_app(environ):
        """The app's answer to a request whose answer cannot depend on its body (not read)."""
        out: dict = {}

        def start_response(status, headers, exc_info=None):
            out['status'], out['headers'] = status, headers

        result = app(environ, start_response)
        try:
            body = b''.join(result)
        finally:
            if hasattr(result, 'close'):
                result.close()
        return out['status'], list(out['headers']), body

    def early_check(environ):
        """``None``: read the body and serve the request; else ``(status, headers, body)``, the
        answer to send at once (the body is then never read)."""
        started = time.perf_counter()
        req = app.request_class(environ)
        try:
            rule, _args = app.create_url_adapter(req).match(return_rule=True)
        except HTTPException:
            return run_app(environ)     # 404 / 405: no handler reads a body
        key = f'{req.method} {rule.rule}'
        perm = rbac.permission_for(key)
        if perm is Permission.PUBLIC:
            # liveness, OPTIONS: answered without the body; a PUBLIC POST would need it
            return run_app(environ) if req.method in _NO_BODY_METHODS else None
        rid = request_id_from(environ.get('HTTP_' + REQUEST_ID_HEADER.upper().replace('-', '_')))
        try:
            creds = credentials(environ)
            identity = guard.authenticate(creds, transport='rest', request_id=rid, action=key)
            guard.authorize(identity, perm, transport='rest', request_id=rid, peer=creds.peer)
        except EngineError as exc:
            resp = refusal(exc, req.path, rid, started, key)
            _add_missing(resp.headers, fixed)
            resp.headers[REQUEST_ID_HEADER] = rid
            return resp.status, resp.headers.to_wsgi_list(), resp.get_data()
        return None

    if guard.cfg['auth']['enabled']:
        # (without authentication every caller has the configured role: nothing to refuse
        # before the body that the chain in Flask would not refuse as cheaply)
        app.extensions['akidb_early_check'] = early_check

    @app.after_request
    def _akidb_headers(resp):
        d = g.get('akidb_guard')
        _add_missing(resp.headers, (*(d.headers.items() if d is not None else ()), *fixed))
        return resp

    @app.teardown_request
    def _akidb_reset(_exc):
        token = g.pop('akidb_guard_token', None)
        if token is not None:
            try:
                _CURRENT.reset(token)
            except ValueError:  # reset from another context: clear instead
                _CURRENT.set(None)


# ------------------------------------------------------------------------------------ gRPC
def _grpc_abort(context: Any, exc: EngineError, request_id: str = '') -> None:
    """Abort a refused call with the table's status and trailing metadata (its request id
    echoed, as on every other answer of the gRPC door)."""
    import grpc

    md = [('akidb-error-code', exc.code.name)]
    if request_id:
        md.append(('x-request-id', request_id))
    md += [(k.lower(), v) for k, v in error_headers(exc).items()]
    context.set_trailing_metadata(tuple(md))
    context.abort(getattr(grpc.StatusCode, exc.code.grpc_status), exc.message)


def _make_interceptor_class():
    import grpc

    from akidb_ros.doors import request_id_from
    from akidb_ros.grpc_api.interceptor_base import WrappingInterceptor, is_non_blocking, \
        with_conventions

    class GuardInterceptor(WrappingInterceptor):
        """Checks every RPC (by its full method name) before the servicer runs."""

        def __init__(self, guard: Guard):
            super().__init__()      # the guarded wrapper is built once per method
            self.guard = guard

        def admit(self, method: str, context: Any) -> Decision:
            """The guard's decision for a call of ``method``; aborts it when refused."""
            started = time.perf_counter()
            creds = credentials_from_grpc(context, self.guard.api_key_header)
            sent = None
            for m in context.invocation_metadata() or ():
                if m.key == 'x-request-id' and isinstance(m.value, str):
                    sent = m.value
            # the servicer's rule: the caller's id when it is sane, else a fresh one
            rid = request_id_from(sent)
            try:
                return self.guard.check(method, creds, transport='grpc', request_id=rid)
            except EngineError as exc:
                count_refusal('grpc', exc, rid, started, method)
                _grpc_abort(context, exc, rid)
                raise  # abort raises; keeps linters calm

        def _wrap(self, method: str, handler):
            check = self.admit

            def unary_response(behavior):
                if is_non_blocking(behavior):
                    return non_blocking(behavior)

                def run(request, context):
                    token = _CURRENT.set(check(method, context))
                    try:
                        return behavior(request, context)
                    finally:
                        _CURRENT.reset(token)

                return run

            def non_blocking(behavior):
                # a handler that answers through gRPC's send callback (health Watch) holds no
                # thread: checked here, it stays that way (no stream slot, no pool thread)
                def run(request, context, *more):
                    token = _CURRENT.set(check(method, context))
                    try:
                        return behavior(request, context, *more)
                    finally:
                        _CURRENT.reset(token)

                return with_conventions(run, behavior)

            def stream_response(behavior):
                if is_non_blocking(behavior):
                    return non_blocking(behavior)

                def run(request, context):
                    token = _CURRENT.set(check(method, context))
                    try:
                        yield from behavior(request, context)
                    finally:
                        try:
                            _CURRENT.reset(token)
                        except ValueError:
                            _CURRENT.set(None)

                return run

            kw = dict(
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(
                    unary_response(handler.unary_unary), **kw
                )
            if handler.unary_stream:
                return grpc.unary_stream_rpc_method_handler(
                    stream_response(handler.unary_stream), **kw
                )
            if handler.stream_unary:
                return grpc.stream_unary_rpc_method_handler(
                    unary_response(handler.stream_unary), **kw
                )
            return grpc.stream_stream_rpc_method_handler(
                stream_response(handler.stream_stream), **kw
            )

    return GuardInterceptor


def GuardInterceptor(guard: Guard):  # noqa: N802 - reads like the class it builds
    """A ``grpc.ServerInterceptor`` enforcing the guard chain on every method."""
    return _make_interceptor_class()(guard)
