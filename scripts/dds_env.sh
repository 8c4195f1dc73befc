# Source this before any ROS process starts: DDS stays on loopback (../shared/notes/ros2-on-pypi.md §4).
# Usage: . scripts/dds_env.sh   (ROS_DOMAIN_ID is kept if already set)
_AKIDB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)
unset ROS_LOCALHOST_ONLY
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$_AKIDB_ROOT/config/fastdds_loopback.xml}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_STATIC_PEERS=""
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:-$_AKIDB_ROOT/.venv}"
