"""The small helpers the torch backends share (``torch_backend/aggregation.py``)."""

import torch

from rlhf_engine.torch_backend import aggregation


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN payloads and signed zeros included)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_where_selects_exactly_like_torch_where_on_every_path():
    rows, cols = 4, aggregation.WHERE_MAX_CPU // 4 + 3  # a [rows, cols] selection is a large one
    cond = torch.rand(rows, cols) > 0.5
    x = torch.randn(rows, cols)
    x[~cond] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).repeat(cols)[: int((~cond).sum())]
    per_row = torch.randn(rows, 1)  # an operand smaller than the condition (broadcast)
    small_cond, small_x = cond[:1, :7], x[:1, :7]

    fresh = aggregation.Where(small_cond)  # small: torch.where itself, no lanes
    assert _same_bits(fresh.keep(small_x), torch.where(small_cond, small_x, 0.0))
    assert fresh._lanes is None

    where = aggregation.Where(cond)
    assert _same_bits(where.keep(x), torch.where(cond, x, 0.0))  # large: builds the lanes
    assert where._lanes is not None
    # once the lanes exist they serve every selection, broadcast operands included
    assert _same_bits(where.select(per_row, 2.5), torch.where(cond, per_row, 2.5))
    assert _same_bits(where.select(x, per_row), torch.where(cond, x, per_row))
    assert _same_bits(where.keep(per_row), torch.where(cond, per_row, 0.0))
    buf = torch.stack([x, x * 2])
    expected = torch.where(cond, buf, 0.0)
    aggregation.TokenMask(cond).apply_(buf)
    assert _same_bits(buf, expected)
