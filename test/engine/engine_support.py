"""Shared helpers for the engine tests (real models exported by make setup into models/)."""
import copy
from pathlib import Path

import numpy as np
import yaml

from akidb_ros.engine import EmbeddingEngine, load_config
from akidb_ros.engine.config import DEFAULT_CONFIG_PATH, REPO_ROOT

MODELS = REPO_ROOT / 'models'
MINILM = 'all-minilm-l6-v2'
MPNET = 'all-mpnet-base-v2'


def base_raw() -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw['models_dir'] = str(MODELS)
    return raw


def write_config(tmp_path: Path, mutate=None) -> Path:
    raw = copy.deepcopy(base_raw())
    if mutate:
        mutate(raw)
    path = tmp_path / 'models.yaml'
    path.write_text(yaml.safe_dump(raw))
    return path


def make_engine(tmp_path: Path, mutate=None, preload=True) -> EmbeddingEngine:
    eng = EmbeddingEngine(load_config(write_config(tmp_path, mutate), env={}))
    if preload:
        eng.start()
    return eng


def reference(folder: str):
    data = np.load(MODELS / folder / 'reference.npz')
    return [str(s) for s in data['sentences']], data['vectors']


class Gate:
    """Wraps a batcher's real ONNX run: records batch shapes and can hold the batcher still."""

    def __init__(self, batcher):
        self.batcher = batcher
        self.inner = batcher._run
        self.shapes = []
        self.real_tokens = []
        import threading
        self.open = threading.Event()
        self.entered = threading.Event()
        self.open.set()
        batcher._run = self

    def close(self):
        self.open.clear()
        self.entered.clear()

    def __call__(self, ids, mask, types):
        self.entered.set()
        self.open.wait(30)
        self.shapes.append(ids.shape)
        self.real_tokens.append(int(mask.sum()))
        return self.inner(ids, mask, types)
