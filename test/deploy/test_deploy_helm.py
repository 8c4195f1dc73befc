"""The Helm chart (issue 7 §2): helm lint + template for every values file (Helm's Go SDK),
offline Kubernetes schema validation, checkov, and the chart's promises read from the rendered
manifests; the rendered node parameters and security profile go through the project's own
validators."""
import itertools
import json
import ssl
from pathlib import Path

import pytest
import yaml

from deploy_support import (CHART, JWT_ISSUER, ROOT, VALUES, SecurityMaterial, checkov_summary,
                            docs, dpython, dtool, paths_in_use, render, run, security_paths,
                            start_guard)


# PVCs rendered per values file (models + TensorRT cache); Jetson uses per-Jetson folders
PVCS = {'values-cpu.yaml': 2, 'values-gpu.yaml': 2, 'values-jetson.yaml': 0}
HOSTNAME = 'kubernetes.io/hostname'


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
    for kind in ('Deployment', 'ConfigMap', 'PodDisruptionBudget', 'NetworkPolicy',
                 'ServiceAccount', 'Role', 'RoleBinding'):
        assert kinds.get(kind), f'{kind} missing'
    assert kinds['Service'] == 3
    # models + TensorRT cache claims; Jetson: a folder on each Jetson instead (hostPath)
    assert kinds.get('PersistentVolumeClaim', 0) == PVCS[values]
    for pvc in by_kind(values).get('PersistentVolumeClaim', []):
        assert pvc['metadata']['annotations']['helm.sh/resource-policy'] == 'keep'
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
    assert {k: spec['securityContext'][k] for k in ('runAsUser', 'runAsGroup', 'fsGroup')} == {
        'runAsUser': 1000, 'runAsGroup': 1000, 'fsGroup': 1000}
    assert spec['automountServiceAccountToken'] is False
    for c in spec['containers']:
        sc = c['securityContext']
        # the PRD's user: akidb, UID 1000 (what the images create and USER names)
        assert sc['runAsNonRoot'] and (sc['runAsUser'], sc['runAsGroup']) == (1000, 1000)
        assert sc['readOnlyRootFilesystem'] is True
        assert sc['allowPrivilegeEscalation'] is False
        assert sc['capabilities']['drop'] == ['ALL']
    vols = {v['name']: v for v in spec['volumes']}
    assert vols['api-keys']['secret']['secretName'] == 'akidb-api-keys'
    node = {c['name']: c for c in spec['containers']}['node']
    mounts = {m['name']: m for m in node['volumeMounts']}
    assert mounts['models']['readOnly'] is True and not mounts['trt-cache'].get('readOnly')
    if PVCS[values]:
        assert vols['models']['persistentVolumeClaim']['readOnly'] is True
        assert 'persistentVolumeClaim' in vols['trt-cache']
    else:
        # must already exist on the node (not created root-owned, unwritable for UID 1000)
        assert vols['models']['hostPath'] == {'path': '/opt/akidb/models', 'type': 'Directory'}
        assert vols['trt-cache']['hostPath'] == {'path': '/var/cache/akidb', 'type': 'Directory'}
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


def unschedulable_volumes(rendered: list) -> list:
    """The volumes that keep replicas Pending or ContainerCreating: with more than one replica
    (replicas, or the HPA's minReplicas) that must run on different nodes (a hostname topology
    spread with DoNotSchedule, or required pod anti-affinity on the hostname), every volume must
    be one each node can mount: a hostPath, an existingClaim (not rendered: the operator's), or a
    claim many nodes can attach (ReadWriteMany; ReadOnlyMany mounted read-only). A rendered
    ReadWriteOnce claim is one volume on one node for all replicas."""
    kinds = {}
    for d in rendered:
        kinds.setdefault(d['kind'], []).append(d)
    dep = kinds['Deployment'][0]
    spec = dep['spec']['template']['spec']
    replicas = max([dep['spec'].get('replicas', 1)] + [
        h['spec'].get('minReplicas', 1) for h in kinds.get('HorizontalPodAutoscaler', [])])
    anti = ((spec.get('affinity') or {}).get('podAntiAffinity') or {}).get(
        'requiredDuringSchedulingIgnoredDuringExecution') or []
    one_per_node = any(c['topologyKey'] == HOSTNAME and c['whenUnsatisfiable'] == 'DoNotSchedule'
                       for c in spec.get('topologySpreadConstraints') or []) or any(
        t['topologyKey'] == HOSTNAME for t in anti)
    if replicas < 2 or not one_per_node:
        return []
    claims = {c['metadata']['name']: c for c in kinds.get('PersistentVolumeClaim', [])}
    bad = []
    for vol in spec['volumes']:
        pvc = vol.get('persistentVolumeClaim')
        if pvc is None or pvc['claimName'] not in claims:
            continue                # hostPath, emptyDir, Secret ...; or an existingClaim
        modes = set(claims[pvc['claimName']]['spec']['accessModes'])
        if 'ReadWriteMany' in modes or ('ReadOnlyMany' in modes and pvc.get('readOnly')):
            continue
        bad.append(f"{vol['name']}: claim {pvc['claimName']} {sorted(modes)} shared by "
                   f'{replicas} replicas on different nodes')
    return bad


@pytest.mark.parametrize('values', VALUES)
def test_every_values_file_can_schedule_its_replicas(values):
    """A shipped values file runs as written: replicas kept on different nodes do not share a
    claim only one node can attach (values-jetson.yaml's local-path claims once left the second
    Jetson's replica Pending)."""
    assert unschedulable_volumes(docs(values)) == []


def test_schedulability_check_catches_a_shared_node_local_claim(tmp_path):
    """The check above flags the shape values-jetson.yaml had: 2 replicas, one per Jetson, on
    ONE local-path claim of each kind; an existingClaim or ReadWriteMany passes."""
    def rendered(persistence):
        cp = render_with(tmp_path, {'persistence': persistence}, values='values-jetson.yaml')
        return [d for d in yaml.safe_load_all(cp.stdout) if d]
    local = {'hostPath': '', 'storageClass': 'local-path'}
    bad = unschedulable_volumes(rendered({'models': local, 'tensorrtCache': local}))
    assert [b.split(':')[0] for b in bad] == ['models', 'trt-cache'], bad
    assert unschedulable_volumes(rendered({
        'models': {'hostPath': '', 'existingClaim': 'models-nfs'},
        'tensorrtCache': {'hostPath': '', 'accessModes': ['ReadWriteMany']}})) == []


@pytest.mark.parametrize('extra', [[], ['--set', 'persistence.models.existingClaim=ignored',
                                        '--set', 'persistence.models.storageClass=ignored']],
                         ids=['hostpath', 'hostpath-wins-over-claim-settings'])
def test_models_host_path_replaces_the_models_claim(extra, tmp_path):
    """persistence.models.hostPath on the default values: the models volume is that folder
    (type Directory: it must exist), still mounted read-only, no models PVC is rendered, and
    the TensorRT cache keeps its claim; the result matches the Kubernetes schemas."""
    cp = run([str(ROOT / 'scripts/helm'), 'template', 'akidb', str(CHART), '-n', 'akidb',
              '--set', 'persistence.models.hostPath=/x', *extra])
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    pvcs = [d['metadata']['name'] for d in rendered if d['kind'] == 'PersistentVolumeClaim']
    assert pvcs == ['akidb-akidb-ros-trt-cache']
    spec = next(d for d in rendered if d['kind'] == 'Deployment')['spec']['template']['spec']
    vols = {v['name']: v for v in spec['volumes']}
    assert vols['models'] == {'name': 'models', 'hostPath': {'path': '/x', 'type': 'Directory'}}
    assert vols['trt-cache']['persistentVolumeClaim'] == {'claimName': pvcs[0]}
    node = {c['name']: c for c in spec['containers']}['node']
    mount = next(m for m in node['volumeMounts'] if m['name'] == 'models')
    assert mount == {'name': 'models', 'mountPath': '/opt/akidb/models', 'readOnly': True}
    f = tmp_path / 'rendered.yaml'
    f.write_text(cp.stdout)
    cp = run([dtool('kubernetes-validate'), '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


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
    assert 'intra_op_threads' in seen
    for name, value in seen.items():
        spec = P.PARAMS_BY_NAME.get(name)
        assert spec is not None, f'{name} is not a node parameter'
        assert type(value) is type(spec.default), f'{name}: {value!r} is not {type(spec.default)}'
        if spec.range:
            assert spec.range[0] <= value <= spec.range[1], name
        assert P.validate_value(name, value) is None, name


@pytest.fixture(scope='module')
def material(tmp_path_factory):
    return SecurityMaterial(tmp_path_factory.mktemp('security-material'))


def render_with(tmp_path, extra: dict, values: str = 'values-cpu.yaml', check: bool = True):
    """`helm template` with a values file and ``extra`` on top (as a second -f file)."""
    f = tmp_path / 'extra-values.yaml'
    f.write_text(yaml.safe_dump(extra))
    return run([str(ROOT / 'scripts/helm'), 'template', 'akidb', str(CHART), '-f',
                str(CHART / values), '-f', str(f), '-n', 'akidb'], check=check)


def boot_rendered_profile(rendered: list, tmp_path, monkeypatch, material):
    """The rendered security.yaml as the bridge container sees it: every file it names must be
    in a volume the bridge mounts (the root filesystem is read-only): Secrets for what it reads,
    a writable volume for the audit log. The Pod's files are laid out under tmp_path (a real
    key file, JWKS, certificate, key and CA at the paths the profile names) and the profile is
    loaded the way the server loads it (start_guard)."""
    cm = next(d for d in rendered if d['kind'] == 'ConfigMap')
    dep = next(d for d in rendered if d['kind'] == 'Deployment')
    spec = dep['spec']['template']['spec']
    bridge = next(c for c in spec['containers'] if c['name'] == 'bridge')
    env = {e['name']: e.get('value') for e in bridge['env']}
    mounts = bridge['volumeMounts']
    volumes = {v['name']: v for v in spec['volumes']}
    cfg_mount = next(m for m in mounts if env['AKIDB_SECURITY_CONFIG'].startswith(
        m['mountPath'] + '/'))
    assert volumes[cfg_mount['name']]['configMap']['name'] == cm['metadata']['name']
    text = cm['data']['security.yaml']
    section = yaml.safe_load(text)['security']
    pod = tmp_path / 'pod'
    for key, path in security_paths(section).items():
        assert path.startswith('/'), (key, path)
        text = text.replace(path, str(pod) + path)
    conf = pod / env['AKIDB_SECURITY_CONFIG'].lstrip('/')
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)
    from akidb_ros.guard import config as G
    used = paths_in_use(G.load(str(conf), env={}))
    for key, path in used.items():
        in_pod = path[len(str(pod)):]
        mount = next((m for m in mounts if in_pod.startswith(m['mountPath'] + '/')), None)
        assert mount is not None, f'{".".join(key)} {in_pod} is in no volume of the bridge'
        vol = volumes[mount['name']]
        if key == ('audit', 'file'):
            writable = 'emptyDir' in vol or 'persistentVolumeClaim' in vol
            assert writable and not mount.get('readOnly'), (in_pod, mount, vol)
        else:
            assert 'secret' in vol and mount.get('readOnly'), (in_pod, mount, vol)
        material.place(key, Path(path))
    return start_guard(conf, monkeypatch, host=env['AKIDB_HOST'])


def prod_rate_limit():
    from akidb_ros.guard import config as G
    return G.load(str(ROOT / 'config/security.prod.yaml'), env={})['rate_limit']


@pytest.mark.parametrize('values', VALUES)
def test_rendered_security_profile_starts_the_guard(values, tmp_path, monkeypatch, material):
    cfg, guard, _ = boot_rendered_profile(docs(values), tmp_path, monkeypatch, material)
    assert cfg.auth_enabled, 'a Pod IP is not loopback: the chart must enable authentication'
    assert cfg['rate_limit'] == prod_rate_limit()
    guard.audit.close()


SWITCHES = list(itertools.product((False, True), repeat=4))


def _switch_id(sw):
    names = ('keys', 'jwks', 'tls', 'clientcert')
    return '+'.join(n for n, on in zip(names, sw) if on) or 'none'


@pytest.mark.parametrize('keys,jwks,tls,client_cert', SWITCHES, ids=map(_switch_id, SWITCHES))
def test_every_security_switch_combination_renders_a_profile_the_server_starts_with(
        keys, jwks, tls, client_cert, tmp_path, monkeypatch, material):
    """security.apiKeysSecret x jwksSecret x tlsSecret x requireClientCert: the chart either
    refuses at render time with the reason, or renders a profile that the server's own loader,
    bind check, Guard and TLS context accept with real files at the mounted paths, and that
    serves what was switched on (an API key, an RS256 token of the configured issuer, TLS 1.3
    with or without client certificates), with config/security.prod.yaml's rate limits."""
    from akidb_ros.guard import Credentials
    from akidb_ros.guard.jwt import issue_token
    cp = render_with(tmp_path, {'security': {
        'apiKeysSecret': 'akidb-api-keys' if keys else '',
        'jwksSecret': 'akidb-jwks' if jwks else '',
        'jwtIssuer': JWT_ISSUER if jwks else '',
        'tlsSecret': 'akidb-tls' if tls else '',
        'requireClientCert': client_cert}}, check=False)
    if client_cert and not tls:
        assert cp.returncode == 1, cp.stdout[-500:]
        assert 'security.requireClientCert needs security.tlsSecret' in cp.stderr, cp.stderr
        return
    if not (keys or jwks or (tls and client_cert)):
        assert cp.returncode == 1, cp.stdout[-500:]
        assert 'needs a way to authenticate' in cp.stderr, cp.stderr
        return
    assert cp.returncode == 0, cp.stderr
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    cfg, guard, ctx = boot_rendered_profile(rendered, tmp_path, monkeypatch, material)
    try:
        a = cfg['auth']
        assert a['enabled']
        assert (a['api_keys']['enabled'], a['jwt']['enabled'], a['mtls']['enabled']) == (
            keys, jwks, tls and client_cert)
        assert cfg.tls_enabled is tls and (ctx is not None) is tls
        if tls:
            assert cfg['tls']['require_client_cert'] is client_cert
            # the client CA only with mTLS: a plain TLS secret (kubectl create secret tls)
            # has no ca.crt
            assert bool(cfg['tls']['ca_file']) is client_cert
            assert (ctx.context.verify_mode == ssl.CERT_REQUIRED) is client_cert
        assert cfg['rate_limit'] == prod_rate_limit()
        assert {r: (b.rate, b.burst) for r, b in guard.limiter.settings.roles.items()} == {
            'admin': (500, 100), 'viewer': (10, 2)}
        if keys:
            d = guard.check('POST /api/v1/embed', Credentials(api_key=material.api_key),
                            transport='rest')
            assert d.identity.role.value == 'developer'
        if jwks:
            token = issue_token(material.jwt_key, subject='robot-2', role='developer',
                                issuer=JWT_ISSUER, audience='akidb', kid='k1')
            d = guard.check('POST /api/v1/embed', Credentials(bearer=token), transport='rest')
            assert d.identity.subject == 'robot-2'
    finally:
        guard.audit.close()


@pytest.mark.parametrize('extra,reason', [
    ({'security': {'jwksSecret': 'akidb-jwks'}},
     'security.jwtIssuer is required with security.jwksSecret'),
    ({'security': {'jwksSecret': 'akidb-jwks', 'jwtIssuer': JWT_ISSUER, 'jwtAudience': ''}},
     'security.jwtAudience is required with security.jwksSecret'),
    ({'security': {'profile': 'dev'}}, 'the chart renders the prod profile only'),
    ({'persistence': {'tensorrtCache': {'enabled': False, 'hostPath': '/var/cache/akidb'}}},
     'persistence.tensorrtCache.hostPath needs persistence.tensorrtCache.enabled'),
], ids=['jwks-without-issuer', 'jwks-without-audience', 'dev-profile', 'hostpath-disabled'])
def test_chart_refuses_a_profile_the_server_would_refuse(extra, reason, tmp_path):
    cp = render_with(tmp_path, extra, check=False)
    assert cp.returncode == 1 and reason in cp.stderr, cp.stderr


def test_chart_rate_limits_follow_values(tmp_path, monkeypatch, material):
    """security.rateLimit.roles adds a role's bucket; null drops a default override."""
    cp = render_with(tmp_path, {'security': {'rateLimit': {'roles': {
        'viewer': None, 'developer': {'rate': 50, 'burst': 5}}}}})
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    cfg, guard, _ = boot_rendered_profile(rendered, tmp_path, monkeypatch, material)
    guard.audit.close()
    assert cfg['rate_limit']['roles'] == {'admin': {'rate': 500, 'burst': 100},
                                          'developer': {'rate': 50, 'burst': 5}}


def test_security_validator_rejects_a_typo():
    from akidb_ros.guard import config as G
    with pytest.raises(G.SecurityConfigError):
        G.from_dict({'auth': {'enabled': True, 'api_kyes': {}}}, base_dir='/')


SCHEMA = CHART / 'values.schema.json'


def _merged_values(values):
    def merge(base, over):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(
                out.get(k), dict) else v
        return out
    base = yaml.safe_load((CHART / 'values.yaml').read_text())
    return merge(base, yaml.safe_load((CHART / values).read_text()) if values else {})


def test_values_schema_covers_every_key_and_rejects_unknown_ones():
    """values.yaml promises that values.schema.json checks every key: the schema is draft-07
    (what Helm reads), values.yaml and each shipped values file (merged as Helm merges them)
    pass it, every key of values.yaml is declared, and every mapping the schema lists key by
    key refuses keys it does not list."""
    import jsonschema
    schema = json.loads(SCHEMA.read_text())
    assert schema['$schema'] == 'http://json-schema.org/draft-07/schema#'
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for values in (None, *VALUES):
        errors = [f'{"/".join(map(str, e.absolute_path))}: {e.message}'
                  for e in validator.iter_errors(_merged_values(values))]
        assert not errors, (values, errors)

    def resolve(node):
        while '$ref' in node:
            node = schema['definitions'][node['$ref'].rsplit('/', 1)[1]]
        return node

    def walk(value, node, path):
        node = resolve(node)
        if not isinstance(value, dict):
            return
        if 'properties' in node:
            assert node.get('additionalProperties') is False, f'{path or "/"} accepts any key'
        for k, v in value.items():
            sub = node.get('properties', {}).get(k)
            if sub is None:
                sub = node.get('additionalProperties')
                assert isinstance(sub, dict), f'{path}{k} is not in values.schema.json'
            walk(v, sub, f'{path}{k}.')

    walk(yaml.safe_load((CHART / 'values.yaml').read_text()), schema, '')


@pytest.mark.parametrize('cmd', ['template', 'lint'])
@pytest.mark.parametrize('setting,error', [
    ('device=gpu', "at '/device': value must be one of 'auto', 'cpu', 'cuda', 'tensorrt'"),
    ('security.profile=staging', "at '/security/profile': value must be one of"),
    ('logLevel=verbose', "at '/logLevel': value must be one of"),
    ('replicaCount=two', "at '/replicaCount': got string, want integer"),
    ('security.requireClientCert=yes', "at '/security/requireClientCert': got string, want"),
    ('bridge.restPortt=8080', "additional properties 'restPortt' not allowed"),
    ('securty.profile=prod', "additional properties 'securty' not allowed"),
    ('bridge.probePort=70000', "at '/bridge/probePort': maximum"),
    ('security.rateLimit.roles.robot.rate=1', "invalid propertyName 'robot'"),
    ('persistence.models.hostPath=opt/models', "at '/persistence/models/hostPath': 'opt/models'"),
], ids=['enum-typo', 'profile-typo', 'loglevel-typo', 'type-int', 'type-bool', 'unknown-key',
        'unknown-top-key', 'port-range', 'unknown-role', 'relative-hostpath'])
def test_values_schema_refuses_a_typo(cmd, setting, error):
    dpython()
    args = ['template', 'akidb'] if cmd == 'template' else ['lint']
    cp = run([str(ROOT / 'scripts/helm'), *args, str(CHART), '-f',
              str(CHART / 'values-cpu.yaml'), '--set', setting], check=False)
    assert cp.returncode == 1, (cp.stdout[-800:], cp.stderr[-800:])
    assert error in cp.stdout + cp.stderr, (cp.stdout[-800:], cp.stderr[-800:])


def test_values_files_only_use_keys_the_chart_knows():
    base = yaml.safe_load((CHART / 'values.yaml').read_text())

    def walk(over, ref, path):
        for k, v in over.items():
            assert k in ref, f'{path}{k} is not in values.yaml'
            if isinstance(v, dict) and isinstance(ref[k], dict) and ref[k]:
                walk(v, ref[k], f'{path}{k}.')

    for values in VALUES:
        walk(yaml.safe_load((CHART / values).read_text()), base, f'{values}: ')


# --- node parameters, OTLP egress, PodMonitor, the UID (deployment audit) ---------------------
def rendered_params(rendered: list) -> dict:
    cm = next(d for d in rendered if d['kind'] == 'ConfigMap')
    return yaml.safe_load(cm['data']['params.yaml'])['/**']['ros__parameters']


def test_intra_op_threads_is_a_chart_value():
    """node.params.intra_op_threads (akidb_ros.ros.params: int, -1..256, -1 = the engine YAML's
    value, 0 = one ONNX Runtime thread per core) is in values.yaml with the node's default, and
    every values file renders it into params.yaml as an integer."""
    from akidb_ros.ros import params as P
    spec = P.PARAMS_BY_NAME['intra_op_threads']
    base = yaml.safe_load((CHART / 'values.yaml').read_text())
    assert base['node']['params']['intra_op_threads'] == spec.default == -1
    schema = json.loads(SCHEMA.read_text())
    prop = schema['properties']['node']['properties']['params']['properties']['intra_op_threads']
    assert prop['type'] == 'integer'
    assert (prop['minimum'], prop['maximum']) == spec.range
    for values in VALUES:
        seen = rendered_params(docs(values))
        assert type(seen['intra_op_threads']) is int, values
        assert seen['intra_op_threads'] == _merged_values(values)['node']['params'][
            'intra_op_threads'], values


@pytest.mark.parametrize('threads', [0, 4, 256])
def test_intra_op_threads_renders_what_is_set(threads, tmp_path):
    cp = render_with(tmp_path, {'node': {'params': {'intra_op_threads': threads}}})
    seen = rendered_params([d for d in yaml.safe_load_all(cp.stdout) if d])
    assert seen['intra_op_threads'] == threads and type(seen['intra_op_threads']) is int


@pytest.mark.parametrize('setting,error', [
    ('node.params.intra_op_threads=257', "at '/node/params/intra_op_threads': maximum"),
    ('node.params.intra_op_threads=-2', "at '/node/params/intra_op_threads': minimum"),
])
def test_intra_op_threads_range_is_checked(setting, error):
    cp = run([str(ROOT / 'scripts/helm'), 'template', 'akidb', str(CHART), '--set', setting],
             check=False)
    assert cp.returncode == 1 and error in cp.stdout + cp.stderr, cp.stderr[-800:]


def test_float_node_parameters_render_exactly(tmp_path):
    """Doubles are written as they are set (0.25 was 0.2 with printf %.1f, 12.75 was 12.8),
    and a whole number keeps its decimal point: the node's parameters are strict doubles."""
    from akidb_ros.ros import params as P
    cp = render_with(tmp_path, {'node': {'params': {
        'shutdown_timeout_s': 12.75, 'resend_window_s': 0.25, 'diagnostics_period_s': 5}}})
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    cm = next(d for d in rendered if d['kind'] == 'ConfigMap')
    text = cm['data']['params.yaml']
    assert 'shutdown_timeout_s: 12.75\n' in text and 'resend_window_s: 0.25\n' in text
    assert 'diagnostics_period_s: 5.0\n' in text
    seen = rendered_params(rendered)
    for name, want in (('shutdown_timeout_s', 12.75), ('resend_window_s', 0.25),
                       ('diagnostics_period_s', 5.0)):
        assert seen[name] == want and type(seen[name]) is float, (name, seen[name])
        assert P.validate_value(name, seen[name]) is None
    cp = render_with(tmp_path, {'node': {'params': {'resend_window_s': 0.0625,
                                                    'shutdown_timeout_s': 600}}})
    seen = rendered_params([d for d in yaml.safe_load_all(cp.stdout) if d])
    assert (seen['resend_window_s'], seen['shutdown_timeout_s']) == (0.0625, 600.0)
    assert type(seen['shutdown_timeout_s']) is float


def network_policy(rendered: list) -> dict:
    return next(d for d in rendered if d['kind'] == 'NetworkPolicy')['spec']


def otlp_rules(np_: dict) -> list:
    return [r for r in np_['egress'] if all(p['port'] != 53 for p in r['ports'])]


@pytest.mark.parametrize('endpoint,port', [
    ('http://otel-collector.observability:4317', 4317),
    ('http://otel-collector.observability.svc.cluster.local:4318', 4318),
    ('http://otel-collector.observability', 4317),     # no port named: otelEgress.port
], ids=['grpc', 'http-port', 'no-port'])
def test_otel_endpoint_opens_its_egress(endpoint, port, tmp_path):
    """Setting otel.endpoint alone opens egress to the collector on the endpoint's port (the
    NetworkPolicy allowed DNS only, so spans were dropped silently); the result still matches
    the Kubernetes schemas."""
    cp = render_with(tmp_path, {'otel': {'endpoint': endpoint}})
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    rules = otlp_rules(network_policy(rendered))
    assert rules == [{'to': [{'namespaceSelector': {'matchLabels': {
        'kubernetes.io/metadata.name': 'observability'}}}],
        'ports': [{'port': port, 'protocol': 'TCP'}]}], rules
    env = {e['name']: e.get('value') for e in containers_of(rendered)['node']['env']}
    assert env['OTEL_EXPORTER_OTLP_ENDPOINT'] == endpoint
    f = tmp_path / 'rendered.yaml'
    f.write_text(cp.stdout)
    cp = run([dtool('kubernetes-validate'), '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_otel_egress_without_endpoint_stays_closed_unless_enabled(tmp_path):
    """No endpoint: DNS only; networkPolicy.otelEgress.enabled opens it anyway (an endpoint
    set through `env`), and otelEgress.to replaces the namespace selector (a pod selector, or
    an ipBlock for a collector outside the cluster)."""
    closed = network_policy(docs('values-cpu.yaml'))
    assert otlp_rules(closed) == []
    cp = render_with(tmp_path, {'networkPolicy': {'otelEgress': {'enabled': True, 'port': 4318}}})
    rules = otlp_rules(network_policy([d for d in yaml.safe_load_all(cp.stdout) if d]))
    assert [r['ports'] for r in rules] == [[{'port': 4318, 'protocol': 'TCP'}]]
    peers = [{'ipBlock': {'cidr': '10.1.2.0/24'}},
             {'namespaceSelector': {'matchLabels': {'team': 'obs'}},
              'podSelector': {'matchLabels': {'app': 'otel-collector'}}}]
    cp = render_with(tmp_path, {'otel': {'endpoint': 'https://otlp.example.net:4317'},
                                'networkPolicy': {'otelEgress': {'to': peers}}})
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    assert otlp_rules(network_policy(rendered)) == [
        {'to': peers, 'ports': [{'port': 4317, 'protocol': 'TCP'}]}]
    f = tmp_path / 'rendered.yaml'
    f.write_text(cp.stdout)
    cp = run([dtool('kubernetes-validate'), '--strict', '-k', '1.31.0', str(f)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def containers_of(rendered: list) -> dict:
    dep = next(d for d in rendered if d['kind'] == 'Deployment')
    return {c['name']: c for c in dep['spec']['template']['spec']['containers']}


def test_pod_monitor_is_off_by_default():
    for values in VALUES:
        assert 'PodMonitor' not in by_kind(values) and 'ServiceMonitor' not in by_kind(values)
        ann = deployment(values)['spec']['template']['metadata']['annotations']
        assert ann['prometheus.io/scrape'] == 'true'


def test_pod_monitor_scrapes_the_node_and_the_bridge_as_the_rules_expect(tmp_path):
    """monitoring.podMonitor.enabled (Prometheus Operator): one PodMonitor with the node's
    metrics port and the bridge's probe port, jobs akidb-node and akidb-bridge (the rules'
    job=~"akidb.*" and the bridge's rest/grpc door metrics the SLO rules count), selecting
    exactly the release's Pods; the prometheus.io annotations go (no second scrape of the
    node under another job)."""
    import re
    cp = render_with(tmp_path, {'monitoring': {'podMonitor': {
        'enabled': True, 'labels': {'release': 'kube-prometheus-stack'}, 'interval': '30s'}}})
    rendered = [d for d in yaml.safe_load_all(cp.stdout) if d]
    pm = next(d for d in rendered if d['kind'] == 'PodMonitor')
    assert pm['apiVersion'] == 'monitoring.coreos.com/v1'
    assert pm['metadata']['namespace'] == 'akidb'
    assert pm['metadata']['labels']['release'] == 'kube-prometheus-stack'
    dep = next(d for d in rendered if d['kind'] == 'Deployment')
    pod_labels = dep['spec']['template']['metadata']['labels']
    assert pm['spec']['selector']['matchLabels'] == dep['spec']['selector']['matchLabels']
    assert all(pod_labels[k] == v for k, v in pm['spec']['selector']['matchLabels'].items())
    assert pm['spec']['namespaceSelector'] == {'matchNames': ['akidb']}
    ports = {c['name']: {p['name'] for p in c['ports']} for c in containers_of(rendered).values()}
    jobs = {}
    for ep in pm['spec']['podMetricsEndpoints']:
        assert ep['path'] == '/metrics' and ep['scheme'] == 'http' and ep['interval'] == '30s'
        job = [r['replacement'] for r in ep['relabelings'] if r.get('targetLabel') == 'job']
        assert len(job) == 1
        jobs[job[0]] = ep['port']
    assert jobs == {'akidb-node': 'metrics', 'akidb-bridge': 'probe'}
    assert 'metrics' in ports['node'] and 'probe' in ports['bridge']
    matcher = re.compile('akidb.*')
    assert all(matcher.fullmatch(j) for j in jobs)
    ann = dep['spec']['template']['metadata']['annotations']
    assert not any(k.startswith('prometheus.io/') for k in ann), ann
    # the monitoring namespace may reach both ports through the NetworkPolicy
    mon = next(r for r in network_policy(rendered)['ingress']
               if 'namespaceSelector' in r['from'][0])
    assert {p['port'] for p in mon['ports']} == {'metrics', 'probe'}
