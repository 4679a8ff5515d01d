"""Plain PyTorch implementations of every op: the executable spec.

Written for clarity, not speed. Tests evaluate them in float64 as the ground truth.
"""
