"""Model configs and model-dir recipes for benchmarks (no weights)."""
