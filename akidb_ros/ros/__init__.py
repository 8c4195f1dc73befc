"""ROS 2 door of akidb_ros: the embedding node, msg<->engine conversions and the CLI.

Importing this package needs rclpy and the generated interfaces (``akidb_ros.msg``/``srv``,
built by ``scripts/build_interfaces.sh`` or colcon); the engine itself never imports it.
"""
