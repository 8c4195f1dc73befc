"""The guard chain on the REAL running service: ``python -m akidb_ros.server`` started here with
the production security profile (config/security.prod.yaml with its file paths moved into a
temp folder), dev certificates from scripts/make_dev_certs.sh, API keys made with the keys CLI,
a models config holding the real MiniLM model and a really corrupt ONNX file, ephemeral ports on
127.0.0.1, real TLS 1.3 with client certificates on both doors, and the plain-HTTP probe port
(health and metrics only) that kubelet, a Docker HEALTHCHECK and Prometheus use. No mocks.

Test-only departures from the prod file (each said where it is made): client certificates are
required at the TLS layer but do not identify the caller (``auth.mtls.enabled: false``) so that
"anonymous" exists on a TLS port; the breaker stays open 2 s instead of 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import grpc
import pytest
import requests
import yaml

from test_rbac_matrix import EXPECTED, PUBLIC, ROLES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MINILM = os.path.join(ROOT, 'models', 'all-MiniLM-L6-v2')
DEFAULT = 'all-minilm-l6-v2'
ISS, AUD = 'https://issuer.test/', 'akidb-test'
SVC = '/akidb.embedding.v1.EmbeddingService/'
OPEN_S = 2.0


def _keys_cli(keys_file, audit_file, *args):
    r = subprocess.run(
        [sys.executable, '-m', 'akidb_ros.guard.keys_cli', '--file', keys_file,
         '--audit', audit_file, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    return r.stdout.strip()


def _models_config(d):
    """The real MiniLM (default) and 'sick': MiniLM's tokenizer with a corrupt model.onnx."""
    mdir = os.path.join(d, 'models')
    os.makedirs(os.path.join(mdir, 'sick'))
    os.symlink(MINILM, os.path.join(mdir, 'minilm'))
    os.symlink(os.path.join(MINILM, 'tokenizer.json'),
               os.path.join(mdir, 'sick', 'tokenizer.json'))
    # the weights are in place (ONNX Runtime refuses external data outside the model's folder);
    # the graph file is corrupt until the breaker test repairs it
    shutil.copyfile(os.path.join(MINILM, 'model.onnx.data'),
                    os.path.join(mdir, 'sick', 'model.onnx.data'))
    with open(os.path.join(mdir, 'sick', 'model.onnx'), 'wb') as f:
        f.write(b'\x08\x07\x12\x04junk' + b'\xff' * 64)  # not a valid ONNX protobuf
    common = {'dimension': 384, 'max_tokens': 256, 'pooling': 'mean', 'normalize': True}
    cfg = {
        'default_model': DEFAULT,
        'models_dir': mdir,
        'engine': {'device': 'cpu', 'intra_op_threads': 1,
                   'cache': {'max_loaded_models': 2, 'max_memory_mb': 2048}},
        'models': [
            {'id': DEFAULT, 'name': 'sentence-transformers/all-MiniLM-L6-v2',
             'path': 'minilm/model.onnx', 'tokenizer': 'minilm/tokenizer.json', **common},
            {'id': 'sick', 'name': 'test/sick', 'path': 'sick/model.onnx',
             'tokenizer': 'sick/tokenizer.json', **common},
        ],
    }
    path = os.path.join(d, 'models.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f)
    return path, mdir


def _security_config(d, certs, keys_file, audit_file, jwt_pem):
    with open(os.path.join(ROOT, 'config', 'security.prod.yaml')) as f:
        cfg = yaml.safe_load(f)
    s = cfg['security']
    assert s['profile'] == 'prod' and s['auth']['enabled'] and s['tls']['enabled']
    s['auth']['api_keys']['file'] = keys_file
    s['auth']['api_keys']['reload_interval_s'] = 0.2
    j = s['auth']['jwt']
    j.pop('jwks_file', None)
    j.update(public_key_file=jwt_pem, issuer=ISS, audience=AUD)
    s['auth']['mtls']['enabled'] = False          # test-only: see the module docstring
    # the TLS files come from the PRD's env vars (AKIDB_TLS_CERT/KEY/CA, Server below), which
    # override these: the server only starts if they do
    s['tls'].update(cert_file='absent/server.crt', key_file='absent/server.key',
                    ca_file='absent/ca.crt')
    assert s['rate_limit']['roles']['viewer'] == {'rate': 10, 'burst': 2}   # used below
    s['breaker']['open_s'] = OPEN_S                # test-only: 2 s instead of 30 s
    # test-only: the RBAC matrices below send hundreds of refused calls from 127.0.0.1
    assert s['rate_limit']['auth_failures'] == {'rate': 1, 'burst': 20}
    s['rate_limit']['auth_failures'] = {'rate': 1000, 'burst': 10000}
    s['audit']['file'] = audit_file
    path = os.path.join(d, 'security.yaml')
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f)
    return path


class Server:
    def __init__(self, d):
        from cryptography.hazmat.primitives.asymmetric import rsa

        from akidb_ros.guard.jwt import issue_token
        from certs import public_pem

        self.dir = d
        self.certs = os.path.join(d, 'certs')
        subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'make_dev_certs.sh'), self.certs,
                        'robot:developer'], check=True, capture_output=True, timeout=60)
        self.ca = os.path.join(self.certs, 'ca.crt')
        self.cert = (os.path.join(self.certs, 'client-robot.crt'),
                     os.path.join(self.certs, 'client-robot.key'))
        self.keys_file = os.path.join(d, 'api_keys.yaml')
        self.audit_file = os.path.join(d, 'audit', 'audit.jsonl')
        jwt_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwt_pem = os.path.join(d, 'jwt_public.pem')
        with open(jwt_pem, 'wb') as f:
            f.write(public_pem(jwt_key))
        self.security = _security_config(d, self.certs, self.keys_file, self.audit_file, jwt_pem)
        self.models_cfg, self.models_dir = _models_config(d)
        self.jwt = {r: issue_token(jwt_key, subject=f'{r}-jwt', role=r, issuer=ISS,
                                   audience=AUD) for r in ROLES}
        self.keys = {}
        self._add_key('admin')         # the key file exists before the server starts
        ready = os.path.join(d, 'ready.json')
        env = dict(os.environ, AKIDB_SECURITY_CONFIG=self.security, AKIDB_LOG_FORMAT='json',
                   AKIDB_SECURITY_PROFILE='prod',
                   AKIDB_TLS_CERT=os.path.join(self.certs, 'server.crt'),
                   AKIDB_TLS_KEY=os.path.join(self.certs, 'server.key'), AKIDB_TLS_CA=self.ca)
        env.pop('GRPC_SSL_CIPHER_SUITES', None)
        self.log_path = os.path.join(d, 'server.log')
        self.log = open(self.log_path, 'wb')
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'akidb_ros.server', '--mode', 'inprocess', '--no-ros',
             '--host', '127.0.0.1', '--rest-port', '0', '--grpc-port', '0',
             '--probe-port', '0', '--config', self.models_cfg, '--ready-file', ready,
             '--grace', '1'],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        # API keys through the CLI (what an operator runs), while the server loads its model;
        # the running server picks each one up within reload_interval_s
        for r in ('viewer', 'operator', 'developer'):
            self._add_key(r)
        self._add_key('developer', 'revoked')
        self.secrets = list(self.keys.values()) + list(self.jwt.values())
        deadline = time.monotonic() + 90
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f'server did not start:\n{self.read_log()[-3000:]}')
            time.sleep(0.1)
        self.startup_s = time.monotonic() - self.t_start
        with open(ready) as f:
            info = json.load(f)
        assert info['tls'] is True and info['security_profile'] == 'prod'
        self.rest_port, self.grpc_port = info['rest_port'], info['grpc_port']
        self.base = f'https://127.0.0.1:{self.rest_port}'
        self.probe = f'http://127.0.0.1:{info["probe_port"]}'
        self.grpc_target = f'127.0.0.1:{self.grpc_port}'

    def _add_key(self, role, name=None):
        self.keys[name or role] = _keys_cli(self.keys_file, self.audit_file, 'create',
                                            '--role', role, '--client', name or f'{role}-svc')

    def read_log(self) -> str:
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def session(self):
        s = requests.Session()
        s.trust_env = False     # REQUESTS_CA_BUNDLE would silently replace .verify
        s.verify = self.ca
        s.cert = self.cert
        return s

    def channel(self, with_cert=True):
        with open(self.ca, 'rb') as f:
            ca = f.read()
        key = crt = None
        if with_cert:
            with open(self.cert[1], 'rb') as f:
                key = f.read()
            with open(self.cert[0], 'rb') as f:
                crt = f.read()
        creds = grpc.ssl_channel_credentials(ca, key, crt)
        return grpc.secure_channel(self.grpc_target, creds,
                                   options=(('grpc.ssl_target_name_override', 'localhost'),))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    srv = Server(str(tmp_path_factory.mktemp('e2e')))
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.read_log()[-3000:]


# ------------------------------------------------------------------------ the RBAC matrix
REST_BODY = {
    'POST /api/v1/embed': {'inputs': ['hello world']},
    'POST /v1/embeddings': {'input': 'hello world', 'model': DEFAULT},
    'POST /admin/models/load': {'model': DEFAULT},         # already loaded: 200, cheap
    'POST /admin/models/unload': {'model': 'no-such-model'},  # guard passed -> 400 NOT_FOUND
}
# what an ALLOWED caller gets (the guard let the call through to the handler)
REST_ALLOWED = {k: 200 for k in EXPECTED if not k.startswith('/')}
REST_ALLOWED['POST /admin/models/unload'] = 400


_last_viewer_call = [0.0]


def pace(role):
    """Viewers are limited to 10/s burst 2 by the prod profile: keep the matrix under that."""
    if role == 'viewer':
        wait = _last_viewer_call[0] + 0.1 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        _last_viewer_call[0] = time.monotonic()


def expect(key, role):
    allowed = EXPECTED[key]
    if allowed == PUBLIC or (role is not None and role in allowed):
        return None
    return 'UNAUTHENTICATED' if role is None else 'PERMISSION_DENIED'


def rest_request(sess, key, headers):
    method, path = key.split(' ', 1)
    return sess.request(method, sess.base + path, json=REST_BODY.get(key), headers=headers,
                        timeout=30)


def test_rest_rbac_matrix_over_tls(server):
    sess = server.session()
    sess.base = server.base
    bad = []
    n = 0
    for key in [k for k in EXPECTED if not k.startswith('/')]:
        cases = [(None, 'anonymous', {})]
        cases += [(r, 'api_key', {'X-API-Key': server.keys[r]}) for r in ROLES]
        cases += [(r, 'jwt', {'Authorization': f'Bearer {server.jwt[r]}'})
                  for r in ROLES]
        for role, how, headers in cases:
            pace(role)
            r = rest_request(sess, key, headers)
            n += 1
            want = expect(key, role)
            status = {'UNAUTHENTICATED': 401,
                      'PERMISSION_DENIED': 403}.get(want, REST_ALLOWED[key])
            got = (r.status_code, r.json().get('code') if want else None)
            if got != (status, want):
                bad.append((key, role, how, r.status_code, r.text[:120]))
            if want == 'UNAUTHENTICATED' and 'WWW-Authenticate' not in r.headers:
                bad.append((key, role, how, 'no WWW-Authenticate'))
            # security headers on every answer, HSTS because this is TLS
            if r.headers.get('X-Content-Type-Options') != 'nosniff' or \
                    'Strict-Transport-Security' not in r.headers:
                bad.append((key, role, how, 'security headers', dict(r.headers)))
            if want is None and key != 'GET /health/live' and 'X-RateLimit-Limit' not in r.headers:
                bad.append((key, role, how, 'no X-RateLimit-*'))
    assert bad == [], bad
    assert n == 10 * 9


def _embed_req(model=''):
    from akidb_ros.grpc_api import embedding_pb2 as pb
    return pb.EmbedRequest(inputs=['hello world'], model=model, normalize=True)


def grpc_invoke(ch, key, md):
    """Call one method with real messages; returns a short description of the answer."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from akidb_ros.grpc_api import embedding_pb2 as pb

    name = key.rsplit('/', 1)[1]
    if key == SVC + 'Embed':
        r = ch.unary_unary(key, pb.EmbedRequest.SerializeToString,
                           pb.EmbedResponse.FromString)(_embed_req(), metadata=md, timeout=20)
        return len(r.embeddings[0].values)
    if key == SVC + 'EmbedStream':
        stream = ch.stream_stream(key, pb.EmbedRequest.SerializeToString,
                                  pb.EmbedResponse.FromString)
        out = stream(
            iter([_embed_req(), _embed_req()]), metadata=md, timeout=20)
        return [len(r.embeddings[0].values) for r in out]
    if key == SVC + 'Health':
        health = ch.unary_unary(key, pb.HealthRequest.SerializeToString,
                                pb.HealthResponse.FromString)
        r = health(pb.HealthRequest(), metadata=md, timeout=20)
        return r.status
    if key == SVC + 'ListModels':
        r = ch.unary_unary(key, pb.ListModelsRequest.SerializeToString,
                           pb.ListModelsResponse.FromString)(pb.ListModelsRequest(), metadata=md,
                                                             timeout=20)
        return sorted(m.id for m in r.models)
    if name == 'Check':
        r = ch.unary_unary(key, health_pb2.HealthCheckRequest.SerializeToString,
                           health_pb2.HealthCheckResponse.FromString)(
            health_pb2.HealthCheckRequest(), metadata=md, timeout=20)
        return r.status
    if name == 'Watch':
        it = ch.unary_stream(key, health_pb2.HealthCheckRequest.SerializeToString,
                             health_pb2.HealthCheckResponse.FromString)(
            health_pb2.HealthCheckRequest(), metadata=md, timeout=20)
        first = next(it).status
        it.cancel()
        return first
    # reflection (v1alpha and v1 share the message layout)
    req = reflection_pb2.ServerReflectionRequest(list_services='')
    out = ch.stream_stream(key, reflection_pb2.ServerReflectionRequest.SerializeToString,
                           reflection_pb2.ServerReflectionResponse.FromString)(
        iter([req]), metadata=md, timeout=20)
    return sorted(s.name for r in out for s in r.list_services_response.service)


def test_grpc_rbac_matrix_over_tls(server):
    from grpc_health.v1 import health_pb2

    from akidb_ros.grpc_api import embedding_pb2 as pb

    allowed_answer = {
        SVC + 'Embed': 384,
        SVC + 'EmbedStream': [384, 384],
        SVC + 'Health': pb.HealthResponse.HEALTHY,
        SVC + 'ListModels': sorted([DEFAULT, 'sick']),
        '/grpc.health.v1.Health/Check': health_pb2.HealthCheckResponse.SERVING,
        '/grpc.health.v1.Health/Watch': health_pb2.HealthCheckResponse.SERVING,
    }
    # grpcio-reflection here registers v1alpha only; v1 is in the table for newer versions
    served = {k for k in EXPECTED if k.startswith('/')}
    try:
        import grpc_reflection.v1  # noqa: F401
    except ImportError:
        served.discard('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo')
    bad = []
    with server.channel() as ch:
        for key in [k for k in EXPECTED if k.startswith('/')]:
            cases = [(None, 'anonymous', ())]
            cases += [(r, 'api_key', (('x-api-key', server.keys[r]),)) for r in ROLES]
            cases += [(r, 'jwt', (('authorization', f'Bearer {server.jwt[r]}'),))
                      for r in ROLES]
            for role, how, md in cases:
                want = expect(key, role)
                pace(role)
                if key not in served:
                    want = 'UNIMPLEMENTED'   # not registered: no handler, nothing to guard
                try:
                    out = grpc_invoke(ch, key, md)
                except grpc.RpcError as e:
                    trailing = dict(e.trailing_metadata() or ())
                    got = (e.code().name, trailing.get('akidb-error-code'))
                    if got != (want, None if want == 'UNIMPLEMENTED' else want):
                        bad.append((key, role, how, got, e.details()))
                    continue
                if want is not None:
                    bad.append((key, role, how, 'allowed', out))
                elif key in allowed_answer and out != allowed_answer[key]:
                    bad.append((key, role, how, 'answer', out))
                elif 'ServerReflection' in key and SVC[1:-1] not in out:
                    bad.append((key, role, how, 'reflection', out))
    assert bad == [], bad


# ------------------------------------------------------------------------ TLS
def _handshake(port, max_version, with_cert=True, alpn=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = max_version
    ctx.load_verify_locations(_handshake.ca)
    if with_cert:
        ctx.load_cert_chain(*_handshake.cert)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(('127.0.0.1', port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname='localhost') as tls:
            return tls.version()


def test_tls12_client_refused_on_both_doors(server):
    _handshake.ca, _handshake.cert = server.ca, server.cert
    # the same client, allowed TLS 1.3, gets through: the refusal below is about the version
    assert _handshake(server.rest_port, ssl.TLSVersion.TLSv1_3) == 'TLSv1.3'
    assert _handshake(server.grpc_port, ssl.TLSVersion.TLSv1_3, alpn=['h2']) == 'TLSv1.3'
    for port, alpn in ((server.rest_port, None), (server.grpc_port, ['h2'])):
        with pytest.raises(ssl.SSLError):
            _handshake(port, ssl.TLSVersion.TLSv1_2, alpn=alpn)


def test_client_without_certificate_refused(server):
    s = requests.Session()
    s.trust_env = False
    s.verify = server.ca           # trusts the server, presents no certificate
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        s.get(server.base + '/health/live', timeout=10)
    with server.channel(with_cert=False) as ch:
        with pytest.raises(grpc.RpcError) as e:
            grpc_invoke(ch, '/grpc.health.v1.Health/Check', ())
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    # with the certificate, the open liveness probe answers
    assert server.session().get(server.base + '/health/live', timeout=10).status_code == 200


def test_plaintext_refused_on_both_doors(server):
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f'http://127.0.0.1:{server.rest_port}/health/live', timeout=10)
    with grpc.insecure_channel(server.grpc_target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            grpc_invoke(ch, '/grpc.health.v1.Health/Check', ())
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------ rate limit
def test_rate_limit_429_with_headers(server):
    """PRD per-client bucket: 100/s, burst 20, one bucket per client across both doors.
    80 gRPC calls at once from one client: about 20 + 100/s x elapsed get through, the rest
    RESOURCE_EXHAUSTED with x-ratelimit-* trailers. REST: a viewer (prod override 10/s burst 2)
    gets 429 with Retry-After and X-RateLimit-*, and is served again once tokens refill."""
    from akidb_ros.grpc_api import embedding_pb2 as pb

    md = (('x-api-key', server.keys['developer']),)
    sess = server.session()
    sess.get(server.base + '/health/live', timeout=10)   # TLS handshake done beforehand
    with server.channel() as ch:
        call = ch.unary_unary(SVC + 'ListModels', pb.ListModelsRequest.SerializeToString,
                              pb.ListModelsResponse.FromString)
        grpc_invoke(ch, '/grpc.health.v1.Health/Check', ())    # channel connected
        time.sleep(0.3)                                         # bucket full again
        t0 = time.monotonic()
        futs = [call.future(pb.ListModelsRequest(), metadata=md, timeout=20) for _ in range(80)]
        codes, trailers = [], None
        for f in futs:
            try:
                f.result()
                codes.append('OK')
            except grpc.RpcError as e:
                codes.append(e.code().name)
                trailers = dict(e.trailing_metadata() or ())
        elapsed = time.monotonic() - t0
    ok = codes.count('OK')
    assert ok + codes.count('RESOURCE_EXHAUSTED') == 80, codes
    assert 20 <= ok <= 20 + 100 * elapsed + 2, (ok, elapsed)
    assert trailers['akidb-error-code'] == 'RATE_LIMITED'
    assert int(trailers['retry-after']) >= 1 and trailers['x-ratelimit-limit'] == '100'
    assert trailers['x-ratelimit-remaining'] == '0'
    # REST, the prod profile's per-role override for viewers: 10/s, burst 2
    hdr = {'X-API-Key': server.keys['viewer']}
    time.sleep(0.3)
    t1 = time.monotonic()
    rest = [sess.get(server.base + '/health', headers=hdr, timeout=10) for _ in range(12)]
    elapsed_rest = time.monotonic() - t1
    served = sum(r.status_code == 200 for r in rest)
    assert 2 <= served <= 2 + 10 * elapsed_rest + 1, (served, elapsed_rest)
    limited = [r for r in rest if r.status_code == 429]
    assert len(limited) + served == 12 and limited
    r = limited[0]
    assert r.json()['code'] == 'RATE_LIMITED'
    assert int(r.headers['Retry-After']) >= 1
    assert r.headers['X-RateLimit-Limit'] == '10' and r.headers['X-RateLimit-Remaining'] == '0'
    time.sleep(0.3)
    r = sess.get(server.base + '/metrics', headers=hdr, timeout=10)
    assert r.status_code == 200 and r.headers['X-RateLimit-Limit'] == '10'
    print(f'rate limit: gRPC {ok}/80 served in {elapsed:.3f}s (bound {20 + 100 * elapsed:.0f}); '
          f'REST viewer {served}/12 in {elapsed_rest:.3f}s (bound {2 + 10 * elapsed_rest:.1f})')


# ------------------------------------------------------------------------ breaker
def _metric(server, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families
    r = server.session().get(server.base + '/metrics',
                             headers={'X-API-Key': server.keys['operator']}, timeout=10)
    assert r.status_code == 200
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_breaker_opens_on_corrupt_model_then_recovers(server):
    sess = server.session()
    hdr = {'X-API-Key': server.keys['developer']}

    def embed():
        t0 = time.monotonic()
        r = sess.post(server.base + '/api/v1/embed', json={'inputs': ['hello'], 'model': 'sick'},
                      headers=hdr, timeout=60)
        return r, time.monotonic() - t0

    codes = [embed()[0] for _ in range(10)]
    assert [(r.status_code, r.json()['code']) for r in codes] == [(503, 'MODEL_LOAD_FAILED')] * 10
    r, dt = embed()
    t_open = time.monotonic()
    assert (r.status_code, r.json()['code']) == (503, 'CIRCUIT_OPEN'), r.text
    assert r.headers['Retry-After'] == str(int(OPEN_S))
    assert dt < 0.5                              # fails fast, the model is not touched
    assert _metric(server, 'akidb_circuit_breaker_state', model='sick') == 2
    # gRPC sees the same breaker (keyed by the model id): UNAVAILABLE, code CIRCUIT_OPEN
    with server.channel() as ch:
        from akidb_ros.grpc_api import embedding_pb2 as pb
        with pytest.raises(grpc.RpcError) as e:
            grpc_embed = ch.unary_unary(SVC + 'Embed', pb.EmbedRequest.SerializeToString,
                                        pb.EmbedResponse.FromString)
            grpc_embed(_embed_req('sick'),
                       metadata=(('x-api-key', server.keys['developer']),), timeout=20)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert dict(e.value.trailing_metadata())['akidb-error-code'] == 'CIRCUIT_OPEN'
    # the operator repairs the model file; the breaker lets probes through after open_s
    sick = os.path.join(server.models_dir, 'sick')
    shutil.copyfile(os.path.join(MINILM, 'model.onnx'), os.path.join(sick, 'model.onnx.tmp'))
    os.replace(os.path.join(sick, 'model.onnx.tmp'), os.path.join(sick, 'model.onnx'))
    while True:
        r, _ = embed()
        if r.status_code == 200:
            break
        assert r.json()['code'] == 'CIRCUIT_OPEN'
        assert time.monotonic() - t_open < OPEN_S + 1.0, 'breaker did not half-open in time'
        time.sleep(0.1)
    reopened_after = time.monotonic() - t_open
    assert reopened_after >= OPEN_S - 0.2           # stayed open for open_s
    for _ in range(2):                               # 3 half-open probes in all
        r, _ = embed()
        assert r.status_code == 200, r.text
        assert len(r.json()['embeddings'][0]) == 384
    assert _metric(server, 'akidb_circuit_breaker_state', model='sick') == 0
    print(f'breaker: open for {reopened_after:.2f}s (open_s {OPEN_S})')


# ------------------------------------------------------------------------ fuzzing
def test_schemathesis_zero_5xx(server):
    sch = os.path.join(os.path.dirname(sys.executable), 'schemathesis')
    r = subprocess.run(
        [sch, 'run', server.base + '/openapi.json', '--url', server.base,
         '-H', 'X-API-Key: ' + server.keys['admin'], '--tls-verify', server.ca,
         '--request-cert', server.cert[0], '--request-cert-key', server.cert[1],
         '-c', 'not_a_server_error', '-n', '15', '--seed', '6', '--workers', '2',
         '--request-timeout', '30', '--generation-deterministic', '--phases', 'examples,fuzzing'],
        cwd=server.dir, capture_output=True, text=True, timeout=150,
        env={k: v for k, v in os.environ.items() if not k.endswith('CA_BUNDLE')},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert 'not_a_server_error' in out or 'passed' in out.lower(), out[-2000:]


# ------------------------------------------------------------------------ audit
def test_audit_log_records_denials_and_admin_actions_without_secrets(server):
    # a revoked key: revoke through the CLI, the running server reloads the file
    sess = server.session()
    key = server.keys['revoked']
    assert sess.get(server.base + '/models', headers={'X-API-Key': key}, timeout=10).status_code \
        == 200
    rows = json.loads(_keys_cli(server.keys_file, server.audit_file, 'list', '--json'))
    kid = next(x['id'] for x in rows if x['client'] == 'revoked')
    _keys_cli(server.keys_file, server.audit_file, 'revoke', kid)
    deadline = time.monotonic() + 5
    while True:
        r = sess.get(server.base + '/models', headers={'X-API-Key': key}, timeout=10)
        if r.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (r.status_code, r.json()['code']) == (401, 'UNAUTHENTICATED')
    assert 'revoked' in r.json()['error']
    # a denial, a bad credential and two admin actions (one succeeds, one fails) of its own
    v = {'X-API-Key': server.keys['viewer']}
    a = {'X-API-Key': server.keys['admin']}
    assert sess.post(server.base + '/api/v1/embed', json={'inputs': ['x']}, headers=v,
                     timeout=10).status_code == 403
    assert sess.get(server.base + '/models', headers={'X-API-Key': 'akidb_' + 'x' * 40},
                    timeout=10).status_code == 401
    assert sess.post(server.base + '/admin/models/load', json={'model': DEFAULT}, headers=a,
                     timeout=30).status_code == 200
    assert sess.post(server.base + '/admin/models/unload', json={'model': 'nope'}, headers=a,
                     timeout=30).status_code == 400
    time.sleep(0.2)
    with open(server.audit_file) as f:
        text = f.read()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    events = {x.get('event') for x in lines}
    assert {'auth_failure', 'permission_denied', 'admin_action'} <= events, events
    assert any(x.get('event') == 'auth_failure' and x.get('reason') == 'revoked' for x in lines)
    admin = [x for x in lines if x.get('event') == 'admin_action']
    assert {x['outcome'] for x in admin} == {'success', 'failure'}   # load ok, unload 400
    for x in lines:
        assert x['ts'] and x['outcome'] and 'request_id' in x, x
    for secret in server.secrets:
        assert secret not in text
        assert secret[-16:] not in text
    # and none in the server's own log either
    log = server.read_log()
    for secret in server.secrets:
        assert secret not in log


# ------------------------------------------------------------------------ the probe port
def _plain():
    s = requests.Session()
    s.trust_env = False     # no proxy, no CA bundle: a bare kubelet-like client
    return s


def test_probe_port_is_plain_http_without_credentials(server):
    """What kubelet, a HEALTHCHECK and Prometheus get: plain HTTP, no key, no certificate."""
    s = _plain()
    assert s.get(server.probe + '/health/live', timeout=10).json() == {'status': 'alive'}
    r = s.get(server.probe + '/health/ready', timeout=10)
    assert (r.status_code, r.json()) == (200, {'status': 'ready'})
    m = s.get(server.probe + '/metrics', timeout=10)
    assert m.status_code == 200
    from prometheus_client.parser import text_string_to_metric_families
    names = {f.name for f in text_string_to_metric_families(m.text)}
    # engine, door and guard families of this process (earlier tests made them move)
    for family in ('akidb_embed_requests', 'akidb_request_errors', 'akidb_auth_failures',
                   'akidb_circuit_breaker_state', 'akidb_model_cache_size'):
        assert family in names, family
    # the same readiness through the guarded door needs TLS, a certificate and health:read
    door = server.session().get(server.base + '/health/ready',
                                headers={'X-API-Key': server.keys['viewer']}, timeout=10)
    assert (door.status_code, door.json()) == (200, r.json())
    # ... while the doors themselves still refuse plain HTTP and certificate-less clients
    with pytest.raises(requests.exceptions.ConnectionError):
        s.get(f'http://127.0.0.1:{server.rest_port}/health/ready', timeout=10)
    nocert = _plain()
    nocert.verify = server.ca
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        nocert.get(server.base + '/health/ready', timeout=10)


def test_probe_port_serves_nothing_else(server):
    s = _plain()
    admin = {'X-API-Key': server.keys['admin']}
    for method, path in (('POST', '/api/v1/embed'), ('POST', '/v1/embeddings'),
                         ('GET', '/models'), ('GET', '/health'), ('GET', '/openapi.json'),
                         ('POST', '/admin/models/load'), ('POST', '/admin/models/unload')):
        # not even an admin key opens anything here: the routes do not exist on this port
        r = s.request(method, server.probe + path, json={'inputs': ['x'], 'model': DEFAULT},
                      headers=admin, timeout=10)
        assert (r.status_code, r.json()['code']) == (404, 'NOT_FOUND'), (method, path)
    for path in ('/health/live', '/health/ready', '/metrics'):
        r = s.post(server.probe + path, data=b'{}', timeout=10)
        assert (r.status_code, r.json()['code']) == (405, 'METHOD_NOT_ALLOWED'), path
    # nothing from the guarded doors leaks: no embeddings, no key material, no audit data
    text = s.get(server.probe + '/metrics', timeout=10).text
    for secret in server.secrets:
        assert secret not in text and secret[-16:] not in text


def test_probe_readiness_follows_the_default_model(server):
    """An operator unloads the default model: the probe says 503 not_ready until it is back,
    which it is by itself (the readiness look starts its load: no traffic reaches a pod that
    is not ready)."""
    s = _plain()
    sess = server.session()
    admin = {'X-API-Key': server.keys['admin']}
    assert sess.post(server.base + '/admin/models/unload', json={'model': DEFAULT},
                     headers=admin, timeout=30).status_code == 200
    try:
        r = s.get(server.probe + '/health/ready', timeout=10)
        assert (r.status_code, r.json()['status'], r.json()['code']) == \
            (503, 'not_ready', 'UNAVAILABLE')
        assert s.get(server.probe + '/health/live', timeout=10).status_code == 200
        end = time.monotonic() + 30
        while s.get(server.probe + '/health/ready', timeout=10).status_code != 200:
            assert time.monotonic() < end, 'the default model did not come back by itself'
            time.sleep(0.1)
    finally:
        assert sess.post(server.base + '/admin/models/load', json={'model': DEFAULT},
                         headers=admin, timeout=60).status_code == 200
    assert s.get(server.probe + '/health/ready', timeout=10).status_code == 200
