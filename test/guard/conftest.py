"""Fixtures for the guard suite: real keys, certificates and files in a temp folder."""

from __future__ import annotations

import os
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from certs import make_ca, make_leaf, make_rsa_key, public_pem  # noqa: E402


class ManualClock:
    """A monotonic clock the test advances by hand (time itself, not a mock of our code)."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture(scope='session')
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('pki'))
    ca = make_ca(d)
    other = make_ca(d, cn='rogue CA')
    server = make_leaf(d, ca, 'localhost', server=True, name='server')
    clients = {
        role: make_leaf(d, ca, f'{role}-client', server=False, ou=role, name=f'client-{role}')
        for role in ('viewer', 'operator', 'developer', 'admin')
    }
    norole = make_leaf(d, ca, 'plain-client', server=False, name='client-norole')
    rogue = make_leaf(d, other, 'rogue', server=False, ou='admin', name='client-rogue')
    expired = make_leaf(
        d,
        ca,
        'old-client',
        server=False,
        ou='admin',
        name='client-expired',
        days=-1,
        not_before_days=-2,
    )
    return {
        'dir': d,
        'ca': ca,
        'rogue_ca': other,
        'server': server,
        'clients': clients,
        'norole': norole,
        'rogue': rogue,
        'expired': expired,
    }


@pytest.fixture(scope='session')
def rsa_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp('jwtkeys')
    good, other = make_rsa_key(), make_rsa_key()
    pem = d / 'public.pem'
    pem.write_bytes(public_pem(good))
    return {'good': good, 'other': other, 'pem': str(pem), 'dir': str(d)}


@pytest.fixture
def key_file(tmp_path):
    return str(tmp_path / 'api_keys.yaml')
