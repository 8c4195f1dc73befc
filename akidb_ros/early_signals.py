"""Quiet exit on SIGINT/SIGTERM while an executable is still starting (stdlib only).

``embedding_node`` and ``akidb-server`` import for about half a second (rclpy, ONNX Runtime,
gRPC) before they install their graceful handlers; a signal meanwhile ended them with a
``KeyboardInterrupt`` traceback (exit 130). Nothing has started yet then, so the process ends
at once with 0. Import this module before the heavy imports.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def started_as(module_name: str, executable: str) -> bool:
    """Whether the calling module runs as the program, not imported by a test or library.

    ``python -m`` (``module_name`` is ``'__main__'``) or its console script ``executable``.
    """
    return module_name == '__main__' or os.path.basename(sys.argv[0]) == executable


def exit_quietly_while_starting() -> None:
    """Until the caller installs its own handlers, SIGINT/SIGTERM end the process with 0."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: os._exit(0))
