"""Case-(d) counts, weights and Θ histograms by one sweep over time (compiled, CPU).

For one group (key head × slice) the pairs ``m > n`` in case (d) are found by walking
the tokens in order and keeping the keys seen so far in a Fenwick tree indexed by the
rank of their phase. At query ``m``, the keys with ``b_n`` on the case-(d) arc form a
rank interval (SPEC §3: ``b_n ∈ (a_m, a_m + π)`` for ``a_m < π``, the complement of
``[a_m − π, a_m]`` for ``a_m ≥ π``), so its count and its ``Σ |k_n|`` are two prefix
queries, ``O(log T)``. The Θ histogram uses a running histogram ``kc`` of the keys' phase
bins: query ``m`` with bin ``u`` adds ``kc`` to row ``u`` of a joint (query bin × key bin)
table, ``O(bins)`` contiguous adds, folded into Θ bins ``(u − v) mod bins`` at the end.

Cost ``O(T·R·(log T + bins))`` per group, no ``T²`` anything; exact, with the same
thresholds as :func:`anomaly.probe.stats.pair_stats`'s vectorised form (which serves
GPUs, where a sequential sweep does not fit). Groups run in parallel (``numba.prange``).

Why numba: the sweep is inherently sequential in time, and no composition of tensor
operations matches a compiled loop here (the vectorised block form measured 0.5 s per
SmolLM2 layer at 2048 tokens, this one a few tens of ms).
"""

from __future__ import annotations

import math

import numba
import numpy as np

PI = math.pi
TWO_PI = 2 * math.pi


@numba.njit(cache=True, inline="always")
def _prefix(tree_n, tree_w, f):
    """Count and weight of the keys of rank < ``f`` in the Fenwick tree (1-based)."""
    n = 0
    w = 0.0
    i = f
    while i > 0:
        n += tree_n[i]
        w += tree_w[i]
        i -= i & -i
    return n, w


@numba.njit(cache=True, inline="always")
def _phase_bin(x, bins):
    # (x·bins)/2π, left to right as in the vectorised form, so edges bin identically.
    k = int(x * bins / TWO_PI)
    return bins - 1 if k > bins - 1 else k


@numba.njit(cache=True)
def _sweep_group(a, wa, b, wb, bins, count, weight, hist):  # pragma: no cover - compiled
    """One group: ``a, wa [R, T]``, ``b, wb [T]``; adds into ``count [R]``, ``weight [R]``,
    ``hist [R, bins]``."""
    r_count, t_count = a.shape
    key = np.where(wb > 0, b, np.inf)  # a zero key sorts last and is never counted
    order = np.argsort(key, kind="mergesort")
    sorted_b = key[order]
    rank = np.empty(t_count, np.int64)
    for i in range(t_count):
        rank[order[i]] = i
    # Bucket index of the sorted valid keys (⌊b·K/2π⌋, monotone in b), so "#{b < x}" is the
    # keys of lower buckets plus a short scan of x's own bucket: O(1) instead of a search.
    n_valid = 0
    while n_valid < t_count and sorted_b[n_valid] < np.inf:
        n_valid += 1
    n_buckets = 2 * t_count
    scale = n_buckets / TWO_PI
    start = np.zeros(n_buckets + 1, np.int64)
    for i in range(n_valid):
        start[min(int(sorted_b[i] * scale), n_buckets - 1) + 1] += 1
    for k in range(n_buckets):
        start[k + 1] += start[k]
    tree_n = np.zeros(t_count + 1, np.int64)
    tree_w = np.zeros(t_count + 1, np.float64)
    key_bins = np.zeros(bins, np.int64)
    joint = np.zeros((r_count, bins, bins), np.int64)  # [r, query bin u, key bin v]
    seen_n = 0
    seen_w = 0.0
    for m in range(t_count):
        for r in range(r_count):
            wq = wa[r, m]
            if wq <= 0:
                continue
            x = a[r, m]
            upper = x + PI if x < PI else x - PI
            k = min(int(upper * scale), n_buckets - 1)
            f_lt = start[k]  # #{b < upper}
            while f_lt < start[k + 1] and sorted_b[f_lt] < upper:
                f_lt += 1
            k = min(int(x * scale), n_buckets - 1)
            f_le = start[k]  # #{b ≤ a}
            while f_le < start[k + 1] and sorted_b[f_le] <= x:
                f_le += 1
            n_hi, w_hi = _prefix(tree_n, tree_w, f_lt)
            n_lo, w_lo = _prefix(tree_n, tree_w, f_le)
            n = n_hi - n_lo
            w = w_hi - w_lo
            if x >= PI:  # the arc wraps: every earlier key except those in [a − π, a]
                n += seen_n
                w += seen_w
            count[r] += n
            weight[r] += w * wq
            row = joint[r, _phase_bin(x, bins)]
            for v in range(bins):  # contiguous, no temporaries: vectorises
                row[v] += key_bins[v]
        wk = wb[m]
        if wk > 0:
            i = rank[m] + 1
            while i <= t_count:
                tree_n[i] += 1
                tree_w[i] += wk
                i += i & -i
            key_bins[_phase_bin(b[m], bins)] += 1
            seen_n += 1
            seen_w += wk
    for r in range(r_count):  # Θ bin of the pair: (u − v) mod bins
        for u in range(bins):
            for v in range(bins):
                delta = u - v if u >= v else u - v + bins
                hist[r, delta] += joint[r, u, v]


@numba.njit(parallel=True, cache=True)
def sweep_phases(a, wa, b, wb, bins):  # pragma: no cover - compiled; tested through pair_stats
    """``(count_d [G, R] int64, weight_d [G, R] float64, hist [G, R, bins] int64)``.

    Args:
        a, wa: ``[G, R, T]`` float64 query phases in ``[0, 2π)`` and magnitudes.
        b, wb: ``[G, T]`` float64 key phases and magnitudes.
        bins: Θ histogram bins; a pair goes to ``(bin(a_m) − bin(b_n)) mod bins``.

    Pairs with a zero query or key slice (magnitude 0) are left out of all three.
    """
    g_count, r_count, _ = a.shape
    count = np.zeros((g_count, r_count), np.int64)
    weight = np.zeros((g_count, r_count), np.float64)
    hist = np.zeros((g_count, r_count, bins), np.int64)
    for g in numba.prange(g_count):
        _sweep_group(a[g], wa[g], b[g], wb[g], bins, count[g], weight[g], hist[g])
    return count, weight, hist


@numba.njit(cache=True, inline="always")
def _phase(re, im):
    # arg in [0, 2π) and modulus, in float64: as anomaly.probe.stats.phases.
    x, y = np.float64(re), np.float64(im)
    ang = math.atan2(y, x)
    if ang < 0:
        ang += TWO_PI
    if ang >= TWO_PI:
        ang = 0.0
    return ang, math.hypot(x, y)


@numba.njit(parallel=True, cache=True)
def sweep_slices(qre, qim, kre, kim, bins):  # pragma: no cover - compiled; tested in test_probe
    """Every per-layer pair statistic straight from the slices' real and imaginary parts.

    Args:
        qre, qim: ``[G, R, T]`` query slice components (any float dtype).
        kre, kim: ``[G, T]`` key slice components.
        bins: Θ histogram bins.

    Returns:
        ``count_d [G, R]``, ``weight_d [G, R]``, ``hist [G, R, bins]`` (as
        :func:`sweep_phases`), ``weight_all [G, R]`` (``Σ_{n<m} |q_m||k_n|``),
        ``product [G, R, 2]`` (re, im of ``Σ_{n<m} q_m k̄_n``), ``q_abs [G, R]`` and
        ``k_abs [G]`` (``Σ_m |q_m|``, ``Σ_n |k_n|``).
    """
    g_count, r_count, t_count = qre.shape
    count = np.zeros((g_count, r_count), np.int64)
    weight = np.zeros((g_count, r_count), np.float64)
    hist = np.zeros((g_count, r_count, bins), np.int64)
    weight_all = np.zeros((g_count, r_count), np.float64)
    product = np.zeros((g_count, r_count, 2), np.float64)
    q_abs = np.zeros((g_count, r_count), np.float64)
    k_abs = np.zeros(g_count, np.float64)
    for g in numba.prange(g_count):
        a = np.empty((r_count, t_count), np.float64)
        wa = np.empty((r_count, t_count), np.float64)
        b = np.empty(t_count, np.float64)
        wb = np.empty(t_count, np.float64)
        # running sums over the keys before m: Σ|k|, Σ k (re, im)
        sum_w, sum_re, sum_im = 0.0, 0.0, 0.0
        for m in range(t_count):
            for r in range(r_count):
                qr, qi = np.float64(qre[g, r, m]), np.float64(qim[g, r, m])
                a[r, m], wa[r, m] = _phase(qr, qi)
                weight_all[g, r] += wa[r, m] * sum_w
                product[g, r, 0] += qr * sum_re + qi * sum_im  # q · conj(Σk): real part
                product[g, r, 1] += qi * sum_re - qr * sum_im
                q_abs[g, r] += wa[r, m]
            kr, ki = np.float64(kre[g, m]), np.float64(kim[g, m])
            b[m], wb[m] = _phase(kr, ki)
            sum_w += wb[m]
            sum_re += kr
            sum_im += ki
        k_abs[g] = sum_w
        _sweep_group(a, wa, b, wb, bins, count[g], weight[g], hist[g])
    return count, weight, hist, weight_all, product, q_abs, k_abs
