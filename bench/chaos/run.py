"""Chaos suite (issue 7 §4): real faults while a load runs, on one machine, loopback only.

Scenarios (each bounded in time and request count; every process started here is stopped):
  node_sigkill     sidecar (node under ROS 2 launch respawn + bridge): SIGKILL the node
  server_sigterm   in-process server: SIGTERM mid-load (graceful drain), then restart
  model_corrupt    second model's model.onnx is garbage: it fails cleanly, the default serves
  model_missing    second model's model.onnx is absent: same promise
  network_faults   TCP fault proxy: 100 ± 50 ms latency, then 20 % connection resets
  disk_full        TensorRT cache + ROS log dir on a full tmpfs (private mount namespace)
  cpu_starvation   stress-ng on every core while the load runs

Per scenario: requests sent, answered, failed by code, lost (accepted but never answered, must be
0), recovery time, latency; results in bench/results/chaos.json and chaos.md.

    .venv/bin/python bench/chaos/run.py [--only NAME ...] [--duration-scale 1.0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.chaos.faultproxy import FaultProxy  # noqa: E402

PY = str(ROOT / '.venv' / 'bin' / 'python')
MODELS = ROOT / 'models'
DEFAULT_MODEL = 'all-minilm-l6-v2'
SECOND_MODEL = 'all-mpnet-base-v2'
RETRYABLE = {'REFUSED', 'RESET', 'UNAVAILABLE', 'OVERLOADED', 'TIMEOUT'}
MAX_REQUESTS_PER_SCENARIO = 4000
DDS_PROFILE = [str(ROOT / 'config' / 'fastdds_loopback.xml')]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def base_env(tmp: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        'FASTDDS_DEFAULT_PROFILES_FILE': DDS_PROFILE[0],
        'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_STATIC_PEERS': '',
        'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp',
        'ROS_DOMAIN_ID': str(random.randint(120, 200)),
        'AMENT_PREFIX_PATH': str(ROOT / '.venv'),
        'ROS_LOG_DIR': str(tmp / 'ros_log'),
        'AKIDB_LOG_LEVEL': 'WARNING',
        'AKIDB_DEVICE': 'cpu',
    })
    env.pop('ROS_LOCALHOST_ONLY', None)
    return env


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, cmd: List[str], env: Dict[str, str], log: Path):
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        self.p: Optional[subprocess.Popen] = None

    def start(self) -> 'Proc':
        self._fh = open(self.log, 'ab')
        self.p = subprocess.Popen(self.cmd, env=self.env, cwd=str(ROOT), stdout=self._fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.p is None:
            return
        if self.alive():
            self.send(sig)
            if self.wait(timeout) is None:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        # the process group: children (e.g. launch's node) must not outlive us
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._fh.close()


def children(pid: int) -> List[int]:
    out = []
    for task in Path(f'/proc/{pid}/task').glob('*'):
        try:
            out += [int(x) for x in (task / 'children').read_text().split()]
        except OSError:
            pass
    return out


def wait_ready(url: str, timeout: float, proc: Optional[Proc] = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and not proc.alive():
            raise RuntimeError(f'{proc.name} exited with {proc.p.returncode} (log {proc.log})')
        try:
            if requests.get(url + '/health/ready', timeout=1).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f'{url} not ready after {timeout} s')


def server_cmd(port: int, ros: bool = False) -> List[str]:
    cmd = [PY, '-m', 'akidb_ros.server', '--mode', 'inprocess', '--host', '127.0.0.1',
           '--rest-port', str(port), '--grpc-port', '0', '--grace', '5']
    return cmd + ([] if ros else ['--no-ros'])


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def classify(exc: Exception) -> str:
    text = repr(exc)
    if isinstance(exc, requests.ReadTimeout):
        return 'CLIENT_TIMEOUT'
    if isinstance(exc, requests.ConnectTimeout):
        return 'REFUSED'
    if 'Connection refused' in text or 'ConnectionRefused' in text:
        return 'REFUSED'
    return 'RESET'      # reset / remote closed without an answer / broken pipe


class Load:
    """Closed-loop clients, each paced to ``rps`` requests/s, with up to 3 attempts (retry on
    REFUSED/RESET/UNAVAILABLE/OVERLOADED/TIMEOUT, 100/200 ms back-off), new connection per call."""

    def __init__(self, url: str, threads: int = 4, rps: float = 10.0,
                 models: Optional[List[str]] = None, timeout_s: float = 10.0,
                 attempts: int = 3):
        self.url, self.threads, self.rps = url, threads, rps
        self.models = models or ['']
        self.timeout_s, self.attempts = timeout_s, attempts
        self.records: List[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ts: List[threading.Thread] = []
        self.t_start = 0.0

    def start(self) -> 'Load':
        self.t_start = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True)
            t.start()
            self._ts.append(t)
        return self

    def stop(self) -> List[dict]:
        self._stop.set()
        for t in self._ts:
            t.join(self.timeout_s * self.attempts + 5)
        return self.records

    def _one(self, sess: requests.Session, model: str, n: int) -> dict:
        body = {'inputs': [f'chaos request {n}: the robot reached dock {n % 17}']}
        if model:
            body['model'] = model
        rec = {'t0': time.monotonic(), 'model': model or DEFAULT_MODEL, 'attempts': []}
        for a in range(self.attempts):
            t_a = time.monotonic()
            try:
                r = sess.post(self.url + '/api/v1/embed', json=body,
                              headers={'Connection': 'close'},
                              timeout=(2.0, self.timeout_s))
                if r.status_code == 200:
                    code = 'OK'
                else:
                    try:
                        code = r.json().get('code') or f'HTTP_{r.status_code}'
                    except ValueError:
                        code = f'HTTP_{r.status_code}'
                answered = True
            except requests.RequestException as exc:
                code, answered = classify(exc), False
            rec['attempts'].append({'code': code, 'answered': answered, 't': t_a,
                                    'latency': time.monotonic() - t_a})
            if code not in RETRYABLE or a == self.attempts - 1 or self._stop.is_set():
                break
            time.sleep(0.1 * (2 ** a))
        last = rec['attempts'][-1]
        rec.update(t1=time.monotonic(), final=last['code'], answered=last['answered'])
        return rec

    def _worker(self, i: int) -> None:
        sess = requests.Session()
        period = 1.0 / self.rps
        n = i
        nxt = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                if len(self.records) >= MAX_REQUESTS_PER_SCENARIO:
                    break
            model = self.models[n % len(self.models)]
            rec = self._one(sess, model, n)
            with self._lock:
                self.records.append(rec)
            n += self.threads
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.monotonic()


def pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))] * 1000, 1)


def summarize(name: str, desc: str, recs: List[dict], fault_t: Optional[float],
              clear_t: Optional[float] = None, lost_codes=('CLIENT_TIMEOUT', 'RESET'),
              extra: Optional[dict] = None) -> dict:
    by_code: Dict[str, int] = {}
    attempts_by_code: Dict[str, int] = {}
    for r in recs:
        by_code[r['final']] = by_code.get(r['final'], 0) + 1
        for a in r['attempts']:
            attempts_by_code[a['code']] = attempts_by_code.get(a['code'], 0) + 1
    ok = [r for r in recs if r['final'] == 'OK']
    lost = [r for r in recs if r['final'] in lost_codes]
    failed = {k: v for k, v in by_code.items() if k != 'OK' and k not in lost_codes}
    recovery = None
    if fault_t is not None:
        # attempt level (retries would hide the outage): from the fault to the first OK attempt
        # that started after the last failed attempt
        atts = [a for r in recs for a in r['attempts']]
        fails = [a for a in atts if a['code'] != 'OK' and a['t'] + a['latency'] >= fault_t]
        if not fails:
            recovery = 0.0
        else:
            last_fail_t = max(a['t'] for a in fails)
            later_ok = [a['t'] + a['latency'] for a in atts
                        if a['code'] == 'OK' and a['t'] > last_fail_t]
            recovery = round(min(later_ok) - fault_t, 3) if later_ok else None
    lat_ok = [r['attempts'][-1]['latency'] for r in ok]
    out = {
        'scenario': name, 'description': desc,
        'sent': len(recs), 'answered': sum(1 for r in recs if r['answered']),
        'ok': len(ok), 'failed_by_code': failed, 'lost': len(lost),
        'lost_by_code': {k: by_code[k] for k in lost_codes if k in by_code},
        'attempts_by_code': attempts_by_code,
        'retried_requests': sum(1 for r in recs if len(r['attempts']) > 1),
        'recovery_s': recovery,
        'latency_ok_ms': {'p50': pct(lat_ok, 0.5), 'p95': pct(lat_ok, 0.95),
                          'max': pct(lat_ok, 1.0)},
    }
    if extra:
        out.update(extra)
    return out


def check(res: dict, name: str, ok: bool, detail: str = '') -> None:
    res.setdefault('checks', []).append({'check': name, 'passed': bool(ok), 'detail': detail})


def finish(res: dict) -> dict:
    check(res, 'lost == 0', res['lost'] == 0, f"lost {res['lost']}")
    check(res, 'every request accounted for',
          res['ok'] + sum(res['failed_by_code'].values()) + res['lost'] == res['sent'])
    res['passed'] = all(c['passed'] for c in res['checks'])
    return res


def metric_sum(url: str, name: str, match: str = '') -> Optional[float]:
    try:
        text = requests.get(url + '/metrics', timeout=3).text
    except requests.RequestException:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in '{ ') and match in line:
            total += float(line.rsplit(' ', 1)[1])
    return total


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------
RESPAWN_DELAY_S = 6.0


def sc_node_sigkill(tmp: Path, scale: float) -> dict:
    env = base_env(tmp)
    # a respawn delay long enough that new calls arrive while the node is really gone
    env['AKIDB_RESPAWN_DELAY_S'] = str(RESPAWN_DELAY_S)
    mport = free_port()
    port = free_port()
    node_cmd = [PY, '-m', 'akidb_ros.ros.node', '--ros-args', '--params-file',
                str(ROOT / 'config' / 'params.yaml'), '-p', f'metrics_port:={mport}']
    launch = Proc('respawn(node)',
                  [PY, '-P', str(ROOT / 'bench/chaos/respawn_launch.py'), '--', *node_cmd],
                  env, tmp / 'launch.log').start()
    bridge = Proc('bridge', [PY, '-m', 'akidb_ros.server', '--mode', 'sidecar', '--host',
                             '127.0.0.1', '--rest-port', str(port), '--grpc-port', '0',
                             '--timeout', '5'], env, tmp / 'bridge.log').start()
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(url, 90, bridge)
        node_pids = children(launch.pid)
        load = Load(url, threads=8, rps=5).start()
        time.sleep(4 * scale)
        victim = node_pids[0]
        fault_t = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        respawned_pid, respawn_s = None, None
        # watch until the service is back (20 OK calls in a row after the respawn), at most
        # 60 s: the bridge's circuit breaker may keep the model open for open_s (30 s)
        t_end = fault_t + RESPAWN_DELAY_S + 60 * scale
        while time.monotonic() < t_end:
            kids = [p for p in children(launch.pid) if p != victim]
            if kids and respawned_pid is None:
                respawned_pid, respawn_s = kids[0], round(time.monotonic() - fault_t, 3)
            with load._lock:
                tail = [r['final'] for r in load.records[-20:]]
                recent = [r for r in load.records if r['t0'] > fault_t + RESPAWN_DELAY_S]
            if respawned_pid and len(recent) >= 20 and set(tail) == {'OK'}:
                time.sleep(2 * scale)
                break
            time.sleep(0.2)
        recs = load.stop()
    finally:
        bridge.stop()
        launch.stop(signal.SIGINT)
    res = summarize('node_sigkill', 'SIGKILL of the embedding node behind the sidecar bridge; '
                    f'the supervisor respawns it after {RESPAWN_DELAY_S} s (launch respawn '
                    'semantics)', recs, fault_t,
                    extra={'node_pid_killed': victim, 'node_pid_respawned': respawned_pid,
                           'respawn_detected_s': respawn_s})
    # attempts started while the node was really gone (after 1 s for DDS to notice, before the
    # respawn): the promise is a fast UNAVAILABLE, not a wait for the deadline
    down_end = fault_t + (respawn_s or RESPAWN_DELAY_S)
    during = [a for r in recs for a in r['attempts'] if fault_t + 1.0 <= a['t'] < down_end]
    codes: Dict[str, int] = {}
    for a in during:
        codes[a['code']] = codes.get(a['code'], 0) + 1
    lat = [a['latency'] for a in during]
    res['while_node_down'] = {'attempts': len(during), 'codes': codes,
                              'latency_ms': {'p50': pct(lat, 0.5), 'p95': pct(lat, 0.95),
                                             'max': pct(lat, 1.0)}}
    check(res, 'launch respawned the node', respawned_pid is not None)
    # UNAVAILABLE or CIRCUIT_OPEN: both are HTTP 503 / gRPC UNAVAILABLE in the error table
    check(res, 'bridge answers UNAVAILABLE fast (p95 < 1 s) while the node is down',
          bool(during) and set(codes) <= {'UNAVAILABLE', 'CIRCUIT_OPEN'}
          and (pct(lat, 0.95) or 0) < 1000,
          f'{len(during)} attempts while down: {json.dumps(codes)}, p95 {pct(lat, 0.95)} ms')
    # budget: respawn delay + node start + the breaker's open_s (30 s) + half-open probes
    check(res, f'recovers after the respawn (< {RESPAWN_DELAY_S + 40:.0f} s after the kill)',
          res['recovery_s'] is not None and res['recovery_s'] < RESPAWN_DELAY_S + 40,
          f"{res['recovery_s']} s")
    return finish(res)


def sc_server_sigterm(tmp: Path, scale: float) -> dict:
    env = base_env(tmp)
    port = free_port()
    srv = Proc('server', server_cmd(port), env, tmp / 'server.log').start()
    url = f'http://127.0.0.1:{port}'
    srv2 = None
    try:
        wait_ready(url, 90, srv)
        load = Load(url, threads=6, rps=12).start()
        time.sleep(4 * scale)
        fault_t = time.monotonic()
        srv.send(signal.SIGTERM)
        rc = srv.wait(30)
        drain_s = round(time.monotonic() - fault_t, 3)
        # the supervisor (systemd Restart=always / compose restart / kubelet) starts it again
        srv2 = Proc('server(restarted)', server_cmd(port), env, tmp / 'server2.log').start()
        wait_ready(url, 90, srv2)
        time.sleep(4 * scale)
        recs = load.stop()
    finally:
        srv.stop()
        if srv2:
            srv2.stop()
    res = summarize('server_sigterm', 'SIGTERM to the in-process server mid-load (graceful '
                    'drain: health NOT_SERVING, in-flight calls answered), then a supervisor '
                    'restart', recs, fault_t, extra={'exit_code': rc, 'drain_s': drain_s})
    during = [r for r in recs if r['t0'] <= fault_t <= r['t1']]
    accepted_err = [a for r in recs for a in r['attempts']
                    if a['answered'] and a['code'] not in ('OK', 'UNAVAILABLE')]
    res['in_flight_at_signal'] = len(during)
    check(res, 'exit code 0 after SIGTERM', rc == 0, f'rc={rc}, drain {drain_s} s')
    dropped = [a for r in recs for a in r['attempts'] if a['code'] in ('RESET', 'CLIENT_TIMEOUT')]
    # a connection still in the kernel's listen backlog when the listener closes is reset by the
    # kernel; it was never accepted by the server. Only connections opened after the signal may
    # see that, and the client's retry gives them a final outcome.
    res['resets_after_signal'] = len(dropped)
    check(res, 'no call accepted before SIGTERM was dropped (RESET/timeout only on connections '
          'opened after the signal)',
          all(a['t'] >= fault_t and a['code'] == 'RESET' for a in dropped),
          f'{len(dropped)} reset attempt(s), all on connections opened after the signal'
          if dropped else 'none')
    check(res, 'no accepted call answered with an error other than UNAVAILABLE',
          not accepted_err, f'{len(accepted_err)} such answers')
    check(res, 'calls in flight at the signal all answered OK',
          all(r['final'] == 'OK' or r['attempts'][0]['code'] in ('OK', 'UNAVAILABLE', 'REFUSED')
              for r in during), f'{len(during)} in flight')
    return finish(res)


def _model_scenario(tmp: Path, scale: float, mode: str) -> dict:
    env = base_env(tmp)
    mdir = tmp / 'models'
    for d in MODELS.iterdir():
        if not d.is_dir():
            continue
        (mdir / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (mdir / d.name / f.name).symlink_to(f)
    victim_dir = next(d for d in mdir.iterdir() if d.name.lower() == SECOND_MODEL.lower())
    (victim_dir / 'model.onnx').unlink()
    if mode == 'corrupt':
        (victim_dir / 'model.onnx').write_bytes(os.urandom(4096) + b'not an onnx model')
    env['AKIDB_MODELS_DIR'] = str(mdir)
    port = free_port()
    srv = Proc('server', server_cmd(port), env, tmp / 'server.log').start()
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(url, 90, srv)
        load = Load(url, threads=4, rps=10, models=['', SECOND_MODEL], attempts=1).start()
        time.sleep(12 * scale)
        recs = load.stop()
        breaker = metric_sum(url, 'akidb_circuit_breaker_state', SECOND_MODEL)
        health = requests.get(url + '/health', timeout=3).json()
        alive = srv.alive()
    finally:
        srv.stop()
    res = summarize(f'model_{mode}', f"{SECOND_MODEL}'s model.onnx is "
                    f"{'4 KiB of garbage' if mode == 'corrupt' else 'missing'}; half the "
                    f'calls ask for it, half for the default model', recs, None,
                    extra={'health_after': health.get('status'),
                           'breaker_state_metric': breaker})
    per_model: Dict[str, Dict[str, int]] = {}
    for r in recs:
        per_model.setdefault(r['model'], {})
        per_model[r['model']][r['final']] = per_model[r['model']].get(r['final'], 0) + 1
    res['by_model'] = per_model
    res['latency_ms_by_model'] = {
        m: {'p50': pct(v, 0.5), 'p95': pct(v, 0.95)} for m, v in
        ((m, [r['attempts'][-1]['latency'] for r in recs if r['model'] == m]) for m in per_model)}
    default = per_model.get(DEFAULT_MODEL, {})
    bad = per_model.get(SECOND_MODEL, {})
    check(res, 'default model keeps serving (100 % OK)',
          default and set(default) == {'OK'}, json.dumps(default))
    clean = {'MODEL_LOAD_FAILED', 'MODEL_UNAVAILABLE', 'CIRCUIT_OPEN', 'MODEL_NOT_FOUND'}
    check(res, 'broken model fails cleanly (only MODEL_* / CIRCUIT_OPEN codes)',
          bad and set(bad) <= clean, json.dumps(bad))
    check(res, 'server stays up', alive)
    res['breaker_opened'] = bool(breaker and breaker >= 2) or 'CIRCUIT_OPEN' in bad
    return finish(res)


def sc_model_corrupt(tmp: Path, scale: float) -> dict:
    return _model_scenario(tmp, scale, 'corrupt')


def sc_model_missing(tmp: Path, scale: float) -> dict:
    return _model_scenario(tmp, scale, 'missing')


def sc_network_faults(tmp: Path, scale: float) -> dict:
    env = base_env(tmp)
    port = free_port()
    srv = Proc('server', server_cmd(port), env, tmp / 'server.log').start()
    proxy = FaultProxy(port)
    try:
        wait_ready(f'http://127.0.0.1:{port}', 90, srv)
        proxy.start()
        url = f'http://127.0.0.1:{proxy.port}'
        load = Load(url, threads=4, rps=10).start()
        time.sleep(3 * scale)
        t_lat = time.monotonic()
        proxy.set_faults(latency_s=0.100, jitter_s=0.050)
        time.sleep(8 * scale)
        t_reset = time.monotonic()
        proxy.set_faults(reset_ratio=0.2)
        time.sleep(8 * scale)
        clear_t = time.monotonic()
        proxy.clear()
        time.sleep(4 * scale)
        recs = load.stop()
        resets = proxy.resets
    finally:
        proxy.stop()
        srv.stop()
    res = summarize('network_faults', 'TCP fault proxy between clients and the REST bridge: '
                    '100 ± 50 ms per chunk for 8 s, then 20 % of connections reset for 8 s; '
                    'clients retry (3 attempts)', recs, t_reset, lost_codes=('CLIENT_TIMEOUT',),
                    extra={'connections_reset_by_proxy': resets})

    def lat(a, b):
        return pct([r['attempts'][-1]['latency'] for r in recs
                    if r['final'] == 'OK' and a <= r['t0'] < b], 0.95)
    res['latency_p95_ms_by_phase'] = {'baseline': lat(0, t_lat), 'latency': lat(t_lat, t_reset),
                                      'resets': lat(t_reset, clear_t),
                                      'cleared': lat(clear_t + 0.5, 1e18)}
    base = res['latency_p95_ms_by_phase']['baseline'] or 50
    after = [r for r in recs if r['t0'] >= clear_t and r['final'] == 'OK']
    back = [r['t1'] for r in after if r['attempts'][-1]['latency'] * 1000 < 2 * base + 10]
    res['recovery_s'] = round(min(back) - clear_t, 3) if back else None
    check(res, 'latency phase visible (p95 >= 100 ms)',
          (res['latency_p95_ms_by_phase']['latency'] or 0) >= 100)
    check(res, 'resets injected and absorbed by client retries',
          resets > 0 and res['failed_by_code'].get('RESET', 0) <= resets,
          f"{resets} resets, {res['retried_requests']} retried, final RESET "
          f"{res['failed_by_code'].get('RESET', 0)}")
    check(res, 'latency back to baseline after the faults clear',
          res['recovery_s'] is not None and res['recovery_s'] < 5, f"{res['recovery_s']} s")
    return finish(res)


def sc_disk_full(tmp: Path, scale: float) -> dict:
    env = base_env(tmp)
    port = free_port()
    full = '/tmp/akidb-chaos-full'
    env['AKIDB_TENSORRT_CACHE'] = f'{full}/trt'
    env['ROS_LOG_DIR'] = f'{full}/ros_log'
    # a private mount namespace: a 256 KiB tmpfs, filled to the last byte, visible to nobody else
    script = (f'mkdir -p {full} && mount -t tmpfs -o size=256k tmpfs {full} && '
              f'(dd if=/dev/zero of={full}/fill bs=4k 2>/dev/null || true) && '
              f'df -k {full} | tail -1 >&2 && exec "$@"')
    srv = Proc('server', ['unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'sh',
                          *server_cmd(port)], env, tmp / 'server.log').start()
    url = f'http://127.0.0.1:{port}'
    try:
        wait_ready(url, 90, srv)
        load = Load(url, threads=4, rps=10).start()
        time.sleep(3 * scale)
        fault_t = time.monotonic()
        admin = []
        for op in ('load', 'unload'):
            r = requests.post(f'{url}/admin/models/{op}', json={'model': SECOND_MODEL},
                              timeout=90)
            admin.append({'op': op, 'status': r.status_code})
        time.sleep(6 * scale)
        recs = load.stop()
        alive = srv.alive()
    finally:
        srv.stop()
    df_line = ''
    try:
        df_line = [ln for ln in (tmp / 'server.log').read_text().splitlines() if 'tmpfs' in ln][0]
    except (OSError, IndexError):
        pass
    res = summarize('disk_full', 'TensorRT engine cache and ROS log dir on a full 256 KiB '
                    'tmpfs; a second model is hot-loaded and unloaded mid-load', recs, fault_t,
                    extra={'admin_calls': admin, 'full_fs': df_line.strip()})
    check(res, 'full filesystem really full', df_line.split()[3:4] == ['0'] if df_line else False,
          df_line.strip())
    check(res, 'no request failed', res['ok'] == res['sent'], json.dumps(res['failed_by_code']))
    check(res, 'hot load/unload still work', all(a['status'] == 200 for a in admin),
          json.dumps(admin))
    check(res, 'server stays up', alive)
    return finish(res)


def sc_cpu_starvation(tmp: Path, scale: float) -> dict:
    env = base_env(tmp)
    port = free_port()
    srv = Proc('server', server_cmd(port), env, tmp / 'server.log').start()
    url = f'http://127.0.0.1:{port}'
    stress = None
    try:
        wait_ready(url, 90, srv)
        load = Load(url, threads=4, rps=10).start()
        time.sleep(4 * scale)
        fault_t = time.monotonic()
        secs = max(3, int(10 * scale))
        stress = Proc('stress-ng', ['stress-ng', '--cpu', str(os.cpu_count() or 2),
                                    '--timeout', f'{secs}s', '--quiet'], env,
                      tmp / 'stress.log').start()
        stress.wait(secs + 10)
        clear_t = time.monotonic()
        time.sleep(4 * scale)
        recs = load.stop()
    finally:
        if stress:
            stress.stop()
        srv.stop()
    res = summarize('cpu_starvation', f'stress-ng --cpu {os.cpu_count()} for '
                    f'{max(3, int(10 * scale))} s on every core while the load runs', recs,
                    fault_t)

    def lat(a, b):
        return pct([r['attempts'][-1]['latency'] for r in recs
                    if r['final'] == 'OK' and a <= r['t0'] < b], 0.95)
    res['latency_p95_ms_by_phase'] = {'baseline': lat(0, fault_t), 'stress': lat(fault_t, clear_t),
                                      'after': lat(clear_t + 0.5, 1e18)}
    base = res['latency_p95_ms_by_phase']['baseline'] or 50
    back = [r['t1'] for r in recs if r['t0'] >= clear_t and r['final'] == 'OK'
            and r['attempts'][-1]['latency'] * 1000 < 2 * base + 10]
    res['recovery_s'] = round(min(back) - clear_t, 3) if back else None
    check(res, 'no request failed', res['ok'] == res['sent'], json.dumps(res['failed_by_code']))
    check(res, 'latency back to baseline after the stress ends',
          res['recovery_s'] is not None and res['recovery_s'] < 5, f"{res['recovery_s']} s")
    return finish(res)


SCENARIOS = {
    'node_sigkill': sc_node_sigkill, 'server_sigterm': sc_server_sigterm,
    'model_corrupt': sc_model_corrupt, 'model_missing': sc_model_missing,
    'network_faults': sc_network_faults, 'disk_full': sc_disk_full,
    'cpu_starvation': sc_cpu_starvation,
}


def write_report(results: List[dict], out_dir: Path, wall_s: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {'generated': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'wall_s': wall_s,
           'host': {'cpus': os.cpu_count()}, 'scenarios': results}
    (out_dir / 'chaos.json').write_text(json.dumps(doc, indent=2) + '\n')
    lines = ['# Chaos suite results', '',
             f"Generated {doc['generated']} by `bench/chaos/run.py` on this {os.cpu_count()}-core "
             f'machine (loopback only), {wall_s:.0f} s wall. Load: closed-loop REST clients '
             '(4-6 threads, ~10 req/s each, single sentence, new connection per call, up to 3 '
             'attempts on REFUSED/RESET/UNAVAILABLE/OVERLOADED/TIMEOUT). `lost` = accepted '
             'but never answered (RESET after send or client deadline).', '',
             '| scenario | sent | answered | OK | failed by code (final) | lost | recovery s | '
             'p95 OK ms | passed |', '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        if 'error' in r:
            lines.append(f"| {r['scenario']} | - | - | - | error: {r['error']} | - | - | - | NO |")
            continue
        fb = ', '.join(f'{k} {v}' for k, v in sorted(r['failed_by_code'].items())) or '—'
        lines.append(f"| {r['scenario']} | {r['sent']} | {r['answered']} | {r['ok']} | {fb} | "
                     f"{r['lost']} | {r['recovery_s']} | {r['latency_ok_ms']['p95']} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    lines.append('')
    for r in results:
        lines.append(f"## {r['scenario']}")
        lines.append('')
        lines.append(r.get('description', ''))
        lines.append('')
        if 'error' in r:
            lines.append(f"Error: {r['error']}")
            lines.append('')
            continue
        for c in r['checks']:
            lines.append(f"- [{'x' if c['passed'] else ' '}] {c['check']}"
                         + (f" — {c['detail']}" if c['detail'] else ''))
        extra = {k: v for k, v in r.items() if k not in (
            'scenario', 'description', 'checks', 'passed', 'sent', 'answered', 'ok',
            'failed_by_code', 'lost')}
        lines.append('')
        lines.append('```json')
        lines.append(json.dumps(extra, indent=1))
        lines.append('```')
        lines.append('')
    (out_dir / 'chaos.md').write_text('\n'.join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--only', nargs='*', choices=sorted(SCENARIOS))
    ap.add_argument('--duration-scale', type=float, default=1.0,
                    help='multiplies every phase length (0.5 = a quicker, rougher run)')
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'results'))
    ap.add_argument('--dds-profile', default=DDS_PROFILE[0],
                    help='Fast DDS profile (default config/fastdds_loopback.xml)')
    args = ap.parse_args(argv)
    if args.only == []:
        ap.error('--only needs at least one scenario (it ran them all)')

    def stop_on(signum, _frame):
        # SIGTERM/SIGHUP (timeout, a CI cancel) end the run through SystemExit, so each
        # scenario's finally stops what it started (its servers were left running, listening)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop_on)
    signal.signal(signal.SIGHUP, stop_on)
    DDS_PROFILE[0] = args.dds_profile
    names = args.only or list(SCENARIOS)
    t0 = time.monotonic()
    results = []
    for name in names:
        tmp = Path(tempfile.mkdtemp(prefix=f'akidb-chaos-{name}-'))
        print(f'== {name}', flush=True)
        try:
            res = SCENARIOS[name](tmp, args.duration_scale)
        except Exception as exc:  # noqa: BLE001 - a scenario that cannot run is a failure
            res = {'scenario': name, 'error': f'{type(exc).__name__}: {exc}', 'passed': False,
                   'logs': str(tmp)}
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        results.append(res)
        print(json.dumps({k: res.get(k) for k in ('sent', 'ok', 'failed_by_code', 'lost',
                                                  'recovery_s', 'passed', 'error')}), flush=True)
        for c in res.get('checks', []):
            if not c['passed']:
                print(f"   FAILED: {c['check']} {c['detail']}", flush=True)
    wall = round(time.monotonic() - t0, 1)
    write_report(results, Path(args.out), wall)
    passed = sum(1 for r in results if r.get('passed'))
    print(f'{passed} passed, {len(results) - passed} failed ({wall} s)')
    return 0 if passed == len(results) else 1


if __name__ == '__main__':
    sys.exit(main())
