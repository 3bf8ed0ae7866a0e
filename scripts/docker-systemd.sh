#!/usr/bin/env bash
# Makes the image the systemd and .deb container tests run (tests/it/container_systemd.rs,
# tests/it/container_deb.rs), when it is missing: the Debian 12 base (scripts/docker-base.sh)
# with systemd as PID 1 and Debian's nginx, curl and procps. Prints the image name.
#   UPSTREAMD_SYSTEMD_IMAGE  the image name (default upstreamd-systemd:bookworm)
set -euo pipefail
image=${UPSTREAMD_SYSTEMD_IMAGE:-upstreamd-systemd:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
base=$(bash "$(dirname "$0")/docker-base.sh")
name=upstreamd-systemd-build-$$
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
# Debian's nginx package starts nginx in its postinst; there is no init here yet, so
# policy-rc.d keeps it from trying. It is removed again before the commit.
docker run --name "$name" "$base" sh -euc '
  printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    systemd systemd-sysv dbus nginx curl procps ca-certificates >/dev/null
  rm -f /usr/sbin/policy-rc.d
  systemctl enable nginx
  # Not needed in a test container, and slow or failing without hardware.
  systemctl mask systemd-logind.service getty.target console-getty.service \
    systemd-udevd.service systemd-udev-trigger.service systemd-remount-fs.service \
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount >/dev/null 2>&1
  apt-get clean; rm -rf /var/lib/apt/lists/*
' >&2
docker commit -c 'CMD ["/lib/systemd/systemd"]' "$name" "$image" >&2
echo "$image"
