"""Run one command with launch-style respawn (what a robot's launch file with ``respawn=True``,
or systemd ``Restart=always``, does).

    python bench/chaos/respawn_launch.py -- python -m akidb_ros.ros.node --ros-args ...

With ROS 2 ``launch`` installed it uses ``launch.actions.ExecuteProcess(respawn=True)``. The PyPI
ROS 2 wheel set has no ``launch`` package, so otherwise a small supervisor with the same
semantics runs the child: respawn 0.5 s after any exit; SIGINT/SIGTERM to this process stop the
child (SIGINT, then SIGTERM after 15 s, SIGKILL after 5 s more) without respawning.
"""
import os
import signal
import subprocess
import sys
import threading

RESPAWN_DELAY_S = float(os.environ.get('AKIDB_RESPAWN_DELAY_S', '0.5'))


def _with_launch(argv):
    from launch import LaunchDescription, LaunchService
    from launch.actions import ExecuteProcess
    ld = LaunchDescription([
        ExecuteProcess(cmd=argv, name='embedding_node', output='screen', respawn=True,
                       respawn_delay=RESPAWN_DELAY_S, sigterm_timeout='15', sigkill_timeout='5'),
    ])
    ls = LaunchService(argv=[])
    ls.include_launch_description(ld)
    return ls.run()


def _supervise(argv) -> int:
    stop = threading.Event()
    child = {'p': None}

    def on_signal(signum, _frame):
        stop.set()
        p = child['p']
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    starts = 0
    while not stop.is_set():
        child['p'] = subprocess.Popen(argv)
        starts += 1
        print(f'[respawn] started pid {child["p"].pid} (start #{starts})', flush=True)
        while child['p'].poll() is None:
            if stop.wait(0.05):
                break
        if stop.is_set():
            break
        print(f'[respawn] pid {child["p"].pid} exited with {child["p"].returncode}; '
              f'respawning in {RESPAWN_DELAY_S} s', flush=True)
        stop.wait(RESPAWN_DELAY_S)
    p = child['p']
    if p is not None and p.poll() is None:
        for sig, wait_s in ((None, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if sig is not None:
                p.send_signal(sig)
            try:
                p.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    return 0


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == '--':
        argv = argv[1:]
    try:
        import launch
        has_launch = hasattr(launch, 'LaunchService')   # not the repo's launch/ folder
    except ImportError:
        has_launch = False
    if has_launch and not os.environ.get('AKIDB_NO_LAUNCH'):
        return _with_launch(argv)
    return _supervise(argv)


if __name__ == '__main__':
    sys.exit(main())
