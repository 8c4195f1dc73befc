"""Concurrent Embed callers in one process (tests and ``bench/ros_bench.py``).

``n`` service clients share one node and one executor spinning in a background thread; each
client keeps exactly one call in flight (closed loop) and issues its next call from the done
callback of the previous one, so ``n`` calls reach the node together. A call without a
``request_id`` gets a fresh one, as the CLI's do: the node then runs the copies a first
contact re-sends once, and its log line of a failed call names it.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

import rclpy
from rclpy.context import Context
from rclpy.qos import QoSProfile

from akidb_ros.ros.cli import client_executor
from akidb_ros.ros.first_contact import FirstContact
from akidb_ros.srv import Embed


@dataclass
class CallRecord:
    """One Embed call: who sent it, when, and what came back (None: no answer)."""

    client: int
    seq: int
    request: object
    t_send: float
    t_done: Optional[float] = None
    response: Optional[object] = None

    @property
    def latency_s(self) -> float:
        return (self.t_done - self.t_send) if self.t_done is not None else float('nan')


class ConcurrentCaller:
    """``n_clients`` closed-loop Embed clients on one node (own rclpy context)."""

    def __init__(self, n_clients: int = 16, namespace: str = '', qos_depth: int = 100,
                 node_name: str = 'akidb_loadgen', executor: str = 'single'):
        self.context = Context()
        rclpy.init(context=self.context, args=[])
        self.node = rclpy.create_node(node_name, context=self.context)
        base = namespace.rstrip('/')
        name = f'{base}/embed' if base else 'embed'
        qos = QoSProfile(depth=qos_depth)
        # FirstContact: a first request sent before the node matched its client is sent again
        self.clients = [FirstContact(self.node.create_client(Embed, name, qos_profile=qos))
                        for _ in range(n_clients)]
        self.executor = client_executor(executor, self.context)
        self.executor.add_node(self.node)
        self._spinning = True
        self._thread = threading.Thread(target=self._spin, name='akidb-loadgen', daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self.records: List[CallRecord] = []

    def _spin(self) -> None:
        while self._spinning and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until every client has discovered the service."""
        deadline = time.monotonic() + timeout_s
        return all(c.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic()))
                   for c in self.clients)

    def run(self, make_request: Callable[[int, int], object], calls_per_client: int = 0,
            duration_s: float = 0.0, stop: Optional[threading.Event] = None,
            timeout_s: float = 60.0) -> List[CallRecord]:
        """Drive all clients, then wait (up to ``timeout_s``) for the calls in flight.

        Each client stops after ``calls_per_client`` calls, after ``duration_s``, once
        ``stop`` is set, or when ``make_request`` returns None. Returns the records of this
        run (unanswered calls: ``response`` None).
        """
        stop = stop or threading.Event()
        t_end = time.perf_counter() + duration_s if duration_s else None
        records: List[CallRecord] = []
        all_done = threading.Event()
        active = [len(self.clients)]
        tag = f'loadgen-{uuid.uuid4().hex[:12]}-'   # unique per run: seq restarts each run

        def finish() -> None:
            with self._lock:
                active[0] -= 1
                if active[0] == 0:
                    all_done.set()

        def issue(i: int, seq: int) -> None:
            if stop.is_set() or (calls_per_client and seq >= calls_per_client) or \
                    (t_end is not None and time.perf_counter() >= t_end):
                finish()
                return
            req = make_request(i, seq)
            if req is None:             # the caller's work ran out
                finish()
                return
            if not req.request_id or req.request_id.startswith(tag):
                # ours is replaced each call (rclpy serialises the request when it sends it),
                # so a request object the caller hands out twice never carries a stale id
                req.request_id = f'{tag}{i}-{seq}'
            rec = CallRecord(i, seq, req, time.perf_counter())
            with self._lock:
                records.append(rec)
            fut = self.clients[i].call_async(req)

            def done(f, rec=rec) -> None:
                rec.t_done = time.perf_counter()
                rec.response = f.result()
                issue(i, seq + 1)
            fut.add_done_callback(done)

        for i in range(len(self.clients)):
            issue(i, 0)
        all_done.wait(timeout=timeout_s + (duration_s or 0.0))
        self.records.extend(records)
        return records

    def close(self) -> None:
        self._spinning = False
        self._thread.join(timeout=5.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> 'ConcurrentCaller':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
