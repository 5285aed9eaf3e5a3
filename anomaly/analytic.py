"""The RoPE–attention anomaly in closed form (docs/conventions.md §2–5).

Every function is vectorised: angles, distances and slices broadcast against each other
under the usual PyTorch rules, so a whole (Θ × distance × slice) grid is one call.

Glossary (docs/conventions.md §2–3):

* ``theta0`` — initial angle ``Θ_j = arg q_j − arg k_j`` reduced to ``[0, 2π)``,
  counter-clockwise from the key slice to the query slice.
* ``freq`` — slice frequency ``θ_j`` (an entry of :func:`anomaly.rope.inv_freq`).
* ``distance`` — ``s = m − n``, query position minus key position (``> 0`` is causal).
* slice score — ``cos(Θ_j + s·θ_j)``, times ``|q_j||k_j|`` when magnitudes are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from anomaly.rope import (
    Layout,
    RopeScaling,
    apply_rope,
    check_layout,
    duplicate_slices,
    inv_freq as rope_inv_freq,
    rope_angles,
    slice_members,
    to_complex,
)

TWO_PI = 2 * math.pi
"""A full turn; the one definition the toolkit's angle code shares."""
CASES = ("a", "b", "c", "d")
CHANCE_FRACTION = 0.5
"""Expected case-(d) share for isotropic phases: Θ is then uniform on [0, 2π), and case (d)
is the half (π, 2π)."""


def _t(x, dtype: torch.dtype = torch.float64) -> Tensor:
    """Tensor view of ``x``; python and numpy numbers become float64."""
    if isinstance(x, Tensor):
        return x if x.is_floating_point() or x.is_complex() else x.to(dtype)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def wrap_angle(x: Tensor) -> Tensor:
    """Reduce angles to ``[0, 2π)``.

    ``remainder`` alone can return exactly ``2π`` for tiny negative inputs after rounding;
    those are folded to 0 so the half-open interval holds exactly.
    """
    r = torch.remainder(x, TWO_PI)
    return torch.where(r >= TWO_PI, torch.zeros_like(r), r)


# --------------------------------------------------------------------------------------
# Initial angle, scenarios, τ
# --------------------------------------------------------------------------------------


def initial_angle(q: Tensor, k: Tensor, layout: Layout = "half") -> Tensor:
    """Initial angle ``Θ_j`` in ``[0, 2π)`` from ``k_j`` to ``q_j``, per slice.

    Args:
        q, k: pre-RoPE vectors ``[..., d]`` (broadcastable against each other).
        layout: how slices sit in the last dimension.

    Returns:
        ``[..., d/2]``; a slice where ``q_j`` or ``k_j`` is zero gets angle 0.
    """
    h = to_complex(q, layout) * to_complex(k, layout).conj()  # [..., d/2]
    return wrap_angle(torch.angle(h))


def _case_codes(theta0, m, n) -> Tensor:
    """Integer case codes 0..3 for a..d, broadcast over inputs."""
    theta = wrap_angle(_t(theta0))
    if torch.isnan(theta).any():
        raise ValueError("initial angle is NaN")
    m, n = _t(m), _t(n)
    if (m == n).any():
        raise ValueError("the scenario is undefined for m == n (the query attends to itself)")
    obtuse = theta > math.pi  # Θ in (π, 2π): cases (c) and (d)
    causal = m > n  # key before query: cases (b) and (d)
    return obtuse.long() * 2 + causal.long()


def scenario(theta0, m, n):
    """Fig. 3 case of a slice: ``"a"``, ``"b"``, ``"c"`` or ``"d"`` (docs/conventions.md §3).

    ========  =========  ============
    case      positions  initial angle
    ========  =========  ============
    (a)       m < n      Θ ≤ π
    (b)       m > n      Θ ≤ π
    (c)       m < n      Θ > π
    (d)       m > n      Θ > π
    ========  =========  ============

    Angles are reduced to ``[0, 2π)`` first. At exactly ``Θ = π`` the slice score sits at
    its minimum and rises in both directions; the table (and so this function) still
    calls it (a)/(b): a measure-zero boundary that :func:`is_rising` treats exactly.

    Returns a ``str`` for scalar inputs and a numpy array of ``str`` otherwise.

    Raises:
        ValueError: if ``m == n`` anywhere, or an angle is NaN.
    """
    codes = _case_codes(theta0, m, n)  # 2·obtuse + causal
    out = np.array(CASES)[codes.numpy()]
    return str(out.item()) if codes.ndim == 0 else out


def _case_array(case) -> np.ndarray:
    arr = np.asarray(case)
    bad = ~np.isin(arr, CASES)
    if bad.any():
        raise ValueError(f"unknown case {arr[bad].flat[0]!r}; use one of a, b, c, d")
    return arr


def diminished_tokens(theta0, freq, case) -> Tensor:
    """τ: how many tokens the slice score keeps *rising* for as the distance grows.

    ``Θ/θ`` in case (a), ``(2π − Θ)/θ`` in case (d), 0 in the expected cases (b), (c).
    Continuous (in tokens); see :func:`abnormal_positions` for the integer count.

    Args:
        theta0: initial angles (reduced to ``[0, 2π)``).
        freq: slice frequencies ``θ_j > 0``.
        case: ``"a"``..``"d"``, scalar or array, broadcast against the others.
    """
    theta, freq = wrap_angle(_t(theta0)), _t(freq)
    if (freq <= 0).any():
        raise ValueError("slice frequencies must be positive")
    case = _case_array(case)
    is_a = torch.as_tensor(case == "a")
    is_d = torch.as_tensor(case == "d")
    tau_a = theta / freq
    tau_d = (TWO_PI - theta) / freq
    zero = torch.zeros((), dtype=tau_a.dtype)
    return torch.where(is_a, tau_a, torch.where(is_d, tau_d, zero))


def causal_tau(theta0, freq) -> Tensor:
    """τ for a causal head (``m > n``): ``(2π − Θ)/θ`` where ``Θ > π`` (case d), else 0."""
    theta, freq = wrap_angle(_t(theta0)), _t(freq)
    return torch.where(theta > math.pi, (TWO_PI - theta) / freq, torch.zeros_like(theta))


def abnormal_positions(theta0, freq, causal: bool = True) -> Tensor:
    """Number of integer distances ``1 ≤ |s| < τ`` inside the abnormal area.

    These are the keys closer than the slice's first rotary border whose score is still
    rising with distance: exactly ``ceil(τ) − 1`` for ``τ > 0`` and 0 otherwise.

    Args:
        theta0, freq: broadcastable initial angles and slice frequencies.
        causal: ``True`` for ``m > n`` (cases b/d), ``False`` for ``m < n`` (cases a/c).
    """
    theta = wrap_angle(_t(theta0))
    if causal:
        tau = causal_tau(theta, freq)
    else:
        tau = torch.where(theta <= math.pi, theta / _t(freq), torch.zeros_like(theta))
    return torch.clamp(torch.ceil(tau) - 1, min=0)


def is_rising(theta0, freq, distance) -> Tensor:
    """Whether ``cos(Θ + sθ)`` increases with ``|s|`` at signed distance ``s``.

    Exact at the boundaries (``Θ = π`` rises both ways; ``Θ = 0`` falls both ways): the
    derivative in ``|s|`` is ``−sign(s)·θ·sin(Θ + sθ)``; where it is zero (at a border)
    the second derivative's sign decides.
    """
    theta, freq, s = wrap_angle(_t(theta0)), _t(freq), _t(distance)
    phase = theta + s * freq
    slope = -torch.sign(s) * torch.sin(phase)
    # At a border the score is at an extremum: rising iff it is a minimum (cos = -1).
    at_border = slope.abs() < 1e-12
    return torch.where(at_border, torch.cos(phase) < 0, slope > 0)


# --------------------------------------------------------------------------------------
# RoPE scores
# --------------------------------------------------------------------------------------


def slice_score(theta0, distance, freq, magnitude=1.0) -> Tensor:
    """Slice score ``magnitude · cos(Θ + s·θ)``, broadcast over every argument."""
    return _t(magnitude) * torch.cos(_t(theta0) + _t(distance) * _t(freq))


def slice_scores(q: Tensor, k: Tensor, m, n, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """Per-slice terms ``|q_j||k_j| cos(Θ_j + (m−n)θ_j)`` of the RoPE score, ``[..., d/2]``.

    ``q``, ``k`` are ``[..., d]``; ``m``, ``n`` broadcast against ``q.shape[:-1]``.
    """
    h = to_complex(q, layout) * to_complex(k, layout).conj()  # [..., d/2]
    s = _t(m).to(inv_freq.dtype) - _t(n).to(inv_freq.dtype)
    angles = rope_angles(s, inv_freq)  # [..., d/2]
    return (h * torch.polar(torch.ones_like(angles), angles)).real


def rope_score(q: Tensor, k: Tensor, m, n, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """RoPE attention score ``Re⟨f(q, m), f(k, n)⟩`` (unscaled), ``[...]``.

    Args:
        q, k: pre-RoPE vectors ``[..., d]``.
        m, n: query and key positions, broadcast against ``q.shape[:-1]``.
        inv_freq: ``[d/2]``.
    """
    return slice_scores(q, k, m, n, inv_freq, layout).sum(-1)


def score_curve(q: Tensor, k: Tensor, distances, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """A head's RoPE score versus distance: ``[..., len(distances)]`` for ``q, k [..., d]``."""
    s = _t(distances)
    return rope_score(q[..., None, :], k[..., None, :], s, torch.zeros_like(s), inv_freq, layout)


# --------------------------------------------------------------------------------------
# Rotary borders and interpolation (App. D.2)
# --------------------------------------------------------------------------------------


def first_border(theta0, freq) -> Tensor:
    """Causal distance ``s > 0`` of the first rotary border: where ``Θ + sθ`` first hits a
    multiple of π and the slice score's monotonicity flips.

    Equals τ in case (d); in case (b) it is where the falling score turns.
    """
    theta, freq = wrap_angle(_t(theta0)), _t(freq)
    rem = torch.remainder(theta, math.pi)
    return (math.pi - rem) / freq


def rotary_borders(theta0: float, freq: float, max_distance: float) -> Tensor:
    """All causal borders ``0 < s ≤ max_distance`` of one slice (float64, ascending)."""
    s1 = float(first_border(theta0, freq))
    step = math.pi / float(freq)
    count = max(0, math.floor((max_distance - s1) / step) + 1) if s1 <= max_distance else 0
    return s1 + step * torch.arange(count, dtype=torch.float64)


@dataclass
class InterpolationEffect:
    """How a frequency scaling changes each slice's abnormal area (App. D.2)."""

    inv_freq: Tensor
    """``[d/2]`` unscaled frequencies."""
    scaled_inv_freq: Tensor
    """``[d/2]`` frequencies under the scaling."""
    tau: Tensor
    """``[..., d/2]`` τ before scaling (causal, case d), in tokens."""
    scaled_tau: Tensor
    """``[..., d/2]`` τ after scaling."""
    positions: Tensor
    """``[..., d/2]`` integer positions in the abnormal area before scaling."""
    scaled_positions: Tensor
    """``[..., d/2]`` integer positions in the abnormal area after scaling."""
    ratio: Tensor
    """``[d/2]`` exact growth of τ: ``θ_j / θ'_j`` (independent of Θ)."""
    paper_ratio: Tensor
    """``[d/2]`` the paper's claim: ``k`` for PI, ``λ^(2j/d)`` for NTK."""


def interpolation_effect(
    theta0, head_dim: int, base: float, scaling: RopeScaling
) -> InterpolationEffect:
    """τ and abnormal-area sizes per slice with and without a scaling (PI, NTK, YaRN, …).

    For any scaling, ``τ'_j = (2π − Θ_j)/θ'_j = τ_j · θ_j/θ'_j``. For PI that ratio is
    exactly ``k``. For NTK-aware scaling (``base' = base·λ^(d/(d−2))``) it is
    ``λ^(2j/(d−2))``: the paper's ``λ^(2j/d)`` is its large-``d`` approximation.
    """
    base_f = rope_inv_freq(head_dim, base)
    scaled = rope_inv_freq(head_dim, base, scaling)
    theta = _t(theta0)
    tau, tau2 = causal_tau(theta, base_f), causal_tau(theta, scaled)
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    if scaling.type in ("ntk", "dynamic"):
        paper = scaling.factor ** (2 * j / head_dim)
    elif scaling.type == "linear":
        paper = torch.full_like(j, scaling.factor)
    else:
        paper = torch.full_like(j, float("nan"))  # the paper makes no claim for YaRN/LLaMA-3
    return InterpolationEffect(
        inv_freq=base_f,
        scaled_inv_freq=scaled,
        tau=tau,
        scaled_tau=tau2,
        positions=abnormal_positions(theta, base_f),
        scaled_positions=abnormal_positions(theta, scaled),
        ratio=base_f / scaled,
        paper_ratio=paper,
    )


def anomalous_slices(theta0, inv_freq, length: int) -> Tensor:
    """Slices that stay in the abnormal area across the whole context: ``θ_j·T < 2π − Θ_j``.

    Such a slice's score rises with distance for every key of a length-``T`` context, so
    it favours the farthest keys throughout. Returns a bool tensor, broadcast shape.
    """
    theta = wrap_angle(_t(theta0))
    freq = _t(inv_freq)
    return (theta > math.pi) & (freq * length < TWO_PI - theta)


def rotations(inv_freq, length: int) -> Tensor:
    """Full turns slice ``j`` makes over ``length`` tokens, ``θ_j·T/2π`` (YaRN's count)."""
    return _t(inv_freq) * length / TWO_PI


def critical_dimension(head_dim: int, base: float, train_length: int) -> int:
    """Liu et al. (2023)'s critical dimension ``d_extra = 2⌈(d/2)·log_base(T_train/2π)⌉``.

    Dimensions at or beyond it never complete a full period within the training length.
    """
    return int(2 * math.ceil((head_dim / 2) * math.log(train_length / TWO_PI) / math.log(base)))


# --------------------------------------------------------------------------------------
# Long-term decay bounds (App. D.1)
# --------------------------------------------------------------------------------------


def _abel_partial_sums(distance, inv_freq: Tensor) -> Tensor:
    """``S_{j+1} = Σ_{k≤j} e^{isθ_k}`` for ``j = 0..d/2−1``: ``[..., d/2]`` complex."""
    angles = rope_angles(_t(distance).to(inv_freq.dtype), inv_freq)  # [..., d/2]
    return torch.polar(torch.ones_like(angles), angles).cumsum(-1)


def _max_step(h: Tensor) -> Tensor:
    """``max_i |h_{i+1} − h_i|`` over ``i = 0..d/2−1`` with ``h_{d/2} = 0`` (Abel summation)."""
    padded = torch.cat([h, torch.zeros_like(h[..., :1])], dim=-1)
    return (padded[..., 1:] - padded[..., :-1]).abs().amax(-1)


def su_decay(distance, inv_freq: Tensor) -> Tensor:
    """Su's content-free decay term ``Σ_j |S_{j+1}|`` at distance ``s``, ``[...]``."""
    return _abel_partial_sums(distance, inv_freq).abs().sum(-1)


def coca_decay(distance, inv_freq: Tensor) -> Tensor:
    """CoCA's content-free decay term ``Σ_j |C_{j+1}|``, ``C_{j+1} = Σ_{k≤j} cos(sθ_k)``."""
    return _abel_partial_sums(distance, inv_freq).real.abs().sum(-1)


def su_bound(q: Tensor, k: Tensor, distance, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """Su's bound ``(max_i |h_{i+1} − h_i|) Σ_j |S_{j+1}|`` on ``|a(s)|``, ``h_j = q_j k̄_j``."""
    h = to_complex(q, layout) * to_complex(k, layout).conj()  # [..., d/2]
    return _max_step(h) * su_decay(distance, inv_freq)


def coca_bound(q: Tensor, k: Tensor, distance, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """The CoCA bound ``(max_i |l_{i+1} − l_i|) Σ_j |C_{j+1}|``, ``l_j = |q_j||k_j|``.

    It bounds the collinear score ``Σ_j l_j cos(sθ_j)``; it is never above :func:`su_bound`.
    """
    l = (to_complex(q, layout) * to_complex(k, layout).conj()).abs()  # [..., d/2]
    return _max_step(l) * coca_decay(distance, inv_freq)


# --------------------------------------------------------------------------------------
# CoCA in closed form (docs/conventions.md §5)
# --------------------------------------------------------------------------------------


def collinear_coefficients(t: Tensor, layout: Layout = "half") -> Tensor:
    """CoCA's collinear coefficients ``t_{n,j} = ReLU(mean of slice j's two members)``.

    Args:
        t: raw T-projection output ``[..., d]``.

    Returns:
        ``[..., d/2]``, non-negative. :func:`anomaly.rope.duplicate_slices` writes them back
        to both members as the released code does.
    """
    re, im = slice_members(t, layout)
    return torch.relu((re + im) / 2)


def strict_score(q: Tensor, t: Tensor, m, n, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """Strict CoCA (Eq. 9): ``Σ_j t_{n,j} |q_{m,j}|² cos((m−n)θ_j)``, ``[...]``.

    ``q``: pre-RoPE query ``[..., d]``; ``t``: raw T output ``[..., d]``.
    """
    coef = collinear_coefficients(t, layout)  # [..., d/2]
    q2 = to_complex(q, layout).abs() ** 2  # [..., d/2]
    s = _t(m).to(inv_freq.dtype) - _t(n).to(inv_freq.dtype)
    return (coef * q2 * torch.cos(rope_angles(s, inv_freq))).sum(-1)


def slack_score(q: Tensor, t: Tensor, m, n, inv_freq: Tensor, layout: Layout = "half") -> Tensor:
    """Slack CoCA (released code): ``⟨ f(q, m) ⊙ q , f(t̃, n) ⟩``, ``[...]``.

    ``t̃`` is ``t`` with each slice's two members replaced by its collinear coefficient.
    Literal form: rotate, multiply elementwise, dot. See :func:`slack_parts` for the
    closed form that separates its relative and absolute-position parts.
    """
    check_layout(layout)
    m, n = _t(m), _t(n)
    t_dup = duplicate_slices(collinear_coefficients(t, layout), layout)  # [..., d]
    shape = torch.broadcast_shapes(q.shape[:-1], t.shape[:-1], m.shape, n.shape)
    q_b, t_b = q.expand(*shape, q.shape[-1]), t_dup.expand(*shape, t.shape[-1])
    # Positions sit in the "seq" slot of apply_rope: one position per vector.
    q_rot = apply_rope(q_b[..., None, :], m.expand(shape)[..., None], inv_freq, layout)[..., 0, :]
    t_rot = apply_rope(t_b[..., None, :], n.expand(shape)[..., None], inv_freq, layout)[..., 0, :]
    return (q_rot * q_b * t_rot).sum(-1)


@dataclass
class SlackParts:
    """Slack CoCA score split into its relative and absolute-position parts."""

    relative: Tensor
    """``[...]`` ``Σ_j (c_j/2)[(x_j+y_j)² cos(sθ_j) + (x_j²−y_j²) sin(sθ_j)]``, ``s = m − n``."""
    absolute: Tensor
    """``[...]`` ``Σ_j (c_j/2)[(x_j−y_j)² cos(σθ_j) − (x_j²−y_j²) sin(σθ_j)]``, ``σ = m + n``."""
    absolute_amplitude: Tensor
    """``[...]`` over the contents only (it does not depend on positions):
    ``Σ_j (c_j/√2)|x_j−y_j||q_j|``, the largest magnitude the absolute part can reach."""


def slack_parts(q: Tensor, t: Tensor, m, n, inv_freq: Tensor, layout: Layout = "half") -> SlackParts:
    """Closed-form decomposition of :func:`slack_score` (``x_j, y_j`` = query slice members).

    The absolute part depends on ``m + n``, not ``m − n``: it is what makes slack CoCA
    non-relative. It vanishes exactly when every query slice has equal members
    (``x_j = y_j``), where slack equals strict.
    """
    x, y = slice_members(q.to(torch.promote_types(q.dtype, torch.float32)), layout)
    c = collinear_coefficients(t, layout)
    m, n = _t(m).to(inv_freq.dtype), _t(n).to(inv_freq.dtype)
    diff = rope_angles(m - n, inv_freq)
    summ = rope_angles(m + n, inv_freq)
    cross = x * x - y * y
    rel = (c / 2) * ((x + y) ** 2 * torch.cos(diff) + cross * torch.sin(diff))
    absolute = (c / 2) * ((x - y) ** 2 * torch.cos(summ) - cross * torch.sin(summ))
    norm = torch.sqrt(x * x + y * y)
    amp = (c / math.sqrt(2)) * (x - y).abs() * norm
    return SlackParts(relative=rel.sum(-1), absolute=absolute.sum(-1), absolute_amplitude=amp.sum(-1))


@dataclass
class PositionVariation:
    """How much the slack score of fixed contents moves with absolute position."""

    positions: Tensor
    """``[P]`` key positions ``n`` evaluated (the query sits at ``n + distance``)."""
    scores: Tensor
    """``[..., P]`` slack scores at each absolute position."""
    spread: Tensor
    """``[...]`` max − min of the score over positions."""
    relative_spread: Tensor
    """``[...]`` spread divided by the mean |score| of the purely relative part (0 for a
    relative score such as strict CoCA or RoPE)."""


def slack_position_variation(
    q: Tensor, t: Tensor, distance: int, positions: Sequence[int] | Tensor, inv_freq: Tensor,
    layout: Layout = "half",
) -> PositionVariation:
    """Slack score of the same contents ``q [..., d]``, ``t [..., d]`` at a fixed distance,
    evaluated at many absolute key positions.
    """
    n = _t(positions)  # [P]
    m = n + distance
    qb, tb = q[..., None, :], t[..., None, :]  # [..., 1, d]
    scores = slack_score(qb, tb, m, n, inv_freq, layout)  # [..., P]
    rel = slack_parts(qb, tb, m, n, inv_freq, layout).relative  # [..., P], constant in P
    spread = scores.amax(-1) - scores.amin(-1)
    denom = rel.abs().mean(-1).clamp_min(torch.finfo(rel.dtype).tiny)
    return PositionVariation(positions=n, scores=scores, spread=spread, relative_spread=spread / denom)
