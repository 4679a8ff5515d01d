"""CUDA-graph capture check: an op that captures and replays to its eager result makes
no host sync and no data-dependent host branching (GPU-only tests)."""

from __future__ import annotations

from typing import Callable

import torch


def assert_replay_matches_eager(step: Callable[[], tuple], rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Run ``step()`` eagerly (also the warm-up), capture it in a CUDA graph, replay, and
    compare every output of the replay with the eager one."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
