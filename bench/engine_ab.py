#!/usr/bin/env python3
"""A/B of engine settings, interleaved with the raw ceiling.

    python bench/engine_ab.py [--rounds 3] [--clients 16] [--variant NAME=JSON ...]

Default variants: the batcher's split policies (``cost`` vs ``padding``). Each ``--variant``
is a name and a JSON override of config/models.yaml, e.g.
``--variant 'runners2={"engine": {"batching": {"runners": 2}}}'``. One engine per variant on the
same model, each driven by 16 concurrent single-sentence callers; every engine pass is divided
by the mean of the raw-ceiling passes (config/models.yaml as it is) right before and after it,
and the medians of those ratios are compared. Prints the first variant's learnt run-cost fit.
AKIDB_DEVICE picks the device.
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
from run import CeilingTrack, RawCeiling, engine_concurrent, load_corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--variant', action='append', default=[], metavar='NAME=JSON')
    args = ap.parse_args()
    variants = {name: json.loads(spec) for name, spec in
                (v.split('=', 1) for v in args.variant)} or {
        policy: {'engine': {'batching': {'split_policy': policy}}}
        for policy in ('cost', 'padding')}
    corpus = load_corpus()
    config = load_config()
    ceiling = RawCeiling(config, config.default_model)
    engines = {}
    for name, override in variants.items():
        eng = EmbeddingEngine(load_config(overrides=override))
        eng.start()
        engine_concurrent(eng, corpus[:300], args.clients)   # warm up; the cost model learns
        engines[name] = eng
    ceiling.embed_sorted(corpus[:200])
    ratios = {p: [] for p in engines}
    try:
        track = CeilingTrack(ceiling, corpus)
        for r in range(args.rounds):
            for name, eng in engines.items():
                c, d = track.around(lambda: engine_concurrent(eng, corpus, args.clients))
                ratios[name].append(d / c)
                print(f'round {r + 1} {name:>10}: ceiling {c:8.1f}/s engine {d:8.1f}/s '
                      f'ratio {d / c:.3f}', flush=True)
        first = next(iter(engines.values()))
        fit = first.manager.loaded(config.default_model).batcher.cost.params()
    finally:
        for eng in engines.values():
            eng.close()
    print(json.dumps({'median_ratio': {n: round(statistics.median(v), 3)
                                       for n, v in ratios.items()},
                      'cost_fit': {'overhead_ms': round(fit[0] * 1e3, 3),
                                   'per_token_us': round(fit[1] * 1e6, 3)} if fit else None,
                      'ceiling_provider': ceiling.onnx.provider}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
