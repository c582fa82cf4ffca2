#!/usr/bin/env bash
# Install what boincd-containers needs on Debian (12+) and make sure dockerd runs.
# Idempotent: safe to run again. Needs root (apt-get, dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests="${1:-}"
packages=(python3 python3-venv docker.io busybox-static)
if [ "$want_tests" = "--test" ]; then
  # The real BOINC client, a local registry, Podman, and the tools the tests drive.
  # Chromium: a real browser renders a task's web graphics (tests/e2e/test_shim_webgraphics.py).
  packages+=(boinc-client docker-registry podman uidmap util-linux systemd procps chromium)
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

# The venv comes from the system Python (Debian's python3 and python3-venv), never
# from whatever python3 is first on PATH: a root-only pyenv there once made a venv
# that the BOINC user and the service could not run. A venv made otherwise is made
# again.
system_python=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! grep -qx 'home = /usr/bin' .venv/pyvenv.cfg 2>/dev/null; then
  echo "setup: creating .venv from $system_python"
  rm -rf .venv
  "$system_python" -m venv .venv
fi
# The daemon needs its own dependencies only; the test extras (pytest, mypy, ruff)
# are for `--test`. (`python -c` imports boincd_containers from the checkout itself,
# so the console script tells whether the package is installed.)
spec=.
needs='import aiodocker, aiohttp, psutil, structlog'
if [ "$want_tests" = "--test" ]; then
  spec='.[test]'
  needs="$needs, pytest_asyncio, mypy, ruff, importlinter"
fi
if [ ! -x .venv/bin/boincd-containers ] || ! .venv/bin/python -c "$needs" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "$spec"
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

if [ "$want_tests" = "--test" ]; then
  # Podman for the tests. Each test session starts its own `podman system
  # service` (rootful, and rootless as boinctest) with its own containers.conf
  # (boincd_containers/testing/podman.py); nothing Podman runs between sessions. What they
  # need from the host: an unprivileged user with a subordinate id range
  # (rootless Podman maps its containers' users through it).
  if ! id boinctest >/dev/null 2>&1; then
    echo "setup: creating user boinctest (rootless Podman tests)"
    useradd --create-home --shell /usr/sbin/nologin boinctest
  fi
  if ! grep -q '^boinctest:' /etc/subuid 2>/dev/null; then
    usermod --add-subuids 200000-265535 boinctest
  fi
  if ! grep -q '^boinctest:' /etc/subgid 2>/dev/null; then
    usermod --add-subgids 200000-265535 boinctest
  fi
  # Podman's default ulimits (nofile 1048576) exceed the hard limits of some hosts
  # (containers then fail to start): clip them, unless the admin configured Podman.
  if [ ! -e /etc/containers/containers.conf ]; then
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ] && nofile=1048576
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
      "$nofile" "$nofile" "$nproc" "$nproc" >/etc/containers/containers.conf
  fi
fi
