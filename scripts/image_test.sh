#!/usr/bin/env bash
# Image test (issue 7 §1): build the CPU image with podman from a Debian 12 base made locally by
# debootstrap, start it with the exported models as a read-only volume, call /health and
# /api/v1/embed on 127.0.0.1, check the size (< 2 GB, the PRD's limit) and that it runs as non-root.
# Writes build/image-test/result.json. Not in the default test run (minutes of CPU).
#
#   bash scripts/image_test.sh            # base (cached) + build + run + checks
#   bash scripts/image_test.sh --base-only
#   bash scripts/image_test.sh --no-build  # run + checks on the image built last time
#
# Needs: podman, debootstrap (scripts/install_deploy_tools.sh), root, and the models under models/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT="$ROOT/build/image-test"
BASE_TAG=localhost/akidb-base:bookworm
IMAGE=localhost/akidb-ros:cpu-test
NAME=akidb-image-test-$$
PORT=${AKIDB_IMAGE_TEST_PORT:-18080}
MAX_BYTES=$((2 * 1000 * 1000 * 1000))
mkdir -p "$OUT"
for t in podman debootstrap; do
  command -v "$t" >/dev/null || { echo "$t missing: bash scripts/install_deploy_tools.sh" >&2; exit 2; }
done
# podman storage: vfs works inside containers/sandboxes where overlay-on-overlay does not
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
PODMAN=(podman --storage-driver "$STORAGE_DRIVER" --cgroup-manager cgroupfs --events-backend file)
# runc copes with hybrid cgroup hierarchies (crun refuses them); rlimits at or below the host's
# hard limits (podman's defaults are above them in sandboxes)
RUN_OPTS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
command -v runc >/dev/null && RUN_OPTS+=(--runtime runc)
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

cleanup() {
  "${PODMAN[@]}" rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. base image: debootstrap (minbase) of Debian 12, imported once and cached
t0=$(now)
if ! "${PODMAN[@]}" image exists "$BASE_TAG"; then
  ROOTFS="$OUT/rootfs"
  rm -rf "$ROOTFS"
  echo "== debootstrap bookworm (minbase)"
  debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >"$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
  # the same apt sources as a stock debian:bookworm image (with security updates)
  cat > "$ROOTFS/etc/apt/sources.list" <<'SRC'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
  rm -rf "$ROOTFS"
fi
base_s=$(elapsed "$t0")
echo "base image $BASE_TAG ready (${base_s} s)"
[ "${1:-}" = "--base-only" ] && exit 0

# 2. build the CPU image (multi-stage) from that base, in docker format (OCI images drop
#    HEALTHCHECK). This host reaches PyPI through a proxy
#    whose CA is in the host bundle: hand it to pip as a build secret (not stored in any layer).
SECRET=()
CA=${AKIDB_PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$CA" ] && SECRET=(--secret "id=pip_ca,src=$CA")
echo "== build $IMAGE"
t0=$(now)
if [ "${1:-}" = "--no-build" ] && [ -f "$OUT/build_s" ]; then
  build_s=$(cat "$OUT/build_s")
else
"${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true     # the previous test image, not kept
"${PODMAN[@]}" build --format docker --network host --isolation chroot --layers=false \
  --build-arg BASE_IMAGE="$BASE_TAG" "${SECRET[@]}" -f docker/Dockerfile -t "$IMAGE" . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log" >&2; exit 1; }
build_s=$(elapsed "$t0")
echo "$build_s" > "$OUT/build_s"
fi
size=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')
user=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Config.User}}')
echo "built in ${build_s} s, size $size bytes, user $user"

# 3. run it: models read-only, root filesystem read-only, only 127.0.0.1 published
echo "== run"
t0=$(now)
rm -rf "$OUT/log" && mkdir -p "$OUT/log" && chown 1000:1000 "$OUT/log"   # the writable log volume
"${PODMAN[@]}" run -d --name "$NAME" --network host --read-only --tmpfs /tmp \
  "${RUN_OPTS[@]}" -v "$ROOT/models:/opt/akidb/models:ro" --tmpfs /var/cache/akidb \
  -v "$OUT/log:/var/log/akidb" \
  -e AKIDB_HOST=127.0.0.1 -e AKIDB_REST_PORT="$PORT" -e AKIDB_GRPC_PORT=0 \
  -e ROS_DOMAIN_ID=$(( (RANDOM % 90) + 110 )) \
  "$IMAGE" python3 -m akidb_ros.server --mode inprocess --no-ros >/dev/null
ready=""
for _ in $(seq 1 240); do
  if curl -fsS "http://127.0.0.1:$PORT/health/ready" >/dev/null 2>&1; then ready=1; break; fi
  if [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$NAME")" != true ]; then break; fi
  sleep 0.5
done
start_s=$(elapsed "$t0")
if [ -z "$ready" ]; then "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -40 >&2; echo "container never became ready" >&2; exit 1; fi
health=$(curl -fsS "http://127.0.0.1:$PORT/health")
embed=$(curl -fsS -X POST "http://127.0.0.1:$PORT/api/v1/embed" -H 'Content-Type: application/json' \
  -d '{"inputs": ["The robot reached the dock.", "Battery low"]}')
uid=$("${PODMAN[@]}" exec "$NAME" id -u)
ro=$("${PODMAN[@]}" exec "$NAME" sh -c 'touch /opt/akidb/app/x 2>/dev/null && echo writable || echo read-only')
# the ROS 2 side of the image: rclpy, the Fast DDS RMW and the generated akidb_ros interfaces load
ros=$("${PODMAN[@]}" exec "$NAME" python3 -c 'import rclpy, rclpy.executors; from akidb_ros.srv import Embed; from akidb_ros.ros import node; print("ros-ok")' 2>&1 | tail -1)
hc=$("${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1 && echo healthy || echo unhealthy)
"${PODMAN[@]}" stop -t 20 "$NAME" >/dev/null
exit_code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$NAME")

python3 - "$OUT/result.json" "$size" "$MAX_BYTES" "$build_s" "$base_s" "$start_s" "$uid" "$hc" "$exit_code" "$health" "$embed" "$ro" "$ros" <<'PY'
import json, sys
out, size, max_b, build_s, base_s, start_s, uid, hc, exit_code, health, embed, ro, ros = sys.argv[1:]
h = json.loads(health); e = json.loads(embed)
dims = [len(v) for v in e['embeddings']]
res = {'image_bytes': int(size), 'image_gb': round(int(size) / 1e9, 3), 'limit_bytes': int(max_b),
       'base_s': float(base_s), 'build_s': float(build_s), 'start_to_ready_s': float(start_s),
       'uid': int(uid), 'healthcheck': hc, 'exit_code_after_sigterm': int(exit_code),
       'root_fs': ro, 'ros_imports': ros, 'health': h, 'embed_dims': dims, 'embed_model': e['model']}
json.dump(res, open(out, 'w'), indent=2)
print(json.dumps(res, indent=2))
errors = []
if int(size) >= int(max_b): errors.append(f'image is {size} bytes, over {max_b}')
if int(uid) != 1000: errors.append(f'container runs as uid {uid}, not 1000 (akidb, the PRD user)')
if ro != 'read-only': errors.append('root filesystem is writable')
if ros != 'ros-ok': errors.append(f'ROS 2 side does not import: {ros}')
if h.get('status') != 'healthy': errors.append(f'/health: {h}')
if dims != [384, 384]: errors.append(f'embed dims {dims}')
if hc != 'healthy': errors.append('HEALTHCHECK failed')
if int(exit_code) != 0: errors.append(f'exit code {exit_code} after SIGTERM')
if errors:
    print('IMAGE TEST FAILED: ' + '; '.join(errors), file=sys.stderr); sys.exit(1)
print('IMAGE TEST PASSED')
PY
