"""Benchmarks of boincd-containers against the bare engine: `python -m benchmarks`."""
