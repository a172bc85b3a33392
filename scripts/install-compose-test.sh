#!/usr/bin/env bash
# What the compose test needs besides the virtualenv, from Debian's packages: podman (and its
# Docker-compatible API), runc (crun refuses this kind of machine's cgroup setup), catatonit
# (compose's `init: true`), netavark and aardvark-dns (service names resolve on an internal
# network), iptables, Debian's docker-compose 1.29, and mmdebstrap (the base images, built
# from the Debian mirror). Needs root, as the test does.
set -euo pipefail
need=()
for cmd in podman runc docker-compose mmdebstrap iptables; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
[ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)
[ -x /usr/lib/podman/netavark ] || need+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  # the other tests can still run; the compose test fails, naming what is missing
  echo "install-compose-test: ${need[*]} missing and installing them needs root; skipping" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  podman runc catatonit netavark aardvark-dns iptables docker-compose mmdebstrap >/dev/null
echo "install-compose-test: done ($(podman --version), $(docker-compose version --short))"
