"""End to end: a real Prometheus server (Debian's `prometheus`) scrapes the running service's
probe port on 127.0.0.1 (as the compose file and the chart do), evaluates the SLO and alert
rules, and answers every dashboard query."""
import re
import shutil
import socket
import subprocess
import time

import pytest
import requests
import yaml

from deploy_support import ROOT, systool
from test_deploy_prometheus import dashboard_exprs

RULES = ROOT / 'deploy' / 'prometheus'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def prometheus(live_server, tmp_path_factory):
    binary = systool('prometheus')
    tmp = tmp_path_factory.mktemp('prometheus')
    # the same rules, evaluated every second instead of every 30 s
    files = []
    for p in sorted(RULES.glob('*.rules.yml')):
        doc = yaml.safe_load(p.read_text())
        for g in doc['groups']:
            g['interval'] = '1s'
        (tmp / p.name).write_text(yaml.safe_dump(doc))
        files.append(str(tmp / p.name))
    port = free_port()
    cfg = {'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'},
           'rule_files': files,
           'scrape_configs': [{'job_name': 'akidb-bridge', 'metrics_path': '/metrics',
                               'static_configs': [{'targets': [
                                   f'127.0.0.1:{live_server.probe_port}']}]}]}
    (tmp / 'prometheus.yml').write_text(yaml.safe_dump(cfg))
    log = open(tmp / 'prometheus.log', 'wb')
    proc = subprocess.Popen([binary, f'--config.file={tmp}/prometheus.yml',
                             f'--storage.tsdb.path={tmp}/data',
                             f'--web.listen-address=127.0.0.1:{port}'],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        t0 = time.monotonic()
        while True:
            try:
                if requests.get(url + '/-/ready', timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 30, \
                (tmp / 'prometheus.log').read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp / 'data', ignore_errors=True)


def query(url, expr):
    r = requests.get(url + '/api/v1/query', params={'query': expr}, timeout=10).json()
    assert r['status'] == 'success', (expr, r)
    return r['data']['result']


def wait_for(url, expr, pred, timeout=30):
    t0 = time.monotonic()
    while True:
        res = query(url, expr)
        if pred(res):
            return res
        assert time.monotonic() - t0 < timeout, f'{expr}: {res}'
        time.sleep(0.5)


def test_prometheus_scrapes_the_service_and_a_rule_evaluates(live_server, prometheus):
    wait_for(prometheus, 'up{job="akidb-bridge"}', lambda r: r and r[0]['value'][1] == '1')
    # traffic between scrapes, so rate() over the window is positive
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert live_server.embed(['a robot counts its requests']) == 200
        time.sleep(0.2)
    res = wait_for(prometheus, 'akidb:requests:rate5m',
                   lambda r: r and float(r[0]['value'][1]) > 0)
    assert float(res[0]['value'][1]) > 0
    by_transport = wait_for(prometheus, 'akidb:requests_by_transport:rate5m',
                            lambda r: any(s['metric'].get('transport') == 'rest' for s in r))
    assert by_transport
    # one MODEL_NOT_FOUND from the fixture: counted as an error, not as a server-side failure
    codes = wait_for(prometheus, 'akidb:errors_by_code:rate5m', lambda r: True)
    assert all(s['metric']['code'] in ('MODEL_NOT_FOUND',) for s in codes), codes
    ratio = wait_for(prometheus, 'akidb:slo_error_ratio:rate5m', lambda r: bool(r))
    assert float(ratio[0]['value'][1]) == 0.0
    p95 = wait_for(prometheus, 'akidb:latency_seconds:p95_5m',
                   lambda r: r and r[0]['value'][1] not in ('NaN',))
    assert 0 < float(p95[0]['value'][1]) < 5


def test_all_rules_load_and_evaluate_without_error(prometheus):
    time.sleep(2)
    groups = requests.get(prometheus + '/api/v1/rules', timeout=10).json()['data']['groups']
    rules = [r for g in groups for r in g['rules']]
    assert len(rules) >= 40
    bad = [(r['name'], r.get('lastError')) for r in rules if r.get('health') != 'ok']
    assert not bad, bad
    firing = [r['name'] for r in rules if r['type'] == 'alerting' and r['state'] == 'firing']
    assert 'AkidbTargetDown' not in firing and 'AkidbBackendDown' not in firing


def test_every_dashboard_query_runs_in_prometheus(prometheus, live_server):
    subst = {'$__rate_interval': '1m', '$__range': '5m', '$job': '.*', '$instance': '.*'}
    empty = []
    for expr in dashboard_exprs():
        if expr.startswith('label_values('):
            m = re.match(r'label_values\((.*),\s*(\w+)\)$', expr)
            expr = m.group(1).replace('$job', '.*')
        for k, v in subst.items():
            expr = expr.replace(k, v)
        if not query(prometheus, expr):
            empty.append(expr)
    # series that exist on a CPU box with traffic must return data
    for must in ('akidb_embed_requests_total', 'akidb_embed_latency_seconds_bucket',
                 'akidb_queue_capacity', 'akidb_model_cache_size'):
        assert not any(must in e and 'histogram_quantile' not in e and 'increase' not in e
                       for e in empty), (must, empty)
    # the rest may be empty here (no GPU, no breaker trip, no shedding) but every query parsed
