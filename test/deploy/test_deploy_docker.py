"""Dockerfiles, .dockerignore and the compose stack: hadolint, checkov, compose-spec, promtool,
plus the image promises of issue 7 §1 read from the files themselves."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_support import (ROOT, SecurityMaterial, checkov_summary, dpython, dtool, paths_in_use,
                            run, security_paths, start_guard, systool)

DOCKERFILES = ['docker/Dockerfile', 'docker/Dockerfile.gpu', 'docker/Dockerfile.jetson']


def test_hadolint_clean():
    hadolint = dtool('hadolint')
    cp = run([hadolint, '--config', 'docker/hadolint.yaml', '--no-color', *DOCKERFILES],
             check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter setup is not a no-op: an unpinned pip install and `latest` fail it."""
    hadolint = dtool('hadolint')
    bad = tmp_path / 'Dockerfile'
    bad.write_text('FROM debian:latest\nRUN pip install requests\nUSER root\n')
    cp = run([hadolint, '--config', 'docker/hadolint.yaml', '--no-color', str(bad)], check=False)
    assert cp.returncode != 0 and 'DL3007' in cp.stdout and 'DL3013' in cp.stdout, cp.stdout


def test_checkov_dockerfiles_no_failed_check():
    checkov = dtool('checkov')
    cp = run([checkov, '--config-file', 'deploy/checkov.yaml', '-d', 'docker', '--framework',
              'dockerfile', '-o', 'json'], check=False, timeout=300)
    summary, failed = checkov_summary(cp.stdout)
    assert summary['passed'] > 50 and summary['failed'] == 0 and summary['parsing_errors'] == 0, \
        (summary, failed)
    # the only skips are the inline, justified CKV_DOCKER_7 (base image is a build argument)
    assert summary['skipped'] == len(DOCKERFILES)


@pytest.mark.parametrize('path', DOCKERFILES)
def test_dockerfile_promises(path):
    text = (ROOT / path).read_text()
    stages = re.findall(r'^FROM\s+(\S+)(?:\s+AS\s+(\S+))?', text, re.M)
    assert len(stages) >= 2, 'multi-stage'
    assert all(img == '${BASE_IMAGE}' for img, _ in stages), 'base image is a build argument'
    assert re.search(r'^ARG BASE_IMAGE=\S+', text, re.M)
    runtime = text[text.rindex('\nFROM '):]
    assert 'g++' not in runtime and 'cmake' not in runtime, 'no compilers in the runtime stage'
    user = re.findall(r'^USER\s+(\S+)', runtime, re.M)
    assert user and user[-1] not in ('root', '0', '0:0'), 'non-root user'
    # the PRD's non-root user: akidb, UID 1000 (the chart's securityContext and compose's user)
    assert re.search(r'^ARG AKIDB_UID=(\d+)', runtime, re.M).group(1) == '1000'
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD', runtime, re.M), 'HEALTHCHECK'
    vols = re.search(r'^VOLUME\s+(\[.*\])', runtime, re.M)
    assert vols and '/opt/akidb/models' in vols.group(1) and '/var/cache/akidb' in vols.group(1)
    assert 'AKIDB_TENSORRT_CACHE=/var/cache/akidb/trt' in runtime
    assert 'fastdds_loopback.xml' in runtime
    assert 'ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST' in runtime
    # no secrets: nothing that looks like a credential is set or copied
    assert not re.search(r'^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|API_KEY)\S*=', text, re.M | re.I)
    assert not re.search(r'^COPY\s+.*(\.pem|\.key|api_keys|certs)', text, re.M)
    assert not re.search(r'^COPY\s+(\S+\s+)*models/', text, re.M), 'models are a volume'
    # PEP 660 editable install: its console scripts import akidb_ros.server directly (the
    # `setup.py develop` ones died with StopIteration on the interfaces' egg-info)
    assert re.search(r'pip install [^\n]*--use-pep517 -e \.', text), 'console scripts work'


def _env(runtime: str) -> dict:
    """ENV key=value pairs of a Dockerfile stage (continuation lines joined)."""
    out = {}
    for block in re.findall(r'^ENV\s+((?:.*\\\n)*.*)$', runtime, re.M):
        for k, v in re.findall(r'(\w+)=(\S+)', block.replace('\\\n', ' ')):
            out[k] = v
    return out


def healthcheck_cmd(path: str) -> list:
    runtime = (ROOT / path).read_text()
    m = re.search(r'^HEALTHCHECK .*\\\n\s*CMD (\[.*\])$', runtime, re.M)
    return json.loads(m.group(1))


@pytest.mark.parametrize('path', DOCKERFILES)
def test_healthcheck_uses_the_probe_port(path):
    """Under the prod profile the REST door wants TLS 1.3 + a client certificate + a key: the
    HEALTHCHECK must ask the plain-HTTP probe listener, which the image exposes."""
    text = (ROOT / path).read_text()
    runtime = text[text.rindex('\nFROM '):]
    cmd = ' '.join(healthcheck_cmd(path))
    assert '/health/ready' in cmd and 'AKIDB_PROBE_PORT' in cmd and 'http://' in cmd
    assert 'AKIDB_REST_PORT' not in cmd and '8080' not in cmd
    env = _env(runtime)
    assert env['AKIDB_PROBE_PORT'] == '8081'
    assert '8081' in re.search(r'^EXPOSE (.*)$', runtime, re.M).group(1).split()
    # the server refuses a non-loopback bind without authentication: an image that binds all
    # addresses by default must also name a security profile
    if env.get('AKIDB_HOST', '127.0.0.1') not in ('127.0.0.1', '::1', 'localhost'):
        assert 'AKIDB_SECURITY_PROFILE' in env or 'AKIDB_SECURITY_CONFIG' in env, env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_healthcheck_command_against_a_live_server(live_server):
    """The images' HEALTHCHECK and the compose bridge's healthcheck, run as written against a
    real server's probe port: healthy; against a closed port: unhealthy."""
    doc = yaml.safe_load((ROOT / 'docker/docker-compose.yml').read_text())
    compose = doc['services']['bridge']['healthcheck']['test']
    assert compose[0] == 'CMD' and 'http://127.0.0.1:8081/health/ready' in compose[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith('AKIDB_')}
    for port, healthy in ((live_server.probe_port, True), (_closed_port(), False)):
        for cmd in [healthcheck_cmd(p) for p in DOCKERFILES] + [compose[1:]]:
            cmd = [sys.executable if c == 'python3' else c.replace(':8081/', f':{port}/')
                   for c in cmd]
            for host in ('0.0.0.0', '127.0.0.1'):
                rc = subprocess.run(cmd, env=dict(env, AKIDB_PROBE_PORT=str(port),
                                                  AKIDB_HOST=host),
                                    capture_output=True, timeout=30).returncode
                assert (rc == 0) is healthy, (cmd, port, host, rc)


def test_dockerignore_keeps_secrets_models_and_venvs_out():
    ignored = {ln.strip() for ln in (ROOT / '.dockerignore').read_text().splitlines()
               if ln.strip() and not ln.startswith('#')}
    for must in ('.git', '.venv', '.venv-build', '.venv-deploy', 'models', 'build',
                 '**/*.pem', '**/*.key', 'config/api_keys.yaml', '.env'):
        assert must in ignored, must


def test_compose_file_is_valid_compose_spec():
    py = dpython()
    cp = run([py, 'deploy/tools/compose_check.py', 'docker/docker-compose.yml'])
    assert 'OK, services bridge, grafana, node, otel-collector, prometheus' in cp.stdout


def test_compose_checker_rejects_unknown_keys(tmp_path):
    py = dpython()
    doc = yaml.safe_load((ROOT / 'docker/docker-compose.yml').read_text())
    doc['services']['node']['privilegd'] = True
    bad = tmp_path / 'compose.yml'
    bad.write_text(yaml.safe_dump(doc))
    cp = run([py, 'deploy/tools/compose_check.py', str(bad)], check=False)
    assert cp.returncode == 1 and 'privilegd' in cp.stdout, cp.stdout


def test_compose_stack_shape():
    doc = yaml.safe_load((ROOT / 'docker/docker-compose.yml').read_text())
    s = doc['services']
    assert set(s) == {'node', 'bridge', 'prometheus', 'grafana', 'otel-collector'}
    assert s['bridge']['network_mode'] == 'service:node', 'DDS stays on the shared loopback'
    assert s['bridge']['ipc'] == 'service:node'
    for name in ('node', 'bridge'):
        assert s[name]['user'] == '1000:1000', name          # akidb, the images' USER
    assert 'sidecar' in s['bridge']['command']
    for name, svc in s.items():
        assert svc.get('read_only') is True, name
        assert svc.get('cap_drop') == ['ALL'], name
        assert not svc.get('privileged'), name
    for port in s['node']['ports']:
        assert port.startswith('${AKIDB_BIND:-127.0.0.1}:'), port
    vols = ' '.join(s['node']['volumes'])
    assert ':/opt/akidb/models:ro' in vols and 'trt-cache:/var/cache/akidb' in vols
    assert 'api_keys' in {x['source'] for x in s['bridge']['secrets']}
    # the bridge's probe listener: its own healthcheck, published like the other ports
    assert s['bridge']['environment']['AKIDB_PROBE_PORT'] == '8081'
    assert '${AKIDB_BIND:-127.0.0.1}:8081:8081' in s['node']['ports']
    assert '8081/health/ready' in ' '.join(s['bridge']['healthcheck']['test'])


def test_compose_prometheus_config(tmp_path):
    promtool = systool('promtool')
    cfg = yaml.safe_load((ROOT / 'docker/compose/prometheus.yml').read_text())
    for i, rf in enumerate(cfg['rule_files']):
        name = rf.rsplit('/', 1)[1]
        (tmp_path / name).write_text((ROOT / 'deploy/prometheus' / name).read_text())
        cfg['rule_files'][i] = str(tmp_path / name)
    (tmp_path / 'prometheus.yml').write_text(yaml.safe_dump(cfg))
    cp = run([promtool, 'check', 'config', str(tmp_path / 'prometheus.yml')])
    assert 'SUCCESS' in cp.stdout + cp.stderr
    jobs = {j['job_name']: j['static_configs'][0]['targets'] for j in cfg['scrape_configs']}
    # the bridge's /metrics on its plain-HTTP probe port (the REST door wants an API key)
    assert jobs == {'akidb-node': ['node:9100'], 'akidb-bridge': ['node:8081']}


def test_compose_security_profile_starts_the_guard(tmp_path, monkeypatch):
    """docker/compose/security.yaml as the bridge container sees it: every file it opens is in
    a volume or secret of the bridge (a writable volume for the audit log, the root filesystem
    is read-only), and with real files there the server's loader, bind check (AKIDB_HOST
    0.0.0.0) and Guard accept it, with config/security.prod.yaml's rate limits (role
    overrides included)."""
    from akidb_ros.guard import config as G
    doc = yaml.safe_load((ROOT / 'docker/docker-compose.yml').read_text())
    bridge = doc['services']['bridge']
    env = bridge['environment']
    conf_in = env['AKIDB_SECURITY_CONFIG']
    mounts = {}
    for v in bridge['volumes']:
        src, dst, *mode = v.split(':')
        mounts[dst] = {'source': src, 'ro': mode == ['ro']}
    for s in bridge['secrets']:
        mounts[s['target']] = {'source': s['source'], 'ro': True}
    assert mounts[conf_in]['source'] == './compose/security.yaml'
    text = (ROOT / 'docker/compose/security.yaml').read_text()
    material = SecurityMaterial(tmp_path / 'material')
    box = tmp_path / 'container'
    for key, path in security_paths(yaml.safe_load(text)['security']).items():
        text = text.replace(path, str(box) + path)
    conf = box / conf_in.lstrip('/')
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    for key, path in paths_in_use(G.load(str(conf), env={})).items():
        inside = path[len(str(box)):]
        where = next((m for m in mounts if inside == m or inside.startswith(m + '/')), None)
        assert where is not None, f'{".".join(key)} {inside} is in no volume of the bridge'
        if key == ('audit', 'file'):
            assert not mounts[where]['ro'] and not mounts[where]['source'].startswith('.'), where
        material.place(key, Path(path))
    cfg, guard, _ = start_guard(conf, monkeypatch, host=env['AKIDB_HOST'])
    guard.audit.close()
    assert cfg['rate_limit'] == G.load(str(ROOT / 'config/security.prod.yaml'),
                                       env={})['rate_limit']
    assert cfg['rate_limit']['roles'] == {'admin': {'rate': 500, 'burst': 100},
                                          'viewer': {'rate': 10, 'burst': 2}}
