"""Constants and helpers shared by the bridge tests (imported by name: several test folders
have a conftest.py, so ``from conftest import`` would be ambiguous)."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / 'models'
DEFAULT_MODEL = 'all-minilm-l6-v2'
SECOND_MODEL = 'all-mpnet-base-v2'


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a call there is refused)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def fail_first_thread_start(monkeypatch, thread_name: str) -> list:
    """Make the first ``threading.Thread.start`` of a thread named ``thread_name`` raise as a
    process out of threads does ("can't start new thread"); the list gets that thread."""
    start, failed = threading.Thread.start, []

    def start_or_fail(thread):
        if thread.name == thread_name and not failed:
            failed.append(thread)
            raise RuntimeError("can't start new thread")
        start(thread)
    monkeypatch.setattr(threading.Thread, 'start', start_or_fail)
    return failed


def refusing_listener(reply: bytes = b'', accepted: list = None) -> socket.socket:
    """A listener on 127.0.0.1 that answers each connection with ``reply`` and closes it (the
    accept times go into ``accepted``); close it to stop."""
    listener = socket.create_server(('127.0.0.1', 0), backlog=64)

    def refuse():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if accepted is not None:
                accepted.append(time.monotonic())
            if reply:
                conn.sendall(reply)
            conn.close()
    threading.Thread(target=refuse, daemon=True).start()
    return listener


def wait_until(cond, timeout, step=0.1) -> bool:
    """Whether ``cond()`` came true within ``timeout`` seconds, looked at every ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def scrape(text: str):
    """/metrics text → {(sample name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def read_to_close(sock) -> bytes:
    """Everything a raw socket receives until the server closes it (or the socket times out)."""
    import socket
    out = b''
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except socket.timeout:
        return out


class Scripted:
    """HTTP/1.1 on 127.0.0.1: each request takes the next (status, headers, body) of a script
    (the last one repeats; an entry may be a function of the request body that returns one);
    every request is logged with its headers, and its body kept in ``bodies``."""

    def __init__(self, script):
        self.script = list(script)
        self.log = []
        self.bodies = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def _do(self):
                n = int(self.headers.get('Content-Length') or 0)
                request_body = self.rfile.read(n) if n else b''
                outer.bodies.append(request_body)
                outer.log.append((time.monotonic(), self.command, self.path,
                                  dict(self.headers)))
                entry = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                status, headers, body = entry(request_body) if callable(entry) else entry
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _do

        self.srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.srv.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.srv.server_address[1]}'
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()
