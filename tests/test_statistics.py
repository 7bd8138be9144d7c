"""SecondMoment (mace_ops.statistics) against brute-force sums of outer products."""

from __future__ import annotations

import pytest
import torch

from mace_ops.statistics import SecondMoment

F64 = torch.float64


@pytest.mark.parametrize("dim", [7, 600])  # 600: the block-triangle Gram path, blocks of 150
def test_gram_and_cross_equal_a_loop_of_outer_products(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 11, dim, generator=g)  # float32 input, (…, dim) rows
    y = torch.randn(33, dim, generator=g, dtype=F64)
    rows = x.reshape(-1, dim).double()
    loop_g = torch.zeros(dim, dim, dtype=F64)
    loop_c = torch.zeros(dim, dim, dtype=F64)
    for a, b in zip(rows, y, strict=True):
        loop_g += torch.outer(a, a)
        loop_c += torch.outer(a, b)
    gram = SecondMoment(dim).add(x[:2]).add(x[2])  # two calls accumulate
    cross = SecondMoment(dim).add(x, y)
    assert gram.count == cross.count == 33
    scale = float(loop_g.abs().max())
    assert float((gram.sum - loop_g).abs().max()) <= 1e-13 * scale  # float64 rounding of 33-term sums
    assert float((cross.sum - loop_c).abs().max()) <= 1e-13 * float(loop_c.abs().max())
    if dim >= 512:  # blocks left of the diagonal are the mirror of those right of it, exactly
        assert torch.equal(gram.sum[150:, :150], gram.sum[:150, 150:].T)


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="3 rows in x but 2 in y"):
        SecondMoment(4).add(torch.ones(3, 4), torch.ones(2, 4))
