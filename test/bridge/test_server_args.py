"""``akidb-server``'s options and their variables are checked when parsed, before anything
loads: a value the server cannot run with is a usage error (exit 2) in one line naming the flag
or the variable. (NaN timeouts answered every call 400 and ended SIGTERM in a traceback,
``--rest-threads 0`` served nothing, a ready file in a missing folder killed a serving server.)
"""
from __future__ import annotations

import errno
import os

import pytest

from akidb_ros.server import build_parser


@pytest.fixture(autouse=True)
def no_akidb_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith('AKIDB_'):
            monkeypatch.delenv(name)


def _usage_error(capsys, parse) -> str:
    """The one line a refused parse printed last (after argparse's usage line)."""
    with pytest.raises(SystemExit) as ei:
        parse()
    err = capsys.readouterr().err
    assert ei.value.code == 2 and 'Traceback' not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize('flag, value', [
    ('--timeout', 'nan'), ('--timeout', 'inf'), ('--timeout', '-inf'), ('--timeout', '0'),
    ('--timeout', '1e300'),
    ('--grace', 'nan'), ('--grace', 'inf'), ('--grace', '-1'),
    ('--discovery-grace', 'nan'), ('--discovery-grace', 'inf'), ('--discovery-grace', '-1'),
    ('--grpc-stream-idle', 'nan'), ('--grpc-stream-idle', 'inf'), ('--grpc-stream-idle', '-1'),
    ('--timeout', 'soon'),
])
def test_a_seconds_option_must_be_finite_and_in_range(capsys, flag, value):
    line = _usage_error(capsys, lambda: build_parser().parse_args([f'{flag}={value}']))
    assert line.startswith(f'akidb-server: error: argument {flag}: {value!r} is not a number'), \
        line


@pytest.mark.parametrize('flag, value', [
    ('--rest-threads', '0'), ('--rest-threads', '-1'), ('--rest-threads', '100000'),
    ('--grpc-workers', '0'), ('--grpc-workers', '1'), ('--grpc-max-streams', '0'),
    ('--max-body-bytes', '0'), ('--max-body-bytes', '1023'), ('--max-body-bytes', str(2 ** 31)),
    ('--rest-port', '99999'), ('--rest-port', '-1'), ('--grpc-port', '65536'),
    pytest.param('--rest-threads', '9' * 5000, id='rest-threads-5000-digits'),
    ('--grpc-workers', '2.0'),
])
def test_an_integer_option_must_be_in_range(capsys, flag, value):
    line = _usage_error(capsys, lambda: build_parser().parse_args([f'{flag}={value}']))
    assert line.startswith(f'akidb-server: error: argument {flag}: ') \
        and 'is not an integer' in line and len(line) < 200, line


@pytest.mark.parametrize('name, value, says', [
    ('AKIDB_TIMEOUT_S', 'nan', 'is not a number > 0 and <= 86400'),
    ('AKIDB_TIMEOUT_S', 'inf', 'is not a number > 0 and <= 86400'),
    ('AKIDB_TIMEOUT_S', '0', 'is not a number > 0 and <= 86400'),
    ('AKIDB_DISCOVERY_GRACE_S', '-1', 'is not a number from 0 to 86400'),
    ('AKIDB_GRPC_STREAM_IDLE_S', 'nan', 'is not a number from 0 to 86400'),
    ('AKIDB_REST_THREADS', '0', 'is not an integer from 1 to 4096'),
    ('AKIDB_GRPC_WORKERS', '1', 'is not an integer from 2 to 4096'),
    ('AKIDB_GRPC_MAX_STREAMS', '0', 'is not an integer from 1 to 4095'),
    ('AKIDB_MAX_BODY_BYTES', '0', 'is not an integer from 1024 to 1073741824'),
    ('AKIDB_REST_PORT', '99999', 'is not an integer from 0 to 65535'),
    ('AKIDB_GRPC_PORT', '-1', 'is not an integer from 0 to 65535'),
])
def test_a_variable_out_of_range_stops_the_start_naming_it(monkeypatch, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as ei:
        build_parser()
    assert str(ei.value) == f'{name}={value!r} {says}'


def test_a_bad_variable_is_a_usage_error_too(monkeypatch, capsys):
    from akidb_ros.server import parse_args
    monkeypatch.setenv('AKIDB_TIMEOUT_S', 'nan')
    assert _usage_error(capsys, lambda: parse_args([])) == \
        "akidb-server: error: AKIDB_TIMEOUT_S='nan' is not a number > 0 and <= 86400"


def test_values_in_range_are_taken():
    from akidb_ros.server import parse_args
    args = parse_args(['--timeout', '86400', '--grace', '0', '--discovery-grace', '0',
                       '--grpc-stream-idle', '0', '--rest-port', '0', '--grpc-port', '65535',
                       '--rest-threads', '1', '--grpc-workers', '2', '--grpc-max-streams', '1',
                       '--max-body-bytes', '1024'])
    assert (args.timeout, args.grace, args.discovery_grace, args.grpc_stream_idle) == (
        86400.0, 0.0, 0.0, 0.0)
    assert (args.rest_port, args.grpc_port, args.rest_threads, args.grpc_workers,
            args.grpc_max_streams, args.max_body_bytes) == (0, 65535, 1, 2, 1, 1024)
    args = parse_args([])       # the defaults are in range too
    assert (args.timeout, args.grace, args.rest_threads, args.grpc_workers,
            args.max_body_bytes) == (5.0, None, 32, 64, 16 * 1024 * 1024)


def test_grpc_max_streams_must_leave_workers_for_unary_calls(capsys):
    from akidb_ros.server import parse_args
    line = _usage_error(capsys, lambda: parse_args(['--grpc-workers', '8',
                                                    '--grpc-max-streams', '8']))
    assert line.startswith('akidb-server: error: --grpc-max-streams must be at least 1 and '
                           'less than --grpc-workers (8)'), line


def test_the_ready_file_must_be_writable_before_anything_loads(tmp_path, capsys):
    missing = tmp_path / 'no-such-dir' / 'ready.json'
    line = _usage_error(capsys, lambda: build_parser().parse_args(['--ready-file', str(missing)]))
    assert line == (f"akidb-server: error: argument --ready-file: {str(missing)!r}: no such "
                    f'directory {missing.parent}')
    line = _usage_error(capsys, lambda: build_parser().parse_args(['--ready-file',
                                                                   str(tmp_path)]))
    assert line.endswith(f'{str(tmp_path)!r} is a directory'), line
    if os.geteuid() != 0:       # root may write anywhere
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        line = _usage_error(capsys, lambda: build_parser().parse_args(
            ['--ready-file', str(locked / 'ready.json')]))
        assert line.endswith(f'directory {locked} is not writable'), line
    ok = str(tmp_path / 'ready.json')
    assert build_parser().parse_args(['--ready-file', ok]).ready_file == ok


def test_start_up_errors_of_the_operators_making_are_one_line():
    """A value no check before the start caught (a library's own range check: OverflowError,
    ValueError) is told in one line like a config or bind error; anything else is a bug and
    keeps its traceback."""
    from akidb_ros.doors import BindError
    from akidb_ros.engine.config import ConfigError
    from akidb_ros.engine.errors import EngineError, ErrorCode
    from akidb_ros.server import expected_start_error
    for exc in (OverflowError('bind(): port must be 0-65535.'), ValueError('bad value'),
                ConfigError('invalid config'), BindError('cannot bind'),
                OSError(errno.EADDRINUSE, 'Address already in use'),
                EngineError(ErrorCode.MODEL_LOAD_FAILED, 'no load')):
        assert expected_start_error(exc), exc
    for exc in (KeyError('k'), RuntimeError('boom'), OSError(errno.EIO, 'I/O error'),
                TypeError('t')):
        assert not expected_start_error(exc), exc


def test_a_blank_host_variable_counts_as_unset_and_a_blank_host_flag_is_refused(
        monkeypatch, capsys):
    """``''`` binds every interface in Python: an unset variable in a template (``AKIDB_HOST=``)
    must not mean that, and nobody writes ``--host ''`` for it."""
    from akidb_ros.server import parse_args
    for blank in ('', '  '):
        monkeypatch.setenv('AKIDB_HOST', blank)
        assert parse_args([]).host == '127.0.0.1'
    monkeypatch.setenv('AKIDB_HOST', ' ::1 ')
    assert parse_args([]).host == '::1'
    line = _usage_error(capsys, lambda: parse_args(['--host', ' ']))
    assert line == ("akidb-server: error: argument --host: ' ' is blank "
                    "(write 127.0.0.1, or 0.0.0.0 for every interface)"), line


@pytest.mark.parametrize('name, value, line', [
    ('AKIDB_LOG_LEVEL', 'bogus',
     "AKIDB_LOG_LEVEL='bogus' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ('AKIDB_LOG_FORMAT', 'xml', "AKIDB_LOG_FORMAT='xml' is not one of json, text"),
    ('AKIDB_ROS_PREFIX', 'bad ns', "AKIDB_ROS_PREFIX='bad ns' is not a ROS namespace: "),
    ('AKIDB_GRPC_MAX_STREAMS', '64', 'AKIDB_GRPC_MAX_STREAMS must be at least 1 and less than '
     '--grpc-workers (64)'),
])
def test_every_variable_the_server_reads_is_checked_before_anything_loads(
        monkeypatch, capsys, name, value, line):
    """A bad log level ended in a traceback, a bad log format was taken as text, a bad ROS
    namespace failed later in the sidecar's start, and a variable's value was named as the
    flag."""
    from akidb_ros.server import parse_args
    monkeypatch.setenv(name, value)
    said = _usage_error(capsys, lambda: parse_args([]))
    assert said.startswith(f'akidb-server: error: {line}'), said


def test_a_ros_prefix_flag_is_checked_and_blank_or_valid_ones_are_taken(monkeypatch, capsys):
    from akidb_ros.server import parse_args
    said = _usage_error(capsys, lambda: parse_args(['--ros-prefix', 'a//b']))
    assert said.startswith("akidb-server: error: argument --ros-prefix: 'a//b' is not a ROS "
                           'namespace'), said
    assert parse_args(['--ros-prefix', '/robot1/']).ros_prefix == '/robot1'
    monkeypatch.setenv('AKIDB_ROS_PREFIX', ' ')
    monkeypatch.setenv('AKIDB_LOG_LEVEL', ' debug ')
    assert parse_args([]).ros_prefix == ''
