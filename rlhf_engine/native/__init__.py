"""Backends ``cpp`` and ``cuda``: Python launchers for the compiled module ``rlhf_engine._C``
(sources in ``csrc/``).

One launcher per op serves both backends with the signature of the Triton launcher of the
same name in ``rlhf_engine.kernels`` (same file names per family): it allocates the fp32
outputs and passes raw addresses to ``_C``, whose entry point is the C++ host twin for CPU
tensors (``<name>_cpu``, OpenMP over ``torch.get_num_threads()`` threads) and the CUDA
kernel for CUDA tensors (``<name>_cuda``, on torch's current stream). No validation and no
autograd here (see ``rlhf_engine.ops``).
"""
