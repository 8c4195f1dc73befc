"""Fixed glibc malloc thresholds, so memory freed by a hot unload goes back to the system.

glibc serves large allocations (a model's weight buffers: 2-9 MB each) with ``mmap`` and
returns them at ``free`` -- until the first such free raises its *dynamic* mmap threshold (up to
32 MB). From then on a reload's weights land in per-thread arena heaps (loads run on new loader,
overlap-builder and ONNX Runtime threads), which fragment and are never returned: measured with
all-mpnet-base-v2 unloaded and loaded 12 times under 8 clients, RSS after the final unload was
2351 MB with 1938 MB of it free inside glibc; with fixed 128 KiB thresholds, 407-441 MB, and the
same sentences per CPU-second without churn (bench notes in docs/architecture.md).

``MALLOC_ARENA_MAX`` made it worse (2.7-2.9 GB), ONNX Runtime's ``enable_cpu_mem_arena=False``
kept the retention and, with fixed thresholds, ran 3x slower; jemalloc needs a preloaded
library in every image. ``mallopt`` needs nothing. Settings an operator gave (the
``MALLOC_*_THRESHOLD_`` variables, glibc tunables, a preloaded jemalloc) are left alone.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from typing import Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1      # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024

_lock = threading.Lock()
_result: Optional[str] = None


def operator_choice(env=os.environ) -> Optional[str]:
    """Why the allocator is the operator's to set here (None: it is ours)."""
    for name in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_'):
        if name in env:
            return f'{name} is set'
    if 'glibc.malloc.' in env.get('GLIBC_TUNABLES', ''):
        return 'GLIBC_TUNABLES sets glibc.malloc'
    if 'jemalloc' in env.get('LD_PRELOAD', '') or 'tcmalloc' in env.get('LD_PRELOAD', ''):
        return 'another allocator is preloaded'
    return None


def tune_malloc() -> str:
    """Apply the fixed thresholds once per process; returns what happened (for logs, tests)."""
    global _result
    with _lock:
        if _result is None:
            _result = _apply()
            log.debug('malloc tuning: %s', _result)
        return _result


def _apply() -> str:
    if not sys.platform.startswith('linux'):
        return f'not applied: {sys.platform}'
    why = operator_choice()
    if why:
        return f'not applied: {why}'
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 'not applied: no mallopt (not glibc)'
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) != 1 \
            or mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) != 1:
        return 'not applied: mallopt refused'
    return f'applied: mmap and trim thresholds {THRESHOLD_BYTES} bytes'


def release_free_memory() -> bool:
    """``malloc_trim(0)``: give back free pages inside every glibc arena, not only at a
    heap's top (all the fixed trim threshold does). Called after a hot unload has let the
    model go; True when it ran.

    The thresholds keep a reload's weights out of the arenas, but the sessions' smaller
    allocations, made on loader and ONNX Runtime threads, leave free holes in up to 16 arenas:
    the node's RSS after each unload of all-mpnet-base-v2 rose 221 -> 253 MB over 22 cycles
    with no traffic (255 -> 350 MB with traffic), all of it free inside glibc; with a trim
    after each unload it stayed at 217 MB (285 MB with traffic, from the 6th cycle on).
    Only where the thresholds are ours (not an operator's allocator or settings).
    """
    if not tune_malloc().startswith('applied'):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True
