"""Loopback-only DDS settings (the Python twin of scripts/dds_env.sh), for tests and benches.

Apply them to ``os.environ`` before the first rclpy context, or to a child process's env copy.
No rclpy import here: this must run before rclpy is loaded.
"""
from __future__ import annotations

import random
import subprocess
import sys
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


def clean_zombie_shm(timeout_s: float = 30.0) -> str:
    """Run ``fastdds shm clean``: remove the shared-memory ports and segments of Fast DDS
    participants whose process is gone. Returns the tool's summary, or why it could not run.

    Under ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` rmw_fastrtps adds Fast DDS's
    shared-memory transport beside UDP. A participant killed with SIGKILL leaves its port
    behind, and a later participant of the same domain that takes its number could discover
    its peers yet get no data from them (the test suite saw it late in full runs). Segments in
    use are left alone, so this is safe beside running participants. The tool needs psutil.
    """
    tool = Path(sys.prefix) / 'tools' / 'fastdds' / 'fastdds.py'
    if not tool.exists():
        return f'no {tool}'
    try:
        out = subprocess.run([sys.executable, str(tool), 'shm', 'clean'], capture_output=True,
                             text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f'fastdds shm clean: {exc}'
    text = ' '.join((out.stdout + out.stderr).split())
    return text if out.returncode == 0 else f'fastdds shm clean failed ({out.returncode}): {text}'
