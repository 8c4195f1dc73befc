"""API keys: hashes only, constant-time verification, expiry, revocation, rotation, reload, CLI."""

import datetime as dt
import hashlib
import os
import stat
import subprocess
import sys
import time

import pytest
import yaml

from akidb_ros.guard import apikeys
from akidb_ros.guard.identity import Role

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_key_file_holds_only_hashes(key_file):
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot-7', expires_days=90)
    text = open(key_file).read()
    secret = key.rsplit('.', 1)[1]
    assert key not in text and secret not in text
    assert hashlib.sha256(key.encode()).hexdigest() in text
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    doc = yaml.safe_load(text)
    assert doc['keys'][0]['id'] == rec.id and doc['keys'][0]['role'] == 'developer'
    assert apikeys.parse_key(key) == rec.id


def test_verify_ok_wrong_unknown_malformed(key_file, clock):
    rec, key = apikeys.create_key(key_file, Role.ADMIN, 'ops')
    store = apikeys.ApiKeyStore(key_file, clock=clock)
    assert store.verify(key).ok and store.verify(key).record.role is Role.ADMIN
    wrong_secret = key[:-1] + ('A' if key[-1] != 'A' else 'B')
    assert store.verify(wrong_secret).reason == 'unknown_key'
    _, other = apikeys.generate_key()
    assert store.verify(other).reason == 'unknown_key'
    for bad in ('', 'akidb', 'akidb.k123.abc', key + 'x', key.upper(), 'Bearer ' + key):
        assert not store.verify(bad).ok


def test_expired_and_revoked_keys_refused(key_file, clock):
    past = apikeys.utcnow() - dt.timedelta(days=2)
    rec_exp, key_exp = apikeys.create_key(key_file, Role.VIEWER, 'old', expires_days=1, now=past)
    rec_rev, key_rev = apikeys.create_key(key_file, Role.VIEWER, 'gone')
    apikeys.revoke_key(key_file, rec_rev.id)
    store = apikeys.ApiKeyStore(key_file, clock=clock)
    assert store.verify(key_exp).reason == 'expired'
    assert store.verify(key_rev).reason == 'revoked'
    assert not store.verify(key_exp).ok and not store.verify(key_rev).ok


def test_revocation_applies_without_restart(key_file, clock):
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    store = apikeys.ApiKeyStore(key_file, reload_interval_s=1.0, clock=clock)
    assert store.verify(key).ok
    apikeys.revoke_key(key_file, rec.id)
    clock.advance(1.01)  # next check after the reload interval
    assert store.verify(key).reason == 'revoked'
    rec2, key2 = apikeys.create_key(key_file, Role.DEVELOPER, 'robot-2')
    clock.advance(1.01)
    assert store.verify(key2).ok


def test_corrupt_key_file_keeps_previous_set(key_file, clock):
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    store = apikeys.ApiKeyStore(key_file, reload_interval_s=0, clock=clock)
    with open(key_file, 'a') as fh:
        fh.write('  - {id: broken\n')  # YAML syntax error
    assert store.verify(key).ok  # still served from the last good set
    assert store.last_error


@pytest.mark.parametrize('junk', [
    b'\xff\xfe not UTF-8',
    b'keys:\n  - {id: k0123456789ab, expires: 2026-13-45}\n',     # YAML cannot build the date
    b'',                                    # caught half-rewritten: it used to drop every key
    b'# akidb API keys\n',
])
def test_a_key_file_that_does_not_decode_keeps_previous_set(key_file, clock, junk):
    """Corrupt in ways that are not YAML syntax errors: the last good set still serves (before,
    the UnicodeDecodeError / ValueError escaped verify: a 500 once a reload interval)."""
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    store = apikeys.ApiKeyStore(key_file, reload_interval_s=0, clock=clock)
    with open(key_file, 'wb') as fh:
        fh.write(junk)
    for _ in range(2):
        clock.advance(1.0)
        assert store.verify(key).ok
    assert store.last_error
    with pytest.raises(apikeys.KeyFileError):       # at start: no good set, the error stops it
        apikeys.ApiKeyStore(key_file)


def test_no_keys_at_all_is_written_as_an_empty_list(key_file, clock):
    """``keys: []`` is the empty set the server accepts; the CLI also takes an empty file."""
    with open(key_file, 'w') as fh:
        fh.write('keys: []\n')
    assert len(apikeys.ApiKeyStore(key_file, clock=clock)) == 0
    open(key_file, 'w').close()
    rec, key = apikeys.create_key(key_file, Role.VIEWER, 'first')
    assert apikeys.ApiKeyStore(key_file, clock=clock).verify(key).ok


@pytest.mark.parametrize('field, value', [
    ('client', [1]), ('client', ''), ('client', 'robot\nlevel=admin'), ('client', 'x' * 129),
    ('note', {'a': 1}), ('note', 'two\nlines'),
])
def test_a_hand_edited_key_entry_is_held_to_what_create_key_writes(key_file, field, value):
    """client and note reach audit lines, rate-limit buckets and terminals: an entry edited
    by hand to a list, an empty client or a line break is refused like a corrupt file."""
    apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    with open(key_file) as fh:
        doc = yaml.safe_load(fh)
    doc['keys'][0][field] = value
    with open(key_file, 'w') as fh:
        yaml.safe_dump(doc, fh)
    with pytest.raises(apikeys.KeyFileError, match=field):
        apikeys.ApiKeyStore(key_file)


def test_rotation_with_and_without_grace(key_file, clock):
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    old, new, new_key = apikeys.rotate_key(key_file, rec.id)
    store = apikeys.ApiKeyStore(key_file, clock=clock)
    assert store.verify(key).reason == 'revoked' and store.verify(new_key).ok
    assert new.client == 'robot' and new.role is Role.DEVELOPER and new.id != rec.id
    # with grace: the old key still works until the grace period ends
    old2, new2, key3 = apikeys.rotate_key(key_file, new.id, grace_s=3600)
    store.reload(force=True)
    assert store.verify(new_key).ok and store.verify(key3).ok
    assert old2.expires is not None and old2.expires <= apikeys.utcnow() + dt.timedelta(
        seconds=3601
    )


def test_unknown_id_costs_a_comparison_too(key_file, clock):
    """Both paths run hmac.compare_digest over 64 hex chars (timing-uniform by construction);
    check both answer the same way in the same order of magnitude of time."""
    rec, key = apikeys.create_key(key_file, Role.DEVELOPER, 'robot')
    store = apikeys.ApiKeyStore(key_file, clock=clock)
    _, unknown = apikeys.generate_key()
    wrong = key[:-2] + 'zz'

    def t(k, n=300):
        t0 = time.perf_counter()
        for _ in range(n):
            store.verify(k)
        return time.perf_counter() - t0

    # interleaved, best of 7: robust against other load on a shared machine
    a = min(t(unknown) for _ in range(7))
    b = min(t(wrong) for _ in range(7))
    assert 0.33 < a / b < 3.0


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, '-m', 'akidb_ros.guard.keys_cli', *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_create_list_revoke_rotate(tmp_path):
    f, audit = str(tmp_path / 'keys.yaml'), str(tmp_path / 'audit.jsonl')
    r = _cli('--file', f, '--audit', audit, 'create', '--role', 'operator', '--client', 'grafana')
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert apikeys.parse_key(key) and r.stdout.count('\n') == 1  # only the key on stdout
    key_id = apikeys.parse_key(key)
    store = apikeys.ApiKeyStore(f)
    assert store.verify(key).ok and store.verify(key).record.role is Role.OPERATOR
    r = _cli('--file', f, 'list')
    assert (
        r.returncode == 0 and key_id in r.stdout and 'operator' in r.stdout and key not in r.stdout
    )
    r = _cli('--file', f, '--audit', audit, 'rotate', key_id)
    assert r.returncode == 0, r.stderr
    new_key = r.stdout.strip()
    store.reload(force=True)
    assert store.verify(key).reason == 'revoked' and store.verify(new_key).ok
    r = _cli('--file', f, '--audit', audit, 'revoke', apikeys.parse_key(new_key))
    assert r.returncode == 0
    store.reload(force=True)
    assert store.verify(new_key).reason == 'revoked'
    r = _cli('--file', f, 'revoke', 'k000000000000')
    assert r.returncode == 2
    log = open(audit).read()
    assert key not in log and new_key not in log
    assert [line for line in log.splitlines() if '"key_created"' in line]
    assert '"key_rotated"' in log and '"key_revoked"' in log
    r = _cli('--file', f, 'list', '--json')
    assert all(row['status'] == 'revoked' for row in __import__('json').loads(r.stdout))


def _race_worker(path, barrier, victim, n_creates, out):
    """One concurrent `akidb-keys` user: creates keys, revokes its victim, creates more."""
    barrier.wait()
    made = [apikeys.create_key(path, Role.VIEWER, 'racer')[0].id for _ in range(n_creates)]
    apikeys.revoke_key(path, victim)
    made += [apikeys.create_key(path, Role.VIEWER, 'racer')[0].id for _ in range(n_creates)]
    out.put(made)


def _rotate_worker(path, barrier, key_id, out):
    barrier.wait()
    old, new, _ = apikeys.rotate_key(path, key_id)
    out.put([new.id])


def test_concurrent_processes_lose_no_change(key_file):
    """Read-modify-writes from separate processes are serialised: every created key stays and
    every revocation (rotation included) holds."""
    import multiprocessing

    ctx = multiprocessing.get_context('spawn')
    victims = [apikeys.create_key(key_file, Role.ADMIN, f'leaked-{i}')[0].id for i in range(6)]
    rotated = apikeys.create_key(key_file, Role.ADMIN, 'rotated')[0].id
    barrier, out = ctx.Barrier(7), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(key_file, barrier, v, 3, out)) for v in victims
    ]
    procs.append(ctx.Process(target=_rotate_worker, args=(key_file, barrier, rotated, out)))
    for p in procs:
        p.start()
    made = [kid for _ in procs for kid in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    records = apikeys.read_key_file(key_file)
    assert len(made) == 6 * 6 + 1 and set(made) <= set(records)
    assert all(records[v].revoked for v in victims + [rotated])
    assert len(records) == 6 + 1 + len(made)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_wrong_secret_carries_the_presented_key_id(key_file, clock):
    """The audit can name the key under attack; the caller still sees an unknown key."""
    rec, key = apikeys.create_key(key_file, Role.ADMIN, 'ops')
    store = apikeys.ApiKeyStore(key_file, clock=clock)
    res = store.verify(key[:-1] + ('A' if key[-1] != 'A' else 'B'))
    assert (res.ok, res.record, res.reason, res.key_id) == (False, None, 'unknown_key', rec.id)
    other_id, other = apikeys.generate_key()
    res = store.verify(other)
    assert (res.record, res.reason, res.key_id) == (None, 'unknown_key', other_id)
    assert store.verify('akidb.nonsense').key_id is None
    assert store.verify(key).key_id == rec.id


def test_rotate_refuses_revoked_and_expired_keys(key_file):
    past = apikeys.utcnow() - dt.timedelta(days=2)
    expired, _ = apikeys.create_key(key_file, Role.ADMIN, 'old', expires_days=1, now=past)
    revoked, _ = apikeys.create_key(key_file, Role.ADMIN, 'gone')
    apikeys.revoke_key(key_file, revoked.id)
    before = open(key_file).read()
    for rec, status in ((expired, 'expired'), (revoked, 'revoked')):
        with pytest.raises(apikeys.KeyStateError, match=status):
            apikeys.rotate_key(key_file, rec.id, grace_s=3600)
    assert open(key_file).read() == before  # nothing minted


@pytest.mark.parametrize('kwargs', [
    {'client': ''}, {'client': '   '}, {'client': 'evil\n\x1b[31mRED'}, {'client': 'x' * 129},
    {'note': 'a\rb'}, {'expires_days': -5}, {'expires_days': float('inf')},
    {'expires_days': float('nan')}, {'expires_days': 1e9}, {'expires_days': 0.5},
])
def test_create_key_validates_its_input(key_file, kwargs):
    args = {'client': 'robot', **kwargs}
    with pytest.raises(ValueError):
        apikeys.create_key(key_file, Role.VIEWER, **args)
    assert apikeys.read_key_file(key_file) == {}


@pytest.mark.parametrize('grace_s', [-1, float('inf'), float('nan'), 31 * 86400])
def test_rotate_validates_grace(key_file, grace_s):
    rec, _ = apikeys.create_key(key_file, Role.VIEWER, 'robot')
    with pytest.raises(ValueError):
        apikeys.rotate_key(key_file, rec.id, grace_s=grace_s)
    assert list(apikeys.read_key_file(key_file)) == [rec.id]
