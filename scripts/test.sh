#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite: lint, types, tests
# (unit, real daemon on a real socket, real dockerd, real BOINC client).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The engine tests must run, not skip, wherever this script runs.
export BOINCD_REQUIRE_ENGINE=1 BOINCD_REQUIRE_BOINC=1
.venv/bin/ruff check boincd_containers tests benchmarks
.venv/bin/mypy
.venv/bin/python -m tests.prepare_images
.venv/bin/pytest "$@"
.venv/bin/python -m benchmarks --smoke  # keeps the benchmarks working; fails on errors, never on timings
