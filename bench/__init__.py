"""Benchmarks: `python -m bench.run [--quick] [--only P1]` (see docs/benchmarks.md)."""
