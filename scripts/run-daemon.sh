#!/usr/bin/env bash
# Set up (Debian packages, venv, dockerd) and run the daemon in the foreground with
# its built-in defaults: socket /run/boincd-containers/boincd.sock,
# state /var/lib/boincd-containers. Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/boincd-containers serve "$@"
