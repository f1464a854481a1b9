"""Scoring a model on examples: prediction, metrics, per-label reports (workers, driver, export)."""
