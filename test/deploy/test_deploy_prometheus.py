"""Alert + SLO rules (promtool check/test), runbook links, and every metric the rules and the
Grafana dashboard query against the live /metrics of a running server."""
import json
import re

import yaml

from deploy_support import (ROOT, families_from_exposition, metric_names_in, recorded_names_in,
                            run, sample_names, systool)

RULES = ROOT / 'deploy' / 'prometheus'
DASHBOARD = ROOT / 'deploy' / 'grafana' / 'akidb-ros.json'
RUNBOOKS = ROOT / 'docs' / 'operations' / 'runbooks'


def rule_docs():
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(RULES.glob('*.rules.yml'))}


def all_rules():
    for doc in rule_docs().values():
        for g in doc['groups']:
            yield from g['rules']


def alerts():
    return [r for r in all_rules() if 'alert' in r]


def recorded():
    return {r['record'] for r in all_rules() if 'record' in r}


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash['panels']:
        for t in p.get('targets', []):
            out.append(t['expr'])
    for v in dash['templating']['list']:
        if v.get('type') == 'query':
            out.append(v['definition'])
    return out


def test_promtool_check_rules():
    promtool = systool('promtool')
    cp = run([promtool, 'check', 'rules', *map(str, sorted(RULES.glob('*.rules.yml')))])
    assert cp.stdout.count('SUCCESS') == 2


def test_promtool_unit_tests():
    promtool = systool('promtool')
    cp = run([promtool, 'test', 'rules', str(RULES / 'tests' / 'akidb-rules.test.yml')])
    assert 'SUCCESS' in cp.stdout


def test_promtool_unit_tests_can_fail(tmp_path):
    """Flip one expected value: the same test file must then fail."""
    promtool = systool('promtool')
    text = (RULES / 'tests' / 'akidb-rules.test.yml').read_text()
    assert 'value: 0.05' in text
    (tmp_path / 'tests').mkdir()
    for p in RULES.glob('*.rules.yml'):
        (tmp_path / p.name).write_text(p.read_text())
    bad = tmp_path / 'tests' / 'bad.test.yml'
    bad.write_text(text.replace('value: 0.05', 'value: 0.5', 1))
    cp = run([promtool, 'test', 'rules', str(bad)], check=False)
    assert cp.returncode != 0 and 'FAILED' in cp.stdout + cp.stderr


def test_slo_targets_are_encoded():
    text = (RULES / 'akidb-alerts.rules.yml').read_text()
    assert '14.4 * 0.001' in text and '6 * 0.001' in text      # 99.9 %, multi-window burn
    assert 'p95_5m > 0.030' in text                              # p95 < 30 ms
    assert 'error_ratio:rate5m > 0.001' in text                  # error rate < 0.1 %
    windows = {r.split(':rate')[-1] for r in recorded() if r.startswith('akidb:slo_error_ratio:')}
    assert windows == {'5m', '30m', '1h', '6h', '1d', '3d'}


def test_error_rate_alert_follows_the_prd():
    """AkidbErrorRateHigh is the Week 6 PRD's ErrorRateSLOViolation: > 0.1 %, for 2m,
    critical; its runbook says why it keeps a traffic guard the PRD's rule does not have."""
    rule = next(a for a in alerts() if a['alert'] == 'AkidbErrorRateHigh')
    assert rule['labels']['severity'] == 'critical' and rule['for'] == '2m'
    assert 'akidb:error_ratio:rate5m > 0.001' in rule['expr']
    runbook = (RUNBOOKS / 'AkidbErrorRateHigh.md').read_text()
    assert '**Severity:** critical' in runbook and 'for 2 minutes' in runbook
    if 'akidb:requests:rate5m' in rule['expr']:
        assert 'Why the traffic guard' in runbook


def test_runbook_index_and_runbooks_carry_the_rules_severity():
    """The index table and each runbook's **Severity:** line say what the rule's label says."""
    index = (RUNBOOKS / 'README.md').read_text()
    for a in alerts():
        sev = a['labels']['severity']
        row = re.search(r'^\| \[' + a['alert'] + r'\]\([^)]*\) \| ([a-z]+)', index, re.M)
        assert row and row.group(1) == sev, (a['alert'], sev, row and row.group(0))
        head = (RUNBOOKS / f"{a['alert']}.md").read_text()
        assert re.search(r'\*\*Severity:\*\* ' + sev + r'\b', head), (a['alert'], sev)


def test_at_least_ten_alerts_each_with_its_runbook():
    names = [a['alert'] for a in alerts()]
    assert len(names) >= 10 and len(set(names)) == len(names)
    for a in alerts():
        ann = a['annotations']
        assert ann['runbook_url'] == f"docs/operations/runbooks/{a['alert']}.md", a['alert']
        assert (ROOT / ann['runbook_url']).is_file(), ann['runbook_url']
        assert a['labels']['severity'] in ('critical', 'warning', 'info')
        assert ann['summary'] and ann['description']
    runbooks = {p.stem for p in RUNBOOKS.glob('*.md')} - {'README'}
    assert runbooks == set(names), 'one runbook per alert, no orphans'
    index = (RUNBOOKS / 'README.md').read_text()
    for n in names:
        assert f'({n}.md)' in index


def test_runbook_links_resolve():
    for md in RUNBOOKS.glob('*.md'):
        for target in re.findall(r'\]\(([^)#]+\.md)\)', md.read_text()):
            assert (md.parent / target).is_file(), f'{md.name} -> {target}'


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash['uid'] == 'akidb-ros' and dash['schemaVersion'] >= 36
    ids = [p['id'] for p in dash['panels']]
    assert len(ids) == len(set(ids))
    for p in dash['panels']:
        if p['type'] == 'row':
            continue
        assert p['datasource']['uid'] == '${datasource}', p['title']
        assert p['targets'], p['title']
        g = p['gridPos']
        assert 0 <= g['x'] and g['x'] + g['w'] <= 24, p['title']


def test_every_recording_rule_used_by_dashboard_or_alerts_exists():
    used = set()
    for e in dashboard_exprs() + [a['expr'] for a in alerts()]:
        used |= recorded_names_in(e)
    assert used and used <= recorded(), used - recorded()


def test_every_queried_metric_is_exported_by_the_live_service(live_server):
    """Dashboard + rules vs a real server's /metrics (families registered and exposed)."""
    families = families_from_exposition(live_server.metrics())
    exported = sample_names(families)
    queried = set()
    for e in dashboard_exprs() + [r['expr'] for r in all_rules()]:
        queried |= metric_names_in(e)
    assert len(queried) >= 20
    missing = sorted(queried - exported)
    assert not missing, f'queried but not exported: {missing}'
    # and the dashboard covers the request, latency, queue, model and accelerator families
    dash_metrics = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    for fam in ('akidb_embed_requests_total', 'akidb_embed_latency_seconds_bucket',
                'akidb_queue_size', 'akidb_model_cache_hits_total', 'akidb_batch_size_bucket',
                'akidb_gpu_memory_used_bytes', 'akidb_circuit_breaker_state'):
        assert fam in dash_metrics, fam


def test_live_metrics_carry_the_labels_the_rules_aggregate_by(live_server):
    text = live_server.metrics()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('akidb_embed_requests_total{'))
    for label in ('model=', 'transport=', 'status='):
        assert label in line, line
    assert re.search(r'akidb_request_errors_total\{[^}]*code="MODEL_NOT_FOUND"', text)
    assert re.search(r'akidb_embed_latency_seconds_bucket\{[^}]*le="0.025"', text)
