#!/usr/bin/env python3
"""GPU acceptance check: run on a host with an NVIDIA GPU and onnxruntime-gpu installed.

    python bench/gpu_check.py [--model all-MiniLM-L6-v2] [--out bench/results/gpu-check]

It proves, with the real engine and the real REST door, what CI (CPU only) cannot:

1. the execution-provider chain: ``device=cuda`` serves on CUDAExecutionProvider;
   ``device=tensorrt``/``auto`` serve on TensorRT, or, where TensorRT is not installed, fall
   back to CUDA and say why (``health().provider_note``, the ``gpu`` check);
   ``device=cpu`` stays on CPU;
2. the vectors agree across providers (CUDA against CPU on the same weights) and with the
   sentence-transformers reference vectors stored next to the model (reference.npz);
3. NVML feeds ``akidb_gpu_memory_used_bytes`` / ``akidb_gpu_utilization_percent``;
4. the REST door, started as users start it (``python -m akidb_ros.server``), reports the GPU
   in ``/health`` and exports the GPU gauges on ``/metrics``.

Throughput on the GPU is measured by the usual benchmark in the same environment:
``AKIDB_DEVICE=cuda python bench/run.py --doors engine,rest,grpc``. Exit status 0 only when
every check passes; the JSON and markdown report say which failed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from akidb_ros.engine import EmbeddingEngine, EmbedRequest, load_config  # noqa: E402
from akidb_ros.observability.gpu import GpuSampler  # noqa: E402

RESULTS = Path(__file__).with_name('results')
CUDA, TRT, CPU = 'CUDAExecutionProvider', 'TensorrtExecutionProvider', 'CPUExecutionProvider'


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def run_device(device: str, model_id: str, sentences: list) -> dict:
    """Serve ``sentences`` through an engine built for ``device``; report what it ran on."""
    config = load_config(overrides={'engine': {'device': device}})
    engine = EmbeddingEngine(config)
    t0 = time.perf_counter()
    try:
        engine.start([model_id])
        load_s = time.perf_counter() - t0
        health = engine.health()
        lm = engine.manager.loaded(model_id)
        result = engine.embed(EmbedRequest(model=model_id, inputs=sentences, normalize=False))
        vectors = np.asarray(result.embeddings, dtype=np.float32)
        gpu = engine.gpu_sampler.sample_once() if engine.gpu_sampler.running else []
        return {'device': device, 'provider': health.provider,
                'session_providers': lm.onnx.session.get_providers(),
                'provider_note': health.provider_note, 'gpu_check': health.checks['gpu'],
                'status': health.status, 'load_s': round(load_s, 2),
                'trt_engine_built': lm.onnx.trt_engine_built, 'nvml': gpu,
                'nvml_status': engine.gpu_sampler.status(), 'vectors': vectors}
    finally:
        engine.close()


def rest_door(model_id: str) -> dict:
    """Start the real server on the GPU and read /health, one embed and /metrics over HTTP."""
    from bridge_bench import Server
    os.environ['AKIDB_DEVICE'] = 'cuda'   # the server process inherits it
    server = Server('inprocess')
    try:
        def get(path, body=None):
            c = http.client.HTTPConnection('127.0.0.1', server.rest_port, timeout=30)
            if body is None:
                c.request('GET', path)
            else:
                c.request('POST', path, json.dumps(body), {'Content-Type': 'application/json'})
            r = c.getresponse()
            return r.status, r.read().decode()
        status, health = get('/health')
        estatus, embed = get('/api/v1/embed', {'inputs': ['a robot arm picks up a red cup']})
        _, metrics = get('/metrics')
        gpu_lines = [ln for ln in metrics.splitlines() if ln.startswith('akidb_gpu_')]
        return {'health_status': status, 'health': json.loads(health),
                'embed_status': estatus,
                'embed_dimension': json.loads(embed).get('dimension') if estatus == 200 else None,
                'gpu_metric_lines': gpu_lines}
    finally:
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='')
    ap.add_argument('--out', default=str(RESULTS / 'gpu-check'))
    ap.add_argument('--no-rest', action='store_true', help='skip the REST server check')
    args = ap.parse_args()
    config = load_config()
    model_id = args.model or config.default_model
    ref_file = config.model(model_id).path.with_name('reference.npz')
    ref = np.load(ref_file) if ref_file.is_file() else None
    sentences = [str(s) for s in ref['sentences']] if ref is not None else [
        'a robot arm picks up a red cup', 'the lidar sees an obstacle ahead']

    sampler = GpuSampler(1.0)
    sampler.start()
    env = {'onnxruntime': ort.__version__, 'available_providers': ort.get_available_providers(),
           'nvml': sampler.status(), 'python': platform.python_version(),
           'platform': platform.platform()}
    sampler.close()
    print(json.dumps(env, indent=1), flush=True)

    runs = {}
    for device in ('cpu', 'cuda', 'tensorrt', 'auto'):
        runs[device] = run_device(device, model_id, sentences)
        r = runs[device]
        print(f"{device:>8}: provider {r['provider']} (session {r['session_providers']}) "
              f"load {r['load_s']} s, gpu check {r['gpu_check']!r}, note {r['provider_note']!r}",
              flush=True)

    cpu_vec = runs['cpu']['vectors']
    checks = {}
    checks['cpu stays on CPU'] = runs['cpu']['provider'] == CPU
    checks['cuda runs on CUDA'] = runs['cuda']['provider'] == CUDA
    checks['cuda health says gpu ok'] = runs['cuda']['gpu_check'] == 'ok'
    for dev in ('tensorrt', 'auto'):
        r = runs[dev]
        on_trt = r['provider'] == TRT
        # Without TensorRT libraries the chain must land on CUDA and say why.
        checks[f'{dev}: TensorRT, or CUDA with a note'] = on_trt or (
            r['provider'] == CUDA and bool(r['provider_note']))
    agreement = {}
    for dev in ('cuda', 'tensorrt', 'auto'):
        v = runs[dev]['vectors']
        agreement[dev] = {'max_abs_diff_vs_cpu': float(np.max(np.abs(v - cpu_vec))),
                          'min_cosine_vs_cpu': min_cosine(v, cpu_vec)}
        # FP32 CUDA kernels differ from CPU only in summation order; TensorRT runs FP16.
        limit = 0.999 if runs[dev]['provider'] == TRT else 0.99999
        checks[f'{dev} vectors agree with CPU (cosine >= {limit})'] = (
            agreement[dev]['min_cosine_vs_cpu'] >= limit)
    if ref is not None:
        agreement['cpu_vs_reference_min_cosine'] = min_cosine(cpu_vec, ref['vectors'])
        agreement['cuda_vs_reference_min_cosine'] = min_cosine(runs['cuda']['vectors'],
                                                               ref['vectors'])
        checks['cuda vectors match the reference (cosine >= 0.999)'] = (
            agreement['cuda_vs_reference_min_cosine'] >= 0.999)
    nvml = runs['cuda']['nvml']
    checks['NVML reports GPU memory in use'] = bool(nvml) and nvml[0]['memory_used_bytes'] > 0

    rest = None
    if not args.no_rest:
        rest = rest_door(model_id)
        h = rest['health']
        checks['REST /health: gpu ok on CUDA'] = (
            rest['health_status'] == 200 and h.get('checks', {}).get('gpu') == 'ok')
        checks['REST embed answers on the GPU'] = rest['embed_status'] == 200
        checks['REST /metrics exports akidb_gpu_memory_used_bytes'] = any(
            ln.startswith('akidb_gpu_memory_used_bytes') for ln in rest['gpu_metric_lines'])

    for r in runs.values():
        r.pop('vectors')
    report = {'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
              'model': model_id, 'environment': env, 'runs': runs, 'agreement': agreement,
              'rest': rest, 'checks': checks, 'passed': all(checks.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(report, indent=2, default=str) + '\n')
    lines = [f"# GPU check — {report['when']}", '',
             f"Model `{model_id}`, onnxruntime {ort.__version__}, providers "
             f"{', '.join(env['available_providers'])}; GPUs: "
             f"{', '.join(str(d['name']) for d in env['nvml']['devices']) or 'none'}.", '',
             '| device setting | provider | load s | gpu check | note |', '|---|---|---|---|---|']
    for dev, r in runs.items():
        lines.append(f"| {dev} | {r['provider']} | {r['load_s']} | {r['gpu_check']} | "
                     f"{r['provider_note'] or ''} |")
    lines += ['', '| check | result |', '|---|---|']
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items()]
    lines += ['', 'Agreement: ' + json.dumps(agreement)]
    if rest:
        lines += ['', 'REST /metrics GPU series: ' + '; '.join(rest['gpu_metric_lines'])]
    out.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0 if report['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
