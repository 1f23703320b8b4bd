"""Trainer, parallel backends, checkpoints, stages, grafting, metrics."""
