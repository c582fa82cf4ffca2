#!/usr/bin/env bash
# Set up everything the tests need and run the whole suite: lint, types, tests
# (unit, real daemon on a real socket, real dockerd, real BOINC client).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The engine tests must run, not skip, wherever this script runs; so must the
# e2e tests under both BOINC clients (Debian's 7.20.5 and ../shared's 8.2.15).
export BOINCD_REQUIRE_ENGINE=1 BOINCD_REQUIRE_BOINC=1
.venv/bin/ruff check boincd_containers tests benchmarks
.venv/bin/mypy
.venv/bin/lint-imports  # the layers of docs/architecture.md
# Rebuild the test images from local files whatever an earlier run left, and
# remove its hello-world and decoys: every run proves what a fresh machine does.
.venv/bin/python -m tests.prepare_images
.venv/bin/pytest "$@"
.venv/bin/python -m benchmarks --smoke  # keeps the benchmarks working; fails on errors, never on timings
