#!/usr/bin/env bash
# Set up (Debian packages, venv, dockerd) and run the daemon in the foreground with
# its built-in defaults: socket /run/boincd-containers/boincd.sock,
# state /var/lib/boincd-containers. Extra arguments go to `serve`. The venv (.venv)
# is made from the system Python with the daemon's dependencies only (no test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/boincd-containers serve "$@"
