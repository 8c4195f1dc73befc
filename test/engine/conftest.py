"""Fixtures for the engine tests (real models exported by make setup)."""
import pytest

from engine_support import make_engine


@pytest.fixture(scope='session')
def engine(tmp_path_factory):
    eng = make_engine(tmp_path_factory.mktemp('engine'))
    yield eng
    eng.close()
