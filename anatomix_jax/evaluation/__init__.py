"""Evaluation: per-sample scoring of generated answers and the paper's tables."""
