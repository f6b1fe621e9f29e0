#!/usr/bin/env bash
# make image: builds docker/Dockerfile into localhost/redis_pg_sync:<version>-pg15 with podman.
# No container registry is reachable here, so the official base images (postgres:15-bookworm,
# rust:1.95-bookworm) are made locally under their official names by the shared
# prepare-bases.sh (RPS_CONTAINER_DIR: by default ../shared/container, else /work/shared/container)
# and the build never pulls.
# Prints the build time and the image size. Sourced by image-test.sh for the same set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${RPS_CONTAINER_DIR:-}" ]; then
  for d in "$(cd .. && pwd)/shared/container" /work/shared/container; do
    [ -x "$d/prepare-bases.sh" ] && { RPS_CONTAINER_DIR=$d; break; }
  done
  RPS_CONTAINER_DIR=${RPS_CONTAINER_DIR:-$(cd .. && pwd)/shared/container}
fi
PG_MAJOR=${PG_MAJOR:-15}
VERSION=$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)
IMAGE=${IMAGE:-localhost/redis_pg_sync:${VERSION}-pg${PG_MAJOR}}

isay() { printf '\033[1;34m[image]\033[0m %s\n' "$*"; }

# Is the container tooling here? 0: yes; 1: no (with the reason on stderr).
container_tooling() {
  if [ ! -x "$RPS_CONTAINER_DIR/prepare-bases.sh" ]; then
    echo "no $RPS_CONTAINER_DIR/prepare-bases.sh (set RPS_CONTAINER_DIR)" >&2
    return 1
  fi
  if ! command -v podman >/dev/null && ! command -v apt-get >/dev/null; then
    echo "no podman, and no apt-get to install it" >&2
    return 1
  fi
}

# The base images under their official names, and CONTAINERS_CONF for podman.
prepare_bases() {
  # debuerreotype needs debootstrap, which it only recommends.
  if ! command -v debootstrap >/dev/null; then
    isay "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  local env
  env=$("$RPS_CONTAINER_DIR/prepare-bases.sh" --rust)
  eval "$env"
  export CONTAINERS_CONF
}

# A free TCP port on loopback, below the range Redis Cluster bus ports would need.
free_port() {
  python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if 20000 <= p < 55535: print(p); break'
}

build_image() {
  local t0 t1
  t0=$(date +%s)
  prepare_bases
  t1=$(date +%s)
  isay "base images ready in $((t1 - t0)) s"
  podman build --pull=never --build-arg "PG_MAJOR=$PG_MAJOR" -t "$IMAGE" -f docker/Dockerfile .
  BUILD_SECS=$(( $(date +%s) - t1 ))
  IMAGE_MB=$(( $(podman image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))
  isay "built $IMAGE in ${BUILD_SECS} s; image size ${IMAGE_MB} MB"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  container_tooling || exit 1
  build_image
fi
