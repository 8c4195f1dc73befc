#!/usr/bin/env python3
"""A/B of the batcher's split policies (``cost`` vs ``padding``), interleaved with the ceiling.

    python bench/split_ab.py [--rounds 3] [--clients 16]       (AKIDB_DEVICE picks the device)

Two engines on the same model, one per policy, each driven by 16 concurrent single-sentence
callers; every engine pass is divided by a raw-ceiling pass measured right before it (as in
bench/run.py) and the medians of those ratios are compared. Prints the cost model's fit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from akidb_ros.engine import EmbeddingEngine, load_config  # noqa: E402
from run import RawCeiling, engine_concurrent, load_corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--clients', type=int, default=16)
    args = ap.parse_args()
    corpus = load_corpus()
    config = load_config()
    ceiling = RawCeiling(config, config.default_model)
    engines = {}
    for policy in ('cost', 'padding'):
        eng = EmbeddingEngine(load_config(
            overrides={'engine': {'batching': {'split_policy': policy}}}))
        eng.start()
        engine_concurrent(eng, corpus[:300], args.clients)   # warm up; the cost model learns
        engines[policy] = eng
    ceiling.embed_sorted(corpus[:200])
    ratios = {p: [] for p in engines}
    try:
        for r in range(args.rounds):
            for policy, eng in engines.items():
                c = ceiling.embed_sorted(corpus)
                d = engine_concurrent(eng, corpus, args.clients)
                ratios[policy].append(d / c)
                print(f'round {r + 1} {policy:>8}: ceiling {c:8.1f}/s engine {d:8.1f}/s '
                      f'ratio {d / c:.3f}', flush=True)
        fit = engines['cost'].manager.loaded(config.default_model).batcher.cost.params()
    finally:
        for eng in engines.values():
            eng.close()
    print(json.dumps({'median_ratio': {p: round(statistics.median(v), 3)
                                       for p, v in ratios.items()},
                      'cost_fit': {'overhead_ms': round(fit[0] * 1e3, 3),
                                   'per_token_us': round(fit[1] * 1e6, 3)} if fit else None,
                      'ceiling_provider': ceiling.onnx.provider}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
