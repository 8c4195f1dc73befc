"""The node process' logs: JSON on stderr by default (AKIDB_LOG_FORMAT), ROS's console with text.

With JSON, rcl's own console output is off (--disable-stdout-logs) and the node's lines reach
stderr through Python logging, like the engine's: every stderr line is one JSON object, and
the ROS log file (and /rosout) still get the node's lines. With text, ROS's console lines are
there as usual, and the engine's Python loggers have a level and a time.
"""
import json
import os
import signal
import subprocess
import sys
import time

from ros_support import ROOT

from akidb_ros.ros.cli import EmbeddingClient
from akidb_ros.srv import Embed

READY = 'embedding node ready in'
# a model name that would forge a log line and colour the terminal, were it logged raw
FORGED = 'evil\n[ERROR] [1795995000.0] [embedding_node]: FORGED \x1b[31m\u2028'


def assert_not_forged(*logs: str) -> None:
    """The forged model name stayed inside its own line, escaped."""
    for log in logs:
        assert '\x1b' not in log and '\u2028' not in log
        assert [ln for ln in log.splitlines() if 'FORGED' in ln and 'evil' not in ln] == []
        assert 'FORGED' in log


def run_node(tmp_path, namespace: str, fmt: str):
    """Start the node, make one good and one bad call, stop it: (stdout, stderr, ROS log)."""
    log_dir = tmp_path / 'roslog'
    env = {**os.environ, 'AKIDB_LOG_FORMAT': fmt, 'ROS_LOG_DIR': str(log_dir),
           'OTEL_TRACES_EXPORTER': 'console'}      # spans on stdout, one JSON per line
    env.pop('AKIDB_LOG_LEVEL', None)
    out, err = tmp_path / 'out.txt', tmp_path / 'err.txt'
    with open(out, 'wb') as fo, open(err, 'wb') as fe:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args', '-r',
             f'__ns:={namespace}', '-p', 'diagnostics_period_s:=0.0'],
            cwd=ROOT, stdout=fo, stderr=fe, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while READY not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
            with EmbeddingClient(namespace, node_name='akidb_logs_client') as c:
                assert c.call('embed', Embed.Request(inputs=['log me'])).success
                bad = c.call('embed', Embed.Request(inputs=['   '], request_id='rid-json-1'))
                assert bad.error_code == 'INVALID_INPUT'
                assert c.call('embed', Embed.Request(inputs=['x'], model=FORGED)).error_code \
                    == 'MODEL_NOT_FOUND'
                # the node traces a call that continues a caller's trace
                assert c.call('embed', Embed.Request(
                    inputs=['x'], request_id='r' * 5000,
                    traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01')).success
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0, err.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    ros_log = ''.join(p.read_text(errors='replace') for p in log_dir.rglob('*.log'))
    return out.read_text(), err.read_text(), ros_log


def test_json_logs_are_one_object_per_stderr_line(tmp_path):
    _out, err, ros_log = run_node(tmp_path, '/logs_json', 'json')
    lines = [ln for ln in err.splitlines() if ln.strip()]
    records = []
    for ln in lines:
        rec = json.loads(ln)        # rcl's console lines ("[INFO] [...]") would fail here
        assert isinstance(rec, dict) and {'ts', 'level', 'logger', 'msg'} <= set(rec), ln
        records.append(rec)
    by_logger = {}
    for rec in records:
        by_logger.setdefault(rec['logger'], []).append(rec)
    # the engine's Python loggers, at INFO, with their level (they printed bare WARNING+ lines)
    assert any(r['level'] == 'info' and r['msg'].startswith('loaded all-minilm-l6-v2')
               for r in by_logger['akidb_ros.engine.manager']), lines
    # the node's own lines, through Python logging, naming the ROS logger
    node = by_logger['akidb_ros.ros.node']
    assert all(r['ros_logger'] == 'logs_json.embedding_node' for r in node)
    failed = [r for r in node if "request_id='rid-json-1'" in r['msg']]
    assert len(failed) == 1 and failed[0]['level'] == 'info', node
    assert 'embed failed' in failed[0]['msg'] and 'code=INVALID_INPUT' in failed[0]['msg']
    assert any(r['msg'].startswith('SIGINT: stopped in') for r in node)
    # rclpy keeps them too: the ROS log file (and /rosout) are not affected
    assert "request_id='rid-json-1'" in ros_log and 'SIGINT: stopped in' in ros_log
    assert_not_forged(err, ros_log)


def test_spans_bound_the_callers_request_id(tmp_path):
    """The node's span keeps at most 128 characters of the request id, as its log line does
    (a 100 000-character id made each span 100 KB)."""
    out, _err, _ros_log = run_node(tmp_path, '/logs_spans', 'json')
    spans = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{')]
    ids = [s['attributes']['akidb.request_id'] for s in spans if s['name'] == 'ros /embed']
    assert ids == ['r' * 128], ids
    assert max(map(len, ids)) <= 128


def test_text_logs_keep_the_ros_console(tmp_path):
    _out, err, ros_log = run_node(tmp_path, '/logs_text', 'text')
    assert_not_forged(err, ros_log)
    lines = err.splitlines()
    assert any(ln.startswith('[INFO] [') and "request_id='rid-json-1'" in ln for ln in lines), err
    assert any(' INFO akidb_ros.engine.manager: loaded all-minilm-l6-v2' in ln
               for ln in lines), err
    assert not any(ln.startswith('{') for ln in lines), err
    # each of the node's lines once (not also through Python logging)
    assert sum("request_id='rid-json-1'" in ln for ln in lines) == 1, err
