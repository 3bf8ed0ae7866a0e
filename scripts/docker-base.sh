#!/usr/bin/env bash
# Makes the Debian 12 base image the container tests and CI's fresh-machine stage start from,
# when it is missing: `debootstrap --variant=minbase bookworm` (Debian's own mirror), then
# `docker import`. No registry image is needed. Prints the image name.
#   UPSTREAMD_BASE_IMAGE  the image name (default upstreamd-base:bookworm)
set -euo pipefail
image=${UPSTREAMD_BASE_IMAGE:-upstreamd-base:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null || {
  echo "docker-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 1
}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
debootstrap --variant=minbase bookworm "$dir" >&2
tar -C "$dir" -c . | docker import - "$image" >&2
echo "$image"
