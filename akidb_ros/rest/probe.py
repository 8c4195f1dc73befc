"""The probe port: plain-HTTP health and metrics for kubelet, Docker HEALTHCHECK and Prometheus.

Under the prod security profile the REST door serves TLS 1.3 only, wants a client certificate
and an RBAC permission for ``/health/ready`` and ``/metrics``, none of which a kubelet probe, a
``HEALTHCHECK`` or a plain Prometheus scrape has. The probe listener is a second, separate
HTTP server (``akidb_ros.rest.server``; default port 8081, ``--probe-port`` /
``AKIDB_PROBE_PORT``) that serves ONLY::

    GET /health/live     200 {"status": "alive"}
    GET /health/ready    200 {"status": "ready"}, or 503 {"status": "not_ready", "code": ...}
    GET /metrics         Prometheus text exposition of this process' default registry

with the very handlers the REST door uses (``akidb_ros.rest.app``: ``live_response``,
``ready_response``, ``metrics_response``), so readiness has one definition. No authentication,
no request bodies are read, every other path is 404 and every other method 405, in the
service's ``{error, code}`` shape. It exposes no embeddings, model management, credentials or
request content; see docs/security.md for why it is safe and how to fence it.
"""
from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from akidb_ros.backends import Backend
from akidb_ros.engine.errors import ErrorCode
from akidb_ros.rest.app import (disable_redirects, http_error, http_exception_response,
                                live_response, metrics_response, ready_response)
from akidb_ros.rest.server import RestServer
from akidb_ros.rest.wsgi_server import plain_error_body

log = logging.getLogger('akidb_ros.rest.probe')

DEFAULT_PROBE_PORT = 8081
PROBE_ROUTES = ('/health/live', '/health/ready', '/metrics')
# probes send no body; the server refuses anything bigger than twice this before Flask sees it
_MAX_BODY_BYTES = 1024
# a probe's request head comes in one packet: 64 heads trickled in (the connection limit) must
# not keep kubelet out for long (the REST door's server allows 30 s)
HEAD_TIMEOUT_S = 10.0


def create_probe_app(backend: Backend) -> Flask:
    """The probe's Flask app: the three GET routes and JSON errors, nothing else."""
    app = Flask('akidb_ros.probe', static_folder=None)
    disable_redirects(app)          # /health//live is a JSON 404, not an HTML 308
    app.config['MAX_CONTENT_LENGTH'] = _MAX_BODY_BYTES

    # GET (and the HEAD Flask derives from it) only: no automatic OPTIONS answer either
    app.add_url_rule('/health/live', 'live', live_response, methods=['GET'],
                     provide_automatic_options=False)
    app.add_url_rule('/health/ready', 'ready', lambda: ready_response(backend), methods=['GET'],
                     provide_automatic_options=False)
    app.add_url_rule('/metrics', 'metrics', metrics_response, methods=['GET'],
                     provide_automatic_options=False)

    @app.after_request
    def _headers(resp: Response) -> Response:
        # health and metrics are never to be cached or sniffed into something else
        resp.headers['X-Content-Type-Options'] = 'nosniff'
        resp.headers['Cache-Control'] = 'no-store'
        return resp

    @app.errorhandler(HTTPException)
    def _http_exc(exc: HTTPException):
        return http_exception_response(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception('probe handler failed')
        return http_error(500, f'internal error ({type(exc).__name__})',
                          ErrorCode.INTERNAL.name)

    return app


class ProbeServer(RestServer):
    """The probe app on its own server: a few threads, a short idle timeout, few connections."""

    def __init__(self, backend: Backend, host: str = '127.0.0.1',
                 port: int = DEFAULT_PROBE_PORT, threads: int = 4):
        # sidecar readiness may wait up to 2 s on DDS: a few threads keep kubelet, the
        # HEALTHCHECK and Prometheus from queueing behind one another
        super().__init__(create_probe_app(backend), host=host, port=port, threads=threads,
                         connection_limit=64, max_body_bytes=_MAX_BODY_BYTES,
                         channel_timeout=15, name='probe port', head_timeout_s=HEAD_TIMEOUT_S,
                         error_body=plain_error_body)   # no OpenAI surface here: {error, code}
