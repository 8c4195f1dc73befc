"""Fixtures for the deployment-asset tests (test/deploy)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # bench.chaos
from deploy_support import LiveServer  # noqa: E402


@pytest.fixture(scope='session')
def live_server():
    """A real in-process server (REST on a free 127.0.0.1 port), a few calls made."""
    srv = LiveServer()
    try:
        for i in range(5):
            assert srv.embed([f'warm up {i}', 'the robot reached the dock']) == 200
        assert srv.embed(['x'], model='no-such-model') == 400
        yield srv
    finally:
        srv.stop()
