import math

import pytest
import torch

from rlhf_lab.losses import masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])


def test_masked_sum_and_mean_by_hand():
    # Selected elements: 1, 2 (row 0) and 5 (row 1).
    # sum = 1 + 2 + 5 = 8; mean = 8 / 3 = 2.6667
    assert masked_sum(X, MASK).item() == pytest.approx(8.0)
    assert masked_mean(X, MASK).item() == pytest.approx(2.666667, abs=1e-6)
    # Per row: sums [1 + 2, 5] = [3, 5]; means [3 / 2, 5 / 1] = [1.5, 5]
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 5.0]))


def test_bool_mask_matches_float_mask():
    assert masked_mean(X, MASK.bool()).item() == pytest.approx(masked_mean(X, MASK).item())
    torch.testing.assert_close(masked_sum(X, MASK.bool(), dim=1), masked_sum(X, MASK, dim=1))


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(X)
    assert masked_mean(X, empty).item() == 0.0
    # Row 1 is empty here: its mean is 0, row 0 is (1 + 2 + 3) / 3 = 2.
    rows = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(X, rows, dim=1), torch.tensor([2.0, 0.0]))


def test_non_finite_padding_is_ignored_in_value_and_gradient():
    x = torch.tensor([[1.0, 2.0, -math.inf], [math.nan, 5.0, math.inf]], requires_grad=True)
    out = masked_mean(x, MASK) + masked_var(x, MASK) + masked_whiten(x, MASK).sum()
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all()
    # Padding positions get no gradient at all.
    assert (x.grad[MASK == 0] == 0).all()


def test_masked_var_by_hand():
    # Selected {1, 2, 5}: mean 8/3; deviations -5/3, -2/3, 7/3;
    # squares 25/9 + 4/9 + 49/9 = 78/9 = 26/3.
    # biased = (26/3) / 3 = 2.8889; unbiased = (26/3) / 2 = 4.3333
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(2.888889, abs=1e-5)
    assert masked_var(X, MASK, unbiased=True).item() == pytest.approx(4.333333, abs=1e-5)
    selected = X[MASK.bool()]
    assert masked_var(X, MASK).item() == pytest.approx(selected.var(unbiased=True).item())


def test_masked_var_single_element_is_zero_not_nan():
    one = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_var(X, one, unbiased=True).item() == 0.0
    assert masked_var(X, torch.zeros_like(X)).item() == 0.0


def test_masked_whiten_by_hand_and_shift_mean():
    # mean 8/3, unbiased var 13/3, sqrt(13/3) = 2.081666
    # (1 - 8/3) / 2.081666 = -0.800641; (2 - 8/3) / 2.081666 = -0.320256;
    # (5 - 8/3) / 2.081666 = 1.120897
    white = masked_whiten(X, MASK)
    expected = torch.tensor([[-0.800641, -0.320256, 0.0], [0.0, 1.120897, 0.0]])
    torch.testing.assert_close(white, expected, atol=1e-5, rtol=0)
    assert masked_mean(white, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, MASK).item() == pytest.approx(1.0, abs=1e-5)

    # shift_mean=False keeps the mean 8/3 = 2.666667: -0.800641 + 2.666667 = 1.866026, ...
    scaled = masked_whiten(X, MASK, shift_mean=False)
    expected_scaled = torch.tensor([[1.866026, 2.346411, 0.0], [0.0, 3.787564, 0.0]])
    torch.testing.assert_close(scaled, expected_scaled, atol=1e-5, rtol=0)
    assert not torch.allclose(white, scaled)
    assert masked_mean(scaled, MASK).item() == pytest.approx(8 / 3, abs=1e-5)


def test_masked_whiten_eps_bounds_constant_input():
    x = torch.full((2, 3), 4.0)
    out = masked_whiten(x, torch.ones_like(x))
    assert torch.isfinite(out).all()
    assert (out == 0).all()


@pytest.mark.parametrize("fn", [masked_sum, masked_mean, masked_var, masked_whiten])
def test_shape_mismatch_names_mask(fn):
    with pytest.raises(ValueError, match="mask"):
        fn(X, MASK[:, :2])


def test_whiten_over_two_processes_uses_the_whole_batch_statistics():
    """Each half whitened with a `reduce` that sums over both halves (two threads standing in
    for two ranks) equals the whole batch whitened at once."""
    import threading

    x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0], [-3.0, 0.5, 8.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    whole = masked_whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def reduce_for(rank):
        def reduce(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    def work(rank, rows):
        out[rank] = masked_whiten(x[rows], mask[rows], reduce=reduce_for(rank))

    threads = [threading.Thread(target=work, args=(0, slice(0, 2))), threading.Thread(target=work, args=(1, slice(2, 4)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(out), whole, atol=1e-6)
    # Whitened alone, a half has its own mean: not the batch's.
    assert not torch.allclose(masked_whiten(x[:2], mask[:2]), whole[:2], atol=1e-3)
