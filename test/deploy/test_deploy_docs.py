"""The operations docs (docs/operations, the chart's notes and comments) against what the code,
the catalogue and the images really do: model folders, the UID, log lines, label values, test
file names and the commands a runbook gives for a Pod."""
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from deploy_support import CHART, ROOT, docs

OPS = ROOT / 'docs' / 'operations'
RUNBOOKS = OPS / 'runbooks'
DOCKERFILES = ['docker/Dockerfile', 'docker/Dockerfile.gpu', 'docker/Dockerfile.jetson']


def ops_pages():
    return sorted(OPS.rglob('*.md'))


def chart_texts():
    return [CHART / 'templates' / 'NOTES.txt', *sorted(CHART.glob('values*.yaml'))]


def test_docs_name_model_folders_by_the_catalogue_path():
    """A model's folder is the one its catalogue entry's `path` names (id all-minilm-l6-v2 ->
    all-MiniLM-L6-v2/), not its id: no page tells operators to copy `models/<id>` or to look in
    `<models>/<id>/`, and the example the deployment guide gives is the catalogue's."""
    cat = yaml.safe_load((ROOT / 'config' / 'models.yaml').read_text())
    folders = {m['id']: m['path'].split('/')[0] for m in cat['models']}
    assert folders['all-minilm-l6-v2'] == 'all-MiniLM-L6-v2'     # the id is not the folder
    bad = []
    for page in ops_pages() + chart_texts():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r'<(id|model)>/', line):
                bad.append(f'{page.relative_to(ROOT)}:{n}: {line.strip()}')
    assert not bad, bad
    guide = (OPS / 'deployment.md').read_text()
    assert 'cp models/all-MiniLM-L6-v2 ' in guide or 'cp -r models/all-MiniLM-L6-v2 ' in guide
    assert "catalogue entry's `path`" in guide


def test_one_uid_everywhere():
    """The PRD's user akidb, UID 1000: the images create it, the chart and compose run as it,
    the image test expects it, and no doc, comment or test names another UID."""
    for path in DOCKERFILES:
        runtime = (ROOT / path).read_text().split('\nFROM ')[-1]
        assert re.search(r'^ARG AKIDB_UID=1000$', runtime, re.M), path
        assert re.search(r'--uid "\$\{AKIDB_UID\}"[^\n]* akidb\b', runtime), path
        assert re.search(r'^USER \$\{AKIDB_UID\}:\$\{AKIDB_UID\}$', runtime, re.M), path
    compose = yaml.safe_load((ROOT / 'docker' / 'docker-compose.yml').read_text())
    for svc in ('node', 'bridge'):
        assert compose['services'][svc]['user'] == '1000:1000', svc
    image_test = (ROOT / 'scripts' / 'image_test.sh').read_text()
    assert 'chown 1000:1000 ' in image_test and 'int(uid) != 1000' in image_test
    stale = []
    for top in ('deploy', 'docker', 'docs/operations', 'test/deploy', 'scripts/image_test.sh'):
        base = ROOT / top
        for f in ([base] if base.is_file() else sorted(base.rglob('*'))):
            if f.is_file() and f.suffix not in ('.pyc',) and f != Path(__file__):
                text = f.read_text(errors='replace')
                stale += [f'{f.relative_to(ROOT)}:{n}' for n, ln in
                          enumerate(text.splitlines(), 1) if re.search(r'\b10001\b', ln)]
    assert not stale, stale


def test_load_shedding_runbook_names_the_batchers_reasons():
    """akidb_load_shed_total{reason}: the values the engine, the node and the bridge set, and
    no other."""
    reasons = set()
    for path in ('engine/batcher.py', 'ros/node.py', 'backends.py'):
        src = (ROOT / 'akidb_ros' / path).read_text()
        reasons |= set(re.findall(r"reason = '(\w+)'", src))
        reasons |= set(re.findall(r"LOAD_SHED\.labels\(reason='(\w+)'\)", src))
    assert reasons == {'full', 'shed', 'tokenise', 'bridge'}, reasons
    text = (RUNBOOKS / 'AkidbLoadShedding.md').read_text()
    line = next(ln for ln in text.splitlines() if 'sum by (reason)' in ln)
    for r in reasons:
        assert f'`{r}`' in line, (r, line)
    assert 'deadline' not in line, line


def test_backend_down_runbook_quotes_log_lines_the_node_writes():
    text = (RUNBOOKS / 'AkidbBackendDown.md').read_text()
    node = (ROOT / 'akidb_ros' / 'ros' / 'node.py').read_text()
    assert 'embedding node active' not in text and 'embedding node active' not in node
    # the lines the node logs when configure ends and when it is active (its services exist)
    assert "f'engine ready: default model {" in node
    assert "f'serving {\", \".join(s.srv_name " in node
    assert "(Embed, 'embed'," in node
    assert '`engine ready: default model <id> on <provider>' in text
    assert '`serving /embed, ' in text
    assert "f'configure failed: " in node and '`configure failed: <why>`' in text


def test_ops_docs_name_test_files_that_exist():
    missing = []
    for page in ops_pages():
        for ref in re.findall(r'\b(test/[\w/.-]+\.py)\b', page.read_text()):
            if not (ROOT / ref).is_file():
                missing.append(f'{page.relative_to(ROOT)}: {ref}')
    assert not missing, missing


def runtime_packages() -> set:
    """The apt packages of every image's runtime stage."""
    pkgs = set()
    for path in DOCKERFILES:
        runtime = (ROOT / path).read_text().split('\nFROM ')[-1]
        m = re.search(r'apt-get install -y --no-install-recommends \\\n(.*?)\\\n', runtime)
        pkgs |= set(m.group(1).split())
    return pkgs


def test_in_pod_commands_use_what_the_images_have():
    """The runtime images carry no curl: no page gives a `kubectl exec ... curl`."""
    pkgs = runtime_packages()
    assert 'tini' in pkgs and 'curl' not in pkgs, pkgs
    bad = []
    for page in ops_pages():
        text = page.read_text()
        for m in re.finditer(r'kubectl[^`\n]*\bexec\b[^`\n]*', text):
            if re.search(r'\b(curl|wget)\b', m.group(0)):
                bad.append(f'{page.relative_to(ROOT)}: {m.group(0)}')
    assert not bad, bad


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b'{"status": "ready"}' if self.status == 200 else b'{"status": "not ready"}'
        self.send_response(self.status if self.path == '/health/ready' else 404)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize('status', [200, 503])
def test_runbook_readiness_command_for_a_pod_works(status):
    """The in-Pod readiness command of the runbooks (the image's python3, no curl), run as
    written against a probe port that answers 200, then 503: it prints the status and body."""
    blocks = {}
    for page in sorted(RUNBOOKS.glob('Akidb*.md')):
        for block in re.findall(r'```bash\n(.*?)```', page.read_text(), re.S):
            if 'kubectl' in block and '/health/ready' in block:
                blocks.setdefault(re.sub(r'^ +', '', block, flags=re.M), []).append(page.name)
    assert len(blocks) == 1, list(blocks)           # one command, the same in every runbook
    block = next(iter(blocks))
    argv = shlex.split(block)
    assert argv[:2] == ['kubectl', '-n'] and argv[3] == 'exec' and '--' in argv
    cmd = argv[argv.index('--') + 1:]
    assert cmd[:2] == ['python3', '-c']
    handler = type('H', (_Health,), {'status': status})
    srv = HTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = cmd[2].replace('127.0.0.1:8081', f'127.0.0.1:{srv.server_address[1]}')
        cp = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=30)
    finally:
        srv.shutdown()
        srv.server_close()
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith(f'{status} ') and '"status"' in cp.stdout, cp.stdout


def test_dds_uses_shared_memory_so_both_containers_share_dev_shm():
    """Under scripts/dds_env.sh (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) rmw_fastrtps adds Fast
    DDS's shared-memory transport beside the profile's loopback UDP: a real participant maps
    /dev/shm/fastdds_* segments. So the node and the bridge must see one /dev/shm: the chart
    mounts its dshm emptyDir in both containers, compose shares the node's IPC namespace."""
    code = ('import os, time, rclpy\n'
            'rclpy.init(); n = rclpy.create_node("shm_probe"); time.sleep(1.0)\n'
            'print(any("/dev/shm/fastdds_" in l for l in open("/proc/self/maps")))\n'
            'n.destroy_node(); rclpy.shutdown()\n')
    cp = subprocess.run(['bash', '-c', f'. scripts/dds_env.sh && exec {sys.executable} -c '
                         f'{shlex.quote(code)}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0 and cp.stdout.strip() == 'True', (cp.stdout, cp.stderr[-500:])
    spec = next(d for d in docs('values.yaml') if d['kind'] == 'Deployment')['spec'][
        'template']['spec']
    assert spec['volumes'][[v['name'] for v in spec['volumes']].index('dshm')]['emptyDir'][
        'medium'] == 'Memory'
    for c in spec['containers']:
        assert {'name': 'dshm', 'mountPath': '/dev/shm'}.items() <= next(
            m for m in c['volumeMounts'] if m['name'] == 'dshm').items(), c['name']
    compose = yaml.safe_load((ROOT / 'docker' / 'docker-compose.yml').read_text())
    assert compose['services']['bridge']['ipc'] == 'service:node'


def test_latency_runbook_names_the_thread_setting():
    """ONNX Runtime threads follow the CPU limit unless node.params.intra_op_threads says."""
    text = (RUNBOOKS / 'AkidbLatencyP95High.md').read_text()
    assert 'node.params.intra_op_threads' in text and 'CFS quota' in text
    values = yaml.safe_load((CHART / 'values.yaml').read_text())
    assert 'intra_op_threads' in values['node']['params']
