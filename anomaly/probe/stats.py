"""Pair statistics of the initial angle over all causal (query, key) pairs, without pairs.

For one slice ``j`` of one head, the initial angle of the pair (query ``m``, key ``n``) is
``Θ_j(m, n) = (a_m − b_n) mod 2π`` with per-token phases ``a_m = arg q_{m,j}`` and
``b_n = arg k_{n,j}`` of the **pre-RoPE** vectors (SPEC §2): RoPE adds ``(m − n)θ_j`` to
it, which is what makes it the *initial* angle. A causal pair (``m > n``) is in case (d)
when ``Θ_j ∈ (π, 2π)`` (SPEC §3).

Counting all ``T(T−1)/2`` pairs by broadcasting costs ``O(T²)`` per slice. Here (SPEC §3's
counting tip) everything is built from per-token phases:

* **Exact case-(d) counts** (and their ``|q_j||k_j|`` weights). ``Θ ∈ (π, 2π)`` is
  ``b_n ∈ (a_m, a_m + π)`` for ``a_m < π`` and ``b_n ∉ [a_m − π, a_m]`` for ``a_m ≥ π``: an
  arc of the circle. With the keys sorted by phase (rank ``r_n``), ``[b_n < x]`` is
  ``[r_n < F(x)]`` with ``F(x) = #{b < x}`` (``searchsorted``), so a query's count is
  ``P(m, F(upper)) − P(m, F_≤(a)) (+ #{valid n < m} when the arc wraps)`` with the
  dominance count ``P(m, f) = #{n < m : r_n < f}``. ``P`` is split on a grid of time
  blocks (``s_t`` tokens) × rank blocks (``s_r`` ranks): keys in earlier time blocks *and*
  earlier rank blocks come from a 2-D prefix table of cell counts
  (``[T/s_t, T/s_r]``), keys of the query's own rank block from the at most ``s_r``
  keys of that block, keys of the query's own time block from the at most ``s_t`` keys
  of that block, compared by rank. No binning is involved, so the count equals the
  brute-force count over all pairs exactly, and the weighted sum is the same sum with
  ``|k_{n,j}|`` in place of 1. Cost ``O(T²/(s_t s_r) + R·T·(s_t + s_r))`` per slice.
* **Θ histograms.** Phases are binned into ``bins`` equal bins and a pair goes to bin
  ``(bin(a_m) − bin(b_n)) mod bins``, which is within one bin of the bin of its exact Θ.
  Built from per-block phase histograms and their prefix sums (one small matmul per
  slice) plus the in-block pairs: ``O(T·bins²/s + T·s)`` per slice.
* **Mean slice product** ``Σ_{n<m} q_{m,j} k̄_{n,j} = Σ_m q_{m,j} Σ_{n<m} k̄_{n,j}``: prefix
  sums, exact. Its angle is the magnitude-weighted circular mean of Θ; it is the slice's
  average contribution to the score before rotation.

On the CPU the probe computes all of this in one compiled pass per group instead
(:mod:`anomaly.probe.sweep`: a Fenwick tree over phase ranks, swept in time order), which
is exact too and several times faster; the vectorised form here serves GPUs, and each
checks the other in the tests.

All functions take phases and magnitudes already grouped for grouped-query attention:
``G`` groups (key head × slice), ``R`` query heads sharing each key head. Memory is
``O(G·R·T·max(s_t, s_r) + G·T²/(s_t s_r))``: nothing of size ``T²`` per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TWO_PI = 2 * math.pi


def phases(z: Tensor) -> tuple[Tensor, Tensor]:
    """Phase in ``[0, 2π)`` and magnitude of complex slices (float64).

    The phase of an exactly-zero slice is reported as 0; callers treat such tokens as
    having initial angle 0 (as :func:`anomaly.analytic.initial_angle` does).
    """
    re, im = z.real.double(), z.imag.double()
    a = torch.atan2(im, re)  # = angle(z.to(complex128)), bit for bit
    a = torch.where(a < 0, a + TWO_PI, a)  # = remainder(a, 2π) for a in [−π, π]
    a = torch.where(a >= TWO_PI, torch.zeros_like(a), a)
    return a, torch.hypot(re, im)


@dataclass
class PairStats:
    """Statistics over causal pairs, one entry per (group, query head in group)."""

    count_d: Tensor
    """``[G, R]`` int64: causal pairs (m > n) in case (d)."""
    weight_d: Tensor
    """``[G, R]`` float64: ``Σ |q_j||k_j|`` over those pairs."""
    weight_all: Tensor
    """``[G, R]`` float64: ``Σ |q_j||k_j|`` over all causal pairs."""
    hist: Tensor
    """``[G, R, bins]`` int64: causal pairs per Θ bin (binned phases, ±1 bin)."""
    mean_product: Tensor
    """``[G, R]`` complex128: ``Σ_{m>n} q_{m,j} k̄_{n,j}``."""
    pairs: int
    """``T(T−1)/2``: causal pairs per slice."""
    q_norm: Tensor | None = None
    """``[G, R]`` float64: mean ``|q_j|`` over tokens."""
    k_norm: Tensor | None = None
    """``[G]`` float64: mean ``|k_j|`` over tokens."""


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


def pair_stats(
    a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, *, bins: int = 64, block: int | None = None,
    method: str | None = None,
) -> PairStats:
    """Case-(d) counts, weights, Θ histograms and mean products over causal pairs.

    Args:
        a, wa: query phases in ``[0, 2π)`` and magnitudes, ``[G, R, T]`` float64.
        b, wb: key phases and magnitudes, ``[G, T]`` float64.
        bins: Θ histogram bins over ``[0, 2π)``.
        block: ``"blocks"`` only: time and rank block size (default: balanced for ``T``
            and ``R``, see :func:`_block_sizes`); any value gives the same result.
        method: ``"sweep"`` (one compiled pass over time, :mod:`anomaly.probe.sweep`;
            the default on the CPU) or ``"blocks"`` (the vectorised tensor form below; the
            default on a GPU). Both are exact and give identical results.

    Returns:
        :class:`PairStats`. A zero query or key slice has Θ = 0 (never case (d)).
    """
    g, r, t = a.shape
    valid_a, valid_b = wa > 0, wb > 0
    wk = torch.where(valid_b, wb, torch.zeros_like(wb))  # key weights; a zero key weighs 0
    wcum = torch.cumsum(wk, -1) - wk  # [G, T]: Σ_{n<m} |k_n|
    weight_all = (wa * wcum[:, None, :]).sum(-1)
    method = method or _default_method(a)
    if method == "sweep":
        from anomaly.probe.sweep import sweep_phases

        arrays = (x.detach().to(torch.float64).cpu().contiguous().numpy() for x in (a, wa, b, wk))
        count_d, weight_d, hist = (torch.from_numpy(x).to(a.device) for x in sweep_phases(*arrays, bins))
    elif method == "blocks":
        s_t, s_r = (min(block, t), min(block, t)) if block else _block_sizes(t, r)
        step = _group_chunk(t, r, max(s_t, s_r), a.device)
        parts = [
            _case_d(a[i : i + step], wa[i : i + step], b[i : i + step], wk[i : i + step], s_t, s_r)
            for i in range(0, g, step)
        ]
        count_d = torch.cat([p[0] for p in parts])
        weight_d = torch.cat([p[1] for p in parts])
        hist = _theta_hist(a, valid_a, b, valid_b, bins, min(t, 8))
    else:
        raise ValueError(f"unknown pair_stats method {method!r}; use 'sweep' or 'blocks'")
    pairs = _zero_slices_to_bin_0(hist, t)

    zq = torch.polar(wa, a)
    zk = torch.polar(wb, b)
    zk_prefix = torch.cumsum(zk, -1) - zk  # Σ_{n<m} k_n
    mean_product = (zq * zk_prefix[:, None, :].conj()).sum(-1)
    return PairStats(count_d, weight_d, weight_all, hist, mean_product, pairs, wa.mean(-1), wb.mean(-1))


def slice_pair_stats(
    q_re: Tensor, q_im: Tensor, k_re: Tensor, k_im: Tensor, *, bins: int = 64, method: str | None = None
) -> PairStats:
    """:func:`pair_stats` straight from the slices' components (what the probe calls).

    Args:
        q_re, q_im: ``[G, R, T]`` real and imaginary parts of the query slices.
        k_re, k_im: ``[G, T]`` of the key slices.
        bins, method: as :func:`pair_stats`. On the CPU the default ``"sweep"`` computes
            the phase order (a pseudo-angle, no atan2), magnitudes and every statistic in
            one compiled pass (:func:`anomaly.probe.sweep.sweep_slices`) with no float64
            tensor passes.
    """
    method = method or _default_method(q_re)
    if method != "sweep":
        a, wa = phases(torch.complex(q_re.float(), q_im.float()))
        b, wb = phases(torch.complex(k_re.float(), k_im.float()))
        return pair_stats(a, wa, b, wb, bins=bins, method=method)
    from anomaly.probe.sweep import sweep_slices

    g, r, t = q_re.shape
    arrays = (x.detach().cpu().contiguous().numpy() for x in (q_re, q_im, k_re, k_im))
    count, weight, hist, weight_all, product, q_abs, k_abs = (
        torch.from_numpy(x) for x in sweep_slices(*arrays, bins)
    )
    pairs = _zero_slices_to_bin_0(hist, t)
    mean_product = torch.complex(product[..., 0], product[..., 1])
    return PairStats(count, weight, weight_all, hist, mean_product, pairs, q_abs / t, k_abs / t)


def _default_method(x: Tensor) -> str:
    """The compiled sweep on the CPU; the vectorised blocks where a sequential sweep does not
    fit (GPU)."""
    return "sweep" if x.device.type == "cpu" else "blocks"


def _zero_slices_to_bin_0(hist: Tensor, t: int) -> int:
    """Put the causal pairs the counting left out (a zero slice: Θ = 0) into bin 0 of
    ``hist [..., bins]`` in place; returns ``T(T−1)/2``, the causal pairs per slice."""
    pairs = t * (t - 1) // 2
    hist[..., 0] += pairs - hist.sum(-1)
    return pairs


def _case_d(a: Tensor, wa: Tensor, b: Tensor, wk: Tensor, s_t: int, s_r: int) -> tuple[Tensor, Tensor]:
    """``(count_d [G, R] int64, weight_d [G, R] float64)`` for a chunk of groups.

    Query ``m`` is in case (d) with key ``n < m`` iff ``[b_n < upper_m] − [b_n ≤ a_m]``
    (+1 when the arc wraps, ``a_m ≥ π``) is 1. With ``F`` the rank thresholds of those two
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

    # ---- rank thresholds: F_lt = #{b < upper}, F_le = #{b ≤ a}; a zero query gets −1 (F = 0)
    wrap = (a >= math.pi) & valid_a
    below = torch.full_like(a, -1.0)
    a_le = torch.where(valid_a, a, below)
    upper = torch.where(valid_a, torch.where(a < math.pi, a + math.pi, a - math.pi), below)
    # b ≤ a ⟺ b < nextafter(a, +∞): both thresholds are strict
    a_next = torch.nextafter(a_le, torch.full_like(a_le, math.inf))
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
