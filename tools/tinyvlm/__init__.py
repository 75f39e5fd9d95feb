"""Tiny VLM: random checkpoint builder, synthetic data, training, evaluation."""
