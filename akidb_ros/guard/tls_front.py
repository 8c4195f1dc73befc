"""In-process TLS 1.3 terminator for HTTP servers that do not speak TLS (the REST door's).

    tls = ReloadingTLSContext(settings)                       # TLS 1.3 only, client certs
    front = TLSFront(tls, listen=('0.0.0.0', 8443), upstream=('127.0.0.1', rest.port)).start()
    ...                                                       # in the WSGI app / guard:
    creds = front.credentials(request.environ)                # peer cert from the handshake

Each accepted connection gets its own thread: the TLS handshake runs there (bounded by
``handshake_timeout_s``, so a client that never sends a ClientHello cannot stall the accept
loop), then one non-blocking select loop relays bytes between the TLS socket and a new plain
connection to the upstream server on loopback (a single thread per SSL object: OpenSSL objects
must not be read and written from two threads at once).

Client identity: the front records, for every upstream connection, the local port it connected
from -> (verified peer certificate, real client address). The app sees ``REMOTE_ADDR=127.0.0.1``
and ``REMOTE_PORT=<that port>``; :meth:`TLSFront.peer` maps it back. Nothing is taken from HTTP
headers, so a client cannot forge an identity; a request that reached the upstream server
without passing the front has no entry and gets no certificate identity (and, with
``require_front`` in :meth:`credentials`, is refused outright). Bind the upstream server to
127.0.0.1 only.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from akidb_ros.doors import ACCEPT_PAUSE_S, NowAndThen, drain_backlog
from akidb_ros.engine.errors import EngineError, ErrorCode

from .identity import Credentials, credentials_from_wsgi
from .mtls import ReloadingTLSContext

log = logging.getLogger('akidb_ros.guard.tls_front')

_CHUNK = 65536
_MAX_BUFFER = 1 << 20
# A stop waits this long (at most) for the handshakes of connections it took from the backlog.
STOP_HANDSHAKE_WAIT_S = 2.0


@dataclass(frozen=True)
class PeerInfo:
    cert_der: Optional[bytes]
    address: str
    tls_version: str


class TLSFront:
    def __init__(
        self,
        tls: ReloadingTLSContext,
        listen: Tuple[str, int],
        upstream: Tuple[str, int],
        max_connections: int = 512,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 120.0,
        backlog: int = 128,
    ):
        self.tls = tls
        self.upstream = upstream
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._peers: Dict[int, PeerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # connections between accept and their upstream connection (a stop waits for them)
        self._handshakes = threading.Condition()
        self._handshaking = 0
        family = socket.AF_INET6 if ':' in listen[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(listen)
        self._sock.listen(backlog)
        self._sock.settimeout(0.5)
        self._accept_warnings = NowAndThen(log)
        self.host, self.port = self._sock.getsockname()[:2]
        self._thread: Optional[threading.Thread] = None
        self.stats = {'accepted': 0, 'handshake_failures': 0, 'rejected_busy': 0}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> 'TLSFront':
        self._thread = threading.Thread(
            target=self._accept_loop, name='akidb-tls-front', daemon=True
        )
        self._thread.start()
        log.info('TLS front on %s:%s -> %s:%s', self.host, self.port, *self.upstream)
        return self

    def stop(self) -> None:
        """Stop accepting. Connections the kernel completed before the stop are taken first
        (closing the listener would reset them, requests perhaps already sent), and their
        handshakes are waited for (a bounded while), so that they reach the upstream server
        before it stops in turn."""
        self._stop.set()
        drain_backlog(self._sock, self._take)    # the accept loop sees the closed socket and ends
        if self._thread:
            self._thread.join(timeout=2)
        with self._handshakes:
            self._handshakes.wait_for(lambda: self._handshaking == 0,
                                      timeout=min(self.handshake_timeout_s, STOP_HANDSHAKE_WAIT_S))

    # ---------------------------------------------------------------- identity
    def peer(self, environ: Mapping[str, Any]) -> Optional[PeerInfo]:
        """The TLS peer of a WSGI request that came through this front, else None."""
        if environ.get('REMOTE_ADDR') not in ('127.0.0.1', '::1'):
            return None
        try:
            port = int(environ.get('REMOTE_PORT') or 0)
        except (TypeError, ValueError):
            return None
        with self._lock:
            return self._peers.get(port)

    def credentials(
        self,
        environ: Mapping[str, Any],
        require_front: bool = True,
        api_key_header: str = 'X-API-Key',
    ) -> Credentials:
        """Credentials of a WSGI request: headers + the verified certificate + real address."""
        base = credentials_from_wsgi(
            {k: v for k, v in environ.items() if k != 'SSL_CLIENT_CERT'},
            api_key_header=api_key_header,
        )
        info = self.peer(environ)
        if info is None:
            if require_front:
                raise EngineError(ErrorCode.UNAUTHENTICATED, 'TLS required')
            return base
        return Credentials(
            api_key=base.api_key,
            bearer=base.bearer,
            peer_cert=info.cert_der,
            peer=info.address,
            malformed=base.malformed,
        )

    # ---------------------------------------------------------------- plumbing
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                # out of descriptors or memory (EMFILE, ENOBUFS ...): accept() fails at once
                # while the connection waits in the backlog; without a pause this loop spun a
                # core until a descriptor came free
                self._accept_warnings.warning('accept failed with %s: pausing and retrying',
                                              errno.errorcode.get(exc.errno, exc))
                self._stop.wait(ACCEPT_PAUSE_S)
                continue
            self._take(conn, addr)

    def _take(self, conn: socket.socket, addr) -> None:
        if not self._slots.acquire(blocking=False):
            self.stats['rejected_busy'] += 1
            conn.close()
            return
        self.stats['accepted'] += 1
        with self._handshakes:
            self._handshaking += 1
        try:
            threading.Thread(
                target=self._serve, args=(conn, addr), daemon=True, name='akidb-tls-conn'
            ).start()
        except RuntimeError as exc:     # "can't start new thread": this one is closed, not
            self._handshake_over()      # the accept loop ended
            self._slots.release()
            conn.close()
            self._accept_warnings.warning(
                'could not start a TLS connection thread (%s): connection closed', exc)

    def _handshake_over(self) -> None:
        with self._handshakes:
            self._handshaking -= 1
            self._handshakes.notify_all()

    def _serve(self, conn: socket.socket, addr) -> None:
        tls_sock = up = None
        port = None
        handshaking = True
        try:
            conn.settimeout(self.handshake_timeout_s)
            try:
                tls_sock = self.tls.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.stats['handshake_failures'] += 1
                log.info('TLS handshake from %s refused: %s', addr[0], getattr(exc, 'reason', exc))
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            finally:
                handshaking = False
                self._handshake_over()
            port = up.getsockname()[1]
            with self._lock:
                self._peers[port] = PeerInfo(
                    tls_sock.getpeercert(binary_form=True), str(addr[0]), tls_sock.version() or ''
                )
            self._relay(tls_sock, up)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                log.debug('TLS relay for %s ended: %s', addr[0], exc)
        finally:
            if handshaking:
                self._handshake_over()
            if port is not None:
                with self._lock:
                    self._peers.pop(port, None)
            for s in (up, tls_sock or conn):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
            self._slots.release()

    def _relay(self, tls_sock: ssl.SSLSocket, up: socket.socket) -> None:
        """Relay until either side closes or nothing moves for idle_timeout_s."""
        tls_sock.setblocking(False)
        up.setblocking(False)
        to_up, to_client = bytearray(), bytearray()
        # poll, not select: a process relaying hundreds of connections holds descriptors
        # above 1024, which select() cannot watch
        poller = select.poll()
        ends = {tls_sock.fileno(): tls_sock, up.fileno(): up}
        while True:
            rlist = []
            if len(to_up) < _MAX_BUFFER:
                rlist.append(tls_sock)
            if len(to_client) < _MAX_BUFFER:
                rlist.append(up)
            wlist = ([up] if to_up else []) + ([tls_sock] if to_client else [])
            if tls_sock in rlist and tls_sock.pending():
                readable = [tls_sock]  # decrypted bytes already buffered in OpenSSL
            else:
                for sock in (tls_sock, up):
                    poller.register(sock, (select.POLLIN if sock in rlist else 0)
                                    | (select.POLLOUT if sock in wlist else 0))
                events = poller.poll(self.idle_timeout_s * 1000)
                if not events:
                    return  # idle timeout
                # a hang-up or error reads as readable: its recv says how it ended
                readable = [ends[fd] for fd, ev in events
                            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR
                                     | select.POLLNVAL)]
            if tls_sock in readable:
                try:
                    data = tls_sock.recv(_CHUNK)
                    if not data:
                        return  # client closed
                    to_up += data
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if up in readable:
                try:
                    data = up.recv(_CHUNK)
                    if not data:  # upstream closed: deliver what is left
                        if to_client:
                            tls_sock.settimeout(self.idle_timeout_s)
                            tls_sock.sendall(bytes(to_client))
                        return
                    to_client += data
                except BlockingIOError:
                    pass
            if to_up:
                try:
                    del to_up[: up.send(to_up)]
                except BlockingIOError:
                    pass
            if to_client:
                try:
                    del to_client[: tls_sock.send(to_client)]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
