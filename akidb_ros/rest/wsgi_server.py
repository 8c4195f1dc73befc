"""A thread-per-connection HTTP/1.1 WSGI server: httptools parses, one thread serves a connection.

Why not waitress (the server before, still measured in docs/benchmarks.md): waitress,
cheroot and gunicorn's gthread worker read every request in one I/O thread, hand it to a worker
thread and hand the answer back to the I/O thread to send. On a small CPU that the model already
saturates, those two thread switches per request and the pure-Python parsing cost more than the
rest of the door: in interleaved A/Bs on one process (16 keep-alive clients, 2 cores), a thread
per connection served more sentences/s than waitress (docs/benchmarks.md has the numbers). Here the
thread that reads a request runs the app and writes its answer; a keep-alive client keeps its
thread. (The Python servers that do serve a connection in one thread are development servers.)

What is hand-written, and why it is small: httptools (MagicStack's binding of llhttp, the
parser of Node.js, used by uvicorn) does the HTTP/1.1 parsing: request line, headers,
Content-Length and chunked framing, keep-alive rules, malformed input. This module moves bytes
between the socket and the parser, builds the WSGI environ (PEP 3333), writes the status line
and headers, and bounds resources: ``connection_limit`` connections (at the limit the
connection idle longest, between requests or silent for FIRST_REQUEST_WAIT_S since its accept,
is closed to make room, as nginx reuses idle keep-alive ones; with none idle, accepting
pauses), ``threads`` requests inside the app at once, ``max_header_bytes`` per request head and
again per trailer section (431), ``max_body_bytes`` per body (413, before the body is read when
its declared length is over), ``head_timeout_s`` for a whole request head (from its first byte,
from the accept for a connection's first request: a head trickled in a byte at a time is cut),
a body by the same time plus a second per ``MIN_BODY_BYTES_PER_S`` bytes received (from when
the server starts reading it: a body trickled in is cut too), ``idle_timeout_s`` per read, an
HTTP/1.1 request without exactly one ``Host`` refused with a 400 (RFC 9112 §3.2), pipelined
requests answered in order (their ``100 Continue`` too, never sent to HTTP/1.0). Trailer fields
are read and dropped, never merged into the environ (RFC 9110 §6.5.1). ``chunked`` is the only
transfer coding implemented: any other (``gzip, chunked``) is refused with a 400. The accept
loop ends only at ``close()``: accept() failing for want of descriptors or memory (EMFILE,
ENFILE, ENOBUFS, ENOMEM) is logged now and then and retried after a pause, and a connection
whose thread cannot start is closed. The server's own refusals of a HEAD request carry no body.
An app can ask ``environ[CALLER_GONE]()`` whether its client has closed the connection
meanwhile (the REST door drops the work of a caller that gave up).

Early check (``early_check``): when a request's head is complete and a body follows, the hook
(the REST door wires the guard's authentication and authorisation to it, see
``akidb_ros.guard.integrations.install_flask``) sees the environ before the body is read; an
answer it returns (a 401 for a caller without credentials) is sent at once and the connection
closes, the body dropped unbuffered, so a caller the guard refuses cannot make the server hold
its body. Refusals of the server itself have their body shaped by ``error_body`` (the REST door
passes its own: OpenAI's shape on the OpenAI routes).

No protocol is ever switched: ``Upgrade`` (``curl --http2``'s h2c offer, a websocket handshake)
is ignored as RFC 9110 §7.8 allows, and the request, body included, is served as HTTP/1.1; the
app does not see the header. ``CONNECT`` (this is not a proxy) is answered ``405`` with an
empty ``Allow``, in JSON, and the connection closes.
"""
from __future__ import annotations

import collections
import errno
import functools
import io
import json
import logging
import select
import selectors
import socket
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

import httptools

from akidb_ros.doors import ACCEPT_PAUSE_S, NowAndThen, drain_backlog
from akidb_ros.engine.errors import ErrorCode

log = logging.getLogger('akidb_ros.rest')

RECV_BYTES = 64 * 1024
# At a stop: how long a connection accepted without a request yet is waited for (its client
# connected before the stop and is sending), and for the accept loop to close the listener.
FIRST_REQUEST_WAIT_S = 1.0
LISTENER_CLOSE_WAIT_S = 2.0
LINGER_BYTES = 4 * 1024 * 1024      # dropped after a refusal, so the client reads the answer
# A request body may take head_timeout_s, plus a second for each this many bytes that came: a
# client on a slow link is never cut while it sends at least this (a 16 MiB body at 32 KiB/s
# takes 8.5 min), one trickling its body is cut after head_timeout_s as one trickling its head.
MIN_BODY_BYTES_PER_S = 32 * 1024
# environ key of a callable telling whether the client has gone (closed its connection), so an
# app waiting on long work can drop it (the REST door does: see ``backends.wait_result``)
CALLER_GONE = 'akidb.caller_gone'
# environ key of a callable telling whether this server cut its connections (a stop whose grace
# ran out): a caller "gone" then did not give up, the server dropped it
SERVER_CUT = 'akidb.server_cut'
# accept() failing for want of descriptors, buffers or memory: the connection stays in the
# backlog, so the loop pauses (until a connection closes, at most this) and tries again
# errors of the connection being accepted that Linux passes on from accept(2): take the next
_ACCEPT_PASSED_ON = frozenset(getattr(errno, name) for name in (
    'ECONNABORTED', 'EPROTO', 'ENETDOWN', 'ENOPROTOOPT', 'EHOSTDOWN', 'ENONET', 'EHOSTUNREACH',
    'EOPNOTSUPP', 'ENETUNREACH', 'EPERM') if hasattr(errno, name))
_LISTENER_GONE = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK))
_HOP_HEADERS = frozenset(('connection', 'transfer-encoding', 'keep-alive'))
# request headers kept out of the WSGI environ: the framing (in CONTENT_LENGTH and the body
# itself) and Upgrade, which this server never honours (werkzeug would route a websocket one)
_NOT_IN_ENVIRON = frozenset(('CONTENT-LENGTH', 'TRANSFER-ENCODING', 'UPGRADE'))
_FRAMING = frozenset((b'content-length', b'transfer-encoding'))
_REASONS = {400: 'Bad Request', 405: 'Method Not Allowed', 413: 'Content Too Large',
            431: 'Request Header Fields Too Large'}
HEAD_TOO_LARGE = 431    # not in the error table: its code is INVALID_INPUT (400 elsewhere)

Answer = Tuple[str, List[Tuple[str, str]], bytes]       # (status line, headers, body)
EarlyCheck = Callable[[Dict[str, Any]], Optional[Answer]]
# (environ of the request's head, code, message) -> headers to add to the server's refusal
OnRefusal = Callable[[Dict[str, Any], ErrorCode, str], Tuple[Tuple[str, str], ...]]


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the client has closed (or reset) its connection while its request is served.

    A readable socket with nothing to read is the peer's end; bytes waiting are a pipelined
    request, not an end. (A client that half-closes after its request counts as gone, as nginx
    counts it: HTTP/1.1 clients do not.) poll, not select: descriptors may pass 1024.
    """
    try:
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        if not poller.poll(0):
            return False
        return conn.recv(1, socket.MSG_PEEK) == b''      # readable: returns at once
    except (OSError, ValueError):
        return True


def plain_error_body(path: str, code: ErrorCode, message: str) -> bytes:
    """The service's ``{error, code}`` body (``ThreadedWSGIServer``'s default ``error_body``)."""
    return json.dumps({'error': message, 'code': code.name}).encode()


def _path_of(url: bytes) -> str:
    """The decoded path of a request target, '' when it has none this server can read."""
    try:
        return unquote_to_bytes(httptools.parse_url(url).path or b'/').decode('latin-1')
    except Exception:   # '*', an authority form, a malformed target: no route's path
        return ''


class _Refusal(Exception):
    """A request answered before the app runs (then the connection closes).

    Its status comes from the one error table (``ErrorCode.http_status``) unless ``status``
    says otherwise (431 for an oversized head).
    """

    def __init__(self, code: ErrorCode, message: str, status: Optional[int] = None,
                 headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or code.http_status
        self.headers = headers
        self.url = b''          # the refused request's target, when known (its error shape)
        self.answer: Optional[Answer] = None    # the early check's answer, sent as it is
        self.head_only = False                  # that answer is to a HEAD request
        self.request: Optional['_Request'] = None   # its complete head (see ``on_refusal``)


def _early_answer(answer: Answer) -> _Refusal:
    refusal = _Refusal(ErrorCode.INVALID_INPUT, 'answered before the body was read')
    refusal.answer = answer
    return refusal


class _Request:
    __slots__ = ('url', 'headers', 'body', 'size', 'method', 'version', 'keep_alive',
                 'expect_continue', 'body_since')

    def __init__(self):
        self.url = b''
        self.headers: List[Tuple[bytes, bytes]] = []
        self.body: List[bytes] = []
        self.size = 0
        self.method = b''
        self.version = '1.1'
        self.keep_alive = True
        self.expect_continue = False
        # monotonic time the server began reading its body (None: not yet): after the early
        # check, the answers to the requests pipelined before it and its 100 Continue, none
        # of which is the client's time
        self.body_since: Optional[float] = None


class _Reader:
    """httptools callbacks: collects complete requests (pipelining: several per read).

    A request with ``Upgrade`` and ``Connection: upgrade`` makes llhttp stop after its head
    (httptools then skips its body and hands back the bytes that follow as another protocol's).
    Upgrades are not supported, so the header is ignored (RFC 9110 §7.8): the request, which
    llhttp completed without its body, is reopened and a head carrying only its framing
    headers (``Content-Length`` / ``Transfer-Encoding``, exactly as sent) is fed to the parser
    before those bytes, so llhttp reads the body, with the same checks and limits, into that
    request, and what follows as the next pipelined requests.
    """

    def __init__(self, max_header_bytes: int, max_body_bytes: int,
                 stated_body_bytes: Optional[int] = None,
                 on_head: Optional[Callable[['_Request'], None]] = None):
        self.parser = httptools.HttpRequestParser(self)
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.stated_body_bytes = stated_body_bytes or max_body_bytes
        self.on_head = on_head      # a complete head with a body to come (may raise _Refusal)
        self.done: Deque[_Request] = collections.deque()
        self.current: Optional[_Request] = None
        self.head_bytes = 0          # bytes fed while a request head is incomplete
        self.in_head = True
        # a chunk-size line was read and none of its data yet: the last chunk's trailer section
        # (or a chunk whose data comes in the next read); llhttp hands a trailer field over
        # whole, httptools joining its pieces, so its bytes count against the head limit
        self.in_trailer = False
        self.trailer_bytes = 0
        self.trailer_fields = 0      # bytes of the current request's trailer fields
        self.reopened: Optional[_Request] = None   # an upgrade request whose body comes next

    def feed(self, data: bytes) -> None:
        while True:
            if self.in_head:
                self.head_bytes += len(data)
                if self.head_bytes > self.max_header_bytes + RECV_BYTES:
                    raise self._located(self._head_too_large())
            elif self.in_trailer:
                self.trailer_bytes += len(data)
                if self.trailer_bytes > self.max_header_bytes + RECV_BYTES:
                    raise self._located(self._trailer_too_large())
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserCallbackError as exc:
                if isinstance(exc.__context__, _Refusal):
                    raise self._located(exc.__context__) from None
                raise self._located(_Refusal(
                    ErrorCode.INVALID_INPUT,
                    f'malformed HTTP request: {exc.__context__ or exc}')) from None
            except httptools.HttpParserUpgrade as exc:
                data = self._reopen_upgrade() + data[exc.args[0]:]
            except httptools.HttpParserError as exc:
                raise self._located(_Refusal(ErrorCode.INVALID_INPUT,
                                             f'malformed HTTP request: {exc}')) from None

    def _reopen_upgrade(self) -> bytes:
        """Reopen the upgrade request llhttp just completed; the head to feed before its body."""
        req = self.done[-1]     # on_message_complete ran before llhttp paused for the upgrade
        # a fresh parser: llhttp ended that message as the last of the connection when it said
        # ``Connection: close`` too (``Upgrade, close``), and would refuse its body as "Data
        # after Connection: close"; the request keeps its own keep-alive verdict
        self.parser = httptools.HttpRequestParser(self)
        framing = [b'%s: %s\r\n' % (n, v) for n, v in req.headers if n.lower() in _FRAMING]
        if not framing:
            return b''          # no body: the request is complete as it is
        self.done.pop()
        self.reopened = req
        return b'POST / HTTP/1.1\r\n' + b''.join(framing) + b'\r\n'

    def _located(self, refusal: _Refusal) -> _Refusal:
        req = self.current
        if req is not None:
            refusal.url = refusal.url or req.url
            refusal.head_only = refusal.head_only or req.method == b'HEAD'
        return refusal

    def _head_too_large(self) -> _Refusal:
        return _Refusal(ErrorCode.INVALID_INPUT,
                        f'request head larger than {self.max_header_bytes} bytes', HEAD_TOO_LARGE)

    def _trailer_too_large(self) -> _Refusal:
        refusal = _Refusal(ErrorCode.INVALID_INPUT, 'request trailer section larger than '
                           f'{self.max_header_bytes} bytes', HEAD_TOO_LARGE)
        refusal.request = self.current      # its head is complete: a request to account for
        return refusal

    def _body_too_large(self) -> _Refusal:
        # the stated limit (the REST door's documented one, which its app enforces below
        # this hard cap) is true of a body over the cap too
        refusal = _Refusal(ErrorCode.INPUT_TOO_LARGE,
                           f'request body larger than {self.stated_body_bytes} bytes')
        refusal.request = self.current      # its head is complete: a request to account for
        return refusal

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = _Request()
        self.in_head = True
        self.trailer_fields = 0

    def on_url(self, url: bytes) -> None:
        req = self.current
        if not req.url:     # the method is parsed by now: a refusal to HEAD carries no body
            req.method = self.parser.get_method()
        req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:    # a trailer field: not merged into the head (RFC 9110 §6.5.1)
            # counted whole (a per-read count let ~200 KB of fields through in small reads)
            self.trailer_fields += len(name) + len(value) + 4
            if self.trailer_fields > self.max_header_bytes:
                raise self._trailer_too_large()
            return
        req = self.current
        req.headers.append((name, value))
        if len(req.headers) > 200:
            raise _Refusal(ErrorCode.INVALID_INPUT, 'more than 200 request header fields',
                           HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        req, p = self.current, self.parser
        if self.reopened is not None:       # the framing head of a reopened upgrade request:
            self.current, self.reopened = self.reopened, None   # its body goes to that one
            self.in_head = False
            self.head_bytes = 0
            return
        size = len(req.url) + sum(len(n) + len(v) + 4 for n, v in req.headers)
        if size > self.max_header_bytes:
            raise self._head_too_large()
        self.in_head = False
        self.head_bytes = 0
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        hosts = sum(1 for n, _ in req.headers if n.lower() == b'host')
        if hosts > 1 or (hosts == 0 and req.version == '1.1'):     # RFC 9112 §3.2
            refusal = _Refusal(ErrorCode.INVALID_INPUT,
                               'an HTTP/1.1 request needs exactly one Host header field'
                               if hosts == 0 else 'more than one Host header field')
            refusal.request = req
            raise refusal
        if req.method == b'CONNECT':    # llhttp would hand the rest over as a tunnel
            raise _Refusal(ErrorCode.METHOD_NOT_ALLOWED,
                           'CONNECT is not supported: this server is not a proxy',
                           headers=(('Allow', ''),))   # no method applies to a tunnel target
        has_body = False
        codings: List[bytes] = []
        for name, value in req.headers:
            lname = name.lower()
            if lname == b'content-length':
                if int(value) > self.max_body_bytes:    # llhttp has validated the digits
                    raise self._body_too_large()
                has_body = has_body or int(value) > 0
            elif lname == b'transfer-encoding':
                has_body = True
                codings += (c.strip().lower() for c in value.split(b','))
            elif lname == b'expect' and value.strip().lower() == b'100-continue':
                req.expect_continue = req.version != '1.0'  # never to 1.0 (RFC 9110 §10.1.1)
        if codings and codings != [b'chunked']:
            # llhttp frames the body by its final chunked and would hand over the gzip (or
            # other) coded bytes as the body itself; no coding but chunked is implemented
            refusal = _Refusal(ErrorCode.INVALID_INPUT, 'unsupported Transfer-Encoding '
                               f'{b", ".join(codings).decode("latin-1")!r}: only chunked is '
                               'accepted')
            refusal.request = req
            raise refusal
        if has_body and self.on_head is not None:
            self.on_head(req)       # before a byte of the body is read (or 100 Continue sent)

    def on_chunk_header(self) -> None:
        self.in_trailer, self.trailer_bytes = True, 0

    def on_chunk_complete(self) -> None:
        self.in_trailer = False

    def on_body(self, body: bytes) -> None:
        self.in_trailer = False
        req = self.current
        req.size += len(body)
        if req.size > self.max_body_bytes:       # chunked bodies have no declared length
            raise self._body_too_large()
        req.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append(self.current)
        self.current = None
        self.in_head = True


class _ConnState:
    """A connection as the accept loop (making room at the limit) and a stop see it."""
    __slots__ = ('busy', 'fresh', 'since')

    def __init__(self, accepted: float):
        self.busy = False       # a request is being read, served or answered
        self.fresh = True       # not a byte received since the accept
        self.since = accepted   # monotonic time of the accept, or of its last answer when idle

    def idle_for(self, now: float) -> Optional[float]:
        """How long it has waited with nothing to do; None while busy, and for a fresh one
        within FIRST_REQUEST_WAIT_S (its client connected and is sending)."""
        waited = now - self.since
        if self.busy or (self.fresh and waited < FIRST_REQUEST_WAIT_S):
            return None
        return waited


class ThreadedWSGIServer:
    """Serve ``app`` on ``host:port`` (0 = a free port, see ``.port``) until ``close()``."""

    def __init__(self, app: Callable, host: str = '127.0.0.1', port: int = 8080,
                 threads: int = 32, connection_limit: int = 512,
                 max_body_bytes: int = 32 * 1024 * 1024, max_header_bytes: int = 64 * 1024,
                 idle_timeout_s: float = 120.0, head_timeout_s: float = 30.0,
                 ident: str = 'akidb',
                 early_check: Optional[Callable[[], Optional[EarlyCheck]]] = None,
                 error_body: Callable[[str, ErrorCode, str], bytes] = plain_error_body,
                 stated_body_bytes: Optional[int] = None,
                 on_refusal: Optional[OnRefusal] = None):
        """``idle_timeout_s``: the most one read may wait (a connection idle between requests
        is closed after it). ``head_timeout_s``: the most a request head may take to arrive,
        from its first byte (from the accept for a connection's first request), however it
        trickles in. ``early_check``: returns the early-check hook (or None), asked once a
        connection, so a hook registered on the app after the server was built is found.
        ``error_body(path, code, message)``: the body of the server's own refusals.
        ``stated_body_bytes``: the body limit its 413 names (default ``max_body_bytes``).
        ``on_refusal(environ, code, message)``: called for a refusal of a request whose head
        was read (a body over the limit: 413; a trailer section over the head limit: 431; a
        transfer coding other than chunked: 400), which the app never sees, so that it is
        accounted for (request id, logs, metrics); returns headers to add to the answer."""
        self.app = app
        self.on_refusal = on_refusal
        self.early_check = early_check
        self.error_body = error_body
        self.stated_body_bytes = stated_body_bytes
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout_s = idle_timeout_s
        self.head_timeout_s = head_timeout_s
        self.connection_limit = connection_limit
        self.ident = ident
        self._app_slots = threading.BoundedSemaphore(threads)
        self._sock = socket.create_server((host, port), backlog=min(connection_limit, 1024))
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Condition()
        self._conns: Dict[socket.socket, _ConnState] = {}
        self._stopping = False
        self._cut = False           # close() cut the connections (requests in flight included)
        self._serving = False
        self._listener_closed = threading.Event()
        self._accept_warnings = NowAndThen(log)

    # -- life cycle -------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept connections until ``close()``; each one gets its own daemon thread."""
        self._serving = True
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                if not any(key.fileobj is self._sock for key, _ in sel.select(1.0)):
                    continue
                with self._lock:
                    # at the limit the connection idle longest makes room (nginx reuses its
                    # idle keep-alive connections so); with none idle, new ones wait in the
                    # backlog until one closes or goes idle
                    while len(self._conns) >= self.connection_limit and not self._stopping:
                        if not self._close_longest_idle():
                            self._lock.wait(0.5)
                if self._stopping:
                    return
                try:
                    conn, peer = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if self._stopping:
                        return
                    if exc.errno in _LISTENER_GONE:
                        raise
                    name = errno.errorcode.get(exc.errno, str(exc.errno))
                    if exc.errno in _ACCEPT_PASSED_ON:      # that connection's own end
                        log.debug('accept failed with %s: taking the next', name)
                    else:
                        # EMFILE, ENFILE, ENOBUFS, ENOMEM: ending the loop would leave the port
                        # listening and never answering; the connection waits in the backlog
                        self._accept_warnings.warning(
                            'accept failed with %s (%s): pausing and retrying', name,
                            exc.strerror)
                        self._pause()
                    continue
                if not self._start_connection(conn, peer):
                    self._pause()
        finally:
            if self._stopping:
                drain_backlog(self._sock, self._start_connection)
            sel.close()
            self._close_wake()
            self._listener_closed.set()

    def _start_connection(self, conn: socket.socket, peer) -> bool:
        """Serve ``conn`` on a thread of its own; False if none could start (it is closed)."""
        accepted = time.monotonic()
        with self._lock:
            self._conns[conn] = _ConnState(accepted)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(conn, peer, accepted),
                             name='akidb-http', daemon=True).start()
            return True
        except (OSError, RuntimeError) as exc:  # the peer is gone; "can't start new thread"
            with self._lock:
                self._conns.pop(conn, None)
                self._lock.notify_all()
            conn.close()
            if isinstance(exc, OSError):
                return True
            self._accept_warnings.warning(
                'could not start a connection thread (%s): connection closed', exc)
            return False

    def _pause(self) -> None:
        with self._lock:        # a connection closing (a descriptor freed) or a stop ends it
            self._lock.wait(ACCEPT_PAUSE_S)

    def _close_longest_idle(self) -> bool:
        """Close the connection that has waited longest with nothing to do (between requests,
        or silent since its accept: see ``_ConnState.idle_for``); whether there was one. Its
        thread sees the end of input and leaves. Called with the lock held."""
        now, longest, chosen = time.monotonic(), -1.0, None
        for conn, state in self._conns.items():
            idle = state.idle_for(now)
            if idle is not None and idle > longest:
                longest, chosen = idle, conn
        if chosen is None:
            return False
        del self._conns[chosen]         # a request its thread reads now is not served
        try:
            chosen.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.debug('connection limit (%d) reached: closed one idle for %.1f s',
                  self.connection_limit, longest)
        return True

    def stop_accepting(self) -> None:
        """Stop accepting: connections already completed by the kernel are still taken (see
        ``drain_backlog``), then the listener closes; requests on open connections are still
        answered."""
        self._stopping = True
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass
        with self._lock:
            self._lock.notify_all()
        if not self._serving:
            try:
                self._sock.close()
            except OSError:
                pass
        elif not self._listener_closed.wait(LISTENER_CLOSE_WAIT_S):
            log.warning('the listener did not close within %.0f s', LISTENER_CLOSE_WAIT_S)
            try:
                self._sock.close()
            except OSError:
                pass

    def busy(self) -> bool:
        """Whether any connection is reading, serving or answering a request, or was accepted
        within FIRST_REQUEST_WAIT_S and has not sent its request yet (its client connected
        before the stop and is about to)."""
        now = time.monotonic()
        with self._lock:
            # not idle (``_ConnState.idle_for``): the same test that keeps it from being closed
            # to make room
            return any(state.idle_for(now) is None for state in self._conns.values())

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Stop accepting and cut every connection (``RestServer.stop`` drains first)."""
        self.stop_accepting()
        with self._lock:
            conns = list(self._conns)
            self._cut = True
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)     # wakes a thread blocked in recv
            except OSError:
                pass
        if not self._serving:   # else serve_forever closes them: a closed fd would not wake it
            self._close_wake()

    def _close_wake(self) -> None:
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- one connection ----------------------------------------------------------------------
    def _set_busy(self, conn: socket.socket, busy: bool) -> bool:
        """Mark a connection busy or idle; False if it was closed to make room meanwhile."""
        with self._lock:
            state = self._conns.get(conn)
            if state is None:
                return False
            state.busy, state.fresh = busy, False
            if not busy:
                state.since = time.monotonic()
                self._lock.notify_all()     # the accept loop may wait for one to go idle
            return True

    def _serve_connection(self, conn: socket.socket, peer, accepted: float) -> None:
        hook = self.early_check() if self.early_check is not None else None
        on_head = (lambda req: self._early(hook, req, peer)) if hook is not None else None
        reader = _Reader(self.max_header_bytes, self.max_body_bytes, self.stated_body_bytes,
                         on_head)
        fresh = True        # until the first bytes, the accept time marks the connection
        # When the head being waited for started: the accept for the first request, its first
        # byte (or the answer before it, for a pipelined one) for a later one; None while idle
        # between requests, which the idle timeout alone bounds. A head trickled a byte at a
        # time would otherwise hold its connection (and a place under the limit) for ever.
        head_since: Optional[float] = accepted
        timeout: Optional[float] = None
        try:
            while True:
                while not reader.done:
                    cur = reader.current
                    if cur is None:
                        if not fresh:
                            self._set_busy(conn, False)     # between requests: nothing to answer
                    elif cur.expect_continue and not reader.in_head and not cur.body:
                        # every request before it is answered by now (answers go in order)
                        conn.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
                        cur.expect_continue = False
                    wait = self.idle_timeout_s
                    if head_since is not None and reader.in_head:
                        left = head_since + self.head_timeout_s - time.monotonic()
                        if left <= 0:
                            log.debug('closing a connection from %s: no complete request head '
                                      'within %.1f s', peer[0], self.head_timeout_s)
                            return
                        wait = min(wait, left)
                    elif cur is not None:
                        # its body: head_timeout_s, and more as the bytes come at the least
                        # rate; a body trickled in a byte at a time held its connection (a
                        # place under the limit) for ever, each byte restarting the idle wait
                        if cur.body_since is None:
                            cur.body_since = time.monotonic()
                        left = (cur.body_since + self.head_timeout_s
                                + cur.size / MIN_BODY_BYTES_PER_S - time.monotonic())
                        if left <= 0:
                            log.debug('closing a connection from %s: request body slower than '
                                      '%d bytes/s after %.1f s', peer[0],
                                      MIN_BODY_BYTES_PER_S, self.head_timeout_s)
                            return
                        wait = min(wait, left)
                    if wait != timeout:
                        conn.settimeout(wait)
                        timeout = wait
                    try:
                        data = conn.recv(RECV_BYTES)
                    except socket.timeout:
                        if wait < self.idle_timeout_s:
                            continue        # the head deadline: closed (and logged) above
                        return              # idle too long
                    if not data or not self._set_busy(conn, True):
                        return      # the peer closed, or it was closed to make room
                    fresh = False
                    try:
                        reader.feed(data)
                    except _Refusal as refusal:
                        # the complete requests pipelined before the refused one come first
                        while reader.done:
                            if not self._serve_or_refuse(conn, peer, reader.done.popleft()):
                                return
                        self._refuse(conn, refusal, peer)
                        return
                    if head_since is None and reader.current is not None:
                        head_since = time.monotonic()
                req = reader.done.popleft()
                if not self._serve_or_refuse(conn, peer, req) or self._stopping:
                    return
                head_since = time.monotonic() if reader.current is not None else None
        except OSError:
            pass                        # peer gone, reset or idle too long: nothing to answer
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                self._lock.notify_all()
            try:
                conn.close()
            except OSError:
                pass

    def _early(self, hook: EarlyCheck, req: _Request, peer) -> None:
        """Run the early check on a complete head; raise its answer (a ``_Refusal``)."""
        environ = self._environ(req, peer)      # a bad target: refused now as it would be later
        try:
            with self._app_slots:
                answer = hook(environ)
        except Exception:   # the app's own checks still run on the whole request
            log.exception('early check failed')
            return
        if answer is not None:
            refusal = _early_answer(answer)
            refusal.head_only = req.method == b'HEAD'
            raise refusal

    def _serve_or_refuse(self, conn: socket.socket, peer, req: _Request) -> bool:
        """Serve one request, or refuse one the environ cannot describe; returns keep-alive."""
        try:
            return self._serve(conn, peer, req)
        except _Refusal as refusal:
            refusal.url = refusal.url or req.url
            refusal.head_only = req.method == b'HEAD'
            self._refuse(conn, refusal, peer)
            return False

    def _serve(self, conn: socket.socket, peer, req: _Request) -> bool:
        """Run the app for one request and send its answer; returns keep-alive."""
        environ = self._environ(req, peer)
        environ[CALLER_GONE] = functools.partial(_peer_closed, conn)
        environ[SERVER_CUT] = lambda: self._cut
        with self._app_slots:
            status, headers, body = self._call_app(environ)
        keep = req.keep_alive and not self._stopping
        return self._write(conn, req.method == b'HEAD', req.version, keep, status, headers, body,
                           environ['PATH_INFO'])

    def _write(self, conn: socket.socket, is_head: bool, version: str, keep: bool, status: str,
               headers, body: bytes, path: str = '') -> bool:
        """Send an app's answer; returns keep-alive."""
        head = [f'HTTP/1.1 {status}\r\n']
        for name, value in headers:
            lname = name.lower()
            if lname in _HOP_HEADERS or (lname == 'content-length' and not is_head):
                continue
            if '\n' in value or '\r' in value or '\n' in name or '\r' in name:
                log.error('WSGI app sent a header with a line break: %r', name)
                status, _headers, body = self._internal_error(path)
                return self._send_error(conn, status, body, head_only=is_head)
            head.append(f'{name}: {value}\r\n')
        no_body = is_head or status[:3] in ('204', '304') or status[0] == '1'
        if not no_body:
            head.append(f'Content-Length: {len(body)}\r\n')
        head.append(f'Server: {self.ident}\r\nDate: {_http_date()}\r\n')
        if not keep:
            head.append('Connection: close\r\n')
        elif version == '1.0':
            head.append('Connection: keep-alive\r\n')
        head.append('\r\n')
        payload = ''.join(head).encode('latin-1')
        conn.sendall(payload if no_body else payload + body)
        return keep

    def _head_environ(self, req: _Request, peer) -> Optional[dict]:
        """The environ of a request's head alone (its body unread), or None if it has none."""
        head = _Request()
        head.url, head.headers, head.method, head.version = \
            req.url, req.headers, req.method, req.version
        try:
            return self._environ(head, peer)
        except _Refusal:
            return None

    def _environ(self, req: _Request, peer) -> dict:
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            # llhttp takes some targets its URL parser does not (http://a:99999/, http://)
            raise _Refusal(ErrorCode.INVALID_INPUT,
                           f'malformed request target: {req.url[:200]!r}') from None
        path = unquote_to_bytes(url.path or b'/').decode('latin-1')
        body = b''.join(req.body)
        env = {
            'REQUEST_METHOD': req.method.decode('ascii'),
            'SCRIPT_NAME': '',
            'PATH_INFO': path,
            'QUERY_STRING': (url.query or b'').decode('latin-1'),
            'SERVER_NAME': self.host, 'SERVER_PORT': str(self.port),
            'SERVER_PROTOCOL': 'HTTP/' + req.version,
            'REMOTE_ADDR': peer[0], 'REMOTE_PORT': str(peer[1]),     # TCP: (host, port, ...)
            'CONTENT_LENGTH': str(len(body)),
            'wsgi.version': (1, 0), 'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(body),
            'wsgi.errors': sys.stderr, 'wsgi.multithread': True, 'wsgi.multiprocess': False,
            'wsgi.run_once': False, 'wsgi.input_terminated': True,
        }
        for name, value in req.headers:
            key = name.decode('latin-1').upper()
            if '_' in key:      # X_Forwarded_For would alias X-Forwarded-For: drop (as waitress)
                continue
            val = value.decode('latin-1').strip()
            if key == 'CONTENT-TYPE':
                env['CONTENT_TYPE'] = val
            elif key not in _NOT_IN_ENVIRON:
                wkey = 'HTTP_' + key.replace('-', '_')
                env[wkey] = env[wkey] + ',' + val if wkey in env else val
        return env

    def _call_app(self, environ: dict) -> Tuple[str, list, bytes]:
        started: dict = {}
        chunks: List[bytes] = []

        def start_response(status, headers, exc_info=None):
            # nothing is sent before the app returns, so a second call (with exc_info) may
            # always replace the status and headers (PEP 3333)
            started['status'], started['headers'] = status, headers
            return chunks.append                 # PEP 3333's legacy write() callable

        try:
            result = self.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, 'close'):
                    result.close()
            return started['status'], started['headers'], b''.join(chunks)
        except Exception:
            log.exception('WSGI app failed')
            return self._internal_error(environ.get('PATH_INFO', ''))

    def _internal_error(self, path: str) -> Tuple[str, list, bytes]:
        body = self.error_body(path, ErrorCode.INTERNAL, 'internal error')
        return '500 Internal Server Error', [('Content-Type', 'application/json')], body

    def _send_error(self, conn, status: str, body: bytes, headers=(),
                    head_only: bool = False) -> bool:
        """Send a refusal of the server's own and close; to HEAD, as an app's answer to it is
        sent: the head of the answer a GET would get (its Content-Length too), no body."""
        extra = ''.join(f'{name}: {value}\r\n' for name, value in headers)
        head = (f'HTTP/1.1 {status}\r\nContent-Type: application/json\r\n'
                f'Content-Length: {len(body)}\r\n{extra}Server: {self.ident}\r\n'
                f'Date: {_http_date()}\r\nConnection: close\r\n\r\n')
        conn.sendall(head.encode('latin-1') + (b'' if head_only else body))
        return False

    def _refuse(self, conn, refusal: _Refusal, peer=('', 0)) -> None:
        """Answer a request refused before the app, then close (its body stays unread).

        Closing a socket with unread input resets the connection, and a client still sending
        its body would see the reset, not the answer: shut the sending side, then read and drop
        what arrives for a moment (bounded in time and bytes) before closing.
        """
        try:
            if refusal.answer is not None:      # the early check's, as the app would send it
                status, headers, body = refusal.answer
                self._write(conn, refusal.head_only, '1.1', False, status, headers, body)
            else:
                headers = refusal.headers
                environ = None
                if self.on_refusal is not None:
                    # a request whose head was read, or one that never got that far
                    # (malformed HTTP, a head over the limit): logged, counted and given a
                    # request id all the same (the latter were answered and left no trace)
                    environ = (self._head_environ(refusal.request, peer)
                               if refusal.request is not None else None) or {
                        'REQUEST_METHOD': '', 'PATH_INFO': _path_of(refusal.url),
                        'REMOTE_ADDR': peer[0]}
                if environ is not None:
                    try:
                        headers = (*headers, *self.on_refusal(environ, refusal.code,
                                                              refusal.message))
                    except Exception:   # accounting must not cost the caller its answer
                        log.exception('on_refusal failed')
                body = self.error_body(_path_of(refusal.url), refusal.code, refusal.message)
                self._send_error(conn, f'{refusal.status} {_REASONS[refusal.status]}', body,
                                 headers, refusal.head_only)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(0.2)
            deadline, dropped = time.monotonic() + 1.0, 0
            while time.monotonic() < deadline and dropped < LINGER_BYTES:
                data = conn.recv(RECV_BYTES)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass


_date_cache = [0, '']


def _http_date() -> str:
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[:] = [now, time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(now))]
    return _date_cache[1]
