"""Benchmark of the embedding node over DDS (issue 4 section 6).

The node runs in its own process (``python -m akidb_ros.ros.node``); this process is the
client. Measured: cold start, ``/embed`` throughput with ``n_clients`` concurrent
single-sentence clients (closed loop), one client's latency percentiles, the node's RSS with
one model loaded, and the idle SIGINT-to-exit time.

    python bench/ros_bench.py --duration 10 [--with-raw] [--out bench/results]

``run_node_bench(corpus, n_clients=16, duration_s=10.0) -> dict`` is the importable entry
point; ``make_ros_door(corpus)`` gives ``bench/run.py --doors ros`` a door object (``run``,
``single_latencies``, ``close``) measured in the same run as the raw engine ceiling. ``--with-raw``
also measures a raw in-process ceiling first (engine only, node not running) so the ratio can
be read standalone. DDS stays on loopback (the same settings as scripts/dds_env.sh).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from akidb_ros.dds_env import apply_loopback_dds  # noqa: E402

DEFAULT_CORPUS = [
    'The robot picked up the red cup.',
    'Navigation stack lost localisation near the charging dock.',
    'Where is the kitchen?',
    'A quick brown fox jumps over the lazy dog while the battery drains slowly.',
    'Gripper force exceeded the safety threshold.',
    'LIDAR returns are sparse on glass surfaces, so mapping the atrium takes longer.',
    'Embeddings turn text into vectors.',
    'Obstacle detected at 0.4 metres, slowing down.',
    'The arm completed 120 pick-and-place cycles without a fault.',
    'Please bring me the blue toolbox from the workshop on the second floor.',
    'Temperature of motor 3 is 71 degrees.',
    'Semantic search over robot logs finds similar incidents across the fleet quickly.',
]
READY_MARK = 'embedding node ready in'
_DOOR_IDS = itertools.count()


def loopback_env() -> None:
    """Loopback-only DDS for this process and its children (before any rclpy context)."""
    apply_loopback_dds(os.environ)
    os.environ.setdefault('ROS_LOG_DIR', str(ROOT / 'build' / 'ros_log'))


def _pct(values: List[float], q: float) -> float:
    if not values:
        return float('nan')
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


def _rss_mb(pid: int) -> float:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    return float('nan')


class _Node:
    def __init__(self, namespace: str, extra: List[str]):
        cmd = [sys.executable, '-m', 'akidb_ros.ros.node', '--ros-args', '--params-file',
               str(ROOT / 'config' / 'params.yaml'), '-r', f'__ns:={namespace}', *extra]
        self.t0 = time.monotonic()
        self.ready = threading.Event()
        self.t_ready = float('nan')
        self.lines: List[str] = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if READY_MARK in line and not self.ready.is_set():
                self.t_ready = time.monotonic() - self.t0
                self.ready.set()

    def stop(self) -> Optional[float]:
        """SIGINT; returns seconds to exit (SIGKILL after 10 s: None)."""
        if self.proc.poll() is not None:
            return None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
            return time.monotonic() - t
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


class RosDoor:
    """The node in its own process plus clients in this one (the door ``bench/run.py`` uses).

    ``run(corpus, n_clients)`` sends every sentence once, one per call, from ``n_clients``
    closed-loop clients sharing the corpus, and returns sentences/s (errors raise);
    ``single_latencies(sentences)`` gives one client's per-call milliseconds; ``close()`` stops
    the node with SIGINT and records the exit time.
    """

    def __init__(self, corpus: Optional[List[str]] = None, n_clients: int = 16,
                 node_args: Optional[List[str]] = None, client_executor: str = 'events'):
        loopback_env()
        from akidb_ros.ros.cli import EmbeddingClient
        corpus = list(corpus or DEFAULT_CORPUS)
        self.ns = f'/akidb_bench_{os.getpid()}_{next(_DOOR_IDS)}'    # one node per door
        self.client_executor = client_executor
        self.info: Dict = {'node_args': ' '.join(node_args or []),
                           'ros_domain_id': int(os.environ['ROS_DOMAIN_ID'])}
        self.node = _Node(self.ns, list(node_args or []))
        self._load = None
        try:
            self.single = EmbeddingClient(self.ns, args=[],
                                          node_name=f'akidb_bench_single{self.ns[13:]}')
            first = self.single.embed([corpus[0]], timeout_s=120)
            self.info['cold_start_first_answer_s'] = round(time.monotonic() - self.node.t0, 3)
            if not first.success:
                raise RuntimeError(f'node answered {first.error_code}: {first.message}')
            self.node.ready.wait(timeout=10)
            self.info.update(cold_start_ready_s=round(self.node.t_ready, 3), model=first.model,
                             dimension=first.dimension)
            self._loader(n_clients)
            self.run(corpus[:min(len(corpus), 8 * n_clients)], n_clients)     # warm-up
        except BaseException:
            self.close()
            raise

    def _loader(self, n_clients: int):
        from akidb_ros.ros.loadgen import ConcurrentCaller
        if self._load is None or len(self._load.clients) != n_clients:
            if self._load is not None:
                self._load.close()
            # the load generator uses rclpy's C++ EventsExecutor: the harness should cost the
            # 2 shared cores as little as possible (about 0.8 ms CPU per call vs 2 ms)
            self._load = ConcurrentCaller(n_clients, namespace=self.ns,
                                          node_name=f'akidb_bench_load{self.ns[13:]}',
                                          executor=self.client_executor)
            if not self._load.wait_ready(30):
                raise RuntimeError('load clients did not discover the node')
        return self._load

    def run(self, corpus: List[str], n_clients: int = 16, duration_s: float = 0.0) -> float:
        """Sentences/s over the whole corpus (or for ``duration_s``, cycling through it)."""
        from akidb_ros.srv import Embed
        load = self._loader(n_clients)
        nxt = iter(range(10 ** 9 if duration_s else len(corpus)))
        lock = threading.Lock()

        def req(i, seq):
            with lock:
                k = next(nxt, None)
            return None if k is None else Embed.Request(inputs=[corpus[k % len(corpus)]])
        t0 = time.perf_counter()
        recs = load.run(req, duration_s=duration_s, timeout_s=120)
        wall = time.perf_counter() - t0
        bad = [r for r in recs if r.response is None or not r.response.success]
        if bad:
            r = bad[0].response
            raise RuntimeError(f'{len(bad)} of {len(recs)} calls failed, first: '
                               f'{(r.error_code, r.message) if r else "no answer"}')
        self.last_latencies_ms = [r.latency_s * 1000.0 for r in recs]
        return len(recs) / wall

    def single_latencies(self, sentences: List[str]) -> List[float]:
        out = []
        for s in sentences:
            t = time.perf_counter()
            r = self.single.embed([s])
            out.append((time.perf_counter() - t) * 1000.0)
            if not r.success:
                raise RuntimeError(f'{r.error_code}: {r.message}')
        return out

    def pids(self) -> Dict[str, int]:
        """Return the process serving this door, by role (bench/cpu_budget.py reads its CPU)."""
        return {'node': self.node.proc.pid}

    def rss_mb(self) -> float:
        return _rss_mb(self.node.proc.pid)

    def close(self) -> None:
        for c in (self._load, getattr(self, 'single', None)):
            if c is not None:
                c.close()
        self._load = None
        self.single = None
        self.info['idle_sigint_exit_s'] = self.node.stop()
        self.info['node_exit_code'] = self.node.proc.returncode


def make_ros_door(corpus: List[str]) -> RosDoor:
    """Open the ROS door for ``bench/run.py --doors ros`` (same run as the raw ceiling).

    ``AKIDB_ROS_BENCH_NODE_ARGS`` adds node arguments, e.g. ``-p executor:=events``.
    """
    return RosDoor(corpus, node_args=os.environ.get('AKIDB_ROS_BENCH_NODE_ARGS', '').split())


def run_node_bench(corpus: Optional[List[str]] = None, n_clients: int = 16,
                   duration_s: float = 10.0, single_calls: int = 300,
                   node_args: Optional[List[str]] = None,
                   client_executor: str = 'events') -> Dict:
    """Start the node in its own process, load it from this one, stop it; return the numbers.

    Keys: cold_start_ready_s, cold_start_first_answer_s, throughput_sentences_per_s,
    concurrent_p50/p95/p99_ms, single_client_p50/p95/p99_ms, node_rss_mb,
    idle_sigint_exit_s, node_exit_code, model, n_clients, duration_s.
    """
    corpus = list(corpus or DEFAULT_CORPUS)
    door = RosDoor(corpus, n_clients, node_args, client_executor)
    out: Dict = {'n_clients': n_clients, 'duration_s': duration_s}
    try:
        lat = door.single_latencies([corpus[i % len(corpus)] for i in range(single_calls)])
        out.update(single_client_p50_ms=round(_pct(lat, 50), 3),
                   single_client_p95_ms=round(_pct(lat, 95), 3),
                   single_client_p99_ms=round(_pct(lat, 99), 3),
                   single_client_calls=single_calls)
        sps = door.run(corpus, n_clients, duration_s=duration_s)
        clat = door.last_latencies_ms
        out.update(throughput_sentences_per_s=round(sps, 1), concurrent_calls=len(clat),
                   concurrent_p50_ms=round(_pct(clat, 50), 3),
                   concurrent_p95_ms=round(_pct(clat, 95), 3),
                   concurrent_p99_ms=round(_pct(clat, 99), 3),
                   node_rss_mb=round(door.rss_mb(), 1))
    finally:
        door.close()
        out.update(door.info)
    return out


def run_raw_bench(corpus: Optional[List[str]] = None, n_clients: int = 16,
                  duration_s: float = 10.0, single_calls: int = 300) -> Dict:
    """Raw engine ceiling in this process: ``n_clients`` threads calling ``engine.embed``."""
    from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config
    corpus = list(corpus or DEFAULT_CORPUS)
    out: Dict = {}
    with EmbeddingEngine(load_config()) as engine:
        engine.start()
        lat = []
        for i in range(single_calls):
            t = time.perf_counter()
            engine.embed(EmbedRequest(inputs=[corpus[i % len(corpus)]]))
            lat.append((time.perf_counter() - t) * 1000.0)
        out['raw_single_p50_ms'] = round(statistics.median(lat), 3)
        stop_at = time.perf_counter() + duration_s
        counts = [0] * n_clients

        def worker(i: int) -> None:
            seq = 0
            while time.perf_counter() < stop_at:
                engine.embed(EmbedRequest(inputs=[corpus[(i * 7 + seq) % len(corpus)]]))
                counts[i] += 1
                seq += 1
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            list(pool.map(worker, range(n_clients)))
        out['raw_throughput_sentences_per_s'] = round(sum(counts) / (time.perf_counter() - t0),
                                                      1)
    return out


def to_markdown(res: Dict) -> str:
    """Render the results as a markdown table."""
    lines = ['# Embedding node benchmark (ROS 2 /embed over loopback DDS)', '',
             '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in res.items()]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    """CLI: run the node benchmark (optionally after a raw ceiling), write JSON + markdown."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--duration', type=float, default=10.0)
    p.add_argument('--clients', type=int, default=16)
    p.add_argument('--single-calls', type=int, default=300)
    p.add_argument('--corpus', help='text file, one sentence per line (bench/corpus.txt)')
    p.add_argument('--with-raw', action='store_true', help='measure the raw ceiling first')
    p.add_argument('--out', default=str(ROOT / 'bench' / 'results'))
    p.add_argument('--node-arg', action='append', default=[],
                   help='extra node ROS argument, e.g. --node-arg=-p --node-arg=executor:=events')
    a = p.parse_args(argv)
    corpus = None
    path = Path(a.corpus) if a.corpus else ROOT / 'bench' / 'corpus.txt'
    if path.exists():           # default: the project's benchmark corpus
        corpus = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    res: Dict = {'timestamp': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                 'cpu_count': os.cpu_count()}
    if a.with_raw:
        res.update(run_raw_bench(corpus, a.clients, a.duration, a.single_calls))
    res.update(run_node_bench(corpus, a.clients, a.duration, a.single_calls, a.node_arg))
    if a.with_raw:
        res['node_vs_raw_throughput'] = round(
            res['throughput_sentences_per_s'] / res['raw_throughput_sentences_per_s'], 3)
        res['node_p50_minus_raw_p50_ms'] = round(
            res['single_client_p50_ms'] - res['raw_single_p50_ms'], 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'ros_bench.json').write_text(json.dumps(res, indent=2) + '\n')
    (out / 'ros_bench.md').write_text(to_markdown(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
