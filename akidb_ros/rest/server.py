"""Serve the REST app inside this process, on ``akidb_ros.rest.wsgi_server``.

Why an embedded server and not gunicorn: in-process mode runs the ROS node, REST and gRPC in ONE
process around ONE engine (one ONNX session per model, one batcher). gunicorn's model is a
master that forks worker processes; every worker would load its own engine (N× the memory, no
shared batching), and gunicorn must own the main thread and signals, which the ROS executor and
the gRPC server also need. Why a thread per connection and not waitress (the server until
2026-11-27): see ``akidb_ros.rest.wsgi_server`` and docs/benchmarks.md.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from akidb_ros.engine.errors import ErrorCode
from akidb_ros.rest.app import error_bytes
from akidb_ros.rest.wsgi_server import ThreadedWSGIServer

log = logging.getLogger('akidb_ros.rest')


class RestServer:
    """The WSGI server in a background thread; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, app, host: str = '127.0.0.1', port: int = 8080, threads: int = 32,
                 connection_limit: int = 512, max_body_bytes: int = 16 * 1024 * 1024,
                 channel_timeout: int = 120, name: str = 'REST bridge',
                 error_body: Callable[[str, ErrorCode, str], bytes] = error_bytes,
                 head_timeout_s: float = 30.0):
        """``error_body(path, code, message)``: the body of the server's own refusals (the REST
        door's error shape by route by default; the probe port passes the plain one).
        ``head_timeout_s``: the most a request head may take to arrive, however it trickles."""
        def early_check():
            # registered by akidb_ros.guard.integrations.install_flask, which akidb_ros.server
            # calls after this server is built: looked up once a connection
            return (getattr(app, 'extensions', None) or {}).get('akidb_early_check')

        def on_refusal(environ, code, message):
            # create_app's: a body refused by its length gets a request id, a log line, metrics
            hook = (getattr(app, 'extensions', None) or {}).get('akidb_server_refusal')
            return hook(environ, code, message) if hook is not None else ()

        self._server = ThreadedWSGIServer(
            app, host=host, port=port, threads=threads, connection_limit=connection_limit,
            # the server's own limit sits above Flask's so that Flask answers 413 as JSON (with
            # the route's error shape either way); its 413 names the limit callers are told
            max_body_bytes=max_body_bytes * 2, stated_body_bytes=max_body_bytes,
            idle_timeout_s=channel_timeout, head_timeout_s=head_timeout_s,
            early_check=early_check, error_body=error_body, on_refusal=on_refusal)
        self.host = host
        self.port = self._server.port
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._closing = False

    def start(self) -> 'RestServer':
        thread_name = 'akidb-' + self.name.split()[0].lower()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        log.info('%s listening', self.name, extra={'host': self.host, 'port': self.port})
        return self

    def _run(self) -> None:
        try:
            self._server.serve_forever()
        except Exception:
            if not self._closing:
                log.exception('%s stopped unexpectedly', self.name)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), then close."""
        self._closing = True
        self._server.stop_accepting()
        deadline = time.monotonic() + grace_s
        while self._server.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._server.close()        # idle keep-alive connections go now
        if self._thread is not None:
            self._thread.join(timeout=5)
