"""Operations assets: systemd units, Chaos Mesh manifests, YAML style, the deployment guide's
references, and the chaos suite's fault proxy and accounting."""
import json
import re
import socket
import threading
import time

import pytest
import yaml

from deploy_support import ROOT, dpython, dtool, run, systool

CHAOS = ROOT / 'deploy' / 'chaos'


def test_systemd_units_verify(tmp_path):
    sa = systool('systemd-analyze')
    units = sorted(str(p) for p in (ROOT / 'deploy' / 'systemd').glob('*.service'))
    assert len(units) == 2
    cp = run([sa, 'verify', '--man=no', *units], check=False)
    # verify exits 0 on unknown keys and bad values but reports them: any report is a failure
    assert cp.returncode == 0 and not cp.stderr.strip() and not cp.stdout.strip(), cp.stderr
    bad = tmp_path / 'bad.service'
    bad.write_text((ROOT / 'deploy/systemd/akidb-node.service').read_text()
                   .replace('Restart=always', 'Restartt=always'))
    cp = run([sa, 'verify', '--man=no', str(bad)], check=False)
    assert 'Restartt' in cp.stderr


def test_systemd_units_drain_and_respawn():
    node = (ROOT / 'deploy/systemd/akidb-node.service').read_text()
    bridge = (ROOT / 'deploy/systemd/akidb-bridge.service').read_text()
    assert 'KillSignal=SIGINT' in node and 'Restart=always' in node
    assert 'scripts/dds_env.sh' in node and 'scripts/dds_env.sh' in bridge
    assert '--mode sidecar' in bridge and 'BindsTo=akidb-node.service' in bridge
    assert 'AKIDB_HOST=127.0.0.1' in bridge


def unit_settings(path) -> dict:
    """{key: [values]} of a unit's [Service] section (repeated keys kept in order; Environment=
    split into its NAME=value assignments)."""
    import shlex
    out, section = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(('#', ';')):
            continue
        if line.startswith('['):
            section = line.strip('[]')
            continue
        key, _, value = line.partition('=')
        if section == 'Service':
            parts = shlex.split(value) if key == 'Environment' else value.split()
            out.setdefault(key, []).extend(parts)
    return out


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip('/') + '/')


def test_systemd_bridge_security_config_fits_the_sandbox(tmp_path, monkeypatch):
    """The security config akidb-bridge.service starts with, as it resolves on the robot: the
    files it writes (the audit log) are in the unit's writable paths (ReadWritePaths, the
    LogsDirectory/StateDirectory/CacheDirectory it creates; under ProtectSystem=strict all else
    is read-only, /opt/akidb_ros explicitly), the files it reads are under /etc/akidb and not
    hidden (ProtectHome, PrivateTmp), and the deployment guide installs the shipped file there.
    Then, with real files at those paths (under tmp_path), the server's loader, bind check,
    Guard and TLS context accept it."""
    from deploy_support import SecurityMaterial, paths_in_use, security_paths, start_guard
    from akidb_ros.guard import config as G
    unit = unit_settings(ROOT / 'deploy/systemd/akidb-bridge.service')
    env = dict(a.split('=', 1) for a in unit['Environment'])
    home = unit['WorkingDirectory'][0]                      # the checkout (REPO_ROOT)
    assert unit['ProtectSystem'] == ['strict'] and home in unit['ReadOnlyPaths']
    writable = list(unit.get('ReadWritePaths', []))
    for key, base in (('LogsDirectory', '/var/log'), ('StateDirectory', '/var/lib'),
                      ('CacheDirectory', '/var/cache'), ('RuntimeDirectory', '/run')):
        writable += [f'{base}/{d}' for d in unit.get(key, [])]
    writable = sorted(set(writable))
    hidden = []
    if unit.get('ProtectHome', ['no'])[0] in ('yes', 'true', 'tmpfs', 'read-only'):
        hidden += ['/home', '/root', '/run/user']
    if unit.get('PrivateTmp', ['no'])[0] in ('yes', 'true'):
        hidden += ['/tmp', '/var/tmp']        # the unit's own, empty: nothing installed shows
    hidden += unit.get('InaccessiblePaths', [])

    # which file the server loads there (akidb_ros.guard.config.load's search order)
    if 'AKIDB_SECURITY_CONFIG' in env:
        installed = env['AKIDB_SECURITY_CONFIG']
    else:
        installed = f"{home}/config/security.{env.get('AKIDB_SECURITY_PROFILE', 'dev')}.yaml"
    if _inside(installed, home):
        source = ROOT / installed[len(home) + 1:]
    else:
        guide = (ROOT / 'docs/operations/deployment.md').read_text()
        m = re.search(r'install [^\n]*?(\S+) ' + re.escape(installed) + r'\b', guide)
        assert m, f'docs/operations/deployment.md does not say what to install as {installed}'
        source = ROOT / m.group(1)
    assert source.is_file(), source

    robot = tmp_path / 'robot'                 # the robot's filesystem, under tmp_path
    text = source.read_text()
    for path in security_paths(yaml.safe_load(text)['security']).values():
        if path.startswith('/'):
            text = text.replace(path, str(robot) + path)
    conf = robot / installed.lstrip('/')
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    used = {k: p[len(str(robot)):] for k, p in paths_in_use(G.load(str(conf), env={})).items()}
    assert ('audit', 'file') in used, 'the bridge keeps no audit log'
    problems = []
    for key, path in used.items():
        name = '.'.join(key)
        if key == ('audit', 'file'):
            if not any(_inside(path, w) for w in writable):
                problems.append(f'{name} {path} is not in a writable path {writable}')
        elif not _inside(path, '/etc/akidb'):
            problems.append(f'{name} {path} is not under /etc/akidb')
        if any(_inside(path, h) for h in hidden):
            problems.append(f'{name} {path} is hidden from the unit')
    assert not problems, problems

    material = SecurityMaterial(tmp_path / 'material')
    for key, path in used.items():
        material.place(key, robot / path.lstrip('/'))
    cfg, guard, ctx = start_guard(conf, monkeypatch, host=env.get('AKIDB_HOST', '127.0.0.1'))
    guard.audit.close()
    assert cfg.auth_enabled and cfg['audit']['file'] == str(robot) + used[('audit', 'file')]
    assert (robot / used[('audit', 'file')].lstrip('/')).exists()
    assert cfg['rate_limit'] == G.load(str(ROOT / 'config/security.prod.yaml'),
                                       env={})['rate_limit']


def chaos_docs():
    out = []
    for f in sorted(CHAOS.glob('*.yaml')):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def test_chaos_manifests_match_the_chaos_mesh_schema():
    import jsonschema
    schema = json.loads((CHAOS / 'schema.json').read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for name, doc in chaos_docs():
        jsonschema.validate(doc, schema)
        sub = {'$defs': schema['$defs'], '$ref': f"#/$defs/{doc['kind']}"}
        jsonschema.validate(doc['spec'], sub)
        assert doc['metadata']['namespace'] == 'akidb', name


def test_chaos_schema_rejects_a_typo():
    import jsonschema
    schema = json.loads((CHAOS / 'schema.json').read_text())
    doc = dict(chaos_docs()[0][1])
    bad = json.loads(json.dumps(doc))
    spec = bad['spec'].get('podChaos', bad['spec'])
    spec['acton'] = spec.pop('action')
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad['spec'], {'$defs': schema['$defs'],
                                          '$ref': f"#/$defs/{bad['kind']}"})


def test_chaos_manifests_cover_the_prd_scenarios():
    kinds = {}
    for _, d in chaos_docs():
        spec = d['spec']
        kind = spec['type'] if d['kind'] == 'Schedule' else d['kind']
        inner = spec.get('podChaos', spec)
        kinds.setdefault(kind, set()).add(inner.get('action') or 'stress')
    assert 'pod-kill' in kinds['PodChaos']                       # 1 pod kill
    assert {'delay', 'partition'} <= kinds['NetworkChaos']       # 2 latency, 4 partition
    assert 'stress' in kinds['StressChaos']                      # 3 memory (GPU) stress
    assert 'fault' in kinds['IOChaos']                           # 5 disk pressure
    assert 'error' in kinds['DNSChaos']                          # 6 DNS failure
    for _, d in chaos_docs():
        sel = (d['spec'].get('podChaos') or d['spec'])['selector']
        assert sel['labelSelectors'] == {'app.kubernetes.io/name': 'akidb-ros'}


def test_yamllint_deploy_assets():
    yl = dtool('yamllint')
    cp = run([yl, '-s', '-c', 'deploy/yamllint.yaml', 'deploy/chaos', 'deploy/prometheus',
              'deploy/helm/akidb-ros/Chart.yaml', *map(str, (ROOT / 'deploy/helm/akidb-ros')
                                                       .glob('values*.yaml')),
              'deploy/systemd/security.yaml',
              'docker/docker-compose.yml', 'docker/compose', 'docker/hadolint.yaml',
              'deploy/checkov.yaml', 'deploy/yamllint.yaml'], check=False)
    assert cp.returncode == 0, cp.stdout


def test_deployment_guide_references_exist():
    text = (ROOT / 'docs/operations/deployment.md').read_text()
    paths = set(re.findall(r'`((?:deploy|docker|docs|scripts|bench|config|launch)/[^`\s*<>]+)`',
                           text))
    assert len(paths) >= 15
    missing = sorted(p for p in paths if not (ROOT / p.rstrip('/')).exists())
    assert not missing, missing


def test_markdown_links_between_the_docs_resolve():
    """Every relative link in README.md, SECURITY.md and docs/ names a file that exists."""
    pages = [ROOT / 'README.md', ROOT / 'SECURITY.md', *sorted((ROOT / 'docs').rglob('*.md'))]
    broken = []
    for page in pages:
        for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
            if re.match(r'[a-z]+:', target) or target.startswith('#'):
                continue            # a URL or an anchor in the same page
            if not (page.parent / target.split('#')[0]).exists():
                broken.append(f'{page.relative_to(ROOT)} -> {target}')
    assert len(pages) > 10
    assert not broken, broken


# --- the chaos suite's own parts --------------------------------------------------------------
def _echo_server():
    srv = socket.socket()
    srv.bind(('127.0.0.1', 0))
    srv.listen(16)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            data = c.recv(1024)
            c.sendall(b'echo:' + data)
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def _call(port):
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(b'ping')
        return s.recv(1024)


def test_fault_proxy_latency_and_resets():
    from bench.chaos.faultproxy import FaultProxy
    srv = _echo_server()
    proxy = FaultProxy(srv.getsockname()[1]).start()
    try:
        assert _call(proxy.port) == b'echo:ping'
        proxy.set_faults(latency_s=0.2)
        t0 = time.monotonic()
        assert _call(proxy.port) == b'echo:ping'
        assert time.monotonic() - t0 >= 0.4          # both directions delayed
        proxy.set_faults(reset_ratio=1.0)
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            r = _call(proxy.port)
            if not r:
                raise ConnectionResetError('closed')
        assert proxy.resets == 1
        proxy.clear()
        assert _call(proxy.port) == b'echo:ping'
    finally:
        proxy.stop()
        srv.close()


def test_chaos_accounting():
    from bench.chaos.run import summarize

    def rec(t0, codes, model='m'):
        atts, t = [], t0
        for c in codes:
            atts.append({'code': c, 'answered': c not in ('RESET', 'REFUSED', 'CLIENT_TIMEOUT'),
                         't': t, 'latency': 0.1})
            t += 0.2
        return {'t0': t0, 't1': t, 'model': model, 'attempts': atts, 'final': codes[-1],
                'answered': atts[-1]['answered']}

    recs = [rec(0, ['OK']), rec(1, ['UNAVAILABLE', 'UNAVAILABLE', 'UNAVAILABLE']),
            rec(2, ['RESET']), rec(3, ['CLIENT_TIMEOUT']), rec(4, ['UNAVAILABLE', 'OK']),
            rec(5, ['OK'])]
    res = summarize('x', 'd', recs, fault_t=0.5)
    assert res['sent'] == 6 and res['ok'] == 3
    assert res['failed_by_code'] == {'UNAVAILABLE': 1}
    assert res['lost'] == 2 and res['lost_by_code'] == {'RESET': 1, 'CLIENT_TIMEOUT': 1}
    assert res['retried_requests'] == 2
    # last failed attempt starts at t=4.0, first OK attempt after it ends at 4.3
    assert res['recovery_s'] == pytest.approx(3.8)


def test_load_test_verdicts_count_errors_and_the_rate_served(tmp_path):
    """bench/load/load_test.py reported a run whose every call failed as met (a fast refusal's
    latency pulled p95 down, errors and the rate served were not part of the verdict) and
    exited 0 whatever happened. Percentiles are of the calls that succeeded; a scenario is met
    with no error, its latency target and, open loop, 95 % of the offered rate served; the exit
    code is 1 when one is not met (here: nothing listens on port 1)."""
    import signal

    from bench.load.load_test import _summary, main
    failed = _summary('sustained', [], 20, 2.0, offered=10.0, target_p95_ms=30.0)
    assert (failed['met'], failed['p95_ms'], failed['requests']) == (False, None, 20)
    good = _summary('sustained', [10.0] * 20, 0, 2.0, offered=10.0, target_p95_ms=30.0)
    assert good['met'] and good['qps'] == 10.0
    behind = _summary('sustained', [10.0] * 12, 0, 2.0, offered=10.0, target_p95_ms=30.0)
    assert not behind['met']                    # 6 QPS served of 10 offered
    one_error = _summary('concurrency15', [10.0] * 400, 1, 2.0, target_p95_ms=50.0,
                         target_qps=150.0)
    assert not one_error['met'] and one_error['p95_ms'] == 10.0
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert main(['--port', '1', '--scenarios', 'sustained', '--qps', '10', '--duration',
                     '1', '--out', str(tmp_path / 'load')]) == 1
    finally:
        for sig, handler in handlers.items():      # main() installs its own
            signal.signal(sig, handler)
    assert '| no |' in (tmp_path / 'load.md').read_text()


def test_chaos_runner_lists_every_issue_scenario():
    from bench.chaos.run import SCENARIOS
    assert set(SCENARIOS) == {'node_sigkill', 'server_sigterm', 'model_corrupt', 'model_missing',
                              'network_faults', 'disk_full', 'cpu_starvation'}


def test_helm_wrapper_reports_the_sdk_version():
    dpython()
    cp = run([str(ROOT / 'scripts/helm'), 'version'])
    assert re.search(r'helm SDK v4\.\d+\.\d+', cp.stdout), cp.stdout


def test_cpu_budget_counts_each_process():
    """bench/cpu_budget.py attributes CPU to the process that spent it, per sentence."""
    import subprocess
    import sys
    from bench.cpu_budget import measure
    burn = ('import sys, time\nsys.stdin.readline()\nt = time.process_time()\n'
            'while time.process_time() - t < 0.4:\n    pass\nprint("done", flush=True)\n'
            'sys.stdin.readline()\n')
    burner = subprocess.Popen([sys.executable, '-c', burn], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        def run():   # the burner stays alive (as a door's server does) until measured
            burner.stdin.write(b'go\n')
            burner.stdin.flush()
            assert burner.stdout.readline() == b'done\n'
            return 10.0
        got = measure(run, {'burner': burner.pid}, sentences=4)
    finally:
        burner.kill()
        burner.wait(10)
    assert got['sps'] == 10.0
    assert 0.3 * 1000 / 4 <= got['cpu_ms']['burner'] <= 0.6 * 1000 / 4   # 0.4 s over 4 sentences
    assert got['cpu_ms']['bench'] < got['cpu_ms']['burner']
    assert got['total_ms'] == sum(got['cpu_ms'].values())


def test_cpu_budget_splits_the_engine_runs_from_the_rest_of_this_process():
    """CPU of long-lived threads named like the engine's runners is ``runs``, not ``bench``."""
    import threading
    import time
    from bench.cpu_budget import measure
    go, done, release = threading.Event(), threading.Event(), threading.Event()

    def runner():   # stands in for a batcher thread: alive before and after the pass
        go.wait()
        t = time.thread_time()
        while time.thread_time() - t < 0.4:
            pass
        done.set()
        release.wait()   # stays alive until the pass has been measured

    t = threading.Thread(target=runner, name='test-runs-0', daemon=True)
    t.start()
    try:
        def run():
            go.set()
            assert done.wait(10)
            return 5.0
        got = measure(run, {}, sentences=4, runs_threads='test-runs-')
    finally:
        go.set()
        release.set()
        t.join(10)
    assert 0.3 * 1000 / 4 <= got['cpu_ms']['runs'] <= 0.6 * 1000 / 4
    assert got['cpu_ms']['bench'] < got['cpu_ms']['runs'] / 4
    assert got['total_ms'] == pytest.approx(sum(got['cpu_ms'].values()))


def test_python_limit_probe_swaps_the_run_only_while_it_measures():
    """bench/python_limit.py: the rate follows the stand-in run time; the real run is restored."""
    from akidb_ros.engine.runtime import OnnxModel
    from bench.python_limit import run_probe
    from bench.run import load_corpus
    real_run = OnnxModel.run
    corpus = load_corpus()[:96]
    slow = run_probe(run_ms=40.0, clients=16, passes=1, corpus=corpus)
    fast = run_probe(run_ms=0.5, clients=16, passes=1, corpus=corpus)
    assert OnnxModel.run is real_run
    # 16 callers, runs of at most 16 sentences on at most 2 runners: <= 800 sentences/s at 40 ms
    assert slow['median_sps'] <= 2 * 16 / 0.040
    assert fast['median_sps'] > 2 * slow['median_sps']
    assert fast['passes'][0]['cpu_ms_per_request'] > 0


def test_single_caller_latency_is_paired_call_by_call():
    """bench/run.py times each door call right after a raw call of the same sentence."""
    from bench.run import paired_latencies
    calls = []

    def timer(kind, ms):
        return lambda s: calls.append((kind, s)) or ms
    raw, door = paired_latencies(timer('raw', 1.0), timer('door', 3.5), ['a', 'b', 'c'])
    assert calls == [(k, s) for s in 'abc' for k in ('raw', 'door')]
    assert raw == [1.0] * 3 and door == [3.5] * 3
