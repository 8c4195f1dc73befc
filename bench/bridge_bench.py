#!/usr/bin/env python3
"""Bridge benchmark: 16 concurrent single-sentence clients through REST or gRPC, in-process or
sidecar mode, on loopback. Used by ``bench/run.py --doors rest,grpc,rest-sidecar,grpc-sidecar``
(ratios against the raw ceiling measured in the same run) and runnable alone::

    .venv/bin/python bench/bridge_bench.py --modes inprocess,sidecar --doors rest,grpc \
        --duration 15 [--ceiling]

The server runs as its own process (``python -m akidb_ros.server``; sidecar mode adds the
embedding node process), exactly as deployed; the clients are threads of this process with one
keep-alive HTTP connection each (REST) or one HTTP/2 channel each (gRPC).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from akidb_ros.dds_env import apply_loopback_dds  # noqa: E402
RESULTS = Path(__file__).with_name('results')
CORPUS = Path(__file__).with_name('corpus.txt')


def load_corpus() -> List[str]:
    return [s for s in CORPUS.read_text().splitlines() if s.strip()]


def loopback_env() -> Dict[str, str]:
    """Loopback-only DDS for the child processes (as scripts/dds_env.sh)."""
    env = apply_loopback_dds(dict(os.environ), domain_id=60 + os.getpid() % 30)
    env.setdefault('AKIDB_LOG_LEVEL', 'WARNING')
    # Rate limits off (see the file): a door's throughput, not the per-client policy, is measured.
    env.setdefault('AKIDB_SECURITY_CONFIG', str(Path(__file__).with_name('security.bench.yaml')))
    return env


def _pct(values: List[float], q: float) -> float:
    if not values:
        return float('nan')
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    """``akidb-server`` (and, for sidecar, the embedding node) as child processes."""

    def __init__(self, mode: str, extra_args: Optional[List[str]] = None):
        self.mode = mode
        self.env = loopback_env()
        self.tmp = Path(tempfile.mkdtemp(prefix='akidb-bench-'))
        self.env.setdefault('ROS_LOG_DIR', str(self.tmp / 'ros_log'))   # removed with it
        self._failed = False
        self.node = None
        ns = '/akidb_bench_' + uuid.uuid4().hex[:6]
        if mode == 'sidecar':
            self.node = subprocess.Popen(
                [sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args', '-r', f'__ns:={ns}',
                 '-p', 'diagnostics_period_s:=0.0'], cwd=ROOT, env=self.env,
                stdout=open(self.tmp / 'node.log', 'wb'), stderr=subprocess.STDOUT)
        ready = self.tmp / 'ready.json'
        args = [sys.executable, '-m', 'akidb_ros.server', '--mode', mode, '--host', '127.0.0.1',
                '--rest-port', '0', '--grpc-port', '0', '--ready-file', str(ready)]
        if mode == 'inprocess':
            args.append('--no-ros')
        else:
            args += ['--ros-prefix', ns]
        self.proc = subprocess.Popen(args + list(extra_args or []), cwd=ROOT, env=self.env,
                                     stdout=open(self.tmp / 'server.log', 'wb'),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._failed = True     # keep its logs
                self.close()
                raise RuntimeError('server did not start:\n' +
                                   (self.tmp / 'server.log').read_text()[-3000:])
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        self.rest_port, self.grpc_port = info['rest_port'], info['grpc_port']
        self._wait_ready(deadline)

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection('127.0.0.1', self.rest_port, timeout=5)
                c.request('GET', '/health/ready')
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f'{self.mode} server never became ready')

    def close(self) -> None:
        """Stop the children; their temp folder goes too unless the start failed (its logs
        are the error's evidence; it was left in /tmp after every run)."""
        for p in (self.proc, self.node):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        if not self._failed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP (``timeout``, a CI cancel, systemd) end a runner through ``SystemExit``,
    so its ``finally`` blocks stop the servers it started (they were left running, re-parented
    to init, still listening)."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


class RestCaller:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)

    def __call__(self, sentence: str) -> bool:
        body = json.dumps({'inputs': [sentence]})
        try:
            self.conn.request('POST', '/api/v1/embed', body,
                              {'Content-Type': 'application/json'})
            resp = self.conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return False

    def close(self) -> None:
        self.conn.close()


class GrpcCaller:
    """One client: its own channel (its own HTTP/2 connection), as each RestCaller has its own
    HTTP connection. (Until 2026-11-27 all callers shared one channel: 16 threads multiplexed
    on one connection cost the client side more, 0.951 of the sentences/s in a paired A/B.)"""

    def __init__(self, port: int):
        import grpc
        from akidb_ros.grpc_api import embedding_pb2 as pb
        from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc
        self._grpc, self._pb = grpc, pb
        self.channel = grpc.insecure_channel(f'127.0.0.1:{port}')
        try:    # connected before timing; a server that is not there fails the calls instead
            grpc.channel_ready_future(self.channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            pass
        self.stub = pb_grpc.EmbeddingServiceStub(self.channel)

    def __call__(self, sentence: str) -> bool:
        try:
            self.stub.Embed(self._pb.EmbedRequest(inputs=[sentence], normalize=True), timeout=30)
            return True
        except self._grpc.RpcError:
            return False

    def close(self) -> None:
        self.channel.close()


def _drive(make_caller, corpus: List[str], n_clients: int,
           duration_s: Optional[float]) -> Dict:
    """n_clients threads, one sentence per call: one corpus pass, or loop for duration_s."""
    lock = threading.Lock()
    state = {'i': 0}
    lat: List[List[float]] = [[] for _ in range(n_clients)]
    errors = [0] * n_clients
    stop_at = [None]

    def next_sentence():
        with lock:
            i = state['i']
            state['i'] += 1
        if duration_s is None:
            return corpus[i] if i < len(corpus) else None
        if time.perf_counter() >= stop_at[0]:
            return None
        return corpus[i % len(corpus)]

    def worker(k: int):
        call = make_caller()
        try:
            while True:
                s = next_sentence()
                if s is None:
                    return
                t0 = time.perf_counter()
                ok = call(s)
                lat[k].append((time.perf_counter() - t0) * 1000)
                if not ok:
                    errors[k] += 1
        finally:
            call.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    stop_at[0] = t0 + (duration_s or 0)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    all_lat = [x for xs in lat for x in xs]
    done = len(all_lat) - sum(errors)
    return {'sentences': done, 'errors': sum(errors), 'seconds': elapsed,
            'sentences_per_s': done / elapsed if elapsed else 0.0,
            'p50_ms': _pct(all_lat, 50), 'p95_ms': _pct(all_lat, 95), 'p99_ms': _pct(all_lat, 99)}


class BridgeDoor:
    """A started server plus callers; the object ``bench/run.py`` drives."""

    def __init__(self, mode: str, door: str):
        assert mode in ('inprocess', 'sidecar') and door in ('rest', 'grpc')
        self.mode, self.door = mode, door
        self.server = Server(mode)
        port = self.server.rest_port if door == 'rest' else self.server.grpc_port
        self._make = (lambda: RestCaller(port)) if door == 'rest' else (lambda: GrpcCaller(port))
        _drive(self._make, load_corpus()[:64], 16, None)   # warm connections and the engine

    def measure(self, corpus: List[str], n_clients: int = 16,
                duration_s: Optional[float] = None) -> Dict:
        return _drive(self._make, corpus, n_clients, duration_s)

    def run(self, corpus: List[str], n_clients: int = 16) -> float:
        """sentences/s over one pass of the corpus (bench/run.py's door interface)."""
        res = self.measure(corpus, n_clients)
        if res['errors']:   # failed calls are fast: counting them would flatter the door
            raise RuntimeError(f'{self.door}/{self.mode}: {res["errors"]} failed calls')
        return res['sentences_per_s']

    def single_latencies(self, sentences: List[str]) -> List[float]:
        call = self._make()
        out = []
        for s in sentences:
            t0 = time.perf_counter()
            ok = call(s)
            out.append((time.perf_counter() - t0) * 1000)
            if not ok:
                call.close()
                raise RuntimeError(f'{self.door}/{self.mode}: a single-sentence call failed')
        call.close()
        return out

    def pids(self) -> Dict[str, int]:
        """Return the processes serving this door by role (bench/cpu_budget.py reads their CPU)."""
        out = {'server': self.server.proc.pid}
        if self.server.node is not None:
            out['node'] = self.server.node.pid
        return out

    def close(self) -> None:
        self.server.close()


def make_bridge_door(name: str, corpus: Optional[List[str]] = None) -> BridgeDoor:
    """``rest`` | ``grpc`` | ``rest-sidecar`` | ``grpc-sidecar`` (bench/run.py)."""
    door, _, mode = name.partition('-')
    return BridgeDoor(mode or 'inprocess', door)


def run_bridge_bench(corpus: Optional[List[str]], mode: str, door: str, n_clients: int = 16,
                     duration_s: Optional[float] = 15.0) -> Dict:
    """Start the server in ``mode``, drive it through ``door`` and return the numbers."""
    corpus = corpus or load_corpus()
    d = BridgeDoor(mode, door)
    try:
        res = d.measure(corpus, n_clients, duration_s)
    finally:
        d.close()
    return {'mode': mode, 'door': door, 'clients': n_clients, **res}


def _ceiling(corpus: List[str]):
    """The lead's raw ceiling (bench/run.py), same process, same model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from run import RawCeiling   # noqa: E402
    from akidb_ros.engine import load_config
    config = load_config()
    c = RawCeiling(config, config.default_model)
    c.embed_sorted(corpus[:256])
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--modes', default='inprocess,sidecar')
    ap.add_argument('--doors', default='rest,grpc')
    ap.add_argument('--clients', type=int, default=16)
    ap.add_argument('--duration', type=float, default=0,
                    help='seconds per measurement (0 = one pass over the corpus)')
    ap.add_argument('--rounds', type=int, default=1)
    ap.add_argument('--ceiling', action='store_true',
                    help='interleave the raw ceiling (bench/run.py) and report ratios')
    ap.add_argument('--out', default=str(RESULTS / 'bridge'))
    args = ap.parse_args(argv)
    corpus = load_corpus()
    ceiling = _ceiling(corpus) if args.ceiling else None
    from run import CeilingTrack   # noqa: E402 (on sys.path once _ceiling ran)
    track = CeilingTrack(ceiling, corpus) if ceiling else None
    rows = []
    for mode in args.modes.split(','):
        for door in args.doors.split(','):
            d = BridgeDoor(mode, door)
            try:
                def measure():
                    return d.measure(corpus, args.clients, args.duration or None)
                for r in range(args.rounds):
                    c, res = track.around(measure) if track else (None, measure())
                    row = {'mode': mode, 'door': door, 'round': r + 1, 'clients': args.clients,
                           **res}
                    if c:
                        row['ceiling_sps'] = c
                        row['ratio'] = res['sentences_per_s'] / c
                    rows.append(row)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                      for k, v in row.items()}), flush=True)
            finally:
                d.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
              'cpu_count': os.cpu_count(), 'corpus_sentences': len(corpus), 'rows': rows}
    out.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    lines = [f"# Bridge benchmark — {result['when']}", '',
             f"{args.clients} concurrent single-sentence clients on loopback, "
             f"{os.cpu_count()} CPUs, corpus of {len(corpus)} sentences.", '',
             '| mode | door | sentences/s | ratio to raw ceiling | p50 ms | p95 ms | p99 ms '
             '| errors |',
             '|---|---|---|---|---|---|---|---|']
    groups: Dict = {}
    for row in rows:
        groups.setdefault((row['mode'], row['door']), []).append(row)
    for (mode, door), rs in groups.items():
        ratio = (f"{statistics.median(r['ratio'] for r in rs):.3f}" if 'ratio' in rs[0]
                 else 'n/a')
        sps = statistics.median(r['sentences_per_s'] for r in rs)
        lines.append(f"| {mode} | {door} | {sps:.1f}"
                     f" | {ratio} | {statistics.median(r['p50_ms'] for r in rs):.1f}"
                     f" | {statistics.median(r['p95_ms'] for r in rs):.1f}"
                     f" | {statistics.median(r['p99_ms'] for r in rs):.1f}"
                     f" | {sum(r['errors'] for r in rs)} |")
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {out}.json and {out}.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
