"""Fast DDS shared-memory files left by SIGKILLed participants: cleaned, live ones left alone.

A participant killed with SIGKILL leaves its port in /dev/shm, and a later participant of the
domain that takes its number can discover its peers yet get no data (akidb_ros.dds_env). The
node and the bridges clean at start, leaving files younger than START_MIN_AGE_S alone (a peer
that is starting beside them has not locked its files yet).
"""
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from akidb_ros.dds_env import clean_zombie_shm, is_locked, START_MIN_AGE_S
from ros_support import NodeProcess

SHM = Path('/dev/shm')
OLD = time.time() - 3600


def _port(folder: Path, number: int, mtime: float = OLD):
    files = [folder / f'fastdds_port{number}_el', folder / f'fastdds_port{number}',
             folder / f'sem.fastdds_port{number}_mutex']
    for f in files:
        f.write_bytes(b'')
        os.utime(f, (mtime, mtime))
    return files


def test_clean_takes_unlocked_files_and_leaves_locked_and_young_ones(tmp_path):
    dead = _port(tmp_path, 7411)
    live = _port(tmp_path, 7412)
    young = _port(tmp_path, 7413, mtime=time.time())
    segment = [tmp_path / 'fastdds_0123456789abcdef_el', tmp_path / 'fastdds_0123456789abcdef']
    for f in segment:
        f.write_bytes(b'')
        os.utime(f, (OLD, OLD))
    other = tmp_path / 'not_fastdds_port7414_el'
    other.write_bytes(b'')
    with open(live[0], 'ab') as holder:      # a live participant holds its port's lock
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        said = clean_zombie_shm(START_MIN_AGE_S, shm_dir=tmp_path)
        assert said == ('1 zombie ports cleaned, 1 zombie segments cleaned; '
                        '2 ports in use, 0 segments in use'), said
        assert not any(f.exists() for f in dead + segment)
        assert all(f.exists() for f in live + young) and other.exists()
        # tests clean between their own processes with no age guard: the young port goes too
        said = clean_zombie_shm(0.0, shm_dir=tmp_path)
    assert said.startswith('1 zombie ports cleaned, 0 zombie segments cleaned'), said
    assert not any(f.exists() for f in young) and all(f.exists() for f in live)


def test_clean_without_the_folder_says_why(tmp_path):
    assert clean_zombie_shm(shm_dir=tmp_path / 'absent').startswith('no shared-memory folder')


PARTICIPANT = '''
import sys, time, rclpy
rclpy.init()
node = rclpy.create_node('akidb_shm_victim')
print('joined', flush=True)
time.sleep(600)
'''


def _fastdds_files() -> set:
    return {p.name for p in SHM.glob('fastdds_*')}


def test_node_start_cleans_what_a_killed_participant_left(tmp_path):
    """A real participant killed with SIGKILL leaves its files; the node cleans them at start."""
    before = _fastdds_files()
    victim = subprocess.Popen([sys.executable, '-c', PARTICIPANT], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert victim.stdout.readline().strip() == 'joined'
        time.sleep(0.5)
        left = _fastdds_files() - before
        assert any(n.startswith('fastdds_port') for n in left), left
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    time.sleep(0.2)
    left = {n for n in left if (SHM / n).exists()}
    assert any(n.startswith('fastdds_port') for n in left), 'SIGKILL left nothing behind'
    for n in left:      # older than the start guard, as after a restart by a supervisor
        os.utime(SHM / n, (OLD, OLD))
    node = NodeProcess()
    try:
        node.wait_ready()
        said = [ln for ln in node.lines if 'DDS shared memory: ' in ln]
        assert len(said) == 1 and ' 0 zombie ports cleaned' not in said[0], node.output
        # the segment (a random name) is gone; the node took the same port numbers again
        # (participant ids start from the lowest free one): those files are its, locked
        locks = [SHM / n for n in left if n.endswith(('_el', '_sl'))]
        assert not any(p.exists() for p in locks if not p.name.startswith('fastdds_port'))
        assert all(is_locked(p) for p in locks if p.exists()), locks
    finally:
        node.stop()


def test_a_clean_exit_leaves_no_shared_memory_behind():
    """The node ends with os._exit after its clean stop; the context was never finalized, so
    Fast DDS never deleted its participant: its segment stayed in /dev/shm at every exit."""
    before = _fastdds_files()
    node = NodeProcess()
    try:
        node.wait_ready()
        time.sleep(0.5)
        ours = _fastdds_files() - before
        assert ours, 'the node made no shared-memory files'
    finally:
        node.stop()
    assert node.proc.returncode == 0, node.output
    # its segment and every lock file go; a port's segment file stays while other
    # participants of the domain (a full test run's) still have it open
    left = {n for n in ours if (SHM / n).exists()}
    assert not {n for n in left if not n.startswith('fastdds_port') or
                n.endswith(('_el', '_sl'))}, left
