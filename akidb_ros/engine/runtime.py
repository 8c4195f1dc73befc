"""ONNX Runtime sessions: execution providers TensorRT -> CUDA -> CPU, with a clean fallback."""
from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnxruntime as ort

from . import errors
from .config import EngineSettings, ModelConfig

log = logging.getLogger('akidb_ros.engine.runtime')

TRT = 'TensorrtExecutionProvider'
CUDA = 'CUDAExecutionProvider'
CPU = 'CPUExecutionProvider'
# A run of at least this many padded tokens gives its growth of ONNX Runtime's CPU memory
# arena back when it ends. The arena keeps the peak of the largest run for good: one run of 32
# texts of 256 tokens left MiniLM's process 507 MB larger (16 MB with the shrink; 16 x 256:
# 256 against 6 MB), while the cache budget counts the model at 90 MB. Smaller runs keep
# their arena: the steady traffic of short texts (runs of a few sentences; the benchmark's
# sorted batches of 32 corpus sentences reach 2560), for which a shrinking run would allocate
# again each time: +5-10 % on a 32 x 256 run here (docs/architecture.md).
SHRINK_AT_TOKENS = 4096

_warned_lock = threading.Lock()
_warned = set()


def _warn_once(key: str, message: str) -> None:
    _say_once(key, logging.WARNING, message)


def _say_once(key: str, level: int, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.log(level, message)


@functools.lru_cache(maxsize=None)   # once per process
def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels before the first GPU session.

    onnxruntime-gpu on PyPI does not bundle CUDA; the images install the runtime libraries as
    wheels (``onnxruntime-gpu[cuda,cudnn]``), which the dynamic loader cannot find on its own.
    ``preload_dlls`` is ORT's documented way to load them; with system CUDA it is a no-op.
    """
    if not hasattr(ort, 'preload_dlls'):
        return
    try:
        ort.preload_dlls()
    except Exception as exc:   # the session's own fallback reports what is really missing
        log.warning('could not preload CUDA libraries: %s', exc)


@functools.lru_cache(maxsize=1)
def _tensorrt_libraries_missing() -> str:
    """Why TensorRT cannot start here, in words an operator can act on ('' when it can try)."""
    import ctypes
    for lib in ('libnvinfer.so.10', 'libnvinfer.so'):
        try:
            ctypes.CDLL(lib)
            return ''   # the library is there: any failure's cause is in the log
        except OSError:
            continue
    return (' (TensorRT libraries not found: libnvinfer.so.10; install tensorrt-cu13-libs or '
            'put them on LD_LIBRARY_PATH)')


def tensorrt_build_expected(model: ModelConfig, settings: EngineSettings) -> bool:
    """Whether loading ``model`` will build a TensorRT engine: TensorRT is planned and can
    start here, and no engine is cached for the model yet (a cached one may still be rebuilt,
    for a changed graph: that load gets the plain load timeout)."""
    if settings.device not in ('auto', 'tensorrt') or TRT not in ort.get_available_providers():
        return False
    cache = Path(settings.tensorrt_cache) / model.id
    if cache.is_dir() and any(cache.glob('*.engine')):
        return False
    return not _tensorrt_libraries_missing()


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _shape_spec(names: List[str], batch: int, seq: int) -> str:
    return ','.join(f'{n}:{batch}x{seq}' for n in names)


def plan_providers(device: str, available: List[str], model: ModelConfig,
                   settings: EngineSettings, input_names: List[str]) -> Tuple[list, str]:
    """Return (providers for InferenceSession, note explaining any degradation)."""
    wanted = {'auto': [TRT, CUDA], 'tensorrt': [TRT, CUDA], 'cuda': [CUDA], 'cpu': []}[device]
    chosen, note = [], ''
    for name in wanted:
        if name not in available:
            continue
        if name == TRT:
            cache = Path(settings.tensorrt_cache) / model.id
            cache.mkdir(parents=True, exist_ok=True)
            max_batch = settings.batching.max_batch_size
            chosen.append((TRT, {
                'trt_fp16_enable': settings.tensorrt_fp16,
                'trt_engine_cache_enable': True,
                'trt_engine_cache_path': str(cache),
                'trt_timing_cache_enable': True,
                'trt_timing_cache_path': str(cache),
                # Optimisation profiles span the batcher's limits, so no shape triggers a rebuild.
                'trt_profile_min_shapes': _shape_spec(input_names, 1, 1),
                'trt_profile_opt_shapes': _shape_spec(input_names, max_batch, min(
                    128, model.max_tokens)),
                'trt_profile_max_shapes': _shape_spec(input_names, max_batch, model.max_tokens),
            }))
        else:
            # TF32 matmuls make a sentence's vector depend on its batch (measured ~5e-4 on an
            # H100, 6e-7 without): exact FP32 unless the config trades that for speed. No
            # device_id: GPU 0 is the default, and naming it makes ORT 1.31 look for a plugin
            # EP device and warn on every session (seen on an H200).
            chosen.append((CUDA, {'use_tf32': int(settings.cuda_tf32)}))
    gpu_wanted = bool(wanted)
    if gpu_wanted and not chosen:
        note = (f'device={device} asked for a GPU but this onnxruntime offers only '
                f'{", ".join(available)}; running on CPU')
    chosen.append(CPU)
    return chosen, note


def _varint(buf, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf, i: int, end: int):
    """(field number, wire type, value) of one protobuf message; a length-delimited value is its
    (start, end) span, so weights are skipped, never read."""
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = (i, i + size), i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f'protobuf wire type {wire}')
        yield number, wire, value


def embedding_tables(path: Path) -> Dict[str, Tuple[str, int]]:
    """``{'position_embeddings' | 'word_embeddings': (name, rows)}`` of the ONNX graph's learnt
    tables (the smallest of each kind), those it has.

    A model with a position table (BERT, MPNet, RoBERTa, E5, BGE ...) cannot run longer inputs
    than it has rows, nor token ids past its word table's rows, and ONNX Runtime only fails at
    the first such run. Rotary models (Qwen) have no position table.

    Read from the file's graph (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.dims = 1, name = 8): no ``onnx`` package, and external or embedded weights are
    skipped.
    """
    found: Dict[str, List[Tuple[str, int]]] = {}
    try:
        with open(path, 'rb') as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, wire, graph in _fields(buf, 0, len(buf)):
                if number != 7 or wire != 2:
                    continue
                for g_number, g_wire, tensor in _fields(buf, *graph):
                    if g_number != 5 or g_wire != 2:
                        continue
                    name, dims = '', []
                    for t_number, t_wire, value in _fields(buf, *tensor):
                        if t_number == 8 and t_wire == 2:
                            name = bytes(buf[value[0]:value[1]]).decode('utf-8', 'replace')
                        elif t_number == 1 and t_wire == 0:
                            dims.append(value)
                        elif t_number == 1 and t_wire == 2:     # packed dims
                            j = value[0]
                            while j < value[1]:
                                dim, j = _varint(buf, j)
                                dims.append(dim)
                    for kind in ('position_embeddings', 'word_embeddings'):
                        if kind in name and len(dims) == 2:
                            found.setdefault(kind, []).append((name, dims[0]))
    except (OSError, ValueError, IndexError) as exc:   # the session reports a bad file
        log.debug('%s: no embedding table read (%s)', path, exc)
        return {}
    return {kind: min(tables, key=lambda f: f[1]) for kind, tables in found.items()}


# Positions that RoBERTa-style models (MPNet, XLM-R) keep for padding at the table's start.
PADDING_POSITIONS = 2


def cgroup_cpu_limit(root: str = '/sys/fs/cgroup',
                     proc_cgroup: str = '/proc/self/cgroup') -> Optional[float]:
    """CPUs this process's CFS quota allows (a Kubernetes or Docker CPU limit), None when there
    is none or it cannot be read. Neither ``os.sched_getaffinity`` nor ONNX Runtime sees a
    quota, so a 4-CPU pod on a 64-core host would run 64 threads per session and be throttled.

    cgroup v2: ``cpu.max`` ("<quota> <period>" or "max <period>") of this cgroup and each
    ancestor (the tightest wins); cgroup v1: ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` of the
    cpu controller's folder. Written by hand: no maintained library reads it (psutil does not).
    """
    try:
        with open(proc_cgroup, encoding='utf-8') as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hier, _, rest = line.partition(':')
        controllers, _, path = rest.partition(':')
        if hier == '0' and controllers == '':                     # v2, unified
            parts = [p for p in path.split('/') if p]
            for depth in range(len(parts), -1, -1):
                quota = _read_words(os.path.join(root, *parts[:depth], 'cpu.max'))
                if quota and len(quota) == 2 and quota[0] != 'max':
                    limits.append(_ratio(quota[0], quota[1]))
        elif 'cpu' in controllers.split(','):                      # v1
            for base in (os.path.join(root, controllers), os.path.join(root, 'cpu')):
                # in a container the controller's mount is its own cgroup; on a host, the path
                for folder in (os.path.join(base, path.lstrip('/')), base):
                    quota = _read_words(os.path.join(folder, 'cpu.cfs_quota_us'))
                    period = _read_words(os.path.join(folder, 'cpu.cfs_period_us'))
                    if quota and period:
                        limits.append(_ratio(quota[0], period[0]))
                        break
                else:
                    continue
                break
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _read_words(path: str) -> Optional[List[str]]:
    try:
        with open(path, encoding='utf-8') as fh:
            return fh.read().split()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> Optional[float]:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None     # v1 writes -1 for "no limit"


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def quota_cores(**where) -> Optional[int]:
    """The CPU quota rounded up, when it allows fewer CPUs than the process may run on
    (``where``: ``cgroup_cpu_limit``'s paths)."""
    limit = cgroup_cpu_limit(**where)
    if limit is None:
        return None
    cores = max(1, math.ceil(limit - 1e-9))
    return cores if cores < _affinity_cores() else None


def _usable_cores() -> int:
    return quota_cores() or _affinity_cores()


class OnnxModel:
    """The model's InferenceSession(s) plus what the batcher needs to feed them.

    With several batcher runners on a CPU, a run that starts while another is in flight goes to
    an *overlap* session whose threads are one runner's share of the cores: two runs each on
    half the cores outrun two runs fighting over one all-core thread pool (and a lone run still
    gets every core). It holds a second copy of the weights, counted in ``memory_factor``, and
    is built in the background after the load (``build_overlap``): a cold load does not wait
    for it, and runs share the main session until it is ready.
    """

    def __init__(self, model: ModelConfig, settings: EngineSettings, runners: int = 1):
        self.cfg = model
        self._settings = settings
        # Refused here, before any session (a TensorRT profile spans max_tokens): a longer
        # max_tokens than the model has positions would fail each long input INTERNAL. Refused,
        # not clamped: max_tokens is what truncation and truncate=false answer by, and what
        # /models reports; the operator fixes the number once, at start.
        tables = embedding_tables(model.path)
        self.position_table = tables.get('position_embeddings')
        self.vocab_table = tables.get('word_embeddings')
        if self.position_table and model.max_tokens > self.position_table[1]:
            table, rows = self.position_table
            raise errors.EngineError(
                errors.ErrorCode.MODEL_LOAD_FAILED,
                f'model {model.id}: max_tokens {model.max_tokens} is more than the model takes '
                f'(its position table {table} has {rows} rows): set max_tokens to at most '
                f'{rows} ({rows - PADDING_POSITIONS} for RoBERTa-style models such as MPNet, '
                f'which keep {PADDING_POSITIONS} rows for padding)')
        opts = self._options(settings.intra_op_threads)
        available = ort.get_available_providers()
        if settings.device != 'cpu' and CUDA in available:
            _preload_cuda_libraries()
        probe_names = ['input_ids', 'attention_mask']
        trt_missing = ''
        if TRT in available and settings.device in ('auto', 'tensorrt'):
            # Without its libraries TensorRT cannot start, and ORT's own fallback would retry
            # with bare provider names, dropping the CUDA options: plan without it instead.
            trt_missing = _tensorrt_libraries_missing()
            if trt_missing:
                available = [p for p in available if p != TRT]
            else:
                # TensorRT profiles must name the graph's real inputs: read them off an
                # unoptimised CPU session (cheap, and only on hosts that have TensorRT).
                probe = ort.SessionOptions()
                probe.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                probe_names = [i.name for i in self._session(probe, [CPU]).get_inputs()]
        providers, note = plan_providers(settings.device, available, model, settings, probe_names)
        trt_cache = Path(settings.tensorrt_cache) / model.id
        engines_before = set(trt_cache.glob('*.engine')) if trt_cache.is_dir() else set()
        self.session = self._session(opts, providers)
        requested = TRT if trt_missing else _provider_name(providers[0])
        planned = [_provider_name(p) for p in providers]
        if planned[0] == TRT and self.session.get_providers()[0] != TRT and CUDA in planned:
            # TensorRT failed at run time (GPU, version, memory: the log says which) and ORT
            # fell back without our CUDA options: build the CUDA session with them.
            self.session = self._session(opts, providers[planned.index(CUDA):])
        self.provider = self.session.get_providers()[0]
        if requested != self.provider and not note:
            note = f'{requested} failed to initialise; running on {self.provider}'
            if requested == TRT:
                note += trt_missing
        if note:
            _warn_once(note, note)
        self.provider_note = note
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {'input_ids', 'attention_mask'} - set(self.input_names)
        if missing:
            raise errors.EngineError(errors.ErrorCode.MODEL_LOAD_FAILED,
                                     f'model {model.id}: graph lacks inputs {sorted(missing)}')
        self.uses_type_ids = 'token_type_ids' in self.input_names
        out = self.session.get_outputs()[0]
        hidden = out.shape[-1]
        if isinstance(hidden, int) and hidden != model.dimension:
            raise errors.EngineError(
                errors.ErrorCode.MODEL_LOAD_FAILED,
                f'model {model.id}: graph output has dimension {hidden}, config says '
                f'{model.dimension}')
        self.trt_engine_built: Optional[bool] = None
        if self.provider == TRT:
            after = set(trt_cache.glob('*.engine'))
            self.trt_engine_built = bool(after - engines_before)
        self.overlap_session: Optional[ort.InferenceSession] = None
        self._overlap_builder: Optional[threading.Thread] = None
        # Several runners on a CPU: their runs overlap, each on a share of the cores (a GPU
        # queues them on one device).
        self.runs_share_cores = self.provider == CPU and runners > 1
        cores = settings.intra_op_threads or _usable_cores()
        share = max(1, cores // max(1, runners))
        self._overlap_threads = share if self.runs_share_cores and share < cores else 0
        self.memory_factor = 2 if self._overlap_threads else 1
        self._in_flight = 0
        self._flight_lock = threading.Lock()
        # every run goes with one of these, so that ``terminate_runs`` reaches the runs in
        # progress (a per-run RunOptions cost as much to make as to pass)
        self._run_options = ort.RunOptions()
        self._shrink_options = _shrinking_run()

    def _options(self, intra_threads: int) -> ort.SessionOptions:
        settings = self._settings
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not intra_threads:
            # ONNX Runtime's own default counts the host's cores; under a CPU limit that many
            # threads are throttled, so take the limit instead (None: keep ORT's choice)
            intra_threads = quota_cores() or 0
            if intra_threads:
                _say_once('quota', logging.INFO,
                          f'CPU limit (cgroup quota) of {intra_threads} CPUs: ONNX Runtime '
                          f'sessions use {intra_threads} threads (engine.intra_op_threads 0)')
        if intra_threads:
            opts.intra_op_num_threads = intra_threads
        if settings.inter_op_threads:
            opts.inter_op_num_threads = settings.inter_op_threads
        opts.log_severity_level = 3
        # Spinning ORT workers burn the cores that tokenisation and the doors need between
        # batches; on a small CPU shared with them, sleeping workers serve more sentences/s.
        spin = '1' if settings.allow_spinning else '0'
        opts.add_session_config_entry('session.intra_op.allow_spinning', spin)
        opts.add_session_config_entry('session.inter_op.allow_spinning', spin)
        return opts

    def _session(self, opts: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(self.cfg.path), sess_options=opts,
                                        providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            # Details (paths, ORT internals) go to the log, not to the caller.
            log.error('model %s: cannot create session from %s: %s', self.cfg.id, self.cfg.path,
                      exc)
            raise errors.EngineError(
                errors.ErrorCode.MODEL_LOAD_FAILED,
                f'model {self.cfg.id}: cannot create session (invalid or corrupt model file: '
                f'{type(exc).__name__})') from exc

    def _feeds(self, ids: np.ndarray, mask: np.ndarray,
               types: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        feeds: Dict[str, np.ndarray] = {'input_ids': ids, 'attention_mask': mask}
        if self.uses_type_ids:
            feeds['token_type_ids'] = types if types is not None else np.zeros_like(ids)
        return feeds

    def _warm(self, session, pad_id: int) -> None:
        for length in (8, min(64, self.cfg.max_tokens)):
            ids = np.full((2, length), pad_id, dtype=np.int64)
            session.run(None, self._feeds(ids, np.ones_like(ids), None))

    def warm_up(self, pad_id: int) -> None:
        """The first runs pay for allocations and kernel selection: make the loader pay, not a
        caller."""
        self._warm(self.session, pad_id)
        if self.position_table and \
                self.cfg.max_tokens > self.position_table[1] - PADDING_POSITIONS:
            # Within the rows a RoBERTa-style model keeps for padding: only a run that long
            # tells whether it takes max_tokens (one sequence; it fails at once if not). Any
            # small id but the pad id, which such models map to a padding position.
            ids = np.full((1, self.cfg.max_tokens), 2 if pad_id == 1 else 1, dtype=np.int64)
            try:
                self.session.run(None, self._feeds(ids, np.ones_like(ids), None))
            except Exception as exc:
                table, rows = self.position_table
                log.error('model %s: a run of max_tokens=%d tokens fails: %s', self.cfg.id,
                          self.cfg.max_tokens, exc)
                raise errors.EngineError(
                    errors.ErrorCode.MODEL_LOAD_FAILED,
                    f'model {self.cfg.id}: max_tokens {self.cfg.max_tokens} is more than the '
                    f'model takes (a run that long fails; its position table {table} has '
                    f'{rows} rows, of which RoBERTa-style models keep {PADDING_POSITIONS} for '
                    f'padding): set max_tokens to at most {rows - PADDING_POSITIONS}') from None

    def build_overlap(self, pad_id: int) -> None:
        """Build and warm the overlap session on a background thread (no-op where none is due)."""
        if not self._overlap_threads or self._overlap_builder is not None:
            return
        self._overlap_builder = threading.Thread(
            target=self._build_overlap, args=(pad_id,), daemon=True,
            name=f'akidb-overlap-{self.cfg.id}')
        self._overlap_builder.start()

    def _build_overlap(self, pad_id: int) -> None:
        try:
            session = self._session(self._options(self._overlap_threads), [CPU])
            self._warm(session, pad_id)
        except Exception as exc:   # the model still serves, on its main session alone
            log.warning('model %s: no overlap session (%s); overlapping runs share the main '
                        'session', self.cfg.id, exc)
            return
        self.overlap_session = session

    def wait_overlap(self, timeout: float) -> bool:
        """Wait for the background build (a thread inside ONNX Runtime must not outlive us)."""
        if self._overlap_builder is not None:
            self._overlap_builder.join(timeout)
            return not self._overlap_builder.is_alive()
        return True

    def run(self, ids: np.ndarray, mask: np.ndarray,
            types: Optional[np.ndarray]) -> np.ndarray:
        feeds = self._feeds(ids, mask, types)
        options = self._shrink_options if ids.size >= SHRINK_AT_TOKENS else self._run_options
        overlap = self.overlap_session
        if overlap is None:
            return self.session.run(None, feeds, options)[0]
        with self._flight_lock:
            busy = self._in_flight
            self._in_flight += 1
        try:
            return (overlap if busy else self.session).run(None, feeds, options)[0]
        finally:
            with self._flight_lock:
                self._in_flight -= 1

    def terminate_runs(self) -> None:
        """Cut the runs in progress short, and fail every later one: ONNX Runtime checks the
        flag between kernels, so a run ends within one kernel's time (a stop whose budget is
        spent otherwise waited seconds for a large batch)."""
        self._run_options.terminate = True
        self._shrink_options.terminate = True


def _shrinking_run() -> ort.RunOptions:
    """Run options that free the CPU arena's unused memory when the run ends."""
    options = ort.RunOptions()
    options.add_run_config_entry('memory.enable_memory_arena_shrinkage', 'cpu:0')
    return options
