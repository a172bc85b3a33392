#!/usr/bin/env bash
# Install what snpemu needs, from scratch, idempotently:
#   - a virtualenv at .venv with snpemu and its pinned dependencies (dev tools included);
#   - Debian's `prometheus` package (Prometheus and promtool) when it is missing and apt-get
#     can be used (root, or sudo without a password). Without it everything still runs; the
#     launcher just starts no Prometheus, and the tests that need one say so and fail.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
      if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" != none ]; then
      echo "install: apt-get install prometheus"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
      echo "install: prometheus is missing and apt-get needs root; skipping (make up runs without it)" >&2
    fi
  else
    echo "install: prometheus is missing and there is no apt-get; skipping" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev]'
touch "$VENV/.installed"
echo "install: done ($("$VENV/bin/python" --version), $(command -v prometheus || echo 'no prometheus'))"
