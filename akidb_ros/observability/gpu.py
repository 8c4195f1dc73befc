"""GPU gauges from NVML: ``akidb_gpu_memory_used_bytes`` and ``akidb_gpu_utilization_percent``.

NVML (through ``nvidia-ml-py``, NVIDIA's own binding) is the only source that sees the whole
device, whatever process holds the memory; ONNX Runtime exposes neither figure. A host without an
NVIDIA driver (a CPU machine, CI, a Jetson without NVML) simply gets no GPU series: the sampler
says why in ``status()`` and never raises.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, List, Optional

from .metrics import GPU_MEMORY_USED, GPU_UTILIZATION

log = logging.getLogger('akidb_ros.observability.gpu')

try:   # nvidia-ml-py is a requirement, but a trimmed install must still start on CPU
    import pynvml
except ImportError:   # pragma: no cover - exercised only on a broken install
    pynvml = None


class GpuSampler:
    """Samples every visible NVIDIA GPU each ``interval_s`` seconds on one daemon thread."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.devices: List[Dict[str, object]] = []
        self.reason = ''
        self._handles: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._initialised = False

    def start(self) -> bool:
        """Open NVML and start sampling; False (with ``reason``) where there is no NVIDIA GPU."""
        if self.interval_s <= 0:
            self.reason = 'disabled (engine.gpu_metrics_interval_s = 0)'
            return False
        if pynvml is None:
            self.reason = 'nvidia-ml-py is not installed'
            return False
        try:
            pynvml.nvmlInit()
            self._initialised = True
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.devices = [{'index': i, 'name': _text(pynvml.nvmlDeviceGetName(h)),
                             'memory_total_bytes': int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
                            for i, h in enumerate(self._handles)]
        except pynvml.NVMLError as exc:
            self.reason = f'NVML unavailable: {exc}'
            self._shutdown_nvml()
            return False
        if not self._handles:
            self.reason = 'NVML found no GPU'
            self._shutdown_nvml()
            return False
        self.sample_once()
        self._thread = threading.Thread(target=self._loop, name='akidb-gpu-sampler',
                                        daemon=True)
        self._thread.start()
        log.info('GPU metrics from NVML every %.1f s: %s', self.interval_s,
                 ', '.join(str(d['name']) for d in self.devices))
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample_once(self) -> List[Dict[str, object]]:
        """Read every device now, set the gauges and return the readings."""
        readings = []
        with self._lock:
            for i, handle in enumerate(self._handles):
                label = str(i)
                try:
                    used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                    GPU_MEMORY_USED.labels(device=label).set(used)
                    reading = {'index': i, 'memory_used_bytes': used}
                    try:
                        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                        GPU_UTILIZATION.labels(device=label).set(util)
                        reading['utilization_percent'] = int(util)
                    except pynvml.NVMLError_NotSupported:
                        pass   # e.g. MIG slices report memory but no utilisation
                    readings.append(reading)
                except pynvml.NVMLError as exc:   # a lost GPU must not kill the sampler
                    log.warning('NVML read of GPU %d failed: %s', i, exc)
        return readings

    def status(self) -> Dict[str, object]:
        return {'enabled': self.running, 'devices': list(self.devices), 'reason': self.reason}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1.0)
        self._shutdown_nvml()

    def _shutdown_nvml(self) -> None:
        with self._lock:
            self._handles = []
            if self._initialised:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
                self._initialised = False


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
