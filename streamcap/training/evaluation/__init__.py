"""Evaluation: caption and retrieval metrics and held-out evaluation of bundles."""
