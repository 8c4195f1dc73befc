"""The client example in docs/api.md runs as written (ports swapped for the test servers)."""
from __future__ import annotations

import re

from bridge_support import ROOT


def _python_blocks(md: str):
    return re.findall(r'```python\n(.*?)```', md, flags=re.S)


def test_client_library_example_runs(rest_url, grpc_target):
    doc = (ROOT / 'docs' / 'api.md').read_text()
    block = next(b for b in _python_blocks(doc) if 'from akidb_ros.client import' in b)
    rest_port = rest_url.rsplit(':', 1)[1]
    grpc_port = grpc_target.rsplit(':', 1)[1]
    code = block.replace('127.0.0.1:8080', f'127.0.0.1:{rest_port}').replace(
        '127.0.0.1:9090', f'127.0.0.1:{grpc_port}')
    scope: dict = {}
    exec(compile(code, 'docs/api.md', 'exec'), scope)   # noqa: S102 - our own docs
    assert scope['out'].embeddings.shape == (2, 384)
    assert scope['vecs'].shape == (1, 384)
    scope['rest'].unload_model('all-mpnet-base-v2')
