#!/usr/bin/env bash
# Builds the akidb_ros ROS 2 interfaces (msg/, srv/) with rosidl and installs them into a venv.
#   usage: scripts/build_interfaces.sh [VENV]        (default: ./.venv)
# Idempotent: re-running re-applies the CMake fix-up and rebuilds only what changed.
# The Python sources are NOT installed: the venv's editable install runs them from the source
# tree; only akidb_ros/{msg,srv}, the type-support libraries and the ament index entries land in
# the venv (see docs/ros.md). For a full ROS install use colcon (docs/ros.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(cd "${1:-$ROOT/.venv}" && pwd)
PY="$VENV/bin/python"
BUILD="${AKIDB_INTERFACES_BUILD_DIR:-$ROOT/build/interfaces}"
[ -x "$PY" ] || { echo "no python in $VENV" >&2; exit 1; }
command -v cmake >/dev/null || { echo "cmake is missing (apt-get install cmake g++ make)" >&2; exit 1; }

# 1. CMake fix-up (../shared/notes/ros2-on-pypi.md §3): the wheels' export files hard-code the
#    build machine's Python and numpy include dirs. Re-run after any pip install of ros-* wheels.
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$PY" -c 'import numpy; print(numpy.get_include())')
[ -f "$PYINC/Python.h" ] || { echo "Python headers missing in $PYINC (apt-get install python3-dev)" >&2; exit 1; }
{ grep -rl '/opt/python/cp311-cp311' "$VENV"/share/*/cmake/ 2>/dev/null || true; } | xargs -r sed -i \
  -e "s|/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include|$NPINC|g" \
  -e "s|/opt/python/cp311-cp311/include/python3.11|$PYINC|g"

# 2. Configure, build, install (into the venv prefix).
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
mkdir -p "$BUILD"
t0=$(date +%s)
cmake -S "$ROOT" -B "$BUILD" -Wno-dev \
  -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DPython3_EXECUTABLE="$PY" -DAKIDB_INSTALL_PYTHON_SOURCES=OFF -DBUILD_TESTING=OFF >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" >"$BUILD/build.log" 2>&1 || { tail -50 "$BUILD/build.log" >&2; exit 1; }
cmake --install "$BUILD" >"$BUILD/install.log" 2>&1 || { cat "$BUILD/install.log" >&2; exit 1; }

# 3. Check: the generated types import through the venv's interpreter.
(cd / && "$PY" -c 'from akidb_ros.srv import Embed, ListModels, LoadModel, UnloadModel; from akidb_ros.msg import Embedding, ModelInfo') \
  || { echo "akidb_ros interfaces were installed but do not import" >&2; exit 1; }
echo "akidb_ros interfaces built and installed into $VENV in $(( $(date +%s) - t0 )) s"
