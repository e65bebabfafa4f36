"""Benchmarks: what users feel, side by side with what they would use instead, in one run.

``python -m benchmarks`` prints a table of figures, anchors and ratios; ``--quick`` runs a small
version. Absolute times on shared machines are noisy: we report medians, spread and ratios.
"""
