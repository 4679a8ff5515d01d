"""The ``"torch"`` backend of every op: plain PyTorch, vectorized, fp32 accumulation.

The CPU path, and the fallback on any device (no host sync on CUDA tensors, so it also
runs inside ``torch.compile`` / CUDA graphs). One module per op family, named like the
spec it implements (``rlhf_engine/reference/<family>.py``) and the Triton backend
(``kernels/<family>.py``); ``aggregation.py`` holds the helpers the families share.
"""
