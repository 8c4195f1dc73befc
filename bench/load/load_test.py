#!/usr/bin/env python3
"""PRD load tests against the REST (or gRPC) bridge, loopback only, bounded in time and count.

* ``sustained``: open loop, 50 requests/s for 60 s (arrivals on a fixed schedule, so a slow
  server cannot slow the offered load: no coordinated omission). PRD target: p95 < 30 ms.
* ``concurrency15``: closed loop, 15 concurrent clients for 30 s. PRD target: > 150 QPS with
  p95 < 50 ms.

Each request embeds one sentence of ``bench/corpus.txt``. Without ``--port`` the script starts
its own in-process server (``python -m akidb_ros.server --mode inprocess --no-ros``) on
ephemeral ports and stops it at the end (on SIGTERM too). Results: ``bench/results/load.json``
and ``load.md``. Latency percentiles are of the calls that succeeded (a fast refusal would pull
them down); a scenario is met only with no error, its latency target, and for ``sustained`` at
least 95 % of the offered rate served. The exit code is 0 when every scenario is met, else 1.

    .venv/bin/python bench/load/load_test.py                       # both scenarios, REST
    .venv/bin/python bench/load/load_test.py --door grpc --scenarios sustained --duration 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from bridge_bench import (GrpcCaller, RestCaller, Server, _pct, exit_on_sigterm,  # noqa: E402
                          load_corpus)

RESULTS = HERE.parent / 'results'
MAX_REQUESTS = 100_000     # hard bound whatever the arguments say


def _summary(name: str, lat: List[float], errors: int, elapsed: float, offered: float = 0.0,
             target_p95_ms: float = 0.0, target_qps: float = 0.0, **extra) -> Dict:
    """``lat``: the successful calls' latencies (a refused call's would pull p95 down: a run
    whose every call failed at once was reported met)."""
    requests = len(lat) + errors
    qps = len(lat) / elapsed if elapsed else 0.0
    out = {'scenario': name, 'requests': requests, 'errors': errors,
           'error_rate': errors / requests if requests else 0.0, 'seconds': round(elapsed, 2),
           'qps': round(qps, 1),
           **{f'p{q}_ms': round(_pct(lat, q), 2) if lat else None for q in (50, 95, 99)},
           'max_ms': round(max(lat), 2) if lat else None, **extra}
    if offered:
        out['offered_qps'] = offered
    if target_p95_ms:
        out['target_p95_ms'] = target_p95_ms
        out['p95_ok'] = bool(lat) and out['p95_ms'] < target_p95_ms
    if target_qps:
        out['target_qps'] = target_qps
        out['qps_ok'] = qps > target_qps
    if offered:     # an open loop must serve what it offered, not fall behind it
        out['qps_ok'] = qps >= 0.95 * offered
    out['met'] = errors == 0 and out.get('p95_ok', True) and out.get('qps_ok', True)
    return out


def sustained(make_caller, corpus: List[str], qps: float = 50.0, duration_s: float = 60.0,
              max_workers: int = 64) -> Dict:
    """Open loop at a fixed rate: request k is sent at t0 + k/qps, on a pool thread."""
    n = min(int(qps * duration_s), MAX_REQUESTS)
    local = threading.local()
    lat: List[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(k: int, scheduled: float):
        call = getattr(local, 'call', None)
        if call is None:
            call = local.call = make_caller()
        ok = call(corpus[k % len(corpus)])
        ms = (time.perf_counter() - scheduled) * 1000   # from the scheduled send time
        with lock:
            if ok:
                lat.append(ms)
            else:
                errors[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for k in range(n):
            at = t0 + k / qps
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, k, at)
    elapsed = time.perf_counter() - t0
    return _summary('sustained', lat, errors[0], elapsed, offered=qps, target_p95_ms=30.0,
                    duration_s=duration_s)


def concurrency(make_caller, corpus: List[str], clients: int = 15,
                duration_s: float = 30.0) -> Dict:
    """Closed loop: ``clients`` threads, each sends its next request when the last returns."""
    lat: List[List[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + duration_s
    counter = iter(range(MAX_REQUESTS))
    lock = threading.Lock()

    def worker(c: int):
        call = make_caller()
        try:
            while time.perf_counter() < stop_at:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                t = time.perf_counter()
                ok = call(corpus[k % len(corpus)])
                if ok:
                    lat[c].append((time.perf_counter() - t) * 1000)
                else:
                    errors[c] += 1
        finally:
            call.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(f'concurrency{clients}', [x for xs in lat for x in xs], sum(errors),
                    time.perf_counter() - t0, target_p95_ms=50.0, target_qps=150.0,
                    clients=clients, duration_s=duration_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--scenarios', default='sustained,concurrency15',
                    help='comma list: sustained, concurrencyN (N clients; plain concurrency: '
                    '--clients)')
    ap.add_argument('--door', choices=('rest', 'grpc'), default='rest')
    ap.add_argument('--mode', choices=('inprocess', 'sidecar'), default='inprocess')
    ap.add_argument('--port', type=int, default=0,
                    help='use a server already listening on 127.0.0.1:PORT')
    ap.add_argument('--qps', type=float, default=50.0)
    ap.add_argument('--duration', type=float, default=60.0, help='sustained scenario seconds')
    ap.add_argument('--conc-duration', type=float, default=30.0)
    ap.add_argument('--clients', type=int, default=15,
                    help='clients of a scenario named plain "concurrency"')
    ap.add_argument('--out', default=str(RESULTS / 'load'))
    args = ap.parse_args(argv)
    exit_on_sigterm()
    corpus = load_corpus()
    server = None
    if args.port:
        port = args.port
    else:
        server = Server(args.mode)
        port = server.rest_port if args.door == 'rest' else server.grpc_port
    make = (lambda: RestCaller(port)) if args.door == 'rest' else (lambda: GrpcCaller(port))
    results = []
    try:
        warm = make()
        for s in corpus[:50]:
            warm(s)
        warm.close()
        for sc in args.scenarios.split(','):
            if sc == 'sustained':
                r = sustained(make, corpus, args.qps, args.duration)
            elif sc.startswith('concurrency'):
                r = concurrency(make, corpus, int(sc[len('concurrency'):] or args.clients),
                                args.conc_duration)
            else:
                raise SystemExit(f'unknown scenario {sc}')
            r.update(door=args.door, mode=args.mode)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if server is not None:
            server.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
           'cpu_count': os.cpu_count(), 'results': results}
    out.with_suffix('.json').write_text(json.dumps(doc, indent=2) + '\n')
    lines = [f"# PRD load tests — {doc['when']}", '',
             f"{args.door.upper()} bridge, {args.mode} mode, loopback, {os.cpu_count()} CPUs, "
             f"one sentence per request.", '',
             '| scenario | offered | QPS | p50 ms | p95 ms | p99 ms | errors | PRD target | met |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        met = r['met']
        if r['scenario'] == 'sustained':
            target = f"p95 < 30 ms @ {r['offered_qps']:g} QPS served, no error"
            offered = f"{r['offered_qps']:.0f} QPS × {r['duration_s']:.0f} s"
        else:
            target = '> 150 QPS, p95 < 50 ms, no error'
            offered = f"{r['clients']} clients × {r['duration_s']:.0f} s"
        lines.append(f"| {r['scenario']} | {offered} | {r['qps']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} | {target} | "
                     f"{'yes' if met else 'no'} |")
    lines += ['', 'Open-loop latency is measured from each request\'s scheduled send time (no '
              'coordinated omission): when the offered rate exceeds the capacity shown by the '
              'closed-loop scenario, queueing dominates. The PRD targets are for a Jetson Thor '
              'GPU; on a CPU-only host compare the closed-loop QPS with the raw ceiling of '
              '`bench/run.py` instead.']
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {out}.json and {out}.md')
    missed = [r['scenario'] for r in results if not r['met']]
    if missed:
        print(f'not met: {", ".join(missed)}', file=sys.stderr)
    return 1 if missed else 0     # a gate: it was 0 even when every call failed


if __name__ == '__main__':
    sys.exit(main())
