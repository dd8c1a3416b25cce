"""Mean and Student-t confidence interval over seeds, in plain Python (no scipy).

With n seeds of a metric, x_1 … x_n, the two-sided (1 − α) confidence interval of the mean is

    x̄ ± t_{1−α/2, n−1} · s / √n,     s² = Σ (x_i − x̄)² / (n − 1)

(Student 1908, "The probable error of a mean"). It assumes the seeds' results are independent
draws from a normal distribution; with 3 seeds the t quantile is large (4.30 at 95%), which is
the honest price of few seeds. One seed has no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MeanCI", "mean_ci", "student_t_cdf", "student_t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), for 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom.

    Formula: for t ≥ 0, F(t) = 1 − ½ I_{df/(df+t²)}(df/2, ½); F(−t) = 1 − F(t).
    Returns a float in [0, 1].
    """
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p for Student's t with `df` degrees of freedom (bisection on the CDF).

    Returns a float; e.g. `student_t_quantile(0.975, 2)` = 4.3027 (closed form for df = 2:
    t = (2p − 1) / √(2p(1 − p))).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """A mean over seeds with its confidence interval; `half_width` is None for one value."""

    mean: float
    half_width: float | None
    n: int
    std: float | None  # sample standard deviation (n − 1 in the denominator); None for one value

    @property
    def low(self) -> float | None:
        """Lower end of the interval (None without one)."""
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        """Upper end of the interval (None without one)."""
        return None if self.half_width is None else self.mean + self.half_width

    def format(self, digits: int = 3) -> str:
        """`"mean ± half_width"`, or `"mean (n=1, no CI)"` for one value; returns the string."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n=1, no CI)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean of `values` and the half-width of its two-sided Student-t interval at `level`.

    Formula: half_width = t_{(1+level)/2, n−1} · s / √n with s the sample standard deviation
    (see the module docstring). One value: half_width None (no interval). Returns a `MeanCI`.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return MeanCI(mean=mean, half_width=None, n=1, std=None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    t = student_t_quantile((1.0 + level) / 2.0, n - 1)
    return MeanCI(mean=mean, half_width=t * std / math.sqrt(n), n=n, std=std)
