"""Brute-force float64 references: explicit index loops and 2×2 rotation matrices.

Deliberately naive and independent of ``anomaly``: no complex numbers, no broadcasting
tricks, one slice and one pair at a time.
"""

from __future__ import annotations

import math

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
