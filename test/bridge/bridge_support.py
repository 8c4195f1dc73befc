"""Constants and helpers shared by the bridge tests (imported by name: several test folders
have a conftest.py, so ``from conftest import`` would be ambiguous)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / 'models'
DEFAULT_MODEL = 'all-minilm-l6-v2'
SECOND_MODEL = 'all-mpnet-base-v2'


def scrape(text: str):
    """/metrics text → {(sample name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def read_to_close(sock) -> bytes:
    """Everything a raw socket receives until the server closes it (or the socket times out)."""
    import socket
    out = b''
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except socket.timeout:
        return out
