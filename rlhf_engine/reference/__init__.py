"""Plain PyTorch implementations of every op: the executable spec.

Written for clarity, not speed. Tests evaluate them in float64 as the ground truth. The
constants that define the semantics (loss names, clamps, estimator tables, ...) live
here too; the backends import them (``rlhf_engine.torch_backend``, ``kernels``).
"""
