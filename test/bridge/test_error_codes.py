"""The doors put ``code.name`` on the wire, so every code of the one table must be its own enum
member. Two codes with an identical ErrorSpec become enum *aliases* (INPUT_TOO_LONG is then
INVALID_INPUT, UNAVAILABLE is CIRCUIT_OPEN on the wire, and clients raise the wrong type)."""
from __future__ import annotations

from akidb_ros.client.errors import RETRYABLE_CODES, _BY_CODE
from akidb_ros.engine.errors import ErrorCode


def test_every_code_is_a_distinct_member():
    aliases = {name: member.name for name, member in ErrorCode.__members__.items()
               if member.name != name}
    assert not aliases, (f'akidb_ros/engine/errors.py: these codes are enum aliases of others '
                         f'(identical ErrorSpec): {aliases}')


def test_client_knows_every_code_and_its_retryability():
    for name, member in ErrorCode.__members__.items():
        assert name in _BY_CODE, name
        assert (name in RETRYABLE_CODES) == member.retryable, name
