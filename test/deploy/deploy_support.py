"""Helpers for test/deploy: the deploy tools (.venv-deploy, apt) and a live akidb server."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
DVENV = ROOT / '.venv-deploy'
CHART = ROOT / 'deploy' / 'helm' / 'akidb-ros'
VALUES = ['values-cpu.yaml', 'values-gpu.yaml', 'values-jetson.yaml']
INSTALL_HINT = 'run scripts/install_deploy_tools.sh (make setup calls it)'


def dtool(name: str) -> str:
    """A tool from .venv-deploy/bin; missing means a broken setup, so the test fails."""
    p = DVENV / 'bin' / name
    if not p.exists():
        pytest.fail(f'{name} is not installed in .venv-deploy: {INSTALL_HINT}')
    return str(p)


def dpython() -> str:
    return dtool('python')


def systool(name: str) -> str:
    p = shutil.which(name)
    if p is None:
        pytest.fail(f'{name} is not installed: {INSTALL_HINT}')
    return p


def run(cmd: List[str], timeout: float = 120, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, cmd))} exited {cp.returncode}\n'
                             f'--- stdout\n{cp.stdout[-4000:]}\n--- stderr\n{cp.stderr[-4000:]}')
    return cp


_RENDERED: Dict[str, str] = {}


def render(values: str, namespace: str = 'akidb', release: str = 'akidb') -> str:
    """`helm template` of the chart with one values file (Helm's Go SDK via scripts/helm)."""
    key = f'{values}|{namespace}|{release}'
    if key not in _RENDERED:
        dpython()
        cp = run([str(ROOT / 'scripts' / 'helm'), 'template', release, str(CHART), '-f',
                  str(CHART / values), '-n', namespace])
        _RENDERED[key] = cp.stdout
    return _RENDERED[key]


def docs(values: str) -> List[dict]:
    import yaml
    return [d for d in yaml.safe_load_all(render(values)) if d]


# --- metric names -----------------------------------------------------------------------------
_METRIC_RE = re.compile(r'\b(akidb_[a-z0-9_]+)')
_RECORD_RE = re.compile(r'\b(akidb:[a-z0-9_:]+)')


def families_from_exposition(text: str) -> Dict[str, str]:
    """{family name: type} from the '# TYPE' lines of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith('# TYPE '):
            _, _, name, typ = line.split(None, 3)
            out[name] = typ.strip()
    return out


def sample_names(families: Dict[str, str]) -> Set[str]:
    """Every series name a family exposes (counter: _total/_created; histogram: _bucket ...)."""
    names = set()
    for fam, typ in families.items():
        names.add(fam)
        if typ == 'counter':
            names.update({fam + '_total', fam + '_created'})
        elif typ == 'histogram':
            names.update({fam + s for s in ('_bucket', '_sum', '_count', '_created')})
        elif typ == 'summary':
            names.update({fam + s for s in ('_sum', '_count', '_created')})
    return names


def metric_names_in(expr: str) -> Set[str]:
    return set(_METRIC_RE.findall(expr))


def recorded_names_in(expr: str) -> Set[str]:
    return set(_RECORD_RE.findall(expr))


# --- a live server ----------------------------------------------------------------------------
class LiveServer:
    """`python -m akidb_ros.server --mode inprocess` on 127.0.0.1 with free ports (REST, gRPC
    and the probe listener, whose /metrics is what Prometheus scrapes in every deployment)."""

    def __init__(self, ros: bool = False):
        self.tmp = Path(tempfile.mkdtemp(prefix='akidb-deploy-test-'))
        self.ready = self.tmp / 'ready.json'
        env = dict(os.environ)
        env.update({'ROS_LOG_DIR': str(self.tmp / 'ros_log'), 'AKIDB_LOG_LEVEL': 'WARNING',
                    'FASTDDS_DEFAULT_PROFILES_FILE': str(ROOT / 'config' / 'fastdds_loopback.xml'),
                    'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_STATIC_PEERS': '',
                    'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp',
                    'AMENT_PREFIX_PATH': str(ROOT / '.venv')})
        env.setdefault('ROS_DOMAIN_ID', str(150 + os.getpid() % 50))
        cmd = [str(ROOT / '.venv' / 'bin' / 'python'), '-m', 'akidb_ros.server', '--mode',
               'inprocess', '--host', '127.0.0.1', '--rest-port', '0', '--grpc-port', '0',
               '--probe-port', '0', '--ready-file', str(self.ready)]
        cmd += [] if ros else ['--no-ros']
        self.log = open(self.tmp / 'server.log', 'wb')
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                self.stop()
                raise RuntimeError('server did not start: '
                                   + (self.tmp / 'server.log').read_text()[-3000:])
            time.sleep(0.2)
        info = json.loads(self.ready.read_text())
        self.rest_port = info['rest_port']
        self.probe_port = info['probe_port']
        self.url = f'http://127.0.0.1:{self.rest_port}'
        self.probe_url = f'http://127.0.0.1:{self.probe_port}'

    def embed(self, texts: List[str], model: str = '') -> int:
        import requests
        body = {'inputs': texts}
        if model:
            body['model'] = model
        return requests.post(self.url + '/api/v1/embed', json=body, timeout=30).status_code

    def metrics(self) -> str:
        import requests
        return requests.get(self.probe_url + '/metrics', timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- security material for a rendered/installed security profile -----------------------------
SECURITY_PATH_KEYS = (('auth', 'api_keys', 'file'), ('auth', 'jwt', 'public_key_file'),
                      ('auth', 'jwt', 'jwks_file'), ('tls', 'cert_file'), ('tls', 'key_file'),
                      ('tls', 'ca_file'), ('audit', 'file'))


def security_paths(section: dict) -> Dict[tuple, str]:
    """{key path: file} of every file a ``security:`` mapping names (set values only)."""
    out = {}
    for keys in SECURITY_PATH_KEYS:
        node = section
        for k in keys:
            node = (node or {}).get(k) if isinstance(node, dict) else None
        if node:
            out[keys] = str(node)
    return out


def paths_in_use(cfg) -> Dict[tuple, str]:
    """The files a loaded SecurityConfig will open at start: those of the enabled controls."""
    a, t = cfg['auth'], cfg['tls']
    used = {}
    if a['enabled'] and a['api_keys']['enabled']:
        used[('auth', 'api_keys', 'file')] = a['api_keys']['file']
    if a['enabled'] and a['jwt']['enabled']:
        for k in ('public_key_file', 'jwks_file'):
            if a['jwt'][k]:
                used[('auth', 'jwt', k)] = a['jwt'][k]
    if t['enabled']:
        used[('tls', 'cert_file')] = t['cert_file']
        used[('tls', 'key_file')] = t['key_file']
        if t['require_client_cert']:
            used[('tls', 'ca_file')] = t['ca_file']
    if cfg['audit']['enabled'] and cfg['audit']['file']:
        used[('audit', 'file')] = cfg['audit']['file']
    return used


JWT_ISSUER = 'https://auth.example.com/'


class SecurityMaterial:
    """Real key, token and certificate files, made once: an API key file with one developer
    key, a JWKS (RSA 2048), a CA and a server certificate + key it signed (test/guard/certs)."""

    def __init__(self, folder: Path):
        import importlib.util
        from akidb_ros.guard import apikeys, jwt
        from akidb_ros.guard.identity import Role
        spec = importlib.util.spec_from_file_location('guard_certs',
                                                      ROOT / 'test' / 'guard' / 'certs.py')
        certs = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
        spec.loader.exec_module(certs)     # (a dataclass needs its module in sys.modules)
        folder.mkdir(parents=True, exist_ok=True)
        self.files = {}
        keys = folder / 'api_keys.yaml'
        _, self.api_key = apikeys.create_key(str(keys), Role.DEVELOPER, 'robot-1')
        self.files[('auth', 'api_keys', 'file')] = keys
        self.jwt_key = certs.make_rsa_key()
        jwks = folder / 'jwks.json'
        jwt.write_jwks(str(jwks), {'k1': self.jwt_key.public_key()})
        self.files[('auth', 'jwt', 'jwks_file')] = jwks
        pem = folder / 'jwt_public.pem'
        pem.write_bytes(certs.public_pem(self.jwt_key))
        self.files[('auth', 'jwt', 'public_key_file')] = pem
        ca = certs.make_ca(str(folder))
        cert, key, _ = certs.make_leaf(str(folder), ca, 'localhost', server=True, name='server')
        self.files[('tls', 'cert_file')] = Path(cert)
        self.files[('tls', 'key_file')] = Path(key)
        self.files[('tls', 'ca_file')] = Path(ca.path)

    def place(self, key: tuple, path: Path) -> None:
        """Copy the file for ``key`` (audit: none, the server creates it) to ``path``."""
        if key == ('audit', 'file'):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[key], path)
        os.chmod(path, 0o600)


def start_guard(config_file: Path, monkeypatch, host: str = '0.0.0.0'):
    """What ``akidb-server`` does with its security config before it binds: load it from
    AKIDB_SECURITY_CONFIG with the real loader, check the bind address, build the Guard (opens
    the key file, the JWKS and the audit log) and the TLS context (reads certificate, key, CA).
    Returns (config, guard, TLS context or None)."""
    from akidb_ros.guard import Guard, ReloadingTLSContext, check_bind, load_security_config
    for name in ('AKIDB_SECURITY_PROFILE', 'AKIDB_TLS_CERT', 'AKIDB_TLS_KEY', 'AKIDB_TLS_CA'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AKIDB_SECURITY_CONFIG', str(config_file))
    cfg = load_security_config()
    check_bind(cfg, host)
    guard = Guard(cfg)
    tls = guard.tls_settings()
    ctx = ReloadingTLSContext(tls) if tls is not None else None
    return cfg, guard, ctx


def checkov_summary(stdout: str):
    """(summed summary, failed check ids) of checkov's JSON output."""
    reports = json.loads(stdout)
    reports = reports if isinstance(reports, list) else [reports]
    total = {'passed': 0, 'failed': 0, 'skipped': 0, 'parsing_errors': 0}
    failed = []
    for r in reports:
        for k in total:
            total[k] += int(r.get('summary', {}).get(k, 0))
        failed += [(c['check_id'], c.get('resource'), c.get('file_path'))
                   for c in r.get('results', {}).get('failed_checks', [])]
    return total, failed


def python_exe() -> str:
    return sys.executable
