"""The paired comparison of two configurations over seeds, for ``malora-report``.

Two methods trained with the same seed see the same data order and the same evaluation examples, so the
question "is method A better than method B?" is asked of the per-seed differences d_s = avg_A(s) - avg_B(s)
(the average accuracy over tasks after training), not of the two means separately: what varies with the
seed is common to both and cancels in d_s.

The test is Student's paired t test, two-sided, at the 5% level: t = mean(d) / (std(d) / sqrt(n)) with the
sample std (n - 1), compared with the 97.5% quantile of Student's t with n - 1 degrees of freedom. A
difference is called "larger than seed noise" when |t| exceeds it (p < 0.05). With 2 seeds the quantile is
12.71 and with 3 it is 4.30, so a few seeds can only show a difference that is large against its spread;
"within seed noise" means the data do not show one, not that the methods are equal. With identical
differences on every seed (std 0) a non-zero mean is larger than the noise and a zero mean is not.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

SIGNIFICANCE = 0.05  # two-sided level of the paired t test
LARGER = "larger than seed noise"
WITHIN = "within seed noise"


@dataclasses.dataclass
class PairedComparison:
    """``first`` minus ``second`` over the seeds both have (``differences`` in the order of ``seeds``)."""

    first: str
    second: str
    seeds: list[str]
    differences: list[float]
    mean: float
    std: float | None  # sample std; None for one seed
    t: float | None  # None for one seed; +-inf when every difference is the same non-zero number
    p_value: float | None
    critical_t: float | None
    wins: int  # seeds on which first > second
    losses: int  # seeds on which first < second

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return "one seed: no test"
        return LARGER if self.p_value < SIGNIFICANCE else WITHIN


def paired_comparison(first: str, second: str, a: dict[str, float],
                      b: dict[str, float]) -> PairedComparison | None:
    """The comparison of ``a`` (seed -> average accuracy of ``first``) with ``b``; None without a shared
    seed."""
    seeds = sorted(set(a) & set(b), key=seed_order)
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(differences)
    n = len(differences)
    std = t = p = critical = None
    if n > 1:
        std = statistics.stdev(differences)
        if std > 0:
            t = mean / (std / math.sqrt(n))
        else:
            t = math.copysign(math.inf, mean) if mean != 0 else 0.0
        p = two_sided_p(t, n - 1)
        critical = t_quantile(1 - SIGNIFICANCE / 2, n - 1)
    return PairedComparison(first, second, [str(s) for s in seeds], differences, mean, std, t, p, critical,
                            wins=sum(d > 0 for d in differences), losses=sum(d < 0 for d in differences))


def seed_order(seed: str) -> tuple[int, float | str]:
    try:
        return (0, float(seed))
    except ValueError:
        return (1, seed)


# -- Student's t distribution (no scipy in the dependencies) ----------------------------------------------

def two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's T with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile (above 0.5) of Student's t, by bisection on the two-sided p-value."""
    target = 2 * (1 - probability)
    low, high = 0.0, 1.0
    while two_sided_p(high, df) > target:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if two_sided_p(middle, df) > target else (low, middle)
    return (low + high) / 2


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    where the fraction converges slowly."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float, tiny: float = 1e-300, eps: float = 1e-15) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return fraction
