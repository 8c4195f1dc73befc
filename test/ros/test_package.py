"""The ROS package itself: interfaces, package.xml, launch files, params file, layout, linters.

The linter tests mirror ament_flake8 / ament_pep257 / ament_xmllint, which are not on PyPI.
"""
import ast
import importlib.metadata
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from ros_support import ROOT

from akidb_ros.msg import Embedding, ModelInfo
from akidb_ros.ros import params as P
from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel

ROS_PY = [ROOT / 'akidb_ros' / 'ros', ROOT / 'test' / 'ros', ROOT / 'launch',
          ROOT / 'bench' / 'ros_bench.py']
LAUNCH_ARGS = {'params_file', 'namespace', 'log_level', 'respawn', 'configure_retry_s'}


def test_embed_interface():
    req = Embed.Request.get_fields_and_field_types()
    assert {k: req[k] for k in ('model', 'inputs', 'normalize', 'truncate')} == {
        'model': 'string', 'inputs': 'sequence<string>', 'normalize': 'boolean',
        'truncate': 'boolean'}
    # optional fields the REST/gRPC sidecar (akidb_ros.backends.RosBackend) fills in
    assert {k: req[k] for k in ('timeout_s', 'request_id', 'traceparent', 'input_type',
                                'admin_lane')} == {
        'timeout_s': 'double', 'request_id': 'string', 'traceparent': 'string',
        'input_type': 'string', 'admin_lane': 'boolean'}
    assert Embed.Request().admin_lane is False          # the engine's normal lane
    r = Embed.Request()
    assert (r.normalize, r.truncate) == (True, True)    # ROS has no 'unset': default true
    resp = Embed.Response.get_fields_and_field_types()
    assert resp == {
        'embeddings': 'sequence<akidb_ros/Embedding>', 'model': 'string', 'dimension': 'uint32',
        'total_tokens': 'uint32', 'truncated_inputs': 'uint32', 'duration_ms': 'double',
        'success': 'boolean', 'error_code': 'string', 'message': 'string',
        'retry_after_s': 'double'}
    assert Embedding.get_fields_and_field_types() == {'values': 'sequence<float>'}


def test_model_info_and_admin_interfaces():
    fields = ModelInfo.get_fields_and_field_types()
    for name in ('id', 'name', 'dimension', 'params', 'memory_mb', 'max_tokens',
                 'latency_p95_ms', 'throughput_qps', 'status', 'provider', 'is_default'):
        assert name in fields
    assert ModelInfo.STATUS_LOADED == 'loaded' and ModelInfo.STATUS_FAILED == 'failed'
    assert ListModels.Response.get_fields_and_field_types() == {
        'models': 'sequence<akidb_ros/ModelInfo>', 'default_model': 'string',
        'node_state': 'string', 'node_instance': 'string'}
    for srv in (LoadModel, UnloadModel):
        assert srv.Request.get_fields_and_field_types() == {'model': 'string'}
        assert srv.Response.get_fields_and_field_types() == {
            'success': 'boolean', 'error_code': 'string', 'message': 'string',
            'model_info': 'akidb_ros/ModelInfo', 'retry_after_s': 'double'}


def test_generated_and_source_halves_join_from_any_directory(tmp_path):
    """Interfaces from the venv's site-packages, Python code from the source tree."""
    code = ('import akidb_ros.srv, akidb_ros.msg, akidb_ros.ros.node, akidb_ros.engine; '
            'print(akidb_ros.srv.__file__); print(akidb_ros.ros.node.__file__)')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    srv_file, node_file = out.stdout.split()
    assert 'site-packages' in srv_file
    assert node_file == str(ROOT / 'akidb_ros' / 'ros' / 'node.py')


def test_package_xml_is_valid_format_3():
    from catkin_pkg.package import parse_package
    pkg = parse_package(str(ROOT / 'package.xml'))
    pkg.validate()
    assert pkg.name == 'akidb_ros' and pkg.package_format == 3
    assert {d.name for d in pkg.buildtool_depends} >= {'ament_cmake', 'ament_cmake_python',
                                                       'rosidl_default_generators'}
    assert {d.name for d in pkg.exec_depends} >= {'rosidl_default_runtime', 'rclpy',
                                                  'diagnostic_msgs', 'lifecycle_msgs'}
    assert 'rosidl_interface_packages' in [g.name for g in pkg.member_of_groups]
    assert pkg.get_build_type() == 'ament_cmake'


# Not on PyPI (so not in the venv to look up): ROS packages by name.
ROS_ONLY_MODULES = {'launch', 'launch_ros'}


def _imported_modules(files) -> set:
    mods = set()
    for f in files:
        for n in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(n, ast.Import):
                mods |= {a.name.split('.')[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                mods.add(n.module.split('.')[0])
    return mods


def test_every_ros_package_the_code_imports_is_declared():
    """A rosdep install must bring everything the node and the launch files import."""
    from catkin_pkg.package import parse_package
    pkg = parse_package(str(ROOT / 'package.xml'))
    declared = {d.name for d in pkg.exec_depends}
    dists = importlib.metadata.packages_distributions()
    files = list((ROOT / 'akidb_ros').rglob('*.py')) + list((ROOT / 'launch').glob('*.py'))
    ros = {m for m in _imported_modules(files) if m in ROS_ONLY_MODULES or any(
        d.lower().startswith('ros-') for d in dists.get(m, []))}
    assert {'rclpy', 'launch_ros', 'ament_index_python'} <= ros   # the scan sees them
    assert ros - declared == set()
    if list((ROOT / 'launch').glob('*.launch.xml')):
        assert 'launch_xml' in declared


def test_every_pip_package_the_node_loads_is_named_in_package_xml():
    """What has no rosdep key is named in package.xml's comment (opentelemetry was missing)."""
    code = ('import sys, json, importlib.metadata as md; import akidb_ros.ros.node; '
            'd = md.packages_distributions(); '
            'print(json.dumps(sorted({x for m in list(sys.modules) '
            'for x in d.get(m.split(".")[0], [])})))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    loaded = {d.lower().replace('_', '-') for d in json.loads(out.splitlines()[-1])}
    rosdep_keyed = {'numpy', 'pyyaml', 'jsonschema'}          # python3-* exec_depends
    brought_along = {'attrs', 'idna', 'referencing', 'rpds-py', 'jsonschema-specifications',
                     'typing-extensions', 'setuptools'}       # dependencies of the above
    pip_only = {d for d in loaded - rosdep_keyed - brought_along - {'akidb-ros'}
                if not d.startswith('ros-') and f'ros-{d}' not in loaded}
    assert {'onnxruntime', 'tokenizers', 'opentelemetry-sdk'} <= pip_only   # the scan sees them
    text = (ROOT / 'package.xml').read_text().lower()
    assert sorted(d for d in pip_only if d not in text and d.split('-')[0] not in text) == []


def test_cmake_generates_every_interface():
    cmake = (ROOT / 'CMakeLists.txt').read_text()
    for f in sorted((ROOT / 'msg').glob('*.msg')) + sorted((ROOT / 'srv').glob('*.srv')):
        assert f'"{f.parent.name}/{f.name}"' in cmake, f'{f.name} not in CMakeLists.txt'


def test_python_launch_file_parses():
    path = ROOT / 'launch' / 'embedding_node.launch.py'
    tree = ast.parse(path.read_text(), filename=str(path))
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert 'generate_launch_description' in funcs
    declared = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call)
                and getattr(c.func, 'id', '') == 'DeclareLaunchArgument'}
    assert declared == LAUNCH_ARGS
    calls = {getattr(c.func, 'id', '') for c in ast.walk(tree) if isinstance(c, ast.Call)}
    assert 'LifecycleNode' in calls
    kws = {k.arg: k.value for c in ast.walk(tree) if isinstance(c, ast.Call)
           and getattr(c.func, 'id', '') == 'LifecycleNode' for k in c.keywords}
    assert ast.literal_eval(kws['executable']) == 'embedding_node'
    assert ast.literal_eval(kws['package']) == 'akidb_ros'
    assert 'respawn' in kws and ast.literal_eval(kws['respawn_delay']) > 0
    # a config error keeps the node up and retrying, not respawned into the same error
    (given,) = [d for d in ast.walk(kws['parameters']) if isinstance(d, ast.Dict)]
    assert [key.value for key in given.keys] == ['configure_retry_s']
    # as a float whatever is typed: launch reads `configure_retry_s:=0` as an int, which the
    # node's double parameter refuses (exit 2, and respawn repeated it every second)
    (value,) = given.values
    assert getattr(value.func, 'id', '') == 'ParameterValue'
    assert {k.arg: getattr(k.value, 'id', None) for k in value.keywords} == {
        'value_type': 'float'}
    compile(path.read_text(), str(path), 'exec')


def test_xml_launch_file_parses():
    path = ROOT / 'launch' / 'embedding_node.launch.xml'
    if shutil.which('xmllint'):
        out = subprocess.run(['xmllint', '--noout', str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    root = ET.parse(path).getroot()
    assert root.tag == 'launch'
    assert {a.get('name') for a in root.findall('arg')} == LAUNCH_ARGS
    (node,) = root.iter('lifecycle_node')
    assert (node.get('pkg'), node.get('exec')) == ('akidb_ros', 'embedding_node')
    assert node.get('namespace') == '$(var namespace)'
    assert '$(var log_level)' in node.get('ros_args')
    assert node.find('param').get('from') == '$(var params_file)'
    # as a float whatever is typed (launch reads `configure_retry_s:=0` as an int: exit 2)
    assert {p.get('name'): p.get('value') for p in node.findall('param')
            if p.get('name')} == {'configure_retry_s': "$(eval 'float($(var configure_retry_s))')"}
    assert node.get('respawn') == '$(var respawn)' and float(node.get('respawn_delay')) > 0


def _python_launch_timeouts() -> dict:
    tree = ast.parse((ROOT / 'launch' / 'embedding_node.launch.py').read_text())
    return {k.arg: float(ast.literal_eval(k.value)) for c in ast.walk(tree)
            if isinstance(c, ast.Call) and getattr(c.func, 'id', '') == 'LifecycleNode'
            for k in c.keywords if k.arg in ('sigterm_timeout', 'sigkill_timeout')}


def test_both_launch_files_give_the_node_time_to_answer_its_calls():
    """On shutdown launch sends SIGINT, then SIGTERM after ``sigterm_timeout`` (launch's own
    default 5 s); the node takes a second signal as "exit now", abandoning calls in flight. Both
    files must wait ``shutdown_timeout_s`` + 2 s at least. The XML file used launch's 5 s (an
    XML node has no sigterm_timeout attribute: it reads the launch configuration)."""
    py = _python_launch_timeouts()
    root = ET.parse(ROOT / 'launch' / 'embedding_node.launch.xml').getroot()
    (node,) = root.iter('lifecycle_node')
    scope = {n: p for p in root.iter() for n in p}[node]      # the node's enclosing element
    lets = {e.get('name'): float(e.get('value')) for e in scope.findall('let')}
    assert lets == py, 'the XML launch file waits differently from the Python one'
    params = yaml.safe_load((ROOT / 'config' / 'params.yaml').read_text())
    shutdown_s = params['/**']['ros__parameters']['shutdown_timeout_s']
    assert py['sigterm_timeout'] >= shutdown_s + 2
    assert P.PARAMS_BY_NAME['shutdown_timeout_s'].default + 2 <= py['sigterm_timeout']


def test_xmllint_package_xml():
    out = subprocess.run(['xmllint', '--noout', str(ROOT / 'package.xml')], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_params_file_matches_declared_parameters():
    data = yaml.safe_load((ROOT / 'config' / 'params.yaml').read_text())
    values = dict(P.flatten(data['/**']['ros__parameters']))
    assert set(values) == set(P.PARAMS_BY_NAME)
    for name, value in values.items():
        spec = P.PARAMS_BY_NAME[name]
        assert type(value) is type(spec.default), name
        assert value == spec.default, f'{name}: params.yaml and the declared default differ'
        if spec.range:
            assert spec.range[0] <= value <= spec.range[1]


def test_every_parameter_has_a_descriptor():
    for spec in P.PARAMS:
        d = spec.descriptor()
        assert d.description and d.type
        if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            assert d.integer_range or d.floating_point_range, spec.name
        # the engine's parameters, read at configure (docs/ros.md): describe_parameters says so
        if spec.engine_key or spec.name in ('config_path', 'preload_models'):
            assert 'applied at the next configure' in d.additional_constraints, spec.name
    overrides = P.engine_overrides(lambda n: P.PARAMS_BY_NAME[n].default)
    assert overrides == {}          # defaults keep config/models.yaml's values
    got = P.engine_overrides(lambda n: {'batching.max_batch_size': 8, 'device': 'cpu'}.get(
        n, P.PARAMS_BY_NAME[n].default))
    assert got == {'engine': {'batching': {'max_batch_size': 8}, 'device': 'cpu'}}


def test_flake8():
    out = subprocess.run([sys.executable, '-m', 'flake8', *map(str, ROS_PY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pep257():
    """ament_pep257's checks on the package code (test functions need no docstrings)."""
    targets = [str(ROOT / 'akidb_ros' / 'ros'), str(ROOT / 'launch'),
               str(ROOT / 'bench' / 'ros_bench.py')]
    out = subprocess.run([sys.executable, '-m', 'pydocstyle', *targets], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_console_scripts_are_installed_and_answer_help():
    """The entry points users run exist in the venv and print their usage (no node starts)."""
    assert (ROOT / 'resource' / 'akidb_ros').is_file()    # ament index marker
    bindir = Path(sys.executable).parent
    for script in ('embedding_node', 'akidb-embed', 'akidb-models', 'akidb-server',
                   'akidb-keys'):
        out = subprocess.run([str(bindir / script), '--help'], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert out.returncode == 0, f'{script}: {out.stdout}{out.stderr}'
        assert 'usage:' in out.stdout, script
    out = subprocess.run([str(bindir / 'embedding_node'), '--help'], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert 'batching.max_wait_ms' in out.stdout and 'ready' not in out.stdout + out.stderr
    # a parameter with a set of values says them (device, executor said only their default)
    device = next(line for line in out.stdout.splitlines() if line.startswith('  device = '))
    assert 'auto, cpu, cuda, tensorrt' in device, device
