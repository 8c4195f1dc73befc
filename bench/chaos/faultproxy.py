"""A TCP fault proxy on 127.0.0.1 (the network path between a client and a bridge).

Faults are switched at run time from another thread: ``latency_s`` ± ``jitter_s`` added to every
chunk forwarded in either direction, and ``reset_ratio`` of new connections reset (RST, via
SO_LINGER 0) after the request has been read — the client sees ECONNRESET, as on a flaky link.
Only loopback: it listens on 127.0.0.1 and connects to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from typing import Optional


class FaultProxy:
    def __init__(self, upstream_port: int, listen_port: int = 0, seed: int = 7):
        self.upstream = ('127.0.0.1', upstream_port)
        self.listen_port = listen_port
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self.reset_ratio = 0.0
        self.connections = 0
        self.resets = 0
        self._rng = random.Random(seed)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()

    # -- control -------------------------------------------------------------------------------
    def set_faults(self, latency_s: float = 0.0, jitter_s: float = 0.0,
                   reset_ratio: float = 0.0) -> None:
        self.latency_s, self.jitter_s, self.reset_ratio = latency_s, jitter_s, reset_ratio

    def clear(self) -> None:
        self.set_faults()

    @property
    def port(self) -> int:
        return self.listen_port

    def start(self) -> 'FaultProxy':
        self._thread = threading.Thread(target=self._run, name='fault-proxy', daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError('fault proxy did not start')
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(5)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    # -- proxy ---------------------------------------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, '127.0.0.1', self.listen_port))
        self.listen_port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    def _delay(self) -> float:
        if self.latency_s <= 0 and self.jitter_s <= 0:
            return 0.0
        return max(0.0, self.latency_s + self._rng.uniform(-self.jitter_s, self.jitter_s))

    async def _pipe(self, reader, writer) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                d = self._delay()
                if d:
                    await asyncio.sleep(d)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _handle(self, c_reader, c_writer) -> None:
        self.connections += 1
        if self.reset_ratio > 0 and self._rng.random() < self.reset_ratio:
            # read what the client sent, then reset the connection (no response at all)
            try:
                await asyncio.wait_for(c_reader.read(65536), timeout=1.0)
            except Exception:
                pass
            sock = c_writer.get_extra_info('socket')
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            self.resets += 1
            c_writer.transport.abort()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.transport.abort()
            return
        await asyncio.gather(self._pipe(c_reader, u_writer), self._pipe(u_reader, c_writer))
