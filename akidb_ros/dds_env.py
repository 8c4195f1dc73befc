"""Loopback-only DDS settings (the Python twin of scripts/dds_env.sh), for tests and benches.

Apply them to ``os.environ`` before the first rclpy context, or to a child process's env copy.
No rclpy import here: this must run before rclpy is loaded.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import MutableMapping, Optional

LOOPBACK_PROFILE = Path(__file__).resolve().parents[1] / 'config' / 'fastdds_loopback.xml'


def apply_loopback_dds(env: MutableMapping[str, str], domain_id: Optional[int] = None,
                       profile: Optional[Path] = None) -> MutableMapping[str, str]:
    """Keep DDS on 127.0.0.1. A given ``profile`` replaces any set one; else it is a default."""
    env.pop('ROS_LOCALHOST_ONLY', None)
    if profile is not None:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)
    else:
        env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(LOOPBACK_PROFILE))
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['ROS_STATIC_PEERS'] = ''
    env['RMW_IMPLEMENTATION'] = 'rmw_fastrtps_cpp'   # the only RMW in the wheel set
    env.setdefault('ROS_DOMAIN_ID', str(random.randint(10, 99) if domain_id is None
                                        else domain_id))
    env.setdefault('AMENT_PREFIX_PATH', sys.prefix)
    return env


# Fast DDS derives its ports from the domain id (7400 + 250 x domain + offsets): above 232 they
# pass 65535 and every participant fails to start, with only Fast DDS's own log line.
MAX_DOMAIN_ID = 232


def domain_id_error(env: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Why ``ROS_DOMAIN_ID`` cannot be used (None when unset, blank or fine), checked before
    rclpy starts: a node, a bridge or the CLI exited 1 with no word of their own."""
    raw = (os.environ if env is None else env).get('ROS_DOMAIN_ID', '').strip()
    if not raw:
        return None             # rcl's default, 0
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_DOMAIN_ID:
        return (f'ROS_DOMAIN_ID={raw[:20]!r} must be a whole number from 0 to {MAX_DOMAIN_ID} '
                '(Fast DDS derives its ports from it and runs out above 232)')
    return None


# Fast DDS's shared-memory files (its `fastdds shm clean` tool, tools/fastdds/shm/clean.py):
# a port or segment is alive while its owner holds an flock on the "_el"/"_sl" lock file.
_SHM_DIR = Path('/dev/shm')  # nosec B108: Fast DDS's own folder, read as its tool does
_SEGMENT_LOCK = re.compile(r'^fastdds_[0-9a-z]{16}(_el|_sl)$')
_PORT_LOCK = re.compile(r'^fastdds_port\d{1,5}(_el|_sl)$')
START_MIN_AGE_S = 5.0


def clean_zombie_shm(min_age_s: float = 0.0, shm_dir: Path = _SHM_DIR) -> str:
    """Remove the shared-memory files of Fast DDS participants whose process is gone.

    Returns a summary: how many ports and segments were cleaned, how many are in use.
    Under ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` rmw_fastrtps adds Fast DDS's
    shared-memory transport beside UDP. A participant killed with SIGKILL (an OOM kill, a
    crash) leaves its port behind, and a later participant of the same domain that takes its
    number could discover its peers yet get no data from them (the test suite saw it late in
    full runs). The files of a live participant are locked by it and left alone.

    Fast DDS's ``fastdds shm clean`` does the same, but as a script (a subprocess, psutil) and
    it would also take files just created whose owner has not locked them yet, so it is not
    safe while another participant starts. ``min_age_s`` leaves such young files alone: the
    node and the bridges clean with :data:`START_MIN_AGE_S` at start, beside peers that may be
    starting too (a pod's containers, a robot's launch); tests, between their processes, with 0.
    """
    try:
        return _summary(*_clean(min_age_s, shm_dir))
    except OSError as exc:
        return f'no shared-memory folder: {exc}'


def _summary(cleaned: dict, in_use: dict) -> str:
    return (f"{cleaned['port']} zombie ports cleaned, {cleaned['segment']} zombie segments "
            f"cleaned; {in_use['port']} ports in use, {in_use['segment']} segments in use")


def _clean(min_age_s: float, shm_dir: Path) -> tuple:
    """Remove the zombie files; return ``(cleaned, in_use)``: counts by kind (OSError: no dir)."""
    names = os.listdir(shm_dir)
    now = time.time()
    cleaned = {'port': 0, 'segment': 0}
    in_use = {'port': 0, 'segment': 0}
    for name in names:
        kind = ('port' if _PORT_LOCK.match(name) else
                'segment' if _SEGMENT_LOCK.match(name) else None)
        if kind is None:
            continue
        lock = shm_dir / name
        try:
            if now - lock.stat().st_mtime < min_age_s or is_locked(lock):
                in_use[kind] += 1
                continue
        except OSError:         # gone meanwhile (its owner closed, or another cleaner)
            continue
        base = name[:-3]
        files = [lock, shm_dir / base]
        if kind == 'port':
            files.append(shm_dir / f'sem.{base}_mutex')     # the port's POSIX semaphore
        for path in files:
            with contextlib.suppress(OSError):
                path.unlink()
        cleaned[kind] += 1
    return cleaned, in_use


def is_locked(path: Path) -> bool:
    """Whether another process holds an flock on ``path`` (as Fast DDS's tool checks)."""
    try:
        with open(path, 'ab') as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False            # closing the file dropped the lock just taken
    except OSError:
        return True


def clean_zombie_shm_at_start(log) -> None:
    """Clean what SIGKILLed participants left, before this process joins DDS (logged if any)."""
    if not sys.platform.startswith('linux'):
        return
    try:
        cleaned, in_use = _clean(START_MIN_AGE_S, _SHM_DIR)
    except OSError:         # no /dev/shm: no shared-memory transport to clean
        return
    if any(cleaned.values()):
        log.info('DDS shared memory: %s', _summary(cleaned, in_use))
