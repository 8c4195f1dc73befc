"""Fixtures for the ROS tests: real rclpy, the node in its own process, loopback-only DDS.

Every process started here gets the loopback DDS environment (scripts/dds_env.sh), the run's
ROS_DOMAIN_ID and a temporary ROS_LOG_DIR, and is stopped on teardown (SIGINT, then SIGKILL).
"""
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# --- loopback DDS, before rclpy is imported anywhere in this process ---------------------
os.environ.pop('ROS_LOCALHOST_ONLY', None)
os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(ROOT / 'config' / 'fastdds_loopback.xml')
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ['ROS_STATIC_PEERS'] = ''
os.environ['RMW_IMPLEMENTATION'] = 'rmw_fastrtps_cpp'
# scripts/run_tests.sh picks a fresh id per run; a bare pytest run gets one from its pid.
os.environ.setdefault('ROS_DOMAIN_ID', str(10 + os.getpid() % 90))
if not os.environ.get('ROS_LOG_DIR'):
    os.environ['ROS_LOG_DIR'] = tempfile.mkdtemp(prefix='akidb-ros-log-')

from akidb_ros.ros.cli import EmbeddingClient  # noqa: E402  (needs the environment above)
from ros_support import free_port, NodeProcess, NS  # noqa: E402, I100


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
