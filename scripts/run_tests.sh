#!/usr/bin/env bash
# Runs the whole suite with a fresh ROS_DOMAIN_ID and loopback-only DDS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 90) + 10 ))}
. scripts/dds_env.sh
export ROS_LOG_DIR=${ROS_LOG_DIR:-$(mktemp -d)}
# shared-memory ports of DDS participants killed in earlier runs (akidb_ros.dds_env)
.venv/bin/python -c 'from akidb_ros.dds_env import clean_zombie_shm as c; c()' || true
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${@:-test}"
