#!/usr/bin/env bash
# Install what boincd-containers needs on Debian (12+) and make sure dockerd runs.
# Idempotent: safe to run again. Needs root (apt-get, dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests="${1:-}"
packages=(python3 python3-venv docker.io busybox-static)
if [ "$want_tests" = "--test" ]; then
  # The real BOINC client, a local registry, Podman, and the tools the tests drive.
  packages+=(boinc-client docker-registry podman uidmap util-linux systemd procps)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's boinc-client starts a client service on install where systemd runs; we run our own.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import boincd_containers, aiodocker, pytest_asyncio' 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
fi

# dockerd: use a running one, else start it (no systemd on CI machines).
if ! docker info >/dev/null 2>&1; then
  if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
    systemctl start docker
  else
    echo "setup: starting dockerd"
    mkdir -p /var/log
    nohup dockerd >/var/log/boincd-dockerd.log 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/boincd-dockerd.log" >&2; exit 1; }
fi
