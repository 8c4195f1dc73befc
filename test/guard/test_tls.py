"""Real TLS handshakes over 127.0.0.1: TLS 1.3 only, client certificates, rotation, gRPC."""

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from certs import make_ca, make_leaf

from akidb_ros.guard.identity import AuthMethod, Role
from akidb_ros.guard.mtls import (
    CertIdentitySettings,
    ReloadingTLSContext,
    TLSFilesError,
    TLSSettings,
    build_client_context,
    build_server_context,
    cert_subject,
    identity_from_cert,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


class TLSServer:
    """A plain TLS echo-identity server on a real socket using the guard's context."""

    def __init__(self, tls: ReloadingTLSContext):
        self.tls = tls
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.results = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                s = self.tls.context.wrap_socket(conn, server_side=True)
                ident = identity_from_cert(s.getpeercert(), CertIdentitySettings())
                self.results.append(('ok', s.version(), ident))
                s.sendall(f'{ident.subject}|{ident.role.value if ident.role else ""}'.encode())
                s.close()
            except (ssl.SSLError, OSError) as exc:
                self.results.append(('refused', repr(exc)))
                conn.close()

    def close(self):
        self._stop = True
        self.sock.close()


def connect(port, ca, cert=None, version=ssl.TLSVersion.TLSv1_3, alpn=None):
    """(tls version, server cert serial, bytes received) or raises ssl/OS errors."""
    ctx = build_client_context(ca, *(cert[:2] if cert else (None, None)), tls_version=version)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(('127.0.0.1', port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname='localhost') as s:
            serial = s.getpeercert()['serialNumber']
            if alpn:
                return s.version(), serial, b''
            data = s.recv(100)
            return s.version(), serial, data


@pytest.fixture
def server(pki):
    sc, sk, _ = pki['server']
    tls = ReloadingTLSContext(TLSSettings(sc, sk, pki['ca'].path, True, reload_interval_s=0.0))
    srv = TLSServer(tls)
    yield srv
    srv.close()


def test_tls13_with_client_cert_gives_identity(server, pki):
    version, _, data = connect(server.port, pki['ca'].path, pki['clients']['developer'])
    assert version == 'TLSv1.3'
    assert data == b'developer-client|developer'


def test_tls12_client_refused(server, pki):
    with pytest.raises(ssl.SSLError) as e:
        connect(
            server.port, pki['ca'].path, pki['clients']['admin'], version=ssl.TLSVersion.TLSv1_2
        )
    assert 'PROTOCOL_VERSION' in str(e.value) or 'UNSUPPORTED_PROTOCOL' in str(e.value)
    time.sleep(0.1)
    assert server.results[-1][0] == 'refused'


def _refused_after_handshake(port, ca, cert=None):
    """In TLS 1.3 the server checks the client certificate after the client's Finished: the
    refusal arrives as an alert on the first read. No application data may come back."""
    try:
        _, _, data = connect(port, ca, cert)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return repr(exc)
    assert data == b'', f'server answered {data!r} to an unauthenticated client'
    return 'eof'


def test_client_without_certificate_refused(server, pki):
    why = _refused_after_handshake(server.port, pki['ca'].path)
    time.sleep(0.1)
    assert server.results[-1][0] == 'refused'
    assert 'CERTIFICATE_REQUIRED' in why or why == 'eof'


def test_client_cert_from_another_ca_refused(server, pki):
    _refused_after_handshake(server.port, pki['ca'].path, pki['rogue'])
    time.sleep(0.1)
    assert (
        server.results[-1][0] == 'refused' and 'CERTIFICATE_VERIFY_FAILED' in server.results[-1][1]
    )


def test_expired_client_cert_refused(server, pki):
    _refused_after_handshake(server.port, pki['ca'].path, pki['expired'])
    time.sleep(0.1)
    assert server.results[-1][0] == 'refused'


def test_certificate_rotation_without_restart(tmp_path, pki):
    d = str(tmp_path)
    ca = pki['ca']
    sc, sk, cert1 = make_leaf(d, ca, 'localhost', server=True, name='server')
    tls = ReloadingTLSContext(TLSSettings(sc, sk, ca.path, True, reload_interval_s=0.2))
    srv = TLSServer(tls)
    try:
        _, serial, _ = connect(srv.port, ca.path, pki['clients']['viewer'])
        assert int(serial, 16) == cert1.serial_number
        _, _, cert2 = make_leaf(d, ca, 'localhost', server=True, name='server')  # rotate in place
        time.sleep(0.25)
        _, serial, data = connect(srv.port, ca.path, pki['clients']['viewer'])
        assert int(serial, 16) == cert2.serial_number and data == b'viewer-client|viewer'
        assert tls.generation == 1
        # client certificates are still required after the switch
        _refused_after_handshake(srv.port, ca.path)
        # a half-written rotation (new cert, old key) is refused; the last good pair keeps serving
        other_dir = tmp_path / 'x'
        other_dir.mkdir()
        c3, _, cert3 = make_leaf(str(other_dir), ca, 'localhost', server=True, name='server')
        shutil.copy(c3, sc)
        time.sleep(0.25)
        _, serial, _ = connect(srv.port, ca.path, pki['clients']['viewer'])
        assert int(serial, 16) == cert2.serial_number and tls.generation == 1
    finally:
        srv.close()


def test_unusable_tls_files_are_named_in_the_error(tmp_path):
    """Missing, mismatched or non-PEM files: the error says which file and why."""
    d = str(tmp_path)
    ca = make_ca(d)
    sc, sk, _ = make_leaf(d, ca, 'localhost', server=True, name='server')
    oc, ok, _ = make_leaf(d, ca, 'localhost', server=True, name='other')
    assert build_server_context(TLSSettings(sc, sk, ca.path, True))
    missing = os.path.join(d, 'absent.crt')
    with pytest.raises(TLSFilesError, match=f'tls.cert_file {missing} .*No such file'):
        build_server_context(TLSSettings(missing, sk, ca.path, True))
    with pytest.raises(TLSFilesError, match=f'{sc} / tls.key_file {ok}: .*MISMATCH'):
        build_server_context(TLSSettings(sc, ok, ca.path, True))
    with pytest.raises(TLSFilesError, match=f'tls.ca_file {sk}'):
        build_server_context(TLSSettings(sc, sk, sk, True))      # a key is not a CA bundle
    assert build_server_context(TLSSettings(sc, sk, sk, False))  # no client certs: CA unused


def test_client_ca_rotation(tmp_path, pki):
    d = str(tmp_path)
    ca1 = make_ca(d, cn='ca one')
    sc, sk, _ = make_leaf(d, ca1, 'localhost', server=True, name='server')
    c1 = make_leaf(d, ca1, 'robot', server=False, ou='developer', name='c1')
    ca_path = os.path.join(d, 'clients-ca.crt')
    shutil.copy(ca1.path, ca_path)
    tls = ReloadingTLSContext(TLSSettings(sc, sk, ca_path, True, reload_interval_s=0.0))
    srv = TLSServer(tls)
    try:
        assert connect(srv.port, ca1.path, c1)[2] == b'robot|developer'
        ca2 = make_ca(d, cn='ca two')
        c2 = make_leaf(d, ca2, 'robot2', server=False, ou='viewer', name='c2')
        shutil.copy(ca2.path, ca_path)  # trust only the new client CA
        assert connect(srv.port, ca1.path, c2)[2] == b'robot2|viewer'
        _refused_after_handshake(srv.port, ca1.path, c1)
        time.sleep(0.1)
        assert srv.results[-1][0] == 'refused'
    finally:
        srv.close()


def test_identity_from_cert_forms_and_role_mapping(pki):
    cpath = pki['clients']['operator'][0]
    pem = open(cpath).read()
    der = ssl.PEM_cert_to_DER_cert(pem)
    for form in (pem, pem.encode(), der):
        ident = identity_from_cert(form, CertIdentitySettings())
        assert ident.subject == 'operator-client' and ident.role is Role.OPERATOR
        assert ident.method is AuthMethod.MTLS and ident.client_id == 'cert:operator-client'
    assert cert_subject(pem)['O'] == 'akidb test'
    plain = open(pki['norole'][0]).read()
    assert identity_from_cert(plain, CertIdentitySettings()).role is None
    assert (
        identity_from_cert(plain, CertIdentitySettings(default_role='viewer')).role is Role.VIEWER
    )
    assert (
        identity_from_cert(plain, CertIdentitySettings(role_map={'plain-client': 'admin'})).role
        is Role.ADMIN
    )
    # OU ignored when role_from_ou is off
    assert identity_from_cert(pem, CertIdentitySettings(role_from_ou=False)).role is None


def test_dev_cert_script_output_works(tmp_path):
    out = str(tmp_path / 'certs')
    r = subprocess.run(
        ['bash', os.path.join(ROOT, 'scripts', 'make_dev_certs.sh'), out, 'robot-1:developer'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(os.path.join(out, 'server.key')).st_mode & 0o777) == '0o600'
    tls = ReloadingTLSContext(
        TLSSettings(
            os.path.join(out, 'server.crt'),
            os.path.join(out, 'server.key'),
            os.path.join(out, 'ca.crt'),
            True,
            reload_interval_s=0,
        )
    )
    srv = TLSServer(tls)
    try:
        cert = (os.path.join(out, 'client-robot-1.crt'), os.path.join(out, 'client-robot-1.key'))
        version, serial1, data = connect(srv.port, os.path.join(out, 'ca.crt'), cert)
        assert version == 'TLSv1.3' and data == b'robot-1|developer'
        # re-running rotates the leaf certificates under the same CA, served without restart
        r = subprocess.run(
            ['bash', os.path.join(ROOT, 'scripts', 'make_dev_certs.sh'), out, 'robot-1:developer'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        _, serial2, data = connect(srv.port, os.path.join(out, 'ca.crt'), cert)
        assert serial2 != serial1 and data == b'robot-1|developer'
    finally:
        srv.close()


# ----------------------------- gRPC ---------------------------------------------------------


class GrpcServerProc:
    def __init__(self, cert, key, ca, interval='0', env_extra=None, client_cert=True):
        env = dict(os.environ)
        env.pop('GRPC_SSL_CIPHER_SUITES', None)
        env.update(env_extra or {})
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, 'grpc_tls_server.py'), cert, key, ca, interval]
            + ([] if client_cert else ['no-client-cert']),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.p.stdout.readline().strip()
        self.line = line
        self.port = int(line.split()[1]) if line.startswith('PORT') else None

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope='module')
def grpc_server(pki):
    sc, sk, _ = pki['server']
    srv = GrpcServerProc(sc, sk, pki['ca'].path)
    assert srv.port, srv.line
    yield srv
    srv.close()


def test_grpc_tls13_mutual_rpc(grpc_server, pki):
    import grpc

    cc, ck, _ = pki['clients']['admin']
    creds = grpc.ssl_channel_credentials(
        open(pki['ca'].path, 'rb').read(), open(ck, 'rb').read(), open(cc, 'rb').read()
    )
    with grpc.secure_channel(f'localhost:{grpc_server.port}', creds) as ch:
        out = ch.unary_unary('/t.Echo/Who')(b'', timeout=10, metadata=(('x-api-key', 'k'),))
    assert out == b'admin-client|admin|k'
    version, _, _ = connect(grpc_server.port, pki['ca'].path, pki['clients']['admin'], alpn=['h2'])
    assert version == 'TLSv1.3'


def test_grpc_tls12_refused(grpc_server, pki):
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        connect(
            grpc_server.port,
            pki['ca'].path,
            pki['clients']['admin'],
            version=ssl.TLSVersion.TLSv1_2,
            alpn=['h2'],
        )


def test_grpc_client_without_cert_refused(grpc_server, pki):
    import grpc

    creds = grpc.ssl_channel_credentials(open(pki['ca'].path, 'rb').read())
    with grpc.secure_channel(f'localhost:{grpc_server.port}', creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary('/t.Echo/Who')(b'', timeout=10)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    rogue = pki['rogue']
    creds = grpc.ssl_channel_credentials(
        open(pki['ca'].path, 'rb').read(), open(rogue[1], 'rb').read(), open(rogue[0], 'rb').read()
    )
    with grpc.secure_channel(f'localhost:{grpc_server.port}', creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary('/t.Echo/Who')(b'', timeout=10)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def test_grpc_tls_without_client_certs_needs_no_client_ca(tmp_path, pki):
    """TLS without mTLS: a client CA named in the config but absent (a Kubernetes TLS secret
    without ca.crt) is not read, as on REST, and a client without a certificate is served (the
    gRPC server failed to start on the missing file)."""
    import grpc

    sc, sk, _ = pki['server']
    srv = GrpcServerProc(sc, sk, str(tmp_path / 'absent-ca.crt'), client_cert=False)
    try:
        assert srv.port, srv.line
        creds = grpc.ssl_channel_credentials(open(pki['ca'].path, 'rb').read())
        with grpc.secure_channel(f'localhost:{srv.port}', creds) as ch:
            out = ch.unary_unary('/t.Echo/Who')(b'', timeout=10, metadata=(('x-api-key', 'k'),))
        assert out == b'||k'        # no client certificate, the API key passed through
        version, _, _ = connect(srv.port, pki['ca'].path, None, alpn=['h2'])
        assert version == 'TLSv1.3'
    finally:
        srv.close()


def test_grpc_refuses_to_start_when_tls12_could_not_be_closed(pki):
    """If grpc was imported before prepare_grpc_tls13(), building credentials fails loudly."""
    sc, sk, _ = pki['server']
    srv = GrpcServerProc(sc, sk, pki['ca'].path, env_extra={'NO_TLS13_PREP': '1'})
    try:
        assert srv.line.startswith('REFUSED') and 'TLS 1.2' in srv.line
    finally:
        srv.close()


def test_grpc_certificate_rotation_without_restart(tmp_path, pki):
    d = str(tmp_path)
    ca = pki['ca']
    sc, sk, cert1 = make_leaf(d, ca, 'localhost', server=True, name='server')
    srv = GrpcServerProc(sc, sk, ca.path, interval='0.2')
    try:
        assert srv.port, srv.line
        _, serial, _ = connect(srv.port, ca.path, pki['clients']['admin'], alpn=['h2'])
        assert int(serial, 16) == cert1.serial_number
        _, _, cert2 = make_leaf(d, ca, 'localhost', server=True, name='server')
        deadline = time.time() + 10
        seen = serial
        while time.time() < deadline and int(seen, 16) != cert2.serial_number:
            time.sleep(0.25)
            _, seen, _ = connect(srv.port, ca.path, pki['clients']['admin'], alpn=['h2'])
        assert int(seen, 16) == cert2.serial_number
    finally:
        srv.close()


def test_importing_the_guard_does_not_import_grpc():
    """prepare_grpc_tls13() must be callable after `import akidb_ros.guard`."""
    code = ('import sys, akidb_ros.guard as g; assert "grpc" not in sys.modules, "grpc imported"; '
            'import os; os.environ.pop("GRPC_SSL_CIPHER_SUITES", None); '
            'assert g.prepare_grpc_tls13(); import grpc; print("ok")')
    env = {k: v for k, v in os.environ.items() if k != 'GRPC_SSL_CIPHER_SUITES'}
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]
