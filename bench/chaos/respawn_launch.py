"""Run one command under ROS 2 launch with ``respawn=True`` (what a robot's launch file does).

    python bench/chaos/respawn_launch.py -- python -m akidb_ros.ros.node --ros-args ...

SIGINT/SIGTERM to this process shuts launch down (it signals the child and waits).
"""
import sys

from launch import LaunchDescription, LaunchService
from launch.actions import ExecuteProcess


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == '--':
        argv = argv[1:]
    ld = LaunchDescription([
        ExecuteProcess(cmd=argv, name='embedding_node', output='screen', respawn=True,
                       respawn_delay=0.5, sigterm_timeout='15', sigkill_timeout='5'),
    ])
    ls = LaunchService(argv=[])
    ls.include_launch_description(ld)
    return ls.run()


if __name__ == '__main__':
    sys.exit(main())
