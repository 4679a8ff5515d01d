"""The small helpers the torch backends share (``reference/aggregation.py``)."""

import torch

from rlhf_engine.reference import aggregation


def test_numeric_converts_a_bool_mask_to_its_0_1_values():
    mask = torch.rand(5, 7) > 0.5
    for view in (mask, mask[:, ::2], mask.t()):  # strided views too
        assert aggregation.numeric(view).dtype == torch.uint8
        assert torch.equal(aggregation.numeric(view).to(torch.float32), view.float())
    weights = torch.rand(5)
    assert aggregation.numeric(weights) is weights


def test_scalar_is_the_value_and_its_cpu_cache_stays_bounded():
    like = torch.zeros(3)
    assert aggregation.scalar(0.25, like).item() == 0.25
    assert aggregation.scalar(0.25, like) is aggregation.scalar(0.25, like)  # cached on the CPU
    for step in range(1000):  # e.g. a clip range that follows a schedule
        assert aggregation.scalar(step / 1000, like).item() == torch.tensor(step / 1000).item()
    assert aggregation._cpu_scalar.cache_info().currsize <= 64
    on_meta = aggregation.scalar(0.5, torch.zeros(3, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.dim() == 0
