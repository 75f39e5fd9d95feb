"""Helpers shared by tests, benchmarks and end-to-end runs (real servers, no fakes)."""
