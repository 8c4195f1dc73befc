#!/usr/bin/env python3
"""One command, one run, ratios on the same machine: ``make bench`` (or ``python bench/run.py``).

Rounds are interleaved (ceiling, door, ceiling, door, ...) because absolute speed on this
machine swings several-fold within an hour; each door's sentences/s is divided by the mean of
the ceiling passes measured right before and right after it, and the report gives the median of
those ratios.

* ceiling: in-process ONNX Runtime, the corpus sorted by token length, batches of 32, the same
  model, sessions, threads and maths as the engine (tokenise, pad, run, mean-pool, L2): with
  ``batching.runners: 2`` two loops take the sorted batches in turn, the way the engine's two
  runners overlap their runs (on this 2-core CPU that is ~10 % faster than one loop on one
  two-thread session, so the engine is measured against the faster ceiling).
* engine:  the EmbeddingEngine called by 16 concurrent single-sentence callers.
* other doors (ROS node, REST, gRPC) are added by bench/ros_bench.py and bench/bridge_bench.py
  when present (``--doors``).

Also measured: single-sentence p50 (raw vs engine, one caller), model cache-hit cost, and the
cold-load time of the small model (p95 over repeated load/unload).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config  # noqa: E402
from akidb_ros.engine.runtime import OnnxModel  # noqa: E402
from akidb_ros.engine.text import TextEncoder, l2_normalize, pad_batch, pool  # noqa: E402

CORPUS = Path(__file__).with_name('corpus.txt')
RESULTS = Path(__file__).with_name('results')


def load_corpus() -> list:
    return [s for s in CORPUS.read_text().splitlines() if s.strip()]


def drain(items: list, handle, workers: int) -> float:
    """``workers`` threads take ``items`` in order and ``handle`` each; returns the seconds."""
    pending = iter(items)
    lock = threading.Lock()

    def loop():
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            handle(item)

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


class RawCeiling:
    """The best this machine can do: no queue, perfectly length-sorted batches, and as many
    loops over them as the engine has runners (same sessions, so the same overlap)."""

    def __init__(self, config, model_id: str):
        self.cfg = config.model(model_id)
        self.loops = config.engine.batching.runners
        self.onnx = OnnxModel(self.cfg, config.engine, self.loops)
        self.onnx.warm_up(0)
        self.onnx.build_overlap(0)
        self.onnx.wait_overlap(60)
        self.encoder = TextEncoder(self.cfg)

    def embed_sorted(self, sentences: list, batch: int = 32) -> float:
        """Embed everything; return sentences/s (tokenisation included, as in the engine)."""
        t0 = time.perf_counter()
        encoded = self.encoder.encode(sentences)
        encoded.sort(key=lambda e: e.length)

        def run(chunk):
            ids, mask, types = pad_batch(chunk, self.encoder.pad_id, self.onnx.uses_type_ids)
            l2_normalize(pool(self.onnx.run(ids, mask, types), mask, self.cfg.pooling))

        drain([encoded[i:i + batch] for i in range(0, len(encoded), batch)], run, self.loops)
        return len(sentences) / (time.perf_counter() - t0)

    def single_latencies(self, sentences: list) -> list:
        out = []
        for s in sentences:
            t0 = time.perf_counter()
            enc = self.encoder.encode([s])
            ids, mask, types = pad_batch(enc, self.encoder.pad_id, self.onnx.uses_type_ids)
            l2_normalize(pool(self.onnx.run(ids, mask, types), mask, self.cfg.pooling))
            out.append((time.perf_counter() - t0) * 1000)
        return out


class CeilingTrack:
    """Ceiling passes between door passes; a door pass is divided by the mean of the two ceiling
    passes around it (this machine's speed drifts within seconds: one neighbour tilts a ratio).

    A ceiling pass is ``ceiling.embed_sorted(corpus)`` (sentences/s), or ``ceiling_pass()`` when
    given: a number, or a dict of numbers averaged key by key (bench/cpu_budget.py).
    """

    def __init__(self, ceiling: RawCeiling, corpus: list, ceiling_pass=None):
        self._pass = ceiling_pass or (lambda: ceiling.embed_sorted(corpus))
        self.before = None

    def around(self, measure) -> tuple:
        """Run ``measure()`` between ceiling passes; return (the ceiling's mean, its result)."""
        if self.before is None:
            self.before = self._pass()
        result = measure()
        after = self._pass()
        before, self.before = self.before, after
        if isinstance(after, dict):
            return {k: (before[k] + after[k]) / 2 for k in after}, result
        return (before + after) / 2, result


def engine_concurrent(engine: EmbeddingEngine, sentences: list, clients: int = 16) -> float:
    """16 callers, one sentence per call, until the corpus is done; sentences/s."""
    errors = []

    def call(sentence):
        try:
            engine.embed(EmbedRequest(inputs=[sentence]))
        except Exception as exc:  # counted: a benchmark with errors is reported as such
            errors.append(exc)

    elapsed = drain(sentences, call, clients)
    if errors:
        raise RuntimeError(f'{len(errors)} engine errors, first: {errors[0]!r}')
    return len(sentences) / elapsed


def engine_single_latencies(engine: EmbeddingEngine, sentences: list) -> list:
    out = []
    for s in sentences:
        t0 = time.perf_counter()
        engine.embed(EmbedRequest(inputs=[s]))
        out.append((time.perf_counter() - t0) * 1000)
    return out


def paired_latencies(raw: Callable[[str], float], door: Callable[[str], float],
                     sentences: list) -> Tuple[list, list]:
    """Call ``raw(s)`` then ``door(s)`` for each sentence; return both lists of milliseconds."""
    raw_ms, door_ms = [], []
    for s in sentences:
        raw_ms.append(raw(s))
        door_ms.append(door(s))
    return raw_ms, door_ms


def cold_load_ms(engine: EmbeddingEngine, model_id: str, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        engine.unload_model(model_id)
        time.sleep(0.05)   # let the retired batcher thread finish
        t0 = time.perf_counter()
        engine.load_model(model_id)
        times.append((time.perf_counter() - t0) * 1000)
        # The overlap session builds after the load; let it finish before the next unload so
        # it does not compete with the next timed load.
        engine.manager.loaded(model_id).onnx.wait_overlap(60)
    return times


def cache_hit_us(engine: EmbeddingEngine, model_id: str, n: int = 2000) -> float:
    mgr = engine.manager
    t0 = time.perf_counter()
    for _ in range(n):
        mgr.release(mgr.acquire(model_id))
    return (time.perf_counter() - t0) / n * 1e6


def p(values: list, q: float) -> float:
    return float(np.percentile(np.array(values), q))


def external_doors(names: list):
    """Doors from the other bench modules: name -> callable(corpus, n_clients) -> sentences/s."""
    doors = {}
    if 'ros' in names:
        from ros_bench import make_ros_door   # bench/ros_bench.py
        doors['ros'] = make_ros_door
    for name in ('rest', 'grpc', 'rest-sidecar', 'grpc-sidecar'):
        if name in names:
            from bridge_bench import make_bridge_door   # bench/bridge_bench.py
            doors[name] = lambda corpus, name=name: make_bridge_door(name, corpus)
    return doors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--doors', default='engine', help='comma list: engine,ros,rest,grpc,...')
    ap.add_argument('--model', default='')
    ap.add_argument('--out', default=str(RESULTS / 'latest'))
    args = ap.parse_args()

    config = load_config()
    model_id = args.model or config.default_model
    corpus = load_corpus()
    single_set = corpus[::6][:200]
    ceiling = RawCeiling(config, model_id)
    engine = EmbeddingEngine(config)
    engine.start([model_id])
    sys.path.insert(0, str(Path(__file__).parent))
    door_names = [d for d in args.doors.split(',') if d]
    doors = {'engine': None}
    extra = external_doors(door_names)
    opened = {name: factory(corpus) for name, factory in extra.items()}
    doors.update(opened)

    # Warm everything once, outside the measurement.
    ceiling.embed_sorted(corpus[:256])
    engine_concurrent(engine, corpus[:256], args.clients)
    rounds = {name: [] for name in doors}
    track = CeilingTrack(ceiling, corpus)
    try:
        for r in range(args.rounds):
            for name in doors:
                door = opened.get(name)   # None: the in-process engine
                c, d = track.around(lambda: door.run(corpus, args.clients) if door else
                                    engine_concurrent(engine, corpus, args.clients))
                rounds[name].append({'ceiling_sps': c, 'door_sps': d, 'ratio': d / c})
                print(f'round {r + 1} {name:>13}: ceiling {c:7.1f}/s  door {d:7.1f}/s  '
                      f'ratio {d / c:.3f}', flush=True)
        # Single-caller latency, paired call by call: each door call comes right after a raw
        # call of the same sentence, and a door's overhead is the median of (door - raw) over
        # the pairs, so the machine's drift (several-fold within minutes here) cancels within
        # each pair, not only between phases. Also kept: the median over rounds of the door's
        # p50 minus the p50 of its paired raw calls (the previous estimator).
        callers = {'engine': lambda s: engine_single_latencies(engine, [s])[0],
                   **{name: (lambda s, door=door: door.single_latencies([s])[0])
                      for name, door in opened.items() if hasattr(door, 'single_latencies')}}
        single = {name: [] for name in ['raw', *callers]}                 # all samples, ms
        pair_diffs = {name: [] for name in callers}
        per_round = {name: [] for name in callers}                        # p50 differences
        for _ in range(3):
            for name, call in callers.items():
                raw, door = paired_latencies(lambda s: ceiling.single_latencies([s])[0], call,
                                             single_set)
                single['raw'] += raw
                single[name] += door
                pair_diffs[name] += [d - r for r, d in zip(raw, door)]
                per_round[name].append(p(door, 50) - p(raw, 50))
        hit = cache_hit_us(engine, model_id)
        cold = cold_load_ms(engine, model_id, 10)
        door_info = {}
        for name, door in opened.items():
            info = dict(getattr(door, 'info', {}) or {})
            if hasattr(door, 'rss_mb'):
                info['rss_mb'] = round(door.rss_mb(), 1)
            door_info[name] = info
    finally:
        for door in opened.values():
            door.close()
        engine.close()

    result = {
        'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine': {'cpu_count': __import__('os').cpu_count(), 'platform': platform.platform(),
                    'python': platform.python_version(), 'onnxruntime': ort.__version__},
        'model': model_id, 'corpus_sentences': len(corpus), 'clients': args.clients,
        'provider': ceiling.onnx.provider, 'ceiling_loops': ceiling.loops, 'rounds': rounds,
        'median_ratio': {n: statistics.median(x['ratio'] for x in v) for n, v in rounds.items()},
        'single_p50_ms': {n: p(v, 50) for n, v in single.items()},
        'single_overhead_ms': {n: statistics.median(v) for n, v in pair_diffs.items()},
        'single_overhead_p50_diff_ms': {n: statistics.median(v) for n, v in per_round.items()},
        'door_info': door_info,
        'cache_hit_us': hit,
        'cold_load_ms': {'p50': p(cold, 50), 'p95': p(cold, 95), 'samples': cold},
        'targets': {'engine_ratio': 0.95, 'engine_single_p50_over_raw_ms': 1.0,
                    'cache_hit_ms': 5.0, 'cold_load_p95_ms': 500.0},
    }
    write(result, Path(args.out))


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    s = result['single_p50_ms']
    lines = [
        f"# akidb_ros benchmark — {result['when']}",
        '',
        f"Model `{result['model']}` on {result['provider']}, {result['corpus_sentences']} "
        f"sentences (5–60 words), {result['clients']} concurrent single-sentence clients, "
        f"{result['machine']['cpu_count']} CPUs, onnxruntime {result['machine']['onnxruntime']}.",
        '',
        '| door | median ratio to raw ceiling | rounds (door/ceiling sentences/s) |',
        '|---|---|---|',
    ]
    for name, rounds in result['rounds'].items():
        cells = ', '.join(f"{r['door_sps']:.0f}/{r['ceiling_sps']:.0f}" for r in rounds)
        lines.append(f"| {name} | {result['median_ratio'][name]:.3f} | {cells} |")
    lines += [
        '',
        '| single-sentence latency | p50 ms |',
        '|---|---|',
        *[f'| {k} | {v:.2f} |' for k, v in s.items()],
        '',
        'Single-caller overhead over raw (median of door − raw over calls paired sentence by '
        'sentence): ' + ', '.join(f'{k} {v:+.2f} ms' for k, v in result.get(
            'single_overhead_ms', {'engine': s['engine'] - s['raw']}).items()) +
        ' (targets: engine ≤ +1 ms, ROS ≤ +2 ms). Median over rounds of door p50 − paired raw '
        'p50: ' + ', '.join(f'{k} {v:+.2f} ms' for k, v in result.get(
            'single_overhead_p50_diff_ms', {}).items()) + '.',
        f"Model cache hit: {result['cache_hit_us']:.1f} µs (target < 5 ms).",
        f"Cold load of `{result['model']}` (load + warm-up): "
        f"p50 {result['cold_load_ms']['p50']:.0f} ms, "
        f"p95 {result['cold_load_ms']['p95']:.0f} ms (target < 500 ms).",
        '',
    ]
    for name, info in result.get('door_info', {}).items():
        if info:
            lines.append(f'{name}: ' + ', '.join(f'{k} {v}' for k, v in info.items()))
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
