#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh machine: venvs, ROS 2 wheels, interfaces, models.
#   .venv        runtime + tests (no torch)
#   .venv-build  build-only: torch (CPU) + sentence-transformers to export and verify the models
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
BVENV="$ROOT/.venv-build"
PIP_FLAGS=(-q --disable-pip-version-check)
step() { printf '\n== %s\n' "$*"; }

step "system packages (cmake, g++, Python headers)"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v xmllint >/dev/null || missing+=(libxml2-utils)
command -v openssl >/dev/null || missing+=(openssl)   # scripts/make_dev_certs.sh
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$PYINC/Python.h" ] || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing system packages: ${missing[*]} (run as root or install them)" >&2; exit 1
  fi
fi

step "runtime venv ($VENV)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# `python -m pip`: a venv whose bin/pip was deleted is still repaired
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r requirements.txt -r requirements-ros.txt -r requirements-dev.txt
"$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -e .
# pip trusts a package's metadata: one whose files were deleted stays "installed". Import what
# the services need; if that fails, reinstall everything once.
IMPORTS='import rclpy, tokenizers, onnxruntime, grpc, flask, yaml, numpy, prometheus_client, akidb_ros.engine'
if ! "$VENV/bin/python" -c "$IMPORTS" 2>/dev/null; then
  echo "the runtime venv is damaged (an import failed): reinstalling its packages"
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --force-reinstall -r requirements.txt -r requirements-ros.txt -r requirements-dev.txt
  "$VENV/bin/python" -c "$IMPORTS"
fi

if [ -x scripts/build_interfaces.sh ]; then
  step "ROS 2 interfaces (rosidl)"
  scripts/build_interfaces.sh "$VENV"
fi

step "deployment-check tools (promtool, hadolint, helm SDK, kubernetes-validate, checkov)"
# The image-build tools (podman, buildah, debootstrap) are only for `make image-test`.
bash scripts/install_deploy_tools.sh --no-image-tools

step "build venv for model export ($BVENV)"
[ -x "$BVENV/bin/python" ] || "$PY" -m venv "$BVENV"
# torch==2.13.0 resolves to the CPU wheel on disk; pinning it first keeps pip from pulling a CUDA build.
"$BVENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
"$BVENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r requirements-build.txt

step "models (export to ONNX + verify against sentence-transformers)"
"$BVENV/bin/python" scripts/export_models.py --out "$ROOT/models"

step "done"
echo "setup complete: make run | make test"
