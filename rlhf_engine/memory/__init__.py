"""Memory planning: predict per-phase GPU bytes, choose residency and micro-batches, move models."""
