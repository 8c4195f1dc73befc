#!/usr/bin/env python3
"""Where each door's CPU goes: CPU milliseconds per sentence, by process, in one run.

    .venv/bin/python bench/cpu_budget.py [--doors engine,ros,rest,grpc] [--rounds 2]

On a small CPU every door is CPU-bound under 16 concurrent single-sentence clients, so a door's
ratio to the raw ceiling is the ceiling's CPU per sentence divided by the door's (clients
included). This measures both sides of that division in the same run, interleaved like
``bench/run.py`` (ceiling, door, ceiling, ...): user + system CPU of this process (the ceiling,
the in-process engine and every door's clients) and of each door's own processes (server,
node), read from ``/proc`` around each pass. For the in-process engine, this process's CPU is
split further by thread: ``runs``, the engine's batcher threads (padding, the ONNX Runtime runs,
pooling: the part the ceiling also does), and ``bench``, everything else (the callers, tokenising,
admission, futures). A door's *overhead* is its CPU per sentence minus the mean of the ceiling
passes around it; *util* is how busy the machine's cores were.
Results: ``bench/results/cpu-budget.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from akidb_ros.engine import EmbeddingEngine, load_config  # noqa: E402
from akidb_ros.engine.batcher import RUNNER_THREAD_PREFIX  # noqa: E402
from run import (CeilingTrack, RawCeiling, engine_concurrent, external_doors,  # noqa: E402
                 load_corpus)

RESULTS = Path(__file__).with_name('results')
_TICK = os.sysconf('SC_CLK_TCK')


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds from a ``/proc`` stat file (fields 14 and 15)."""
    fields = stat.read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    return _stat_cpu_s(Path(f'/proc/{pid}/stat'))


def threads_cpu_s(prefix: str) -> float:
    """CPU seconds of this process's live threads whose name starts with ``prefix``.

    Python names its threads only for itself, so they are found through ``threading`` and read
    by their native id; the engine's batcher threads live as long as the engine, so the
    difference around a pass is what they spent in it.
    """
    return sum(_stat_cpu_s(Path(f'/proc/self/task/{t.native_id}/stat'))
               for t in threading.enumerate() if t.name.startswith(prefix))


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def measure(run: Callable[[], float], pids: Dict[str, int], sentences: int,
            runs_threads: str = '') -> dict:
    """Run one pass; return its sentences/s and CPU ms per sentence by process role.

    With ``runs_threads`` (a thread-name prefix), this process's own CPU is split into ``runs``
    (those threads) and ``bench`` (the rest).
    """
    before = {role: process_cpu_s(pid) for role, pid in pids.items()}
    runs_before = threads_cpu_s(runs_threads) if runs_threads else 0.0
    mine, t0 = self_cpu_s(), time.perf_counter()
    sps = run()
    wall = time.perf_counter() - t0
    cpu = {role: (process_cpu_s(pid) - before[role]) * 1000 / sentences
           for role, pid in pids.items()}
    own = self_cpu_s() - mine
    if runs_threads:
        runs = threads_cpu_s(runs_threads) - runs_before
        cpu['runs'] = runs * 1000 / sentences
        own -= runs
    cpu['bench'] = own * 1000 / sentences
    total = sum(cpu.values())
    return {'sps': sps, 'cpu_ms': cpu, 'total_ms': total,
            'util': total * sentences / 1000 / wall / (os.cpu_count() or 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--doors', default='engine,ros,rest,grpc')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--out', default=str(RESULTS / 'cpu-budget'))
    args = ap.parse_args()
    names = [d for d in args.doors.split(',') if d]
    config = load_config()
    model_id = config.default_model
    corpus = load_corpus()
    ceiling = RawCeiling(config, model_id)
    engine = EmbeddingEngine(config)
    engine.start([model_id])
    opened = {name: factory(corpus) for name, factory in external_doors(names).items()}
    ceiling.embed_sorted(corpus[:256])
    engine_concurrent(engine, corpus[:256], args.clients)
    n = len(corpus)
    rows: Dict[str, list] = {name: [] for name in names}

    def ceiling_pass() -> dict:
        got = measure(lambda: ceiling.embed_sorted(corpus), {}, n)
        return {'sps': got['sps'], 'total_ms': got['total_ms']}

    track = CeilingTrack(ceiling, corpus, ceiling_pass)
    try:
        for r in range(args.rounds):
            for name in names:
                door = opened.get(name)
                if door is not None:
                    run, pids, runs_threads = (lambda: door.run(corpus, args.clients),
                                               door.pids(), '')
                else:   # the in-process engine: split its runner threads from the callers
                    run, pids, runs_threads = (
                        lambda: engine_concurrent(engine, corpus, args.clients), {},
                        RUNNER_THREAD_PREFIX)
                ceil, got = track.around(lambda: measure(run, pids, n, runs_threads))
                ceil_ms, ceil_sps = ceil['total_ms'], ceil['sps']
                got.update(ceiling_ms=ceil_ms, ceiling_sps=ceil_sps,
                           overhead_ms=got['total_ms'] - ceil_ms, ratio=got['sps'] / ceil_sps)
                rows[name].append(got)
                parts = ', '.join(f'{k} {v:.2f}' for k, v in got['cpu_ms'].items())
                print(f"round {r + 1} {name:>13}: {got['sps']:6.1f}/s (ceiling {ceil_sps:6.1f}/s"
                      f" {ceil_ms:5.2f} ms) cpu {got['total_ms']:5.2f} ms/sentence [{parts}] "
                      f"overhead {got['overhead_ms']:+.2f} ms, util {got['util']:.0%}",
                      flush=True)
    finally:
        for door in opened.values():
            door.close()
        engine.close()
    result = {'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
              'model': model_id, 'cpus': os.cpu_count(), 'clients': args.clients,
              'sentences': n, 'rounds': rows}
    write(result, Path(args.out))
    return 0


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    med = statistics.median
    lines = [f"# CPU per sentence by door — {result['when']}", '',
             f"Model `{result['model']}`, {result['sentences']} sentences, {result['clients']} "
             f"concurrent single-sentence clients, {result['cpus']} CPUs; each column the "
             f"median over {len(next(iter(result['rounds'].values())))} interleaved rounds "
             f"(`bench/cpu_budget.py`). `bench` is this process: the clients (and for `engine` "
             f"the engine's own Python); `runs` the in-process engine's batcher threads "
             f"(padding, ONNX Runtime runs, pooling).", '',
             '| door | sentences/s (ratio) | ceiling ms | door ms | overhead ms | by process ms '
             '| util |', '|---|---|---|---|---|---|---|']
    for name, rows in result['rounds'].items():
        roles = rows[0]['cpu_ms'].keys()
        by = ', '.join(f"{role} {med(r['cpu_ms'][role] for r in rows):.2f}" for role in roles)
        lines.append(f"| {name} | {med(r['sps'] for r in rows):.0f} "
                     f"({med(r['ratio'] for r in rows):.3f}) "
                     f"| {med(r['ceiling_ms'] for r in rows):.2f} "
                     f"| {med(r['total_ms'] for r in rows):.2f} "
                     f"| {med(r['overhead_ms'] for r in rows):+.2f} | {by} "
                     f"| {med(r['util'] for r in rows):.0%} |")
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    sys.exit(main())
