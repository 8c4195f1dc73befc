"""Serve the REST app with waitress (a production WSGI server), inside this process.

Why waitress and not gunicorn: in-process mode runs the ROS node, REST and gRPC in ONE
process around ONE engine (one ONNX session per model, one batcher). gunicorn's model is a
master that forks worker processes; every worker would load its own engine (N× the memory,
no shared batching), and gunicorn must own the main thread and signals, which the ROS
executor and the gRPC server also need. waitress is a pure-Python, multi-threaded WSGI server
that embeds as a library: one process, a thread pool (handlers block on the engine's futures
while the batcher groups their sentences), and a clean ``close()`` for graceful shutdown.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

log = logging.getLogger('akidb_ros.rest')


class RestServer:
    """waitress in a background thread; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(self, app, host: str = '127.0.0.1', port: int = 8080, threads: int = 32,
                 connection_limit: int = 512, max_body_bytes: int = 16 * 1024 * 1024,
                 channel_timeout: int = 120, name: str = 'REST bridge'):
        from waitress.server import create_server

        self._server = create_server(
            app, host=host, port=port, threads=threads, connection_limit=connection_limit,
            # waitress' own limit sits above Flask's so that Flask answers 413 as JSON
            max_request_body_size=max_body_bytes * 2, channel_timeout=channel_timeout,
            ident='akidb', clear_untrusted_proxy_headers=True, expose_tracebacks=False,
            asyncore_use_poll=True, outbuf_overflow=4 * 1024 * 1024)
        self.host = host
        self.port = int(self._server.effective_port)
        self.name = name
        self._thread: Optional[threading.Thread] = None

    def start(self) -> 'RestServer':
        thread_name = 'akidb-' + self.name.split()[0].lower()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        log.info('%s listening', self.name, extra={'host': self.host, 'port': self.port})
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:
            # run() raises once close() has torn the sockets down; only log real failures
            if self._thread is not None and not getattr(self, '_closing', False):
                log.exception('%s stopped unexpectedly', self.name)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), then close."""
        self._closing = True
        srv = self._server
        # stop accepting new connections first
        try:
            srv.accepting = False
            srv.del_channel()
            srv.socket.close()
        except Exception:
            pass
        deadline = time.monotonic() + grace_s
        task_dispatcher = srv.task_dispatcher
        while time.monotonic() < deadline:
            busy = task_dispatcher.active_count or task_dispatcher.queue or any(
                getattr(ch, 'requests', None) or getattr(ch, 'total_outbufs_len', 0)
                for ch in list(srv._map.values()))
            if not busy:
                break
            time.sleep(0.02)
        for ch in list(srv._map.values()):   # idle keep-alive connections, the trigger
            try:
                ch.close()
            except Exception:
                pass
        try:
            srv.close()
        except Exception:
            pass
        try:
            task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
