"""Structured pruning: one torch-pruning step (importance -> pruner -> step) and the prune + fine-tune rounds."""
