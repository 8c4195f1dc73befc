"""The Helm chart (issue 7 §2): helm lint + template for every values file (Helm's Go SDK),
offline Kubernetes schema validation, checkov, and the chart's promises read from the rendered
manifests; the rendered node parameters and security profile go through the project's own
validators."""
import pytest
import yaml

from deploy_support import (CHART, ROOT, VALUES, checkov_summary, docs, dpython, dtool, render,
                            run)


def by_kind(values):
    out = {}
    for d in docs(values):
        out.setdefault(d['kind'], []).append(d)
    return out


def deployment(values):
    return by_kind(values)['Deployment'][0]


def containers(values):
    return {c['name']: c for c in deployment(values)['spec']['template']['spec']['containers']}


@pytest.mark.parametrize('values', VALUES)
def test_helm_lint_strict(values):
    dpython()
    cp = run([str(ROOT / 'scripts/helm'), 'lint', str(CHART), '-f', str(CHART / values),
              '--strict'])
    assert '0 chart(s) failed' in cp.stdout


def test_helm_lint_fails_on_a_broken_template(tmp_path):
    import shutil
    dpython()
    bad = tmp_path / 'akidb-ros'
    shutil.copytree(CHART, bad)
    (bad / 'templates' / 'broken.yaml').write_text('kind: {{ .Values.nope.deeper }}\n')
    cp = run([str(ROOT / 'scripts/helm'), 'lint', str(bad), '--strict'], check=False)
    assert cp.returncode == 1 and 'ERROR' in cp.stdout, cp.stdout


@pytest.mark.parametrize('values', VALUES)
def test_rendered_manifests_match_kubernetes_schemas(values, tmp_path):
    kv = dtool('kubernetes-validate')
    f = tmp_path / 'rendered.yaml'
    f.write_text(render(values))
    cp = run([kv, '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.count('passed for resource') == len(docs(values))


def test_schema_validation_is_strict(tmp_path):
    """An unknown field in a container fails kubernetes-validate --strict."""
    kv = dtool('kubernetes-validate')
    d = deployment('values-cpu.yaml')
    d['spec']['template']['spec']['containers'][0]['readinessProbes'] = {}
    f = tmp_path / 'bad.yaml'
    f.write_text(yaml.safe_dump(d))
    cp = run([kv, '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode != 0 and 'readinessProbes' in cp.stdout + cp.stderr


@pytest.mark.parametrize('values', VALUES)
def test_checkov_no_failed_check(values, tmp_path):
    checkov = dtool('checkov')
    (tmp_path / 'rendered.yaml').write_text(render(values))
    cp = run([checkov, '--config-file', 'deploy/checkov.yaml', '-d', str(tmp_path),
              '--framework', 'kubernetes', '-o', 'json'], check=False, timeout=300)
    summary, failed = checkov_summary(cp.stdout)
    assert summary['passed'] > 80 and summary['failed'] == 0, (summary, failed)


@pytest.mark.parametrize('values', VALUES)
def test_every_required_object_is_rendered(values):
    kinds = {k: len(v) for k, v in by_kind(values).items()}
    for kind in ('Deployment', 'ConfigMap', 'PersistentVolumeClaim', 'PodDisruptionBudget',
                 'NetworkPolicy', 'ServiceAccount', 'Role', 'RoleBinding'):
        assert kinds.get(kind), f'{kind} missing'
    assert kinds['Service'] == 3 and kinds['PersistentVolumeClaim'] == 2
    svc_ports = {s['metadata']['name'].rsplit('-', 1)[1]: [p['port'] for p in s['spec']['ports']]
                 for s in by_kind(values)['Service']}
    assert svc_ports == {'rest': [8080], 'grpc': [9090], 'metrics': [9100, 8081]}
    metrics = next(x for x in by_kind(values)['Service'] if x['metadata']['name'].endswith(
        '-metrics'))
    # the bridge's door metrics are scraped from its plain-HTTP probe port, not the REST door
    assert {p['name']: p['targetPort'] for p in metrics['spec']['ports']} == {
        'metrics': 'metrics', 'http-metrics': 'probe'}
    if values != 'values-jetson.yaml':
        hpa = by_kind(values)['HorizontalPodAutoscaler'][0]
        assert hpa['spec']['scaleTargetRef']['name'] == deployment(values)['metadata']['name']
    for d in docs(values):
        assert d['metadata']['namespace'] == 'akidb'


@pytest.mark.parametrize('values', VALUES)
def test_node_and_bridge_are_sidecars_with_probes_and_drain(values):
    dep = deployment(values)
    c = containers(values)
    assert set(c) == {'node', 'bridge'}
    assert 'akidb_ros.ros.node' in c['node']['args']
    assert c['bridge']['args'][:5] == ['python3', '-m', 'akidb_ros.server', '--mode', 'sidecar']
    for name in ('node', 'bridge'):
        for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
            assert probe in c[name], f'{name} {probe}'
        assert c[name]['lifecycle']['preStop']['exec']['command'][0] == 'sleep'
        assert c[name]['resources']['limits'] and c[name]['resources']['requests']
    assert c['bridge']['readinessProbe']['httpGet']['path'] == '/health/ready'
    # the bridge's probes use the plain-HTTP probe port: the REST door may want TLS 1.3, a
    # client certificate and a key, none of which kubelet has
    ports = {p['name']: p['containerPort'] for p in c['bridge']['ports']}
    assert ports == {'http': 8080, 'grpc': 9090, 'probe': 8081}
    env = {e['name']: e.get('value') for e in c['bridge']['env']}
    assert env['AKIDB_PROBE_PORT'] == str(ports['probe'])
    for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
        get = c['bridge'][probe]['httpGet']
        assert (get['port'], get['scheme']) == ('probe', 'HTTP'), (probe, get)
    strategy = dep['spec']['strategy']
    assert strategy['type'] == 'RollingUpdate'
    assert strategy['rollingUpdate']['maxUnavailable'] == 0
    assert strategy['rollingUpdate']['maxSurge'] >= 1
    spec = dep['spec']['template']['spec']
    drain = int(c['node']['lifecycle']['preStop']['exec']['command'][1])
    assert spec['terminationGracePeriodSeconds'] > drain + 20, 'drain + graceful stop fit'


@pytest.mark.parametrize('values', VALUES)
def test_security_context_and_secret_references(values):
    spec = deployment(values)['spec']['template']['spec']
    assert spec['securityContext']['runAsNonRoot'] is True
    assert spec['automountServiceAccountToken'] is False
    for c in spec['containers']:
        sc = c['securityContext']
        assert sc['runAsNonRoot'] and sc['runAsUser'] >= 10000
        assert sc['readOnlyRootFilesystem'] is True
        assert sc['allowPrivilegeEscalation'] is False
        assert sc['capabilities']['drop'] == ['ALL']
    vols = {v['name']: v for v in spec['volumes']}
    assert vols['api-keys']['secret']['secretName'] == 'akidb-api-keys'
    assert vols['models']['persistentVolumeClaim']['readOnly'] is True
    assert 'persistentVolumeClaim' in vols['trt-cache']
    # no Secret object is created by the chart: keys and certificates are references only
    assert 'Secret' not in by_kind(values)


def test_gpu_and_jetson_scheduling():
    cpu = containers('values-cpu.yaml')['node']['resources']['limits']
    assert 'nvidia.com/gpu' not in cpu
    for values in ('values-gpu.yaml', 'values-jetson.yaml'):
        spec = deployment(values)['spec']['template']['spec']
        node = {c['name']: c for c in spec['containers']}['node']
        assert node['resources']['limits']['nvidia.com/gpu'] == 1
        assert spec['runtimeClassName'] == 'nvidia'
        assert spec['nodeSelector']['nvidia.com/gpu.present'] == 'true'
        assert {'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'} \
            in spec['tolerations']
    assert deployment('values-jetson.yaml')['spec']['template']['spec']['nodeSelector'][
        'kubernetes.io/arch'] == 'arm64'


def test_network_policy_default_denies_and_opens_only_the_doors():
    np_ = by_kind('values-cpu.yaml')['NetworkPolicy'][0]['spec']
    assert set(np_['policyTypes']) == {'Ingress', 'Egress'}
    ports = sorted(p['port'] for rule in np_['ingress'] for p in rule['ports'])
    assert ports == ['grpc', 'http', 'metrics', 'probe']
    # monitoring reaches the node's metrics and the bridge's probe port, not the REST door
    monitoring = next(r for r in np_['ingress'] if 'namespaceSelector' in r['from'][0])
    assert sorted(p['port'] for p in monitoring['ports']) == ['metrics', 'probe']
    egress_ports = sorted(p['port'] for rule in np_['egress'] for p in rule['ports'])
    assert egress_ports == [53, 53]


def test_network_policy_probe_sources_open_only_the_probe_port(tmp_path):
    """networkPolicy.probeSources (for CNIs that police kubelet traffic) adds one rule for the
    probe port, and the result still matches the Kubernetes schemas."""
    kv = dtool('kubernetes-validate')
    extra = tmp_path / 'probe-sources.yaml'
    extra.write_text(yaml.safe_dump({'networkPolicy': {'probeSources': [
        {'ipBlock': {'cidr': '10.0.0.0/16'}}]}}))
    cp = run([str(ROOT / 'scripts/helm'), 'template', 'akidb', str(CHART), '-f',
              str(CHART / 'values-cpu.yaml'), '-f', str(extra), '-n', 'akidb'])
    np_ = next(d for d in yaml.safe_load_all(cp.stdout) if d and d['kind'] == 'NetworkPolicy')
    rule = np_['spec']['ingress'][-1]
    assert rule == {'from': [{'ipBlock': {'cidr': '10.0.0.0/16'}}],
                    'ports': [{'port': 'probe', 'protocol': 'TCP'}]}
    f = tmp_path / 'rendered.yaml'
    f.write_text(cp.stdout)
    cp = run([kv, '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize('values', VALUES)
def test_rendered_node_parameters_are_valid_node_parameters(values):
    """params.yaml from the ConfigMap vs the node's own declarations (akidb_ros.ros.params)."""
    from akidb_ros.ros import params as P
    cm = by_kind(values)['ConfigMap'][0]
    doc = yaml.safe_load(cm['data']['params.yaml'])
    seen = dict(P.flatten(doc['/**']['ros__parameters']))
    assert seen['metrics_port'] == 9100 and seen['metrics_address'] == '0.0.0.0'
    for name, value in seen.items():
        spec = P.PARAMS_BY_NAME.get(name)
        assert spec is not None, f'{name} is not a node parameter'
        assert type(value) is type(spec.default), f'{name}: {value!r} is not {type(spec.default)}'
        if spec.range:
            assert spec.range[0] <= value <= spec.range[1], name
        assert P.validate_value(name, value) is None, name


@pytest.mark.parametrize('values', VALUES)
def test_rendered_security_profile_passes_the_guard_validator(values):
    from akidb_ros.guard import config as G
    cm = by_kind(values)['ConfigMap'][0]
    doc = yaml.safe_load(cm['data']['security.yaml'])
    cfg = G.from_dict(doc['security'], base_dir='/', source=f'chart {values}')
    assert cfg.auth_enabled, 'a Pod IP is not loopback: the chart must enable authentication'
    G.check_bind(cfg, '0.0.0.0')


def test_security_validator_rejects_a_typo():
    from akidb_ros.guard import config as G
    with pytest.raises(G.SecurityConfigError):
        G.from_dict({'auth': {'enabled': True, 'api_kyes': {}}}, base_dir='/')


def test_values_files_only_use_keys_the_chart_knows():
    base = yaml.safe_load((CHART / 'values.yaml').read_text())

    def walk(over, ref, path):
        for k, v in over.items():
            assert k in ref, f'{path}{k} is not in values.yaml'
            if isinstance(v, dict) and isinstance(ref[k], dict) and ref[k]:
                walk(v, ref[k], f'{path}{k}.')

    for values in VALUES:
        walk(yaml.safe_load((CHART / values).read_text()), base, f'{values}: ')
