#!/usr/bin/env python
"""Hot unload/load churn of all-mpnet-base-v2 under client traffic; RSS per cycle.

Run: .venv/bin/python bench/memory_churn.py --cycles 12 [options]
Prints a compact table and a final JSON line ("RESULT {...}"): RSS and glibc's heap in use /
free after each cycle and after a final unload, and which sessions, models and batchers made
for mpnet are still alive (weak references). The engine fixes glibc's mmap/trim thresholds
itself (akidb_ros/engine/malloc_tuning.py); the allocator options below are the variants
compared in docs/architecture.md (an environment MALLOC_*_THRESHOLD_ turns the engine's off).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import sys
import threading
import time
import weakref

p = argparse.ArgumentParser()
p.add_argument('--cycles', type=int, default=20)
p.add_argument('--clients', type=int, default=8)
p.add_argument('--default-clients', type=int, default=2,
               help='of --clients, use the default model')
p.add_argument('--serve-s', type=float, default=1.5, help='traffic time after each reload')
p.add_argument('--mallopt-arena', type=int, default=0, help='mallopt(M_ARENA_MAX, n) at start')
p.add_argument('--mallopt-mmap', type=int, default=0,
               help='mallopt(M_MMAP_THRESHOLD, n) and mallopt(M_TRIM_THRESHOLD, n) at start')
p.add_argument('--trim', action='store_true', help='malloc_trim(0) after each unload retires')
p.add_argument('--no-ort-arena', action='store_true',
               help='SessionOptions.enable_cpu_mem_arena=False')
p.add_argument('--leakcheck', action='store_true', help='weakref/gc census after each unload')
p.add_argument('--steady', type=float, default=0.0, help='no churn: measure throughput for N s')
p.add_argument('--label', default='')
args = p.parse_args()

libc = ctypes.CDLL('libc.so.6')
M_ARENA_MAX = -8
if args.mallopt_arena:
    # before any thread (ORT, tokenizers) exists
    rc = libc.mallopt(M_ARENA_MAX, args.mallopt_arena)
    assert rc == 1, rc
if args.mallopt_mmap:
    # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3: fixed values switch glibc's dynamic
    # mmap threshold off (what MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ do from the env)
    assert libc.mallopt(-3, args.mallopt_mmap) == 1
    assert libc.mallopt(-1, args.mallopt_mmap) == 1


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


_jemalloc = 'jemalloc' in os.environ.get('LD_PRELOAD', '')
try:
    _mallinfo2 = libc.mallinfo2
    _mallinfo2.restype = Mallinfo2
except AttributeError:
    _mallinfo2 = None


def mem() -> dict:
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM'):
                out[k] = int(v.split()[0]) // 1024
            elif k == 'Threads':
                out[k] = int(v)
    if _mallinfo2 is not None and not _jemalloc:
        mi = _mallinfo2()
        out['heap_used'] = (mi.uordblks + mi.hblkhd) >> 20   # in use: arenas + mmapped chunks
        out['heap_free'] = mi.fordblks >> 20                 # free, kept in the arenas
    return out


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from akidb_ros.engine import EmbeddingEngine, load_config  # noqa: E402
from akidb_ros.engine import runtime as rt, manager as mg  # noqa: E402
from akidb_ros.engine.errors import EngineError  # noqa: E402
from akidb_ros.engine.types import EmbedRequest  # noqa: E402

MPNET = 'all-mpnet-base-v2'

# --- instrumentation: weakrefs to everything each load makes -------------------------------
made = {'sessions': [], 'onnx': [], 'lm': [], 'batcher': []}
_orig_session = rt.OnnxModel._session
_orig_options = rt.OnnxModel._options


def _session(self, opts, providers):
    s = _orig_session(self, opts, providers)
    if self.cfg.id == MPNET:
        made['sessions'].append(weakref.ref(s))
    return s


def _options(self, intra):
    opts = _orig_options(self, intra)
    if args.no_ort_arena:
        opts.enable_cpu_mem_arena = False
    return opts


rt.OnnxModel._session = _session
rt.OnnxModel._options = _options
_orig_onnx_init = rt.OnnxModel.__init__


def _onnx_init(self, *a, **k):
    _orig_onnx_init(self, *a, **k)
    if self.cfg.id == MPNET:
        made['onnx'].append(weakref.ref(self))


rt.OnnxModel.__init__ = _onnx_init
_orig_lm_init = mg.LoadedModel.__init__


def _lm_init(self, cfg, onnx, encoder, batcher, secs):
    _orig_lm_init(self, cfg, onnx, encoder, batcher, secs)
    if cfg.id == MPNET:
        made['lm'].append(weakref.ref(self))
        made['batcher'].append(weakref.ref(batcher))


mg.LoadedModel.__init__ = _lm_init


def alive() -> dict:
    return {k: sum(1 for r in v if r() is not None) for k, v in made.items()}


# --- traffic ------------------------------------------------------------------------------
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus.txt')
corpus = [line.strip() for line in open(CORPUS) if line.strip()]
stop = threading.Event()
lock = threading.Lock()
counts = {'ok': 0, 'sentences': 0, 'other_exc': 0}
errs: dict = {}
other: list = []


def client(n: int) -> None:
    rnd = random.Random(n)
    model = '' if n < args.default_clients else MPNET
    while not stop.is_set():
        k = rnd.choice((1, 1, 1, 2, 4, 8))
        inputs = [rnd.choice(corpus) for _ in range(k)]
        if rnd.random() < 0.3:   # vary lengths more: longer multi-sentence texts
            inputs = [' '.join(rnd.choice(corpus) for _ in range(rnd.randint(2, 6)))
                      for _ in range(k)]
        try:
            res = engine.embed(EmbedRequest(inputs=inputs, model=model))
            assert res.embeddings.shape[0] == k
            with lock:
                counts['ok'] += 1
                counts['sentences'] += k
        except EngineError as exc:
            with lock:
                errs[exc.code.name] = errs.get(exc.code.name, 0) + 1
        except BaseException as exc:  # not a typed engine error: a bug
            with lock:
                counts['other_exc'] += 1
                if len(other) < 5:
                    other.append(repr(exc))


def wait_retired(timeout=90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with engine.manager._lock:
            busy = list(engine.manager._retiring)
        if not busy:
            return
        for t in busy:
            t.join(timeout=max(0.0, end - time.monotonic()))


rows = []


def snap(label, **extra):
    m = mem()
    m.update(extra)
    m['at'] = label
    rows.append(m)
    return m


t_start = time.monotonic()
engine = EmbeddingEngine(load_config())
engine.start()
snap('default-loaded')
engine.load_model(MPNET)
time.sleep(1.0)   # overlap session builds in background
snap('mpnet-loaded')

threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
for t in threads:
    t.start()

if args.steady:
    time.sleep(3.0)   # warm-up
    with lock:
        c0, s0 = counts['ok'], counts['sentences']
    t0 = time.monotonic()
    cpu0 = os.times()
    time.sleep(args.steady)
    with lock:
        c1, s1 = counts['ok'], counts['sentences']
    dt = time.monotonic() - t0
    cpu1 = os.times()
    usr, sy = cpu1.user - cpu0.user, cpu1.system - cpu0.system
    stop.set()
    for t in threads:
        t.join(30)
    snap('end')
    res = {'label': args.label, 'mode': 'steady', 'req_s': (c1 - c0) / dt,
           'sent_s': (s1 - s0) / dt,
           'sent_per_cpu_s': (s1 - s0) / (usr + sy), 'cpu_user_s': usr, 'cpu_sys_s': sy,
           'cpu_share': (usr + sy) / dt, 'errors': errs, 'other_exc': counts['other_exc'],
           'rss_end': rows[-1]['VmRSS']}
    print('RESULT ' + json.dumps(res))
    engine.close()
    os._exit(0)

time.sleep(2.0)
snap('traffic-warm')
c0 = counts['ok']
s0 = counts['sentences']
t0 = time.monotonic()
leak_rows = []
for cycle in range(1, args.cycles + 1):
    engine.unload_model(MPNET)
    wait_retired()
    if args.trim:
        libc.malloc_trim(0)
    if args.leakcheck:
        # NB clients may have lazily reloaded mpnet already: the current copy is expected alive
        before = alive()
        gc.collect()
        after = alive()
        reloaded = engine.manager.loaded(MPNET) is not None   # keep no reference
        leak_rows.append((cycle, len(made['sessions']), before, after, reloaded))
    engine.load_model(MPNET)     # may be a no-op if traffic already reloaded it lazily
    time.sleep(args.serve_s)
    snap(f'cycle {cycle}', alive=sum(alive().values()) if args.leakcheck else None)
churn_s = time.monotonic() - t0
with lock:
    c1, s1 = counts['ok'], counts['sentences']
stop.set()
for t in threads:
    t.join(30)
time.sleep(1.0)
snap('traffic-stopped')
engine.unload_model(MPNET)
wait_retired()
time.sleep(1.0)
snap('final-unload')
gc.collect()
final_alive = alive()
snap('final-unload+gc')

hdr = ['at', 'VmRSS', 'RssAnon', 'RssFile', 'Threads', 'heap_used', 'heap_free']
print(f'# {args.label}  cycles={args.cycles} clients={args.clients} churn {churn_s:.1f}s')
print(' '.join(f'{h:>15}' if i == 0 else f'{h:>9}' for i, h in enumerate(hdr)))
for r in rows:
    print(' '.join(f'{str(r.get(h, "-")):>15}' if i == 0 else f'{str(r.get(h, "-")):>9}'
                   for i, h in enumerate(hdr)))
if args.leakcheck:
    print('# leakcheck: cycle, mpnet sessions made, alive(before gc), alive(after gc), reloaded')
    for lr in leak_rows:
        print('  ', lr)
    print('# final alive after unload+gc:', final_alive)
    # who holds anything still alive?
    for kind, refs in made.items():
        for r in refs:
            o = r()
            if o is not None:
                print(f'# ALIVE {kind}: {type(o).__name__} referrers:',
                      [type(x).__name__ for x in gc.get_referrers(o)][:8])
by = {r['at']: r for r in rows}
res = {
    'label': args.label, 'cycles': args.cycles,
    'rss': {k: by[k]['VmRSS'] for k in by if k in (
        'default-loaded', 'mpnet-loaded', 'traffic-warm', 'cycle 1', 'cycle 5', 'cycle 10',
        'cycle 20', f'cycle {args.cycles}', 'traffic-stopped', 'final-unload', 'final-unload+gc')},
    'anon_end': by['final-unload']['RssAnon'], 'file_end': by['final-unload']['RssFile'],
    'hwm': rows[-1]['VmHWM'],
    'heap_free_end': by['final-unload'].get('heap_free'),
    'heap_used_end': by['final-unload'].get('heap_used'),
    'req_s': (c1 - c0) / churn_s, 'sent_s': (s1 - s0) / churn_s, 'churn_s': churn_s,
    'ok': counts['ok'], 'errors': errs, 'other_exc': counts['other_exc'], 'other': other,
    'sessions_made': len(made['sessions']), 'alive_end': final_alive,
    'wall_s': time.monotonic() - t_start,
}
print('RESULT ' + json.dumps(res))
engine.close()
os._exit(0)
