"""Benchmarks: `python -m bench` (or `make bench`; `make bench-quick` in under two minutes)."""
