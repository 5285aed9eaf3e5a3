"""Pair statistics of the initial angle over all causal (query, key) pairs, without pairs.

One entry point, :func:`pair_statistics`: a layer's pre-rotation query and key contents in
(``q [heads, seq, d_rot]``, ``k [kv_heads, seq, d_rot]``, their layout), per head and
slice out (:class:`PairStats`). For slice ``j`` the initial angle of the pair (query ``m``,
key ``n``) is ``Θ_j(m, n) = (a_m − b_n) mod 2π`` with per-token phases ``a_m = arg q_{m,j}``
and ``b_n = arg k_{n,j}`` (docs/conventions.md §2): RoPE adds ``(m − n)θ_j`` to it. A
causal pair (``m > n``) is in case (d) when ``Θ_j ∈ (π, 2π)`` (docs/conventions.md §3).

**Zero-angle tolerance.** ``zero_angle_tol`` reads every ``Θ`` within ``tol`` of 0
(mod 2π, inclusive) as exactly 0, so case (d) becomes ``Θ_j ∈ (π, 2π − tol)``. Contents
computed by rotating back an exact angle of 0 (strict CoCA's, see
:func:`anomaly.coca.coca_qk` with ``rotated=False``) come back as ``±1e-16`` rad, and
``−1e-16`` would otherwise count as case (d). The default 0 is the exact definition.

Counting all ``T(T−1)/2`` pairs by broadcasting costs ``O(T²)`` per slice. Everything
here is built from per-token phases instead. ``Θ ∈ (π, 2π − tol)`` is
``b_n ∈ (a_m + tol, a_m + π)`` on the circle, an arc: with the keys sorted by phase a
query's count is a difference of two dominance counts
``#{n < m : b_n < x}`` at the arc's two ends (plus every earlier key when the arc wraps
through 0), and its ``Σ |k_n|`` the same sums with weights. Two implementations compute
them, exactly, with the same thresholds, and the tests check both against a brute-force
float64 loop (``tests/reference.py``):

* ``"sweep"`` (the CPU default): one compiled pass over time per group with a Fenwick
  tree over phase ranks (:mod:`anomaly.probe.sweep`), ``O(T·R·(log T + bins))``;
* ``"blocks"`` (the GPU default, where a sequential sweep does not fit): the dominance
  counts split on a grid of time blocks × rank blocks (a 2-D prefix table of cell counts
  plus the keys of the threshold's own rank block and of the query's own time block),
  all vectorised, ``O(T²/(s_t s_r) + R·T·(s_t + s_r))`` per slice and nothing of size
  ``T²``.

Alongside the counts:

* **Θ histograms**: phases binned into ``bins`` equal bins, a pair goes to bin
  ``(bin(a_m) − bin(b_n)) mod bins``, within one bin of the bin of its exact Θ (the
  tolerance is not applied: it moves a pair by less than a bin);
* **mean slice product** ``Σ_{n<m} q_{m,j} k̄_{n,j} = Σ_m q_{m,j} Σ_{n<m} k̄_{n,j}`` by
  prefix sums, exact: its angle is the magnitude-weighted circular mean of Θ.

A zero query or key slice has Θ = 0 (never case (d)), as
:func:`anomaly.analytic.initial_angle` has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from anomaly.analytic import TWO_PI
from anomaly.rope import Layout, check_layout, slice_members

METHODS = ("sweep", "blocks")


@dataclass
class PairStats:
    """Statistics of one layer over the causal pairs it scores (``m > n``, and ``m − n < W``
    for a sliding-window layer), per query head and slice."""

    count_d: Tensor
    """``[H, J]`` int64: causal pairs in case (d)."""
    weight_d: Tensor
    """``[H, J]`` float64: ``Σ |q_{m,j}||k_{n,j}|`` over those pairs."""
    weight_all: Tensor
    """``[H, J]`` float64: ``Σ |q_{m,j}||k_{n,j}|`` over all those pairs."""
    hist: Tensor
    """``[H, J, bins]`` int64: causal pairs per Θ bin (binned phases, ±1 bin)."""
    mean_product: Tensor
    """``[H, J]`` complex128: ``Σ_{m>n} q_{m,j} k̄_{n,j}``."""
    q_norm: Tensor
    """``[H, J]`` float64: mean ``|q_{m,j}|`` over tokens."""
    k_norm: Tensor
    """``[KV, J]`` float64: mean ``|k_{n,j}|`` over tokens."""
    pairs: int
    """Pairs per slice: ``T(T−1)/2``, less ``(T−W+1)(T−W)/2`` beyond a window ``W < T``."""


def pair_statistics(
    q: Tensor,
    k: Tensor,
    layout: Layout,
    *,
    bins: int = 64,
    zero_angle_tol: float = 0.0,
    method: str | None = None,
    block: int | None = None,
    window: int | None = None,
) -> PairStats:
    """Case-(d) counts and weights, Θ histograms and mean slice products of one layer.

    Args:
        q: ``[H, T, d_rot]`` pre-rotation query contents (any float dtype, any device).
        k: ``[KV, T, d_rot]`` key contents; query head ``h`` reads key head
            ``h // (H / KV)`` (grouped-query attention).
        layout: ``"half"`` or ``"interleaved"``: which dims form slice ``j``.
        bins: Θ histogram bins over ``[0, 2π)``.
        zero_angle_tol: radians; ``|Θ| ≤ tol`` (mod 2π) counts as 0 (module docstring).
            In ``[0, π/2)``.
        method: ``"sweep"`` (default on the CPU) or ``"blocks"`` (default elsewhere); both
            exact, with identical results.
        block: ``"blocks"`` only: time and rank block size (default balanced for ``T``);
            any value gives the same result.
        window: a sliding-window layer's ``W``: only the pairs it scores count
            (``0 < m − n < W``). ``None``: every causal pair (global attention).

    Returns:
        :class:`PairStats` on ``q``'s device.
    """
    check_layout(layout)
    h, t, d = q.shape
    kv = k.shape[0]
    if k.shape[1:] != (t, d) or h % kv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share seq and d_rot, "
                         "and the query heads must be a multiple of the key heads")
    if not 0.0 <= zero_angle_tol < math.pi / 2:
        raise ValueError(f"zero_angle_tol must be in [0, π/2), got {zero_angle_tol}")
    method = method or ("sweep" if q.device.type == "cpu" else "blocks")
    if method not in METHODS:
        raise ValueError(f"unknown pair-statistics method {method!r}; use one of {', '.join(METHODS)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    every = _causal_statistics(q, k, layout, bins, zero_angle_tol, method, block)
    if window is None or window >= t:
        return every
    # The pairs beyond the window (m − n ≥ W) are the causal pairs of the shifted sequences
    # q[W−1:] and k[:T−W+1] (query i is m = i + W − 1, so n < i is n ≤ m − W); every
    # statistic but the per-token norms is a sum over pairs, so the window's is the
    # difference, exact, with either method.
    far = _causal_statistics(q[:, window - 1 :], k[:, : t - window + 1], layout, bins, zero_angle_tol, method, block)
    return PairStats(
        count_d=every.count_d - far.count_d, weight_d=every.weight_d - far.weight_d,
        weight_all=every.weight_all - far.weight_all, hist=every.hist - far.hist,
        mean_product=every.mean_product - far.mean_product, q_norm=every.q_norm, k_norm=every.k_norm,
        pairs=every.pairs - far.pairs,
    )


def _causal_statistics(
    q: Tensor, k: Tensor, layout: Layout, bins: int, zero_angle_tol: float, method: str, block: int | None
) -> PairStats:
    """:func:`pair_statistics` over every causal pair (arguments checked there)."""
    h, t, d = q.shape
    kv = k.shape[0]
    r, j = h // kv, d // 2
    q_re, q_im = slice_members(q, layout)  # [H, T, J] each (views)
    k_re, k_im = slice_members(k, layout)  # [KV, T, J]

    # Groups G = (key head, slice), R query heads each: the layout both implementations take.
    def queries(x: Tensor) -> Tensor:  # [H, T, J] -> [KV, R, T, J] -> [KV, J, R, T] -> [G, R, T]
        return x.reshape(kv, r, t, j).permute(0, 3, 1, 2).reshape(kv * j, r, t)

    def keys(x: Tensor) -> Tensor:  # [KV, T, J] -> [KV, J, T] -> [G, T]
        return x.permute(0, 2, 1).reshape(kv * j, t)

    def per_head(x: Tensor) -> Tensor:  # [G, R, ...] -> [KV, J, R, ...] -> [KV, R, J, ...] -> [H, J, ...]
        x = x.reshape(kv, j, r, *x.shape[2:]).transpose(1, 2)
        return x.reshape(h, j, *x.shape[3:])

    grouped = (queries(q_re), queries(q_im), keys(k_re), keys(k_im))
    if method == "sweep":
        count, weight, hist, weight_all, product, q_abs, k_abs = _sweep(*grouped, bins, zero_angle_tol)
    else:
        count, weight, hist, weight_all, product, q_abs, k_abs = _blocks(*grouped, bins, zero_angle_tol, block)
    pairs = t * (t - 1) // 2
    hist[..., 0] += pairs - hist.sum(-1)  # pairs with a zero slice (left out): Θ = 0
    return PairStats(
        count_d=per_head(count), weight_d=per_head(weight), weight_all=per_head(weight_all),
        hist=per_head(hist), mean_product=per_head(product), q_norm=per_head(q_abs) / t,
        k_norm=k_abs.reshape(kv, j) / t, pairs=pairs,
    )


def _sweep(q_re: Tensor, q_im: Tensor, k_re: Tensor, k_im: Tensor, bins: int, tol: float) -> tuple[Tensor, ...]:
    """The compiled one-pass form (:func:`anomaly.probe.sweep.sweep_slices`), on the CPU."""
    from anomaly.probe.sweep import sweep_slices

    device = q_re.device
    arrays = (x.detach().cpu().contiguous().numpy() for x in (q_re, q_im, k_re, k_im))
    threads = torch.get_num_threads()
    try:  # the caller's thread budget, kept: the sweep uses no more threads than torch may
        out = sweep_slices(*arrays, bins, tol, threads=threads)
    finally:
        # numba's OpenMP layer shares the OpenMP runtime with torch and leaves its own thread
        # count set in it: without this, a process that limited torch to 1 thread (each of the
        # ablation's --shared workers) trained on every core after its first probe, 2 workers
        # × 2 threads on 2 cores, several times slower
        torch.set_num_threads(threads)
    count, weight, hist, weight_all, product, q_abs, k_abs = (torch.from_numpy(x).to(device) for x in out)
    return count, weight, hist, weight_all, torch.complex(product[..., 0], product[..., 1]), q_abs, k_abs


def phases(re: Tensor, im: Tensor) -> tuple[Tensor, Tensor]:
    """Phase in ``[0, 2π)`` and magnitude of slices with components ``re``, ``im`` (float64).

    The phase of an exactly-zero slice is reported as 0 (its magnitude 0 keeps it out of
    every count).
    """
    re, im = re.double(), im.double()
    a = torch.atan2(im, re)  # = angle(z.to(complex128)), bit for bit
    a = torch.where(a < 0, a + TWO_PI, a)  # = remainder(a, 2π) for a in [−π, π]
    a = torch.where(a >= TWO_PI, torch.zeros_like(a), a)
    return a, torch.hypot(re, im)


def _blocks(
    q_re: Tensor, q_im: Tensor, k_re: Tensor, k_im: Tensor, bins: int, tol: float, block: int | None
) -> tuple[Tensor, ...]:
    """The vectorised tensor form: ``[G, R, T]`` query and ``[G, T]`` key components in,
    the same seven tensors as :func:`anomaly.probe.sweep.sweep_slices` out."""
    a, wa = phases(q_re, q_im)
    b, wb = phases(k_re, k_im)
    g, r, t = a.shape
    valid_a, valid_b = wa > 0, wb > 0
    wk = torch.where(valid_b, wb, torch.zeros_like(wb))  # a zero key weighs 0
    wcum = torch.cumsum(wk, -1) - wk  # [G, T]: Σ_{n<m} |k_n|
    weight_all = (wa * wcum[:, None, :]).sum(-1)
    s_t, s_r = (min(block, t), min(block, t)) if block else _block_sizes(t, r)
    step = _group_chunk(t, r, max(s_t, s_r), a.device)
    parts = [
        _case_d(a[i : i + step], wa[i : i + step], b[i : i + step], wk[i : i + step], s_t, s_r, tol)
        for i in range(0, g, step)
    ]
    count = torch.cat([p[0] for p in parts])
    weight = torch.cat([p[1] for p in parts])
    hist = _theta_hist(a, valid_a, b, valid_b, bins, min(t, 8))
    zq, zk = torch.polar(wa, a), torch.polar(wb, b)
    zk_prefix = torch.cumsum(zk, -1) - zk  # Σ_{n<m} k_n
    product = (zq * zk_prefix[:, None, :].conj()).sum(-1)
    return count, weight, hist, weight_all, product, wa.sum(-1), wb.sum(-1)


def _block_sizes(t: int, r: int) -> tuple[int, int]:
    """``(s_t, s_r)``: time and rank block sizes (see the module docstring for the costs).

    Tuned on CPU at T = 2048, R = 3 (SmolLM2-135M); any sizes give the same result.
    """
    s_r = max(2, min(8, round(math.sqrt(t / 32))))
    s_t = 2 * s_r
    return min(t, s_t), min(t, s_r)


def _group_chunk(t: int, r: int, s: int, device: torch.device) -> int:
    """Groups per chunk: on CPU the ``[chunk, s, 2R, T]`` work arrays stay cache-sized (a
    few hundred kB); on a GPU, large chunks keep the kernels few."""
    budget = 1 << (26 if device.type == "cuda" else 19)
    return max(1, budget // (2 * r * t * s))


def _small_int(n: int) -> torch.dtype:
    return torch.int16 if n < 2**15 else torch.int32


def _case_d(
    a: Tensor, wa: Tensor, b: Tensor, wk: Tensor, s_t: int, s_r: int, tol: float
) -> tuple[Tensor, Tensor]:
    """``(count_d [G, R] int64, weight_d [G, R] float64)`` for a chunk of groups.

    Query ``m`` is in case (d) with key ``n < m`` iff ``[b_n < upper_m] − [b_n ≤ lower_m]``
    (+1 when the arc wraps through 0, ``lower_m > upper_m``) is 1, with the arc's ends
    ``lower = a + tol`` and ``upper = a + π`` reduced mod 2π. With ``F`` the rank thresholds of those two
    conditions, its count is ``P(m, F_lt) − P(m, F_le) (+ #{valid n < m})``, ``P`` the
    dominance count ``#{n < m : r_n < f}``, assembled from three disjoint parts: keys in
    earlier time blocks and earlier rank blocks (2-D prefix table), keys in earlier time
    blocks and the threshold's own rank block (its at most ``s_r`` keys, ranks ``f − j``),
    keys of the query's own time block before it (at most ``s_t``, tokens ``m − d``). The
    last two are one vectorised pass over all offsets ``j``, ``d`` and queries of the chunk.
    """
    g, r, t = a.shape
    dev = a.device
    valid_a, valid_b = wa > 0, wk > 0
    nbt, nbr = -(-t // s_t), -(-t // s_r)
    itype = _small_int(t + s_t + 2)
    pos = torch.arange(t, device=dev)

    # ---- keys sorted by phase; a zero key sorts last (+inf) and meets no condition
    b_key = torch.where(valid_b, b, torch.full_like(b, math.inf))
    sorted_b, order = torch.sort(b_key, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, pos.expand(g, t))  # [G, T] by time

    # ---- rank thresholds: F_lt = #{b < upper}, F_le = #{b ≤ lower}; a zero query gets −1 (F = 0)
    below = torch.full_like(a, -1.0)
    lower = a + tol  # tol = 0 keeps a bit for bit
    lower = torch.where(lower >= TWO_PI, lower - TWO_PI, lower)
    upper = torch.where(a < math.pi, a + math.pi, a - math.pi)
    wrap = (lower > upper) & valid_a
    upper = torch.where(valid_a, upper, below)
    lower = torch.where(valid_a, lower, below)
    # b ≤ lower ⟺ b < nextafter(lower, +∞): both thresholds are strict
    a_next = torch.nextafter(lower, torch.full_like(lower, math.inf))
    x = torch.stack([upper.reshape(g, r * t), a_next.reshape(g, r * t)], 1).reshape(g, 2 * r * t)
    f = _count_below(sorted_b, valid_b.sum(-1), x)  # [G, 2·R·T]: F_lt, then F_le
    qblk = (pos // s_t).repeat(2 * r)  # [2·R·T] time block of each query

    # ---- part 1: 2-D prefix table C[β, γ] = #{n : time block < β, rank block < γ}
    tblk = pos // s_t
    cell = (torch.arange(g, device=dev)[:, None] * nbt + tblk) * nbr + rank // s_r  # [G, T]
    ncell = g * nbt * nbr
    grid_n = torch.bincount(cell.reshape(-1), minlength=ncell).reshape(g, nbt, nbr)
    grid_w = torch.bincount(cell.reshape(-1), weights=wk.reshape(-1), minlength=ncell).reshape(g, nbt, nbr)

    def exclusive_2d(x: Tensor) -> Tensor:  # [G, nbt, nbr] -> [G, nbt·(nbr+1)], rows β < nbt
        x = torch.nn.functional.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))  # [G, nbt+1, nbr+1]
        return x[:, :nbt].reshape(g, -1)

    gam = torch.div(f, s_r, rounding_mode="floor")  # rank block of the threshold
    idx = qblk * (nbr + 1) + gam
    cnt = exclusive_2d(grid_n).gather(1, idx)  # int64 [G, 2RT]
    wsum = exclusive_2d(grid_w).gather(1, idx)

    # ---- part 2: keys of ranks γ·s_r ... f − 1 in earlier time blocks: ranks f − j, j ≤ δ
    # by_rank_*[s_r + ρ]: time block and weight of the key of rank ρ (front padding: never used)
    by_rank_t = torch.full((g, s_r + t), nbt, dtype=itype, device=dev)
    by_rank_t[:, s_r:] = tblk[order].to(itype)
    by_rank_w = torch.zeros(g, s_r + t, dtype=wk.dtype, device=dev)
    by_rank_w[:, s_r:] = wk.gather(1, order)
    delta = (f - gam * s_r).to(itype)  # keys of block γ below f (δ < s_r)
    j = torch.arange(1, s_r, device=dev)[:, None, None]  # [J, 1, 1] offsets, one pass for all
    at = (f + s_r) - j  # [J, G, 2RT]: index of rank f − j
    take = by_rank_t.expand(s_r - 1, -1, -1).gather(2, at) < qblk.to(itype)
    take &= delta >= j.to(itype)
    cnt += take.sum(0)
    wsum += (take * by_rank_w.expand(s_r - 1, -1, -1).gather(2, at)).sum(0)

    # ---- part 3: keys n = m − d of the query's own time block (d < s_t), all d in one pass.
    # Both thresholds at once: [b < upper] − [b ≤ a] = sgn·[lo ≤ r_n < hi] over the interval.
    f3 = f.reshape(g, 2, r, t)
    lo = torch.minimum(f3[:, 0], f3[:, 1]).to(itype)[:, None]  # [G, 1, R, T]
    hi = torch.maximum(f3[:, 0], f3[:, 1]).to(itype)[:, None]
    sgn_neg = f3[:, 0] < f3[:, 1]  # F_lt < F_le: the interval counts −1 (wrapped arc)
    d = torch.arange(1, s_t, device=dev)[:, None]  # [D, 1]
    src = (pos - d).clamp_(min=0)  # [D, T]
    same = (pos % s_t) >= d  # key m − d lies in m's block
    rk_d = torch.where(same, rank.to(itype)[:, src], t + 1)[:, :, None, :]  # [G, D, 1, T]
    inside = (rk_d >= lo) & (rk_d < hi)  # [G, D, R, T]
    in_n = inside.sum(1, dtype=torch.int64)
    in_w = (inside * wk[:, src][:, :, None, :]).sum(1)
    in_n = torch.where(sgn_neg, -in_n, in_n)
    in_w = torch.where(sgn_neg, -in_w, in_w)

    cnt = cnt.reshape(g, 2, r, t)
    wsum = wsum.reshape(g, 2, r, t)
    per_m_n = cnt[:, 0] - cnt[:, 1] + in_n  # [G, R, T]
    per_m_w = wsum[:, 0] - wsum[:, 1] + in_w
    vcum = torch.cumsum(valid_b, -1, dtype=torch.int64) - valid_b.long()  # valid keys before m
    wcum = torch.cumsum(wk, -1) - wk
    count_d = per_m_n.sum(-1) + (wrap * vcum[:, None, :]).sum(-1)
    wa_wrap = torch.where(wrap, wa, torch.zeros_like(wa))
    weight_d = (per_m_w * wa).sum(-1) + (wa_wrap * wcum[:, None, :]).sum(-1)
    return count_d, weight_d


def _count_below(sorted_b: Tensor, n_valid: Tensor, x: Tensor) -> Tensor:
    """``#{b < x}`` per row (``searchsorted``, but faster for ``T`` in the thousands).

    Phases are bucketed into ``K ≈ 4T`` equal buckets by ``⌊v·K/2π⌋``, the same
    (monotone) float formula for keys and queries, so a key in a lower (higher) bucket than
    ``x`` is below (above) it; only the keys of ``x``'s own bucket, a contiguous run of the
    sorted keys, are binary-searched, in as many vectorised steps as the fullest bucket
    needs. Keys past ``n_valid`` (``+inf``) are never counted.

    Args:
        sorted_b: ``[G, T]`` ascending (valid keys first).
        n_valid: ``[G]`` valid keys per row.
        x: ``[G, N]`` thresholds (below ``2π``; negative ones count 0).
    """
    g, t = sorted_b.shape
    dev = sorted_b.device
    k = 1 << max(4, (4 * t - 1).bit_length())
    scale = k / TWO_PI
    pos = torch.arange(t, device=dev)
    kb = torch.floor(sorted_b * scale).clamp_(0, k - 1)
    kb = torch.where(pos < n_valid[:, None], kb, torch.full_like(kb, k)).long()  # invalid: bucket k
    rows = torch.arange(g, device=dev)[:, None] * (k + 2)
    start = torch.bincount((rows + 1 + kb).reshape(-1), minlength=g * (k + 2)).reshape(g, k + 2).cumsum_(1)
    occupancy = int((start[:, 1 : k + 1] - start[:, :k]).max())  # fullest bucket (valid keys)
    kx = torch.floor(x * scale).clamp_(0, k - 1).long()
    lo, hi = start.gather(1, kx), start.gather(1, kx + 1)  # the run of x's bucket: [lo, hi)
    padded = torch.nn.functional.pad(sorted_b, (0, 1), value=math.inf)
    for _ in range(occupancy.bit_length()):
        mid = (lo + hi) >> 1
        v = padded.gather(1, mid)
        go = (v < x) & (mid < hi)
        lo = torch.where(go, mid + 1, lo)
        hi = torch.where(go, hi, mid)
    return lo


def _theta_hist(a, valid_a, b, valid_b, bins, s) -> Tensor:
    """Causal pairs per binned Θ: ``[G, R, bins]`` int64 (pairs with a zero slice left out).

    Across time blocks: per-block query histograms times prefix key histograms (one
    batched matmul, exact: float32 while every count stays below 2²⁴, else float64).
    Within a block: the at most ``s(s−1)/2`` pairs counted directly by ``bincount``. A zero
    slice goes to a spare bin ``bins`` that is dropped (no boolean indexing).
    """
    g, r, t = a.shape
    nblk = -(-t // s)
    dev = a.device
    ftype = torch.float32 if t * t < 2**24 else torch.float64
    nb = bins + 1
    # (a·bins)/2π, the brute-force formula, so that phases on a bin edge bin identically.
    ba = torch.clamp((a * bins / TWO_PI).long(), max=bins - 1)  # [G, R, T]
    bb = torch.clamp((b * bins / TWO_PI).long(), max=bins - 1)  # [G, T]
    ba = torch.where(valid_a, ba, bins)
    bb = torch.where(valid_b, bb, bins)
    blk = torch.arange(t, device=dev) // s  # [T] block of each token
    # query histograms per block, laid out [G, nblk, R, nb] for the matmul
    rows = (torch.arange(g, device=dev)[:, None, None] * nblk + blk) * r + torch.arange(r, device=dev)[:, None]
    qa = torch.bincount((rows * nb + ba).reshape(-1), minlength=g * nblk * r * nb)
    qa = qa.to(ftype).reshape(g, nblk, r * nb)
    kb = torch.bincount(((torch.arange(g, device=dev)[:, None] * nblk + blk) * nb + bb).reshape(-1), minlength=g * nblk * nb)
    kb = kb.to(ftype).reshape(g, nblk, nb)
    kprefix = kb.cumsum(1) - kb  # keys in earlier blocks
    joint = torch.bmm(qa.transpose(1, 2), kprefix).reshape(g, r, nb, nb)[:, :, :bins, :bins]  # [G, R, u, v]
    u = torch.arange(bins, device=dev)
    # hist[δ] = Σ_u joint[u, (u − δ) mod bins]
    diag = (u[:, None] - u[None, :]) % bins  # [u, δ] -> v
    hist = joint.gather(3, diag[None, None].expand(g, r, bins, bins)).sum(2)  # [G, R, δ]
    hist = hist.round().long()
    # in-block pairs (m, n), n < m; a pair with a zero slice lands in the spare bin
    mi, ni = torch.tril_indices(s, s, -1, device=dev)  # positions inside a block
    m = (torch.arange(nblk, device=dev)[:, None] * s + mi).reshape(-1)  # [nblk·P]
    n = (torch.arange(nblk, device=dev)[:, None] * s + ni).reshape(-1)
    keep = m < t
    m, n = m[keep], n[keep]
    qm, kn = ba[..., m], bb[:, None, n]  # [G, R, P'], [G, 1, P']
    d = torch.where((qm == bins) | (kn == bins), bins, (qm - kn) % bins)
    gr = torch.arange(g * r, device=dev).reshape(g, r, 1)
    hist += torch.bincount((gr * nb + d).reshape(-1), minlength=g * r * nb).reshape(g, r, nb)[..., :bins]
    return hist
