"""Launch the akidb_ros embedding node.

    ros2 launch akidb_ros embedding_node.launch.py
    ros2 launch akidb_ros embedding_node.launch.py namespace:=robot1 log_level:=debug \
        params_file:=/path/to/params.yaml

Keep DDS on loopback unless the robot needs the network: source scripts/dds_env.sh (or set
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and FASTDDS_DEFAULT_PROFILES_FILE) before launching.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    """Node + launch arguments: params_file, namespace, log_level, respawn, configure_retry_s."""
    default_params = os.path.join(get_package_share_directory('akidb_ros'), 'config',
                                  'params.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='Node parameters (YAML, /**: ros__parameters)'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='Namespace of the node and its services'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='debug | info | warn | error | fatal'),
        DeclareLaunchArgument('respawn', default_value='true',
                              description='Restart the node 1 s after it dies (crash, SIGKILL)'),
        DeclareLaunchArgument('configure_retry_s', default_value='5.0',
                              description='A failed configure (a config error): stay up '
                              'unconfigured and retry after this many s, doubling up to 60 '
                              '(0 = exit 1, and respawn repeats the error every second)'),
        LifecycleNode(
            package='akidb_ros',
            executable='embedding_node',
            name='embedding_node',
            namespace=LaunchConfiguration('namespace'),
            parameters=[LaunchConfiguration('params_file'),
                        # a float, whatever is typed: launch reads '0' or '5' as an int,
                        # which the node's double parameter refuses (exit 2, respawn loop)
                        {'configure_retry_s': ParameterValue(
                            LaunchConfiguration('configure_retry_s'), value_type=float)}],
            ros_arguments=['--log-level', LaunchConfiguration('log_level')],
            output='screen',
            emulate_tty=True,
            respawn=PythonExpression(["'", LaunchConfiguration('respawn'), "' == 'true'"]),
            respawn_delay=1.0,
            # SIGINT first (the node answers calls in flight), SIGTERM/SIGKILL after a grace period
            sigterm_timeout='15',
            sigkill_timeout='5',
        ),
    ])
