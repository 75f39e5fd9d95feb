"""Benchmark clients for a running Triad cluster (``python -m tools.bench.serve``)."""
