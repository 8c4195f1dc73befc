"""The REST door's WSGI server (akidb_ros.rest.wsgi_server) over real loopback sockets.

HTTP/1.1 behaviour a client relies on: keep-alive on one connection, pipelining, chunked bodies,
``Expect: 100-continue`` (in order when pipelined, never to HTTP/1.0), HEAD, HTTP/1.0; limits
answered with the service's ``{error, code}`` (413 before the body is read, 431 for a head or a
trailer section, 400 for malformed input and for transfer codings other than chunked), with no
body to HEAD; trailer fields kept out of the environ; the connection limit (idle connections
make room), the head deadline and the body's (a body trickled in is cut too); exactly one
``Host`` in an HTTP/1.1 request; an accept loop that outlives EMFILE and a thread that cannot
start; a graceful stop that answers the request in flight; an app failure is a JSON 500, never a
dropped connection; ``Upgrade`` ignored (body read, pipelining intact), ``CONNECT`` a JSON 405.
"""
import http.client
import json
import socket
import threading
import time

import pytest

from akidb_ros.rest.server import RestServer
from bridge_support import fail_first_thread_start, read_to_close


def _app(environ, start_response):
    path = environ['PATH_INFO']
    body = environ['wsgi.input'].read()
    if path == '/boom':
        raise RuntimeError('app bug')
    if path == '/slow':
        time.sleep(float(environ['QUERY_STRING'] or 0.5))
    if path == '/split':
        start_response('200 OK', [('Content-Type', 'text/plain'), ('X-Bad', 'a\r\nInjected: 1')])
        return [b'x']
    out = json.dumps({
        'method': environ['REQUEST_METHOD'], 'path': path, 'query': environ['QUERY_STRING'],
        'len': len(body), 'body': body.decode('latin-1')[:64],
        'content_type': environ.get('CONTENT_TYPE', ''),
        'headers': {k: v for k, v in environ.items() if k.startswith('HTTP_')},
        'remote_port': environ['REMOTE_PORT'], 'protocol': environ['SERVER_PROTOCOL'],
    }).encode()
    start_response('200 OK', [('Content-Type', 'application/json'),
                              ('Content-Length', str(len(out)))])
    return [out]


@pytest.fixture
def server():
    srv = RestServer(_app, port=0, threads=4, connection_limit=4, max_body_bytes=1024,
                     channel_timeout=5).start()
    yield srv
    srv.stop(0)


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_close(s)


def _responses(out: bytes):
    """Split back-to-back HTTP responses: [(head, body)], framed by Content-Length."""
    parts = []
    while out:
        head, rest = out.split(b'\r\n\r\n', 1)
        length = next(int(line.split(b':')[1]) for line in head.split(b'\r\n')
                      if line.lower().startswith(b'content-length:'))
        parts.append((head, rest[:length]))
        out = rest[length:]
    return parts


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    ports = set()
    for i in range(5):
        conn.request('POST', f'/echo/{i}?q=%C3%A9', body=b'x' * i,
                     headers={'Content-Type': 'application/json', 'X-Request-Id': f'r{i}'})
        resp = conn.getresponse()
        got = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader('Server') == 'akidb'
        assert resp.getheader('Date') and resp.getheader('Connection') is None
        assert got['path'] == f'/echo/{i}' and got['query'] == 'q=%C3%A9'
        assert got['len'] == i and got['content_type'] == 'application/json'
        assert got['headers']['HTTP_X_REQUEST_ID'] == f'r{i}'
        assert got['protocol'] == 'HTTP/1.1'
        ports.add(got['remote_port'])
    assert len(ports) == 1          # the same connection every time
    conn.close()


def test_path_is_percent_decoded_as_latin1_per_pep3333(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    conn.request('GET', '/a%20b/%C3%A9')
    got = json.loads(conn.getresponse().read())
    assert got['path'] == '/a b/' + b'\xc3\xa9'.decode('latin-1')


def test_pipelined_requests_are_answered_in_order(server):
    data = b''.join(f'GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n'.encode() for i in range(3))
    out = _raw(server.port, data + b'GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    paths = [json.loads(body)['path'] for _head, body in _responses(out)]
    assert paths == ['/p0', '/p1', '/p2', '/last']
    assert out.count(b'Connection: close') == 1


def test_chunked_body_is_decoded(server):
    req = (b'POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
           b'Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n')
    out = _raw(server.port, req)
    got = json.loads(out.split(b'\r\n\r\n', 1)[1])
    assert got['body'] == 'hello world' and got['len'] == 11
    assert 'HTTP_TRANSFER_ENCODING' not in got['headers']


def test_expect_100_continue_gets_an_interim_answer(server):
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(b'POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n'
                  b'Expect: 100-continue\r\nConnection: close\r\n\r\n')
        assert s.recv(100).startswith(b'HTTP/1.1 100 Continue\r\n\r\n')
        s.sendall(b'abcd')
        out = b''
        while not out.endswith(b'}'):
            out += s.recv(4096)
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['body'] == 'abcd'


def test_declared_body_over_the_limit_is_refused_before_it_is_read(server):
    # 2 x 1024 is the server's own limit (Flask answers between the two)
    out = _raw(server.port, b'POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n')
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 413 ') and b'Connection: close' in head
    assert json.loads(body)['code'] == 'INPUT_TOO_LARGE'


def test_chunked_body_over_the_limit_is_refused(server):
    chunk = b'800\r\n' + b'y' * 0x800 + b'\r\n'
    out = _raw(server.port, b'POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
               b'\r\n' + chunk * 2)
    assert out.startswith(b'HTTP/1.1 413 ')
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['code'] == 'INPUT_TOO_LARGE'


def test_oversized_head_is_431(server):
    out = _raw(server.port, b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 70000 + b'\r\n\r\n')
    assert out.startswith(b'HTTP/1.1 431 ')
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['code'] == 'INVALID_INPUT'


@pytest.mark.parametrize('raw', [b'NOT HTTP AT ALL\r\n\r\n',
                                 b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n',
                                 b'GET / HTTP/1.1\r\nBad Header\r\n\r\n'])
def test_malformed_requests_get_a_json_400(server, raw):
    out = _raw(server.port, raw)
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 400 ') and b'Connection: close' in head
    assert json.loads(body)['code'] == 'INVALID_INPUT'


def test_header_names_with_underscores_are_dropped(server):
    out = _raw(server.port, b'GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\n'
               b'X-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n')
    got = json.loads(out.split(b'\r\n\r\n', 1)[1])
    assert got['headers']['HTTP_X_FORWARDED_FOR'] == '10.0.0.1'


def test_repeated_headers_are_joined(server):
    out = _raw(server.port, b'GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n'
               b'Connection: close\r\n\r\n')
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['headers']['HTTP_ACCEPT'] == 'a,b'


def test_head_and_http10(server):
    out = _raw(server.port, b'HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 200 ') and body == b''
    assert b'Content-Length: ' in head          # the app's, for the GET it stands for
    out = _raw(server.port, b'GET /old HTTP/1.0\r\n\r\n')     # 1.0 without keep-alive: closes
    assert b'Connection: close' in out and json.loads(out.split(b'\r\n\r\n', 1)[1])[
        'protocol'] == 'HTTP/1.0'


def test_app_failure_is_a_json_500_and_header_injection_is_blocked(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    conn.request('GET', '/boom')
    resp = conn.getresponse()
    assert resp.status == 500 and json.loads(resp.read())['code'] == 'INTERNAL'
    conn.request('GET', '/after')          # the connection survives an app failure
    assert conn.getresponse().status == 200
    out = _raw(server.port, b'GET /split HTTP/1.1\r\nHost: x\r\n\r\n')
    assert out.startswith(b'HTTP/1.1 500 ') and b'Injected' not in out


def _wait_for_connections(srv, n: int) -> None:
    deadline = time.monotonic() + 5
    while srv.connections() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.connections() == n


def test_connection_limit_pauses_accepting_while_every_connection_is_busy(server):
    # a connection with part of a request head in is busy: none can make room
    busy = [socket.create_connection(('127.0.0.1', server.port)) for _ in range(4)]
    try:
        for s in busy:
            s.sendall(b'GET /partial HTTP/1.1\r\nHost: x\r\n')
        _wait_for_connections(server._server, 4)
        extra = http.client.HTTPConnection('127.0.0.1', server.port, timeout=0.5)
        with pytest.raises(socket.timeout):     # waits in the backlog, not refused
            extra.request('GET', '/queued')
            extra.getresponse()
        busy.pop().close()
        extra.close()
        late = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
        late.request('GET', '/late')
        assert late.getresponse().status == 200
        late.close()
    finally:
        for s in busy:
            s.close()


def test_at_the_connection_limit_the_longest_idle_keep_alive_connection_makes_room(server):
    """Keep-alive connections between requests do not lock new clients out until their idle
    timeout (5 s here): the one idle longest is closed for a new one, as nginx does."""
    clients = [http.client.HTTPConnection('127.0.0.1', server.port, timeout=5) for _ in range(4)]
    try:
        for i, c in enumerate(clients):
            c.request('GET', f'/k{i}')
            assert c.getresponse().read()
            time.sleep(0.05)        # an order of idleness
        _wait_for_connections(server._server, 4)
        t0 = time.monotonic()
        fifth = http.client.HTTPConnection('127.0.0.1', server.port, timeout=2)
        fifth.request('GET', '/fifth')
        assert fifth.getresponse().status == 200
        assert time.monotonic() - t0 < 2
        fifth.close()
        clients[0].sock.settimeout(2)
        assert clients[0].sock.recv(10) == b''          # the longest idle was closed
        clients[3].request('GET', '/still')             # the others were left alone
        assert clients[3].getresponse().status == 200
    finally:
        for c in clients:
            c.close()


def test_at_the_connection_limit_connections_that_never_sent_a_byte_make_room(server):
    silent = [socket.create_connection(('127.0.0.1', server.port)) for _ in range(4)]
    try:
        _wait_for_connections(server._server, 4)
        late = http.client.HTTPConnection('127.0.0.1', server.port, timeout=3)
        late.request('GET', '/late')        # after a grace for a request on its way (1 s)
        assert late.getresponse().status == 200
        late.close()
        silent[0].settimeout(2)
        assert silent[0].recv(10) == b''
    finally:
        for s in silent:
            s.close()


def _serve(**kwargs):
    from akidb_ros.rest.wsgi_server import ThreadedWSGIServer
    srv = ThreadedWSGIServer(_app, port=0, **kwargs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_a_request_head_must_be_complete_within_the_head_deadline():
    """The idle timeout is per read: a head trickled a byte at a time held its connection (and
    a slot of the limit) forever. The head deadline cuts it; a connection idle between
    requests has the idle timeout only."""
    srv = _serve(head_timeout_s=0.5, idle_timeout_s=5)
    try:
        with socket.create_connection(('127.0.0.1', srv.port)) as s:
            s.settimeout(0.05)
            t0, closed = time.monotonic(), False
            trickle = b'GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'a' * 200
            for byte in trickle:
                try:
                    s.sendall(bytes([byte]))
                    closed = s.recv(10) == b''
                except socket.timeout:
                    pass
                except OSError:
                    closed = True
                if closed or time.monotonic() - t0 > 3:
                    break
            assert closed and 0.4 < time.monotonic() - t0 < 2
        with socket.create_connection(('127.0.0.1', srv.port), timeout=3) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b''            # nothing sent: from the accept
            assert time.monotonic() - t0 < 2
        conn = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=5)
        conn.request('GET', '/one')
        port = json.loads(conn.getresponse().read())['remote_port']
        time.sleep(0.7)                             # idle past the head deadline
        conn.request('GET', '/two')
        assert json.loads(conn.getresponse().read())['remote_port'] == port
        conn.close()
    finally:
        srv.close()


def test_a_request_body_trickled_in_is_cut_like_a_head():
    """Once its head was in, a body had only the idle timeout per read: a byte every few seconds
    held the connection for ever (64 of them kept kubelet off the probe port). It gets the head
    deadline plus a second per MIN_BODY_BYTES_PER_S that came; a body that pauses and then
    comes at speed is served."""
    srv = _serve(head_timeout_s=0.5, idle_timeout_s=5)
    head = b'POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n'
    try:
        with socket.create_connection(('127.0.0.1', srv.port)) as s:
            s.sendall(head)
            s.settimeout(0.1)
            t0, closed = time.monotonic(), False
            while not closed and time.monotonic() - t0 < 4:
                try:
                    s.sendall(b'x')
                    closed = s.recv(10) == b''
                except socket.timeout:
                    pass
                except OSError:
                    closed = True
            assert closed and 0.4 < time.monotonic() - t0 < 2, time.monotonic() - t0
        with socket.create_connection(('127.0.0.1', srv.port), timeout=3) as s:
            s.sendall(head)
            time.sleep(0.3)
            s.sendall(b'y' * 100 + b'GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
            (_, first), (_, second) = _responses(read_to_close(s))
            assert json.loads(first)['len'] == 100 and json.loads(second)['path'] == '/after'
    finally:
        srv.close()


def test_the_body_clock_starts_when_the_server_reads_the_body():
    """The body's deadline ran from the end of its head, so the server's own waits (the early
    check queued for an app slot, requests pipelined before it) counted against the client: a
    body sent at once after a late 100 Continue was cut, the connection closed unanswered."""
    srv = _serve(threads=1, head_timeout_s=1.0, idle_timeout_s=5,
                 early_check=lambda: (lambda environ: None))
    try:
        busy = threading.Thread(target=_raw, args=(
            srv.port, b'GET /slow?1.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'))
        busy.start()
        time.sleep(0.2)                             # it holds the one app slot for 1.5 s
        with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
            s.sendall(b'POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 128\r\n'
                      b'Expect: 100-continue\r\nConnection: close\r\n\r\n')
            assert s.recv(64).startswith(b'HTTP/1.1 100 Continue')   # after ~1.3 s
            s.sendall(b'b' * 128)
            (head, body), = _responses(read_to_close(s))
        busy.join(10)
        assert head.startswith(b'HTTP/1.1 200 ') and json.loads(body)['len'] == 128, head
    finally:
        srv.close()


@pytest.mark.parametrize('head,status', [
    (b'GET /h HTTP/1.1\r\n\r\n', 400),
    (b'GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400),
    (b'GET /h HTTP/1.0\r\n\r\n', 200),                 # 1.0 predates Host
    (b'GET /h HTTP/1.1\r\nHOST: a\r\nConnection: close\r\n\r\n', 200),
], ids=['none', 'two', 'http-1.0', 'any-case'])
def test_an_http_1_1_request_has_exactly_one_host(server, head, status):
    """RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request without a Host header
    field or with more than one (both were served)."""
    (got, body), = _responses(_raw(server.port, head))
    assert got.startswith(b'HTTP/1.1 %d ' % status), got
    if status == 400:
        assert 'Host' in json.loads(body)['error']


def test_the_probe_port_has_a_short_head_deadline():
    from akidb_ros.rest.probe import ProbeServer
    probe = ProbeServer(None, port=0)
    try:
        assert probe._server.head_timeout_s == 10
    finally:
        probe._server.close()


def test_idle_connections_time_out():
    srv = RestServer(_app, port=0, channel_timeout=0.3).start()
    try:
        with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b''            # closed by the server
            assert time.monotonic() - t0 < 3
    finally:
        srv.stop(0)


def test_stop_answers_the_request_in_flight_then_refuses_new_connections():
    srv = RestServer(_app, port=0).start()
    conn = http.client.HTTPConnection('127.0.0.1', srv.port, timeout=10)
    idle = socket.create_connection(('127.0.0.1', srv.port))
    result = {}
    conn.connect()
    conn.request('GET', '/slow?0.6')
    t = threading.Thread(target=lambda: result.update(resp=conn.getresponse()))
    t.start()
    time.sleep(0.2)
    srv.stop(grace_s=5)
    t.join(5)
    assert result['resp'].status == 200
    assert result['resp'].getheader('Connection') == 'close'
    assert idle.recv(10) == b''                 # idle keep-alive connection closed
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(('127.0.0.1', srv.port), timeout=1)


def test_stop_answers_the_connections_waiting_in_the_backlog():
    """A client whose connection the kernel completed before the stop, and which sent its
    request, is answered: closing the listener with it still in the backlog reset it (a call
    the client had sent, cut without an answer; the chaos suite's server_sigterm saw it)."""
    srv = RestServer(_app, port=0, connection_limit=1).start()
    idle = socket.create_connection(('127.0.0.1', srv.port))
    deadline = time.monotonic() + 5
    while srv._server.connections() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = socket.create_connection(('127.0.0.1', srv.port), timeout=10)
    try:
        queued.sendall(b'GET /queued HTTP/1.1\r\nHost: x\r\n\r\n')   # in the backlog
        time.sleep(0.1)
        assert srv._server.connections() == 1
        srv.stop(grace_s=5)
        head, body = _responses(read_to_close(queued))[0]
        assert head.startswith(b'HTTP/1.1 200') and b'Connection: close' in head, head
        assert json.loads(body)['path'] == '/queued'
        assert idle.recv(10) == b''
    finally:
        queued.close()
        idle.close()


def test_stop_waits_for_the_request_of_a_connection_just_accepted():
    """A connection accepted just before the stop whose request is still on its way is
    answered (the stop saw nothing busy and cut it at once)."""
    srv = RestServer(_app, port=0).start()
    s = socket.create_connection(('127.0.0.1', srv.port), timeout=10)
    try:
        deadline = time.monotonic() + 5
        while srv._server.connections() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopper = threading.Thread(target=srv.stop, kwargs={'grace_s': 5})
        stopper.start()
        time.sleep(0.2)
        s.sendall(b'GET /late HTTP/1.1\r\nHost: x\r\n\r\n')
        head, body = _responses(read_to_close(s))[0]
        assert head.startswith(b'HTTP/1.1 200') and b'Connection: close' in head, head
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        s.close()


def test_a_client_still_sending_a_refused_body_reads_the_answer(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    conn.request('POST', '/big', body=b'z' * 300_000)       # no reset while it sends
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())['code'] == 'INPUT_TOO_LARGE'


# -- Upgrade, CONNECT and URLs the app cannot take ---------------------------------------------
# What `curl --http2` sends on a plain-HTTP URL (h2c upgrade); the server does not switch
# protocols, so it ignores the header (RFC 9110 §7.8) and serves the request as HTTP/1.1.
H2C = (b'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n'
       b'HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n')


def test_upgrade_header_is_ignored_and_the_body_read(server):
    body = b'{"inputs": ["x"]}'
    out = _raw(server.port, b''.join([
        b'POST /cl HTTP/1.1\r\nHost: x\r\n' + H2C + b'Content-Length: %d\r\n\r\n' % len(body)
        + body,
        b'POST /chunked HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n'
        b'Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n',
        b'GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n',
        b'POST /empty HTTP/1.1\r\nHost: x\r\n' + H2C + b'Content-Length: 0\r\n\r\n',
        b'GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n']))
    answers = _responses(out)
    got = [json.loads(b) for _head, b in answers]
    assert [g['path'] for g in got] == ['/cl', '/chunked', '/ws', '/empty', '/last']
    assert all(head.startswith(b'HTTP/1.1 200 ') for head, _b in answers)
    assert b'101' not in b''.join(head.split(b'\r\n', 1)[0] for head, _b in answers)
    assert (got[0]['body'], got[0]['len']) == (body.decode(), len(body))
    assert (got[1]['body'], got[1]['len']) == ('hello world', 11)
    assert got[2]['len'] == got[3]['len'] == 0
    # the app never sees an upgrade it could not honour (werkzeug would route it as a websocket)
    assert not any('HTTP_UPGRADE' in g['headers'] for g in got)
    assert got[0]['headers']['HTTP_HTTP2_SETTINGS']       # other headers reach the app


def test_upgrade_with_connection_close_is_served(server):
    # `Connection: Upgrade, close`: llhttp ended the message as the connection's last and
    # refused the body fed after it (400 "Data after `Connection: close`")
    body = b'{"inputs": ["x"]}'
    out = _raw(server.port, b'POST /cl HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n'
               b'Connection: Upgrade, HTTP2-Settings, close\r\n'
               b'HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n'
               b'Content-Length: %d\r\n\r\n' % len(body) + body)
    answers = _responses(out)
    assert len(answers) == 1 and answers[0][0].startswith(b'HTTP/1.1 200 ')
    assert b'Connection: close' in answers[0][0]
    got = json.loads(answers[0][1])
    assert (got['path'], got['body']) == ('/cl', body.decode())


def test_upgrade_body_in_later_reads_with_expect_continue(server):
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(b'POST /late HTTP/1.1\r\nHost: x\r\n' + H2C + b'Content-Length: 10\r\n'
                  b'Expect: 100-continue\r\n\r\n')
        assert s.recv(100).startswith(b'HTTP/1.1 100 Continue\r\n\r\n')
        s.sendall(b'01234')
        time.sleep(0.05)
        s.sendall(b'56789GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        out = read_to_close(s)
    got = [json.loads(b) for _head, b in _responses(out)]
    assert [(g['path'], g['body']) for g in got] == [('/late', '0123456789'), ('/next', '')]


def test_upgrade_body_framing_is_still_checked(server):
    # the body limit and framing errors apply to an upgrade request as to any other
    out = _raw(server.port, b'POST /big HTTP/1.1\r\nHost: x\r\n' + H2C
               + b'Transfer-Encoding: chunked\r\n\r\n' + (b'800\r\n' + b'y' * 0x800 + b'\r\n') * 2)
    assert out.startswith(b'HTTP/1.1 413 ')
    out = _raw(server.port, b'POST /bad HTTP/1.1\r\nHost: x\r\n' + H2C
               + b'Transfer-Encoding: chunked\r\n\r\nzz\r\n')
    assert out.startswith(b'HTTP/1.1 400 ')
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['code'] == 'INVALID_INPUT'


def test_connect_is_a_json_405_and_the_connection_closes(server):
    out = _raw(server.port, b'CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n'
               b'SSH-2.0-x\r\n')
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 405 ') and b'Connection: close' in head
    assert b'\r\nAllow: \r\n' in head + b'\r\n'       # no method applies to a tunnel target
    assert json.loads(body)['code'] == 'METHOD_NOT_ALLOWED'


@pytest.mark.parametrize('url', [b'http://a:99999/', b'http://', b'http://a:b/x'])
def test_a_url_the_wsgi_environ_cannot_take_is_a_json_400(server, url):
    # llhttp accepts these request targets, httptools' URL parser does not
    out = _raw(server.port, b'GET ' + url + b' HTTP/1.1\r\nHost: x\r\n\r\n')
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 400 ') and b'Connection: close' in head
    assert json.loads(body)['code'] == 'INVALID_INPUT'


def test_requests_before_a_malformed_one_are_answered_first(server):
    out = _raw(server.port, b'GET /first HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n')
    (head1, body1), (head2, body2) = _responses(out)
    assert head1.startswith(b'HTTP/1.1 200 ') and json.loads(body1)['path'] == '/first'
    assert head2.startswith(b'HTTP/1.1 400 ') and json.loads(body2)['code'] == 'INVALID_INPUT'


def test_the_413_names_the_stated_limit_not_the_hard_cap(server):
    """RestServer's hard cap is twice its limit (the app answers between): a body over the cap
    is refused naming the limit callers are told (1024 here), which it is over too."""
    out = _raw(server.port, b'POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n')
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['error'] == \
        'request body larger than 1024 bytes'


def test_the_early_check_answers_on_the_head_of_a_request_with_a_body():
    """The hook sees each request that has a body when its head is complete (before the body
    is read); its answer is sent at once and the connection closes. Requests without a body,
    and requests it lets through, are served as usual."""
    from akidb_ros.rest.wsgi_server import ThreadedWSGIServer
    seen = []

    def hook(environ):
        seen.append((environ['REQUEST_METHOD'], environ['PATH_INFO']))
        if environ.get('HTTP_X_KEY') != 'ok':
            return '401 Unauthorized', [('Content-Type', 'application/json'),
                                        ('WWW-Authenticate', 'ApiKey')], b'{"code": "NO"}'
        return None

    srv = ThreadedWSGIServer(_app, port=0, max_body_bytes=1 << 26, early_check=lambda: hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = _raw(srv.port, b'GET /a HTTP/1.1\r\nHost: x\r\n\r\n'
                             b'POST /b HTTP/1.1\r\nHost: x\r\nX-Key: ok\r\nContent-Length: 2\r\n'
                             b'\r\nhi'
                             b'POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n',
                   timeout=3)
        (h1, b1), (h2, b2), (h3, b3) = _responses(out)
        assert json.loads(b1)['path'] == '/a' and json.loads(b2)['body'] == 'hi'
        assert h3.startswith(b'HTTP/1.1 401 ') and b3 == b'{"code": "NO"}'
        assert b'WWW-Authenticate: ApiKey' in h3 and b'Connection: close' in h3
        assert seen == [('POST', '/b'), ('POST', '/c')]
    finally:
        srv.close()


# -- trailers, transfer codings, HEAD refusals, 100 Continue -----------------------------------
def test_a_large_trailer_section_is_refused_without_being_buffered(server):
    """Trailer fields count against the head limit (64 KiB): 431 as for a head, answered while
    the client is still sending the field, not once all of it was buffered."""
    with socket.create_connection(('127.0.0.1', server.port), timeout=3) as s:
        s.sendall(b'POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                  b'5\r\nhello\r\n0\r\nX-Big: ')

        def send():     # 2 MiB of one field, never ended
            try:
                for _ in range(32):
                    s.sendall(b'a' * 65536)
            except OSError:
                pass
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        out = read_to_close(s)
        sender.join(5)
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 431 ') and b'Connection: close' in head
    assert json.loads(body)['code'] == 'INVALID_INPUT' and 'trailer' in json.loads(body)['error']


def test_trailer_fields_count_whole_against_the_head_limit():
    """The trailer section was counted per read: many fields, each read on its own, passed
    ~3x the limit (200 KB through a 64 KiB one). Counted field by field, it is 431."""
    srv = _serve(max_header_bytes=2048, idle_timeout_s=5)
    try:
        with socket.create_connection(('127.0.0.1', srv.port), timeout=3) as s:
            s.sendall(b'POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                      b'5\r\nhello\r\n0\r\n')
            try:
                for i in range(40):             # 40 fields of 100 bytes, one per read
                    s.sendall(b'X-T%d: %s\r\n' % (i, b'a' * 100))
                    time.sleep(0.01)
                s.sendall(b'\r\n')
            except OSError:
                pass
            head, body = read_to_close(s).split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 431 '), head
        assert 'trailer' in json.loads(body)['error']
    finally:
        srv.close()


def test_trailer_fields_do_not_reach_the_app(server):
    # RFC 9110 §6.5.1: trailers are not to be merged into the header section
    out = _raw(server.port, b'POST /t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n'
               b'Content-Type: text/plain\r\nX-Request-ID: x\r\n\r\n')
    got = json.loads(_responses(out)[0][1])
    assert (got['body'], got['content_type']) == ('hello', 'application/json')
    assert 'HTTP_X_REQUEST_ID' not in got['headers']


@pytest.mark.parametrize('coding', [b'Transfer-Encoding: gzip, chunked\r\n',
                                    b'Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n',
                                    b'Transfer-Encoding: x-gzip ,chunked\r\n'],
                         ids=['gzip-chunked', 'two-fields', 'x-gzip'])
def test_transfer_codings_other_than_chunked_are_refused(server, coding):
    out = _raw(server.port, b'POST /te HTTP/1.1\r\nHost: x\r\n' + coding
               + b'\r\n5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n')
    (head, body), = _responses(out)
    assert head.startswith(b'HTTP/1.1 400 ') and b'Connection: close' in head
    got = json.loads(body)
    assert got['code'] == 'INVALID_INPUT' and 'gzip' in got['error'], got


def test_chunked_is_recognised_in_any_case_and_spacing(server):
    out = _raw(server.port, b'POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  CHUNKED \r\n'
               b'Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n')
    assert json.loads(_responses(out)[0][1])['body'] == 'hello'


@pytest.mark.parametrize('raw,status', [
    (b'HEAD /h HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n', b'413'),
    (b'HEAD /h HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n', b'400'),
    (b'HEAD /h HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 70000 + b'\r\n\r\n', b'431'),
    (b'HEAD /h HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 300000, b'431'),
    (b'HEAD /h HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n', b'400'),
], ids=['413', '400-framing', '431', '431-unended', '400-coding'])
def test_the_servers_refusals_to_head_have_no_body(server, raw, status):
    # like an app's answer to HEAD: the head of the answer a GET would get, Content-Length too
    out = _raw(server.port, raw)
    head, body = out.split(b'\r\n\r\n', 1)
    assert head.startswith(b'HTTP/1.1 ' + status + b' ') and b'Connection: close' in head
    assert body == b''
    assert int(head.split(b'Content-Length: ')[1].split(b'\r\n')[0]) > 0


def test_100_continue_of_a_pipelined_request_follows_the_answers_before_it(server):
    """RFC 9112 §9.3.2: answers in request order, the interim one included."""
    import re
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(b'POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi'
                  b'POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n'
                  b'Expect: 100-continue\r\nConnection: close\r\n\r\n')
        out = b''
        while b'100 Continue' not in out:
            chunk = s.recv(4096)
            assert chunk, out
            out += chunk
        s.sendall(b'abcd')
        out += read_to_close(s)
    assert re.findall(rb'HTTP/1\.1 (\d{3}) ', out) == [b'200', b'100', b'200'], out
    assert json.loads(out.rsplit(b'\r\n\r\n', 1)[1])['body'] == 'abcd'


def test_an_http10_request_gets_no_100_continue(server):
    # RFC 9110 §10.1.1: a server must not send 100 to an HTTP/1.0 client
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(b'POST /old HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n')
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(100)
        s.settimeout(5)
        s.sendall(b'abcd')
        out = read_to_close(s)
    assert out.startswith(b'HTTP/1.1 200 ') and b'100 Continue' not in out
    assert json.loads(out.split(b'\r\n\r\n', 1)[1])['body'] == 'abcd'


# -- the accept loop outlives what goes wrong around it ----------------------------------------
_EMFILE_CHILD = """
import logging, os, resource, sys
logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
from akidb_ros.rest.wsgi_server import ThreadedWSGIServer

def app(environ, start_response):
    start_response('200 OK', [('Content-Length', '2')])
    return [b'ok']

srv = ThreadedWSGIServer(app, port=0)
# room for a dozen connections beyond what is open now
soft = len(os.listdir('/proc/self/fd')) + 12
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(srv.port, flush=True)
srv.serve_forever()
"""


def test_accepting_goes_on_after_running_out_of_file_descriptors(tmp_path):
    """accept() failing with EMFILE ended the accept loop for good: the port never answered
    again while the process (and its probes) lived on. It is logged (once in a while), the
    loop pauses and goes on."""
    import subprocess
    import sys
    from bridge_support import ROOT
    stderr = tmp_path / 'stderr'
    with open(stderr, 'wb') as err:
        child = subprocess.Popen([sys.executable, '-c', _EMFILE_CHILD], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=err)
    clients = []
    try:
        port = int(child.stdout.readline())
        clients = [socket.create_connection(('127.0.0.1', port)) for _ in range(30)]
        deadline = time.monotonic() + 5
        while b'Errno 24' not in stderr.read_bytes() and b'EMFILE' not in stderr.read_bytes() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)                     # a few failed accepts: one warning for them all
        for c in clients:
            c.close()
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=3)
        conn.request('GET', '/after')
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b'ok')
        conn.close()
        log = stderr.read_bytes().decode()
        assert log.count('EMFILE') == 1, log
    finally:
        for c in clients:
            c.close()
        child.kill()
        child.wait(5)
        child.stdout.close()


def test_a_connection_whose_thread_cannot_start_is_closed_and_accepting_goes_on(monkeypatch):
    srv = _serve()
    failed = fail_first_thread_start(monkeypatch, 'akidb-http')
    try:
        with socket.create_connection(('127.0.0.1', srv.port), timeout=3) as s:
            assert s.recv(10) == b''            # closed, not left without a thread
        out = _raw(srv.port, b'GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                   timeout=3)
        assert out.startswith(b'HTTP/1.1 200 ') and failed
        assert srv.connections() == 0
    finally:
        srv.close()


def test_the_app_can_tell_a_client_that_closed_from_one_that_pipelines():
    """``environ['akidb.caller_gone']()``: False while the client is connected, bytes of a
    pipelined request waiting included; True once it has closed its connection."""
    from akidb_ros.rest.wsgi_server import CALLER_GONE
    seen, release = [], threading.Event()

    def app(environ, start_response):
        gone = environ[CALLER_GONE]
        if environ['PATH_INFO'] == '/watch':
            seen.append(gone())                 # connected, a pipelined request waiting
            release.wait(5)
            end = time.monotonic() + 5
            while not gone() and time.monotonic() < end:
                time.sleep(0.02)
            seen.append(gone())
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'ok']
    srv = RestServer(app, port=0, threads=2).start()
    try:
        with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
            s.sendall(b'GET /watch HTTP/1.1\r\nHost: x\r\n\r\n'
                      b'GET /next HTTP/1.1\r\nHost: x\r\n\r\n')
            end = time.monotonic() + 5
            while not seen and time.monotonic() < end:
                time.sleep(0.01)
        release.set()           # the client has closed by now
        end = time.monotonic() + 6
        while len(seen) < 2 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        release.set()
        srv.stop(0)
    assert seen == [False, True]
