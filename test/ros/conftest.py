"""Fixtures for the ROS tests: real rclpy, the node in its own process, loopback-only DDS.

Every process started here gets the loopback DDS environment (scripts/dds_env.sh), the run's
ROS_DOMAIN_ID and a temporary ROS_LOG_DIR, and is stopped on teardown (SIGINT, then SIGKILL).
"""
import os
import tempfile
from pathlib import Path

import pytest

from akidb_ros.dds_env import LOOPBACK_PROFILE, apply_loopback_dds

ROOT = Path(__file__).resolve().parents[2]

# --- loopback DDS, before rclpy is imported anywhere in this process ---------------------
# scripts/run_tests.sh picks a fresh id per run; a bare pytest run gets one from its pid.
apply_loopback_dds(os.environ, domain_id=10 + os.getpid() % 90, profile=LOOPBACK_PROFILE)
if not os.environ.get('ROS_LOG_DIR'):
    os.environ['ROS_LOG_DIR'] = tempfile.mkdtemp(prefix='akidb-ros-log-')

from akidb_ros.ros.cli import EmbeddingClient  # noqa: E402  (needs the environment above)
from ros_support import free_port, NodeProcess, NS  # noqa: E402, I100


@pytest.fixture(scope='module', autouse=True)
def no_zombie_dds_ports():
    """Each module starts without shared-memory ports of killed participants: a participant
    that took such a port's number discovered its peers but got no data from them (the
    bounded-SIGTERM test's loaders, late in full runs, after the sidecar tests' SIGKILLs)."""
    from ros_support import _clean_shm
    _clean_shm()


@pytest.fixture(scope='session')
def metrics_port():
    return free_port()


@pytest.fixture(scope='session')
def node(metrics_port):
    """The node under test (namespace NS), with /metrics on a loopback port."""
    n = NodeProcess('-p', f'metrics_port:={metrics_port}', namespace=NS)
    n.wait_ready()
    yield n
    n.stop()


@pytest.fixture(scope='session')
def client(node):
    with EmbeddingClient(NS, node_name='akidb_test_client') as c:
        assert c.clients['embed'].wait_for_service(timeout_sec=30), node.output
        yield c
