"""Brute-force float64 references: explicit index loops and 2×2 rotation matrices.

Deliberately naive and independent of ``anomaly``: no complex numbers, no broadcasting
tricks, one slice and one pair at a time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def slice_index(j: int, d: int, layout: str) -> tuple[int, int]:
    """Indices of the (re, im) members of slice ``j`` in a ``d``-vector."""
    if layout == "half":
        return j, j + d // 2
    if layout == "interleaved":
        return 2 * j, 2 * j + 1
    raise ValueError(layout)


def freqs(d: int, base: float) -> np.ndarray:
    return np.array([base ** (-2.0 * j / d) for j in range(d // 2)])


def rotate(x: np.ndarray, p: float, theta: np.ndarray, layout: str) -> np.ndarray:
    """RoPE by explicit 2×2 rotation matrices, one slice at a time."""
    d = len(x)
    out = np.zeros(d)
    for j in range(d // 2):
        a, b = slice_index(j, d, layout)
        c, s = math.cos(p * theta[j]), math.sin(p * theta[j])
        out[a] = c * x[a] - s * x[b]
        out[b] = s * x[a] + c * x[b]
    return out


def score(q, k, m, n, theta, layout) -> float:
    """Rotate then dot."""
    return float(np.dot(rotate(q, m, theta, layout), rotate(k, n, theta, layout)))


def initial_angles(q, k, layout) -> np.ndarray:
    d = len(q)
    out = np.zeros(d // 2)
    for j in range(d // 2):
        a, b = slice_index(j, d, layout)
        ang = math.atan2(q[b], q[a]) - math.atan2(k[b], k[a])
        out[j] = ang % (2 * math.pi)
    return out


def coefficients(t, layout) -> np.ndarray:
    d = len(t)
    out = np.zeros(d // 2)
    for j in range(d // 2):
        a, b = slice_index(j, d, layout)
        out[j] = max(0.0, (t[a] + t[b]) / 2)
    return out


def strict_score(q, t, m, n, theta, layout) -> float:
    """Eq. 9 literally: key slice = t_{n,j} × query slice; rotate both; dot."""
    d = len(q)
    c = coefficients(t, layout)
    key = np.zeros(d)
    for j in range(d // 2):
        a, b = slice_index(j, d, layout)
        key[a], key[b] = c[j] * q[a], c[j] * q[b]
    return score(q, key, m, n, theta, layout)


def slack_score(q, t, m, n, theta, layout) -> float:
    """The released code: <f(q, m) ⊙ q, f(t̃, n)>, t̃ with duplicated coefficients."""
    d = len(q)
    c = coefficients(t, layout)
    t_dup = np.zeros(d)
    for j in range(d // 2):
        a, b = slice_index(j, d, layout)
        t_dup[a] = t_dup[b] = c[j]
    return float(np.dot(rotate(q, m, theta, layout) * q, rotate(t_dup, n, theta, layout)))


def rising_run(theta0: float, freq: float, causal: bool = True, limit: int = 10**7) -> int:
    """Count integer distances s = 1, 2, … at which the slice score is still rising,
    judged by the sign of the derivative in |s| — stops at the first one that is not."""
    sign = 1.0 if causal else -1.0
    count = 0
    for s in range(1, limit):
        slope = -math.sin(theta0 + sign * s * freq) * sign * freq  # d/d|s| of cos(Θ ± |s|θ)
        if slope <= 0:
            break
        count += 1
    return count


# --------------------------------------------------------------------------------------
# Pair statistics of the initial angle (the probe's core, CoCA's effective contents)
# --------------------------------------------------------------------------------------

_PI = Fraction(math.pi)


def in_case_d(a: float, b: float, tol: float = 0.0) -> bool:
    """Θ = (a − b) mod 2π in (π, 2π − tol), decided exactly on the floats (π taken as
    ``math.pi``): float ``%`` would round 2π − 1e-300 up to 2π. ``|Θ| ≤ tol`` reads as 0."""
    x = Fraction(a) - Fraction(b)
    if x < 0:
        x += 2 * _PI
    return _PI < x < 2 * _PI - Fraction(tol)


def pair_statistics(q: np.ndarray, k: np.ndarray, layout: str, tol: float = 0.0, bins: int = 16,
                    window: int | None = None) -> dict:
    """Every pair statistic of the probe, one head, slice and causal pair at a time.

    Args:
        q: ``[H, T, d]`` query contents; k: ``[KV, T, d]`` key contents (query head ``h``
            reads key head ``h // (H / KV)``).
        tol: Θ within ``tol`` of 0 (mod 2π) is read as 0.
        window: a sliding window ``W``: only pairs with ``m − n < W`` count.

    Returns:
        ``count_d``, ``weight_d``, ``weight_all``, ``product_re``, ``product_im`` (the real
        and imaginary parts of ``Σ_{m>n} q_{m,j} k̄_{n,j}``), all ``[H, J]``, and ``hist``
        (``[H, J, bins]``: pair to bin ``(bin(a) − bin(b)) mod bins``, a zero slice to 0).
    """
    heads, t, d = q.shape
    group = heads // k.shape[0]
    out = {
        "count_d": np.zeros((heads, d // 2), dtype=np.int64),
        "weight_d": np.zeros((heads, d // 2)),
        "weight_all": np.zeros((heads, d // 2)),
        "product_re": np.zeros((heads, d // 2)),
        "product_im": np.zeros((heads, d // 2)),
        "hist": np.zeros((heads, d // 2, bins), dtype=np.int64),
    }
    for h in range(heads):
        for j in range(d // 2):
            re, im = slice_index(j, d, layout)
            for m in range(t):
                qx, qy = float(q[h, m, re]), float(q[h, m, im])
                for n in range(m):
                    if window is not None and m - n >= window:
                        continue
                    kx, ky = float(k[h // group, n, re]), float(k[h // group, n, im])
                    wq, wk = math.hypot(qx, qy), math.hypot(kx, ky)
                    out["weight_all"][h, j] += wq * wk
                    out["product_re"][h, j] += qx * kx + qy * ky  # q · conj(k)
                    out["product_im"][h, j] += qy * kx - qx * ky
                    if wq == 0 or wk == 0:  # a zero slice has Θ = 0
                        out["hist"][h, j, 0] += 1
                        continue
                    a, b = math.atan2(qy, qx) % (2 * math.pi), math.atan2(ky, kx) % (2 * math.pi)
                    a, b = (0.0 if a == 2 * math.pi else a), (0.0 if b == 2 * math.pi else b)
                    if in_case_d(a, b, tol):
                        out["count_d"][h, j] += 1
                        out["weight_d"][h, j] += wq * wk
                    bin_a, bin_b = (min(int(x * bins / (2 * math.pi)), bins - 1) for x in (a, b))
                    out["hist"][h, j, (bin_a - bin_b) % bins] += 1
    return out


def anomalous_fractions(q: np.ndarray, k: np.ndarray, layout: str, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(anomalous_fraction [H], weighted_anomalous_fraction [H])``: case-(d) shares of the
    causal triples (query, key, slice), unweighted and weighted by ``|q_j||k_j|``."""
    st = pair_statistics(q, k, layout, tol)
    t, j = q.shape[1], q.shape[2] // 2
    frac = st["count_d"].sum(-1) / (j * t * (t - 1) / 2)
    w_all = st["weight_all"].sum(-1)
    return frac, np.where(w_all > 0, st["weight_d"].sum(-1) / np.where(w_all > 0, w_all, 1), 0.0)
