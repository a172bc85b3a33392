#!/usr/bin/env bash
# Install what snpemu needs, from scratch, idempotently:
#   - a virtualenv at .venv with snpemu and its pinned dependencies (dev tools included);
#   - Debian packages, when missing and apt-get can be used (root, or sudo without a password):
#     `prometheus` (Prometheus and promtool) and `ovmf` (the default guest firmware,
#     /usr/share/OVMF/OVMF_CODE.fd). Without them the host still runs; the launcher starts no
#     Prometheus, and the tests that need them say so and fail;
#   - Debian's kubectl (`kubernetes-client`), unpacked into $VENV/opt/kubernetes-client rather
#     than installed, so it never replaces a kubectl the machine has: the Kubernetes manifest
#     tests render deploy/k8s with its `kubectl kustomize`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -f /usr/share/OVMF/OVMF_CODE.fd ] || missing+=(ovmf)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install: ${missing[*]} missing and there is no apt-get; skipping" >&2
  elif [ "$SUDO" = none ]; then
    echo "install: ${missing[*]} missing and apt-get needs root; skipping" >&2
  else
    echo "install: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
KUBECTL="$VENV/opt/kubernetes-client/usr/bin/kubectl"
if [ ! -x "$KUBECTL" ] && command -v apt-get >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq kubernetes-client 2>/dev/null); then
    mkdir -p "$VENV/opt/kubernetes-client"
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$VENV/opt/kubernetes-client"
  else
    echo "install: could not download Debian's kubernetes-client; the k8s tests will fail" >&2
  fi
  rm -rf "$tmp"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev,lab]'
touch "$VENV/.installed"
echo "install: done ($("$VENV/bin/python" --version), $(command -v prometheus || echo 'no prometheus'))"
