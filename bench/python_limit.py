#!/usr/bin/env python3
"""How many sentences/s the engine's own Python can serve, whatever the model's speed.

    .venv/bin/python bench/python_limit.py [--run-ms 0.5] [--clients 16] [--passes 9]

On a GPU (or a many-core CPU) a run of the model takes well under a millisecond, and what
limits the engine is its own Python under the GIL: tokenising, the hand-offs between caller
and batcher threads, padding, pooling, futures. This measures that limit on any machine. The
engine is the real one (real tokenizer, admission, batcher, deadlines) on the default model,
with one thing swapped: each ONNX Runtime run is replaced by a sleep of ``--run-ms`` that
returns zeros of the right shape. It is a measuring instrument, never a serving path; the
vectors it produces are meaningless. 16 single-sentence callers (as in ``bench/run.py``) go
through the corpus; the report gives sentences/s and this process' CPU per request for each
pass, and their medians. Results: ``bench/results/python-limit.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from akidb_ros.engine import EmbeddingEngine, load_config  # noqa: E402
from akidb_ros.engine.runtime import OnnxModel  # noqa: E402
from cpu_budget import measure as cpu_measure  # noqa: E402
from run import engine_concurrent, load_corpus  # noqa: E402

RESULTS = Path(__file__).with_name('results')


def fixed_time_run(run_s: float, dimension: int):
    """An ``OnnxModel.run`` replacement: sleep ``run_s``, return zeros ``[batch, seq, dim]``."""
    def run(self, ids, mask, types):
        time.sleep(run_s)
        return np.zeros((ids.shape[0], ids.shape[1], dimension), np.float32)
    return run


def measure(engine: EmbeddingEngine, corpus: list, clients: int) -> dict:
    """One pass over ``corpus``: sentences/s and this process' CPU ms per request."""
    got = cpu_measure(lambda: engine_concurrent(engine, corpus, clients), {}, len(corpus))
    return {'sps': got['sps'], 'cpu_ms_per_request': got['cpu_ms']['bench']}


def run_probe(run_ms: float, clients: int, passes: int, corpus: list) -> dict:
    config = load_config()
    model = config.model(config.default_model)
    original = OnnxModel.run
    OnnxModel.run = fixed_time_run(run_ms / 1000.0, model.dimension)
    try:
        engine = EmbeddingEngine(config)
        try:
            engine.start([model.id])
            engine_concurrent(engine, corpus[:256], clients)      # warm-up
            rows = [measure(engine, corpus, clients) for _ in range(passes)]
        finally:
            engine.close()
    finally:
        OnnxModel.run = original
    return {
        'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                    'python': platform.python_version()},
        'model': model.id, 'run_ms': run_ms, 'clients': clients, 'sentences': len(corpus),
        'passes': rows,
        'median_sps': statistics.median(r['sps'] for r in rows),
        'median_cpu_ms_per_request': statistics.median(r['cpu_ms_per_request'] for r in rows),
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    lines = [
        f"# Engine's Python limit — {result['when']}", '',
        f"Model `{result['model']}` tokenizer and engine, each model run replaced by a "
        f"{result['run_ms']} ms sleep, {result['clients']} concurrent single-sentence callers, "
        f"{result['sentences']} sentences per pass, {result['machine']['cpu_count']} CPUs "
        '(`bench/python_limit.py`).', '',
        '| pass | sentences/s | CPU ms per request |', '|---|---|---|',
        *[f"| {i + 1} | {r['sps']:.0f} | {r['cpu_ms_per_request']:.3f} |"
          for i, r in enumerate(result['passes'])],
        f"| median | {result['median_sps']:.0f} | {result['median_cpu_ms_per_request']:.3f} |",
    ]
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument('--run-ms', type=float, default=0.5, help='stand-in run time (default 0.5)')
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--passes', type=int, default=9)
    ap.add_argument('--out', default=str(RESULTS / 'python-limit'))
    args = ap.parse_args(argv)
    corpus = load_corpus() * 2
    result = run_probe(args.run_ms, args.clients, args.passes, corpus)
    for i, r in enumerate(result['passes']):
        print(f"pass {i + 1}: {r['sps']:7.0f} sentences/s  {r['cpu_ms_per_request']:.3f} ms CPU "
              'per request', flush=True)
    print(f"median {result['median_sps']:.0f} sentences/s", flush=True)
    write(result, Path(args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
