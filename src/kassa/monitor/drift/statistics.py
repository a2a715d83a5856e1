"""Two-sample statistics of drift, in our own numpy code: the population stability index (PSI) of count
tables and of numeric values binned at the reference's quantiles, its significance (PSI is asymptotically
chi-square), the two-sample Kolmogorov–Smirnov test with its asymptotic p-value, and Welch's z for
comparing two rates.

A PSI alert also needs significance (the chi-square approximation of PSI): a small window over many
categories reaches PSI 0.2 by chance. Every function here is pure; `kassa.monitor.drift.distribution`
turns them into report rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kassa.monitor.drift.config import OTHER


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
        epsilon: float = 1e-4) -> float:
    """Population stability index of two aligned count (or share) vectors: Σ (a − e)·ln(a / e) over
    shares, each share floored at ``epsilon`` so an empty bin does not make it infinite."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError("psi needs two non-empty count vectors of the same length")
    if e.sum() <= 0 or a.sum() <= 0 or (e < 0).any() or (a < 0).any():
        raise ValueError("psi needs non-negative counts with a positive total on both sides")
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable with ``df`` degrees of freedom: the regularized upper incomplete
    gamma function Q(df/2, x/2), by its series below a + 1 and its continued fraction above
    (Numerical Recipes §6.2)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_pre = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_pre)))
    tiny = 1e-300
    b = z + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_pre) * h))


def psi_p_value(value: float, n_reference: int, n_live: int, bins: int) -> float:
    """Approximate p-value of a PSI under no drift: PSI is the symmetrised Kullback–Leibler divergence,
    and ``PSI·n₁n₂/(n₁+n₂)`` is asymptotically the chi-square homogeneity statistic with ``bins − 1``
    degrees of freedom."""
    if bins < 2 or n_reference < 1 or n_live < 1:
        return 1.0
    return chi2_sf(value * n_reference * n_live / (n_reference + n_live), bins - 1)


def categorical_psi(reference: Mapping[str, float], live: Mapping[str, float], epsilon: float = 1e-4) -> float:
    """PSI over the union of the categories of two count tables."""
    keys = sorted(set(reference) | set(live))
    return psi([reference.get(k, 0) for k in keys], [live.get(k, 0) for k in keys], epsilon)


def align_categories(reference: Mapping[str, float], live: Mapping[str, float]) -> tuple[dict[str, float],
                                                                                         dict[str, float]]:
    """Make two capped count tables comparable: once a window has run out of room (it counts values it
    did not keep under ``__other__``), a value the other window kept but it did not is folded into the
    other window's ``__other__`` too, so both tables mean the same by it."""
    ref, cur = dict(reference), dict(live)
    capped = [(table, other) for table, other in ((ref, cur), (cur, ref)) if OTHER in table]
    for table, other in capped:
        for k in [k for k in other if k not in table and k != OTHER]:
            other[OTHER] = other.get(OTHER, 0) + other.pop(k)
    return ref, cur


def quantile_edges(reference: Sequence[float] | np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates dropped, so ties make fewer bins)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        raise ValueError("quantile_edges needs a non-empty reference")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def binned_counts(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < x <= edges[i] (first and last bins open-ended)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def binned_psi(reference: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray, bins: int = 10,
               epsilon: float = 1e-4) -> float:
    """PSI of a numeric feature over ``bins`` bins cut at the reference's quantiles."""
    edges = quantile_edges(reference, bins)
    return psi(binned_counts(reference, edges), binned_counts(live, edges), epsilon)


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: the alternating series for lam ≥ 1.18, and the
    Jacobi-theta form (fast for small lam) below it."""
    if lam <= 0:
        return 1.0
    if lam < 1.18:
        # 1 - sqrt(2π)/lam · Σ exp(-(2j-1)²π²/(8 lam²)); five terms reach double precision here.
        w = math.pi**2 / (8.0 * lam * lam)
        s = sum(math.exp(-((2 * j - 1) ** 2) * w) for j in range(1, 6))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        s += term if j % 2 else -term
        if term < 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * s))


def ks_2samp(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test: (D, asymptotic two-sided p-value).

    D is the largest gap between the two empirical CDFs. The p-value is the Kolmogorov distribution's
    tail at ``(√n_e + 0.12 + 0.11/√n_e)·D`` with ``n_e = nm/(n+m)`` (Stephens' small-sample correction,
    as in Numerical Recipes §14.3); it is slightly conservative when the data have ties.
    """
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / n
    cdf_y = np.searchsorted(y, grid, side="right") / m
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def welch_z(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int) -> float:
    """z statistic of mean_b − mean_a (Welch's standard error; normal approximation for large n)."""
    se = math.sqrt(max(var_a, 0.0) / n_a + max(var_b, 0.0) / n_b)
    if se == 0:
        return 0.0 if mean_a == mean_b else math.copysign(math.inf, mean_b - mean_a)
    return (mean_b - mean_a) / se
