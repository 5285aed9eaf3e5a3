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
  arc of the circle. With the keys' phases sorted (ranks ``r_n``), the arc is a rank
  interval found by ``searchsorted``, and the count over the causal prefix is
  ``P(m, r) = #{n < m : r_n < r}``. ``P`` comes from a table of prefix counts at block
  boundaries (``[T/s, T]``, a cumulative per-block rank histogram) plus the at most ``s``
  keys of the query's own block compared directly. No binning is involved, so the count
  equals the brute-force count over all pairs exactly. Cost ``O(T²/s + T·s)`` per slice.
* **Θ histograms.** Phases are binned into ``bins`` equal bins and a pair goes to bin
  ``(bin(a_m) − bin(b_n)) mod bins``, which is within one bin of the bin of its exact Θ.
  Built from per-block phase histograms and their prefix sums (one small matmul per
  slice) plus the in-block pairs: ``O(T·bins + T·s)`` per slice.
* **Mean slice product** ``Σ_{n<m} q_{m,j} k̄_{n,j} = Σ_m q_{m,j} Σ_{n<m} k̄_{n,j}``: prefix
  sums, exact. Its angle is the magnitude-weighted circular mean of Θ; it is the slice's
  average contribution to the score before rotation.

All functions take phases and magnitudes already grouped for grouped-query attention:
``G`` groups (key head × slice), ``R`` query heads sharing each key head.
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
    z = z.to(torch.complex128)
    a = torch.remainder(torch.angle(z), TWO_PI)
    a = torch.where(a >= TWO_PI, torch.zeros_like(a), a)
    return a, z.abs()


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


def _block_size(t: int, r: int) -> int:
    # Balances the [T/s, T] prefix table against R·T·s in-block comparisons.
    return max(1, min(t, 32))


def pair_stats(
    a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, *, bins: int = 64, block: int | None = None
) -> PairStats:
    """Case-(d) counts, weights, Θ histograms and mean products over causal pairs.

    Args:
        a, wa: query phases in ``[0, 2π)`` and magnitudes, ``[G, R, T]`` float64.
        b, wb: key phases and magnitudes, ``[G, T]`` float64.
        bins: Θ histogram bins over ``[0, 2π)``.
        block: time block ``s`` (default ``≈ √(T/R)``); any value gives the same result.

    Returns:
        :class:`PairStats`. A zero query or key slice has Θ = 0 (never case (d)).
    """
    g, r, t = a.shape
    s = block or _block_size(t, r)
    nblk = -(-t // s)
    pad = nblk * s - t
    dev = a.device
    valid_a, valid_b = wa > 0, wb > 0

    # ---- ranks of the keys' phases; invalid keys sort last and are never counted
    b_key = torch.where(valid_b, b, torch.full_like(b, math.inf))
    sorted_b, order = torch.sort(b_key, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(t, device=dev).expand(g, t))  # [G, T]

    # ---- rank interval of the case-(d) arc for every query
    flat_a = a.reshape(g, r * t).contiguous()
    upper = torch.where(flat_a < math.pi, flat_a + math.pi, flat_a - math.pi)
    lo = torch.searchsorted(sorted_b, flat_a, right=True).reshape(g, r, t)  # #{b <= a}
    hi = torch.searchsorted(sorted_b, upper.contiguous(), right=False).reshape(g, r, t)  # #{b < upper}
    wrap = (a >= math.pi) & valid_a  # arc = everything valid except [a − π, a]

    # ---- prefix sums over time (exclusive): valid keys and their weights before m
    wb_valid = torch.where(valid_b, wb, torch.zeros_like(wb))
    vcum = torch.cumsum(valid_b.long(), -1) - valid_b.long()  # [G, T]
    wcum = torch.cumsum(wb_valid, -1) - wb_valid  # [G, T]

    # ---- keys in earlier blocks: prefix counts over ranks, swept block by block
    beta_n, beta_w = _prefix_sweep(rank, valid_b, wb_valid, lo, hi, s)
    cross_n = beta_n[0] - beta_n[1]
    cross_w = beta_w[0] - beta_w[1]

    # ---- in-block keys n in [β·s, m): compare ranks directly
    def blocks(x: Tensor, fill) -> Tensor:  # [..., T] -> [..., nblk, s]
        x = torch.nn.functional.pad(x, (0, pad), value=fill) if pad else x
        return x.reshape(*x.shape[:-1], nblk, s)

    rk = blocks(rank, t)[:, None, :, None, :]  # [G, 1, nblk, 1, s]  (key n)
    wk = blocks(wb_valid, 0.0)[:, None, :, None, :]
    lo_b = blocks(lo, 0)[..., None]  # [G, R, nblk, s, 1]  (query m)
    hi_b = blocks(hi, 0)[..., None]
    causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril(-1)  # [m, n]: n < m
    step = ((rk < hi_b) & causal).to(torch.int8) - ((rk < lo_b) & causal).to(torch.int8)
    in_n = step.sum(-1, dtype=torch.int64).reshape(g, r, nblk * s)[..., :t]
    in_w = (step * wk).sum(-1).reshape(g, r, nblk * s)[..., :t]

    # For a ≥ π the rank interval [hi, lo) is the complement: count = valid prefix − it.
    raw_n = cross_n + in_n
    raw_w = cross_w + in_w
    vc, wc = vcum[:, None, :], wcum[:, None, :]
    per_m_n = torch.where(wrap, vc + raw_n, raw_n)
    per_m_w = torch.where(wrap, wc + raw_w, raw_w)
    per_m_n = torch.where(valid_a, per_m_n, torch.zeros_like(per_m_n))
    count_d = per_m_n.sum(-1)
    weight_d = (per_m_w * wa).sum(-1)
    weight_all = (wc * wa).sum(-1)

    hist = _theta_hist(a, valid_a, b, valid_b, bins, min(8, t))
    pairs = t * (t - 1) // 2
    # Pairs with a zero slice have Θ = 0: bin 0.
    hist[..., 0] += pairs - hist.sum(-1)

    zq = torch.polar(wa, a)
    zk_prefix = torch.cumsum(torch.polar(wb, b), -1) - torch.polar(wb, b)  # Σ_{n<m} k_n
    mean_product = (zq * zk_prefix[:, None, :].conj()).sum(-1)
    return PairStats(count_d, weight_d, weight_all, hist, mean_product, pairs)


def _prefix_sweep(rank, valid_b, wb_valid, lo, hi, s):
    """``P(m, ρ)`` over the keys in blocks before ``m``'s block, for ``ρ = hi`` and ``lo``.

    Sweeps time a block at a time: the keys seen so far are marked at their ranks, and one
    cumulative sum over ranks gives ``#{n < β·s : r_n < ρ}`` for every ``ρ`` at once, so
    each query is one lookup. ``O(T/s)`` cumulative sums of length ``T`` per group.
    Returns ``((P_hi, P_lo) counts, (P_hi, P_lo) weights)``, each ``[G, R, T]``.
    """
    g, r, t = lo.shape
    dev = lo.device
    seen_n = torch.zeros(g, t + 1, dtype=torch.int32, device=dev)  # index ρ+1 marks rank ρ
    seen_w = torch.zeros(g, t + 1, dtype=torch.float64, device=dev)
    out_n = torch.zeros(2, g, r, t, dtype=torch.int32, device=dev)
    out_w = torch.zeros(2, g, r, t, dtype=torch.float64, device=dev)
    thr = torch.stack([hi, lo]).permute(1, 0, 2, 3)  # [G, 2, R, T]
    for start in range(0, t, s):
        stop = min(start + s, t)
        if start:  # queries of this block see every key of earlier blocks
            idx = thr[..., start:stop].reshape(g, -1)  # [G, 2·R·w]
            shape = (g, 2, r, stop - start)
            out_n[..., start:stop] = seen_n.cumsum(1, dtype=torch.int32).gather(1, idx).reshape(shape).transpose(0, 1)
            out_w[..., start:stop] = seen_w.cumsum(1).gather(1, idx).reshape(shape).transpose(0, 1)
        pos = rank[:, start:stop] + 1
        seen_n.scatter_(1, pos, valid_b[:, start:stop].int())
        seen_w.scatter_(1, pos, wb_valid[:, start:stop])
    return out_n.long(), out_w


def _theta_hist(a, valid_a, b, valid_b, bins, s) -> Tensor:
    g, r, t = a.shape
    nblk = -(-t // s)
    pad = nblk * s - t
    dev = a.device
    ba = torch.clamp((a * (bins / TWO_PI)).long(), max=bins - 1)  # [G, R, T]
    bb = torch.clamp((b * (bins / TWO_PI)).long(), max=bins - 1)  # [G, T]
    blk = torch.arange(t, device=dev) // s  # [T] block of each token
    qa = torch.zeros(g, r, nblk * bins, device=dev, dtype=torch.float64)
    qa.scatter_add_(2, blk * bins + ba, valid_a.double())
    qa = qa.reshape(g, r, nblk, bins)  # [G, R, nblk, B] query phase bins per block
    kb = torch.zeros(g, nblk * bins, device=dev, dtype=torch.float64)
    kb.scatter_add_(1, blk * bins + bb, valid_b.double())
    kb = kb.reshape(g, nblk, bins)  # [G, nblk, B]
    kprefix = kb.cumsum(1) - kb  # keys in earlier blocks
    joint = torch.einsum("grbu,gbv->gruv", qa, kprefix)  # [G, R, B(query), B(key)]
    u = torch.arange(bins, device=dev)
    diff = (u[:, None] - u[None, :]) % bins  # [B, B] Θ bin of (query bin, key bin)
    hist = torch.zeros(g, r, bins, device=dev, dtype=torch.float64)
    hist.scatter_add_(2, diff.reshape(1, 1, -1).expand(g, r, -1), joint.reshape(g, r, -1))
    # in-block pairs
    pa = torch.nn.functional.pad(ba, (0, pad)) if pad else ba
    pb = torch.nn.functional.pad(bb, (0, pad)) if pad else bb
    va = torch.nn.functional.pad(valid_a, (0, pad)) if pad else valid_a
    vb = torch.nn.functional.pad(valid_b, (0, pad)) if pad else valid_b
    d = pa.reshape(g, r, nblk, s, 1).int() - pb.reshape(g, 1, nblk, 1, s).int()  # [G, R, nblk, s, s]
    d = torch.where(d < 0, d + bins, d).long()
    causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril(-1)
    keep = causal & va.reshape(g, r, nblk, s, 1) & vb.reshape(g, 1, nblk, 1, s)
    hist.scatter_add_(2, d.reshape(g, r, -1), keep.reshape(g, r, -1).double())
    return hist.round().long()
