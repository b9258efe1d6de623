"""Measuring a model against the original: fidelity, the guard, latency and cost."""
