"""Corpora: sources, parsing, augmentation, the Ray Data pipeline (run in Ray Data tasks) and the
worker-side stream of features."""
