"""Mean ± Student-t CI over seeds, checked against values worked out by hand."""

import math

import pytest

from rlhf_lab.compare.stats import mean_ci, student_t_cdf, student_t_quantile


def test_t_quantiles_match_their_closed_forms_and_the_tables():
    # df = 1 is the Cauchy distribution: t_p = tan(π (p − ½)); at p = 0.975, tan(0.475 π) = 12.7062.
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    # df = 2: F(t) = ½ + t / (2 √(2 + t²)), so t_p = (2p − 1) / √(2p(1 − p)):
    # p = 0.975 → 0.95 / √(2 · 0.975 · 0.025) = 0.95 / √0.04875 = 0.95 / 0.220794 = 4.302653.
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(0.04875), rel=1e-9)
    # Printed t tables (two-sided 95%): df 4 → 2.776, df 10 → 2.228, df 30 → 2.042; df → ∞ → 1.960.
    assert student_t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert student_t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert student_t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    # Symmetry: the lower quantile is the negative of the upper one, and F(0) = ½.
    assert student_t_quantile(0.025, 3) == pytest.approx(-student_t_quantile(0.975, 3))
    assert student_t_cdf(0.0, 5) == pytest.approx(0.5)


def test_three_seeds_ci_worked_by_hand():
    # x = (0.2, 0.3, 0.4): mean 0.3; deviations −0.1, 0, 0.1; s² = (0.01 + 0 + 0.01) / (3 − 1) = 0.01,
    # s = 0.1; standard error s / √3 = 0.0577350; t(0.975, 2) = 4.302653 (above);
    # half-width = 4.302653 · 0.0577350 = 0.248414.
    m = mean_ci([0.2, 0.3, 0.4])
    assert m.n == 3
    assert m.mean == pytest.approx(0.3)
    assert m.std == pytest.approx(0.1)
    assert m.half_width == pytest.approx(0.248414, abs=1e-6)
    assert (m.low, m.high) == (pytest.approx(0.3 - 0.248414, abs=1e-6), pytest.approx(0.3 + 0.248414, abs=1e-6))
    assert m.format() == "0.300 ± 0.248"


def test_two_seeds_and_another_level_by_hand():
    # x = (1, 3): mean 2, s² = (1 + 1) / 1 = 2, s / √2 = 1, so the half-width is the t quantile itself:
    # 95%: t(0.975, 1) = 12.7062; 90%: t(0.95, 1) = tan(0.45 π) = 6.3138.
    assert mean_ci([1.0, 3.0]).half_width == pytest.approx(12.706205, abs=1e-5)
    assert mean_ci([1.0, 3.0], level=0.90).half_width == pytest.approx(math.tan(0.45 * math.pi), rel=1e-9)


def test_equal_values_have_a_zero_width_interval():
    assert mean_ci([0.5, 0.5, 0.5]).half_width == 0.0


def test_one_seed_has_no_interval_and_says_so():
    m = mean_ci([0.42])
    assert (m.mean, m.half_width, m.std, m.n, m.low) == (0.42, None, None, 1, None)
    assert m.format() == "0.420 (n=1, no CI)"


def test_bad_input_fails_with_the_argument_name():
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="p must be"):
        student_t_quantile(1.0, 3)
