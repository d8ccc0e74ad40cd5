"""Benchmark suite: `python -m bench [--quick]` (run from the repository root; see bench/run.py)."""
