"""Benchmarks of the streaming relay: `python -m bench.run` (see docs/benchmarks.md)."""
