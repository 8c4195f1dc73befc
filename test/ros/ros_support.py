"""Helpers for the ROS tests: the node process, metrics scraping, generic service calls.

Import after conftest.py has set the loopback DDS environment (pytest loads conftest first).
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / 'config' / 'params.yaml'
# the session's node lives in its own namespace: other suites may run nodes on the same domain
NS = '/akidb_ros_test'
READY_MARK = 'embedding node ready in'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class NodeProcess:
    """``python -m akidb_ros.ros.node`` in its own process, with its output collected."""

    def __init__(self, *extra_args: str, namespace: str = '', params_file=PARAMS_FILE,
                 env=None):
        # AKIDB_ROS_TEST_NODE_ARGS: extra node arguments for the whole run, e.g.
        # '-p executor:=multi_threaded' to run every test against the MultiThreadedExecutor
        cmd = [sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args',
               '--params-file', str(params_file),
               *os.environ.get('AKIDB_ROS_TEST_NODE_ARGS', '').split(), *extra_args]
        if namespace:
            cmd += ['-r', f'__ns:={namespace}']
        self.namespace = namespace
        self.lines = []
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.t_ready = None
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True,
                                     env=None if env is None else {**os.environ, **env})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip('\n'))
            if READY_MARK in line and not self.ready.is_set():
                self.t_ready = time.monotonic()
                self.ready.set()
        self.exited.set()

    @property
    def output(self) -> str:
        return '\n'.join(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from Popen to the node's ready line; fails with the node's output."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(timeout=0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f'node not ready (rc={self.proc.returncode}):\n{self.output}')
        return self.t_ready - self.t_start

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exited.wait(timeout=5)
        return rc

    def stop(self) -> None:
        """SIGINT, then SIGKILL after 10 s (the node answers what is in flight first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                _clean_shm()
        self.exited.wait(timeout=5)


def _clean_shm() -> None:
    """Remove Fast DDS shared-memory ports and segments left by SIGKILLed processes."""
    from akidb_ros.dds_env import clean_zombie_shm
    said = clean_zombie_shm()
    assert 'cleaned' in said, said


def scrape(port: int) -> str:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: str = '') -> float:
    """Sum of a Prometheus sample's values (matching ``labels`` as a substring)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + '{') or line.startswith(name + ' '):
            if labels in line:
                total += float(line.rsplit(' ', 1)[1])
    return total


def call(client, srv_type, name: str, request, timeout: float = 10.0):
    """Call any service through the client (an EmbeddingClient); relative names are under NS."""
    from akidb_ros.ros.cli import NoAnswer
    if not name.startswith('/'):
        name = f'{NS}/{name}'
    try:
        return client.call_service(srv_type, name, request, timeout)
    except NoAnswer as exc:
        pytest.fail(str(exc))
