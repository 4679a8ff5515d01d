"""Public functional API: the fused RL ops.

Each op validates its inputs, dispatches to a backend (``"triton"`` on CUDA, ``"torch"``
anywhere; see ``rlhf_engine._backend``) and is registered with ``torch.library`` so it
composes with ``torch.compile(fullgraph=True)``.
"""
