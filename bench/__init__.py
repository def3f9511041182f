"""Benchmarks: `python -m bench` lists them, `python -m bench NAME [args]` runs one (see bench/README.md)."""
