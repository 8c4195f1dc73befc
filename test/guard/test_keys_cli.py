"""``akidb-keys``: input validation, refusals without tracebacks, config errors, audit, races."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from akidb_ros.guard import apikeys, keys_cli
from akidb_ros.guard.identity import Role

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch):
    monkeypatch.delenv('AKIDB_SECURITY_CONFIG', raising=False)
    monkeypatch.delenv('AKIDB_SECURITY_PROFILE', raising=False)


def _run(capsys, *argv):
    """(exit code, stdout, stderr) of one in-process run; argparse refusals exit too."""
    try:
        rc = keys_cli.main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert 'Traceback' not in err
    return rc, out, err


def _snapshot(d):
    return {p: open(os.path.join(d, p), 'rb').read() for p in sorted(os.listdir(d))}


@pytest.mark.parametrize('extra', [
    ['--expires-days', 'inf'], ['--expires-days', '1e9'], ['--expires-days', 'nan'],
    ['--expires-days', '-5'], ['--expires-days', '0.5'], ['--expires-days', 'soon'],
    ['--client', ''], ['--client', '  '], ['--client', 'evil\n\x1b[31mRED'],
    ['--client', 'x' * 129], ['--note', 'line\nbreak'], ['--note', 'bell\x07'],
])
def test_create_refuses_bad_input(tmp_path, capsys, extra):
    f = str(tmp_path / 'keys.yaml')
    argv = ['--file', f, '--audit', str(tmp_path / 'a.jsonl'), 'create', '--role', 'viewer']
    argv += extra if '--client' in extra else ['--client', 'robot'] + extra
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == '' and 'error: argument' in err
    assert '\x1b' not in err and 'evil\n' not in err  # refused input is not echoed raw
    assert os.listdir(tmp_path) == []  # nothing written, no audit line


@pytest.mark.parametrize('extra', [
    ['--grace-s', 'inf'], ['--grace-s', '-100'], ['--grace-s', 'nan'], ['--grace-s', '1e12'],
    ['--expires-days', '1e9'], ['--expires-days', '-1'],
])
def test_rotate_refuses_bad_numbers(tmp_path, capsys, extra):
    f = str(tmp_path / 'keys.yaml')
    rec, _ = apikeys.create_key(f, Role.VIEWER, 'robot')
    before = _snapshot(tmp_path)
    rc, out, err = _run(capsys, '--file', f, 'rotate', rec.id, *extra)
    assert rc == 2 and out == '' and 'error: argument' in err
    assert _snapshot(tmp_path) == before


def test_limits_are_accepted_at_the_bounds(tmp_path, capsys):
    f = str(tmp_path / 'keys.yaml')
    rc, out, _ = _run(capsys, '--file', f, 'create', '--role', 'viewer', '--client', 'robot 7',
                      '--expires-days', '3650')
    assert rc == 0 and apikeys.parse_key(out.strip())
    rc, out, _ = _run(capsys, '--file', f, 'create', '--role', 'viewer', '--client', 'r',
                      '--expires-days', '0')  # 0 = never expires
    kid = apikeys.parse_key(out.strip())
    assert rc == 0 and apikeys.read_key_file(f)[kid].expires is None
    rc, out, err = _run(capsys, '--file', f, 'rotate', kid, '--grace-s', str(30 * 86400))
    assert rc == 0 and 'valid until' in err


def test_rotate_of_revoked_or_expired_key_is_refused(tmp_path, capsys):
    f, audit = str(tmp_path / 'keys.yaml'), str(tmp_path / 'audit.jsonl')
    past = apikeys.utcnow() - apikeys._dt.timedelta(days=31)
    expired, _ = apikeys.create_key(f, Role.ADMIN, 'old', expires_days=30, now=past)
    revoked, _ = apikeys.create_key(f, Role.ADMIN, 'leaked')
    apikeys.revoke_key(f, revoked.id)
    before = _snapshot(tmp_path)
    for rec, status in ((revoked, 'revoked'), (expired, 'expired')):
        rc, out, err = _run(capsys, '--file', f, '--audit', audit, 'rotate', rec.id,
                            '--grace-s', '3600')
        assert rc == 1 and out == '' and status in err and len(err.splitlines()) == 1
    after = _snapshot(tmp_path)
    assert after.pop('audit.jsonl', b'') == b'' and after == before  # no change, no record


def test_rotation_audit_names_the_old_key(tmp_path, capsys):
    f, audit = str(tmp_path / 'keys.yaml'), str(tmp_path / 'audit.jsonl')
    rec, _ = apikeys.create_key(f, Role.DEVELOPER, 'robot')
    rc, out, _ = _run(capsys, '--file', f, '--audit', audit, 'rotate', rec.id)
    assert rc == 0
    row = [json.loads(x) for x in open(audit)][-1]
    assert row['event'] == 'key_rotated' and row['previous_key_id'] == rec.id
    assert row['key_id'] == apikeys.parse_key(out.strip())


def _write_config(path, doc):
    with open(path, 'w') as fh:
        yaml.safe_dump(doc, fh)
    return str(path)


@pytest.mark.parametrize('how', ['env', 'option'])
@pytest.mark.parametrize('content', ['typo', 'missing', 'not_yaml', 'not_utf8'])
def test_broken_named_config_is_an_error(tmp_path, capsys, monkeypatch, how, content):
    cfg = tmp_path / 'security.yaml'
    if content == 'typo':
        _write_config(cfg, {'security': {'auth': {'enabld': True}}})
    elif content == 'not_yaml':
        cfg.write_text('security: [unclosed\n')
    elif content == 'not_utf8':
        cfg.write_bytes(b'\xff\xfe security: {}\n')
    repo_keys = os.path.join(ROOT, 'config', 'api_keys.yaml')
    repo_before = os.path.exists(repo_keys) and os.stat(repo_keys).st_mtime_ns
    before = _snapshot(tmp_path)
    opt = []
    if how == 'env':
        monkeypatch.setenv('AKIDB_SECURITY_CONFIG', str(cfg))
    else:
        opt = ['--config', str(cfg)]
    for cmd in (['create', '--role', 'admin', '--client', 'x'], ['list']):
        rc, out, err = _run(capsys, *opt, *cmd)
        assert rc == 1 and out == '' and 'security config' in err and str(cfg) in err
        assert len(err.splitlines()) == 1
    assert _snapshot(tmp_path) == before
    assert (os.path.exists(repo_keys) and os.stat(repo_keys).st_mtime_ns) == repo_before


def test_named_config_supplies_key_file_and_audit(tmp_path, capsys, monkeypatch):
    keys, audit = str(tmp_path / 'keys.yaml'), str(tmp_path / 'audit' / 'a.jsonl')
    cfg = _write_config(tmp_path / 'security.yaml', {'security': {
        'auth': {'enabled': True, 'api_keys': {'file': keys}}, 'audit': {'file': audit}}})
    rc, out, _ = _run(capsys, '--config', cfg, 'create', '--role', 'viewer', '--client', 'r')
    kid = apikeys.parse_key(out.strip())
    assert rc == 0 and kid in apikeys.read_key_file(keys)
    assert json.loads(open(audit).read())['key_id'] == kid
    monkeypatch.setenv('AKIDB_SECURITY_CONFIG', cfg)
    rc, out, _ = _run(capsys, 'list', '--json')
    assert rc == 0 and [r['id'] for r in json.loads(out)] == [kid]


@pytest.mark.parametrize('content,says', [
    (b'keys: [unclosed\n', 'not valid YAML'),
    (b'keys:\n\t- x\n', 'not valid YAML'),
    (b'!!python/object:os.system {}\n', 'not valid YAML'),
    (b'keys: *undefined\n', 'not valid YAML'),
    (b'\xff\xfe keys: []\n', 'not UTF-8'),
])
def test_key_file_that_cannot_be_read_is_one_line(tmp_path, capsys, content, says):
    f = tmp_path / 'keys.yaml'
    f.write_bytes(content)
    audit = str(tmp_path / 'audit.jsonl')
    for cmd in (['list'], ['list', '--json'], ['create', '--role', 'viewer', '--client', 'r'],
                ['revoke', 'k0123456789ab'], ['rotate', 'k0123456789ab']):
        rc, out, err = _run(capsys, '--file', str(f), '--audit', audit, *cmd)
        assert rc == 1 and out == '' and len(err.splitlines()) == 1, (cmd, err)
        assert err.startswith('akidb-keys: ') and str(f) in err and says in err
    assert f.read_bytes() == content                        # nothing written ...
    assert not os.path.exists(audit) or open(audit).read() == ''   # ... nor audited


def test_audit_log_folder_is_created_and_said(tmp_path, capsys):
    """Keys are made before a new deployment's server first creates the audit folder, so a
    missing one is created — and said on stderr, so a typo in --audit cannot hide the log."""
    f = str(tmp_path / 'keys.yaml')
    audit = tmp_path / 'nope' / 'x' / 'audit.jsonl'
    rc, out, err = _run(capsys, '--file', f, '--audit', str(audit), 'create', '--role',
                        'viewer', '--client', 'r')
    kid = apikeys.parse_key(out.strip())
    assert rc == 0 and f'created folder {audit.parent} for the audit log' in err
    assert json.loads(audit.read_text())['key_id'] == kid
    rc, out, err = _run(capsys, '--file', f, '--audit', str(audit), 'revoke', kid)
    assert rc == 0 and 'created folder' not in err           # said once, when created
    assert len(audit.read_text().splitlines()) == 2
    rc, out, err = _run(capsys, '--file', f, '--audit', str(tmp_path / 'other' / 'a.jsonl'),
                        'list')
    assert rc == 0 and kid in out and not (tmp_path / 'other').exists()   # list audits none


def test_key_file_folder_is_created_by_create_only_and_said(tmp_path, capsys):
    """``create`` makes a new deployment's key folder and says so; ``revoke``, ``rotate`` and
    ``list`` on a mistyped path answer "no key" and leave no folder behind."""
    for cmd in (['revoke', 'k0123456789ab'], ['rotate', 'k0123456789ab'], ['list']):
        typo = tmp_path / 'typo' / 'keys.yaml'
        rc, out, err = _run(capsys, '--file', str(typo), *cmd)
        assert rc == (0 if cmd == ['list'] else 2), (cmd, rc, err)
        assert not (tmp_path / 'typo').exists(), cmd
    f = tmp_path / 'new' / 'keys.yaml'
    rc, out, err = _run(capsys, '--file', str(f), 'create', '--role', 'viewer', '--client', 'r')
    assert rc == 0 and f'created folder {f.parent} for the key file' in err
    assert apikeys.parse_key(out.strip()) in apikeys.read_key_file(str(f))
    rc, out, err = _run(capsys, '--file', str(f), 'create', '--role', 'viewer', '--client', 's')
    assert rc == 0 and 'created folder' not in err                # said once, when created


def _cli(*args):
    return subprocess.Popen(
        [sys.executable, '-m', 'akidb_ros.guard.keys_cli', *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_concurrent_cli_runs_lose_nothing(tmp_path):
    """A revoke racing creates (separate `akidb-keys` processes) is kept, and so is every key."""
    f, audit = str(tmp_path / 'keys.yaml'), str(tmp_path / 'audit.jsonl')
    made = []
    for round_ in range(2):
        victim, _ = apikeys.create_key(f, Role.ADMIN, f'leaked-{round_}')
        procs = [_cli('--file', f, '--audit', audit, 'create', '--role', 'viewer',
                      '--client', f'c{i}') for i in range(4)]
        procs.append(_cli('--file', f, '--audit', audit, 'revoke', victim.id))
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            if out:
                made.append(apikeys.parse_key(out.strip()))
        records = apikeys.read_key_file(f)
        assert records[victim.id].revoked
    assert len(made) == 8 and set(made) <= set(records) and len(records) == 10
