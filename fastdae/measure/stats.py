"""Statistics over seeds for the studies: Student-t confidence intervals and Welch's t-test.

    s = mean_ci([41.2, 44.0, 39.5])          # {mean, std, n, ci95: [lo, hi]}
    w = welch([41.2, 44.0, 39.5], [60.1, 58.3, 63.0])   # {diff, ci95, t, dof, p, n_a, n_b}

Pure Python (math only; no scipy dependency): the t distribution's tail is the regularized incomplete
beta function, P(|T| > t) = I_x(dof/2, 1/2) with x = dof / (dof + t^2) (Abramowitz & Stegun 26.7.1,
26.5.27), evaluated by its continued fraction (A&S 26.5.8) with the modified Lentz method; quantiles
invert it by bisection. Welch's dof are not integers, so the general (real a, b) form is needed.
tests/measure/test_stats.py checks every function against scipy.stats where scipy is installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LEVEL = 0.95  # confidence level of every interval in the reports
ALPHA = 1 - LEVEL  # significance level of the tests (two-sided)
_EPS = 1e-15  # relative convergence of the continued fraction
_TINY = 1e-300  # Lentz's guard against a zero denominator
_MAX_TERMS = 10_000
_BISECTIONS = 200  # interval halvings of t_ppf: far below double precision well before


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (A&S 26.5.8), by the modified Lentz method; converges
    quickly for x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        # even term d_{2m}, then odd term d_{2m+1} of the fraction
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= c * d
        if abs(c * d - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a > 0, b > 0, 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b  # I_x(a, b) = 1 - I_{1-x}(b, a)


def t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with `dof` > 0 degrees of freedom (real, as Welch's are)."""
    if not dof > 0:
        raise ValueError(f"t_sf: dof must be > 0, got {dof}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    half_two_sided = 0.5 * betainc(0.5 * dof, 0.5, dof / (dof + t * t))  # P(T > |t|)
    return half_two_sided if t >= 0 else 1.0 - half_two_sided


def t_ppf(q: float, dof: float) -> float:
    """The q-quantile of Student's t with `dof` > 0 degrees of freedom, q in (0, 1): t_sf inverted
    by bisection (t_sf is monotone, so this cannot miss)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, dof)
    tail = 1.0 - q
    lo, hi = 0.0, 1.0
    while t_sf(hi, dof) > tail:  # bracket: t_sf(lo) >= tail >= t_sf(hi)
        lo, hi = hi, 2.0 * hi
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_sf(mid, dof) > tail else (lo, mid)
    return 0.5 * (lo + hi)


def _var(values: Sequence[float]) -> float:
    """Sample variance (ddof 1) of >= 2 values."""
    m = math.fsum(values) / len(values)
    return math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> dict[str, float | int | list[float] | None]:
    """{mean, std (ddof 1; 0 for one value), n, ci95: [lo, hi] the Student-t interval of the mean,
    mean +- t_{(1+level)/2, n-1} std / sqrt(n); None for one value (no spread to scale)}."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    std = math.sqrt(_var(values)) if n > 1 else 0.0
    ci = None
    if n > 1:
        half = t_ppf(0.5 + 0.5 * level, n - 1) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"mean": mean, "std": std, "n": n, "ci95": ci}


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, float | int | list[float] | None]:
    """Welch's unequal-variance t-test of mean(a) - mean(b), two-sided:
    t = diff / se, se^2 = s_a^2/n_a + s_b^2/n_b, dof by Welch–Satterthwaite
    (se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))), p = 2 P(T_dof > |t|), and the interval
    diff +- t_{(1+level)/2, dof} se. {diff, ci95, t, dof, p, n_a, n_b}; t, dof, p and ci95 are None
    when it cannot be tested: fewer than 2 values in an arm, or no spread in either (se = 0)."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        raise ValueError(f"welch needs values in both arms, got {na} and {nb}")
    diff = math.fsum(a) / na - math.fsum(b) / nb
    out: dict[str, float | int | list[float] | None] = {
        "diff": diff,
        "ci95": None,
        "t": None,
        "dof": None,
        "p": None,
        "n_a": na,
        "n_b": nb,
    }
    if na < 2 or nb < 2:
        return out
    va, vb = _var(a) / na, _var(b) / nb
    se2 = va + vb
    if se2 == 0.0:
        return out
    se = math.sqrt(se2)
    dof = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t = diff / se
    half = t_ppf(0.5 + 0.5 * level, dof) * se
    out.update(ci95=[diff - half, diff + half], t=t, dof=dof, p=min(1.0, 2.0 * t_sf(abs(t), dof)))
    return out
