"""Collinear Constrained Attention as fused attention (docs/conventions.md §5).

Both CoCA variants are ordinary dot products of per-token vectors, so they run through
PyTorch's fused ``scaled_dot_product_attention`` (FlashAttention on a GPU) with O(N·d)
memory:

* **slack** (the authors' released code): ``q'_m = f(q_m, m) ⊙ q_m`` and
  ``k'_n = f(t̃_n, n)``, where ``t̃_n`` carries each slice's collinear coefficient in both
  members;
* **strict** (Eq. 9): ``q'_m = f(ρ_m, m)`` with ``ρ_{m,j} = |q_{m,j}|² + 0i`` and
  ``k'_n = f(τ_n, n)`` with ``τ_{n,j} = t_{n,j} + 0i``, so that
  ``⟨q'_m, k'_n⟩ = Σ_j t_{n,j} |q_{m,j}|² cos((m−n)θ_j)``.

The query transform depends only on the query's own position and the key transform only
on the key's, so a KV cache of transformed keys makes decoding cost what vanilla decoding
costs. The quadratic forms (:func:`einsum_scores`, :func:`einsum_attention`) are kept as
references and as the released code's formulation for the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly.analytic import collinear_coefficients
from anomaly.rope import (
    Layout,
    check_layout,
    cos_sin,
    duplicate_slices,
    rotate,
    slice_members,
)

Variant = Literal["strict", "slack"]
VARIANTS: tuple[str, ...] = ("strict", "slack")


def check_variant(variant: str) -> str:
    """Return ``variant`` or raise a one-line ``ValueError`` naming the valid choices."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CoCA variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def _join(re: Tensor, im: Tensor, layout: Layout) -> Tensor:
    """Inverse of :func:`anomaly.rope.slice_members`: 2 × ``[..., d/2]`` -> ``[..., d]``."""
    if layout == "half":
        return torch.cat([re, im], dim=-1)
    return torch.stack([re, im], dim=-1).flatten(-2)  # [..., d/2, 2] -> [..., d]


# --------------------------------------------------------------------------------------
# Per-token transforms
# --------------------------------------------------------------------------------------


def transform_query(
    q: Tensor, cos: Tensor, sin: Tensor, variant: Variant, layout: Layout = "half"
) -> Tensor:
    """CoCA's effective query ``q'_m`` from the pre-RoPE query ``q`` at its own position.

    Args:
        q: ``[..., seq, d]`` pre-RoPE queries, e.g. ``[batch, heads, seq, d]``.
        cos, sin: ``[..., seq, d/2]`` (broadcastable) of the query positions' angles,
            including any attention factor the model folds into them (YaRN).
        variant: ``"slack"`` gives ``f(q, m) ⊙ q``; ``"strict"`` gives ``f(ρ, m)`` with
            ``ρ_j = |q_j|² + 0i``.

    Returns:
        ``[..., seq, d]`` in ``q``'s dtype.
    """
    check_variant(variant)
    if variant == "slack":
        return rotate(q, cos, sin, layout) * q
    re, im = slice_members(q, layout)
    rho = re * re + im * im  # [..., seq, d/2]
    # f(ρ + 0i, m) = (ρ cos mθ, ρ sin mθ).
    return _join(rho * cos, rho * sin, layout)


def transform_key(
    t: Tensor, cos: Tensor, sin: Tensor, variant: Variant, layout: Layout = "half"
) -> Tensor:
    """CoCA's effective key ``k'_n`` from the raw T-projection output ``t``.

    Args:
        t: ``[..., seq, d]`` raw T output (before halving, ReLU and duplication).
        cos, sin: ``[..., seq, d/2]`` of the key positions' angles.
        variant: ``"slack"`` gives ``f(t̃, n)`` with the coefficient in both slice members;
            ``"strict"`` gives ``f(τ, n)`` with ``τ_j = t_{n,j} + 0i``.

    Returns:
        ``[..., seq, d]`` in ``t``'s dtype: what a KV cache stores per key.
    """
    check_variant(variant)
    coef = collinear_coefficients(t, layout)  # [..., seq, d/2], ≥ 0
    if variant == "slack":
        return rotate(duplicate_slices(coef, layout), cos, sin, layout)
    return _join(coef * cos, coef * sin, layout)


def _default_positions(seq: int, offset: int, device: torch.device) -> Tensor:
    return torch.arange(offset, offset + seq, device=device)


def _angles(
    positions: Tensor, inv_freq: Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos and sin ``[(batch, 1,) seq, d/2]`` that broadcast against ``[batch, heads, seq, ·]``."""
    cos, sin = cos_sin(positions, inv_freq, scale=scale, dtype=dtype)
    if positions.dim() == 2:  # [batch, seq] ids: add the heads axis
        cos, sin = cos[:, None], sin[:, None]  # [batch, 1, seq, d/2]
    return cos, sin


def _check_rotary(d: int, inv_freq: Tensor) -> None:
    if d != 2 * inv_freq.shape[-1]:
        raise ValueError(
            f"head dim {d} needs {d // 2} frequencies, got {inv_freq.shape[-1]}; CoCA rotates "
            "the whole head (partial rotary is not supported)"
        )


def coca_qk(
    q: Tensor,
    t: Tensor,
    *,
    variant: Variant,
    inv_freq: Tensor,
    positions: Tensor | None = None,
    layout: Layout = "half",
    attention_scale: float = 1.0,
    rotated: bool = True,
) -> tuple[Tensor, Tensor]:
    """CoCA's effective per-token query and key: the vectors whose dot product is the score.

    Args:
        q: ``[batch, heads, seq, d]`` pre-RoPE queries.
        t: ``[batch, kv_heads, seq, d]`` raw T-projection outputs.
        variant: ``"strict"`` or ``"slack"``.
        inv_freq: ``[d/2]`` slice frequencies (:func:`anomaly.rope.inv_freq`).
        positions: ``[seq]`` or ``[batch, seq]``; default ``0 … seq−1``.
        layout: slice layout of ``q`` and ``t``.
        attention_scale: factor folded into cos and sin (YaRN), as the model does.
        rotated: ``True`` returns ``(q', k')`` as attention uses them. ``False`` rotates each
            back to position 0, giving the *contents* whose RoPE rotation yields them, i.e.
            the vectors a probe of RoPE geometry reads: :func:`anomaly.analytic.initial_angle`
            of these is CoCA's effective initial angle (0 in every slice for strict; for
            slack, the query content depends on the query's absolute position).

    Returns:
        ``(q' [batch, heads, seq, d], k' [batch, kv_heads, seq, d])``.
    """
    check_layout(layout)
    _check_rotary(q.shape[-1], inv_freq)
    if positions is None:
        positions = _default_positions(q.shape[-2], 0, q.device)
    cos, sin = _angles(positions, inv_freq, q.dtype, attention_scale)
    q_eff = transform_query(q, cos, sin, variant, layout)
    k_eff = transform_key(t, cos, sin, variant, layout)
    if not rotated:
        # Undo f(·, p): rotate by −p, i.e. (cos, −sin); the attention factor cancels too.
        norm = attention_scale * attention_scale
        q_eff = rotate(q_eff, cos, -sin, layout) / norm
        k_eff = rotate(k_eff, cos, -sin, layout) / norm
    return q_eff, k_eff


# --------------------------------------------------------------------------------------
# Fused attention with an optional KV cache
# --------------------------------------------------------------------------------------


@dataclass
class CocaCache:
    """Per-layer KV cache for :func:`coca_attention`: transformed keys and values.

    Keys are stored *after* the CoCA key transform (rotated ``t̃`` for slack, ``f(τ, n)``
    for strict), so a decoding step only transforms its own new query and key.
    """

    keys: Tensor | None = None
    """``[batch, kv_heads, cached, d]`` transformed keys ``k'``."""
    values: Tensor | None = None
    """``[batch, kv_heads, cached, d_v]`` values."""
    positions: list[Tensor] = field(default_factory=list)
    """Positions of the cached keys, one tensor per append (for inspection)."""

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Add new transformed keys and values; return all cached keys and values."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)  # [batch, kv_heads, cached+new, d]
            self.values = torch.cat([self.values, values], dim=-2)
        self.positions.append(positions)
        return self.keys, self.values


def _check_shapes(q: Tensor, t: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or t.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, t and v must be [batch, heads, seq, d]; got shapes "
            f"{tuple(q.shape)}, {tuple(t.shape)}, {tuple(v.shape)}"
        )
    if t.shape[:3] != v.shape[:3] or t.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"t {tuple(t.shape)} and v {tuple(v.shape)} must share batch, kv_heads and seq, and "
            f"t must have q's head dim {q.shape[-1]}"
        )
    if q.shape[1] % t.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({t.shape[1]})"
        )


def coca_attention(
    q: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    variant: Variant,
    inv_freq: Tensor,
    positions: Tensor | None = None,
    layout: Layout = "half",
    causal: bool = True,
    scale: float | None = None,
    attention_scale: float = 1.0,
    cache: CocaCache | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Collinear Constrained Attention through fused ``scaled_dot_product_attention``.

    Args:
        q: ``[batch, heads, seq, d]`` pre-RoPE queries.
        t: ``[batch, kv_heads, seq, d]`` raw T-projection outputs (the key projection's
            place); ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention).
        v: ``[batch, kv_heads, seq, d_v]`` values.
        variant: ``"strict"`` (Eq. 9) or ``"slack"`` (released code).
        inv_freq: ``[d/2]`` slice frequencies, including any scaling.
        positions: ``[seq]`` or ``[batch, seq]`` positions of the new tokens; default
            continues from the cache (``cache.length … cache.length + seq − 1``).
        layout: ``"half"`` (HF) or ``"interleaved"`` (the paper).
        causal: mask keys after each query (aligned to the end when a cache holds past keys).
        scale: score scale; default ``1/√d``.
        attention_scale: factor folded into cos and sin (YaRN's), as HF does.
        cache: a :class:`CocaCache` to append the new transformed keys/values to and attend
            over; ``None`` attends only over this call's tokens.
        dropout_p: attention dropout probability (training).

    Returns:
        ``[batch, heads, seq, d_v]`` in ``q``'s dtype.

    Without a cache (or with one query token) the causal mask is SDPA's ``is_causal``, so no
    seq × seq tensor exists outside the fused kernel. Prefilling several tokens on top of a
    non-empty cache builds a boolean ``[seq, cached + seq]`` mask.
    """
    _check_shapes(q, t, v)
    check_layout(layout)
    _check_rotary(q.shape[-1], inv_freq)
    past = cache.length if cache is not None else 0
    if positions is None:
        positions = _default_positions(q.shape[-2], past, q.device)
    cos, sin = _angles(positions, inv_freq, q.dtype, attention_scale)
    q_eff = transform_query(q, cos, sin, variant, layout)  # [batch, heads, seq, d]
    k_eff = transform_key(t, cos, sin, variant, layout)  # [batch, kv_heads, seq, d]
    if cache is not None:
        k_eff, v = cache.append(k_eff, v, positions)
    n_q, n_k = q_eff.shape[-2], k_eff.shape[-2]
    mask, is_causal = None, False
    if causal and n_q == n_k:
        is_causal = True
    elif causal and n_q > 1:
        # Query i sits at key index (n_k − n_q + i): bottom-right aligned causal mask.
        offset = n_k - n_q
        rows = torch.arange(n_q, device=q.device)[:, None]  # [n_q, 1]
        mask = torch.arange(n_k, device=q.device)[None, :] <= rows + offset  # [n_q, n_k]
    gqa = q.shape[1] != t.shape[1]
    return F.scaled_dot_product_attention(
        q_eff,
        k_eff,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=gqa,
    )


# --------------------------------------------------------------------------------------
# Quadratic references (tests, and the released code's formulation for the benchmark)
# --------------------------------------------------------------------------------------


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    """``[batch, kv_heads, seq, d]`` -> ``[batch, heads, seq, d]`` (copies; references only)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def einsum_scores(
    q: Tensor,
    t: Tensor,
    *,
    variant: Variant,
    inv_freq: Tensor,
    positions: Tensor | None = None,
    layout: Layout = "half",
) -> Tensor:
    """Unscaled CoCA scores ``a(m, n)`` materialised as ``[batch, heads, seq, seq]``.

    * slack: the released code's formulation, one three-operand einsum over the pre-RoPE
      query, the rotated query and the rotated ``t̃``:
      ``a(m, n) = Σ_d q[m,d] · f(q,m)[m,d] · f(t̃,n)[n,d]`` (O(N²) memory);
    * strict: Eq. 9 in closed form, ``Σ_j t_{n,j} |q_{m,j}|² cos((m−n)θ_j)``, built from a
      ``[seq, seq, d/2]`` table of cosines of distances (O(N²·d) memory; a reference that
      does not use the q'/k' factorisation at all).

    Shapes as :func:`coca_attention`; ``positions`` is ``[seq]`` here.
    """
    check_variant(variant)
    _check_rotary(q.shape[-1], inv_freq)
    seq = q.shape[-2]
    if positions is None:
        positions = _default_positions(seq, 0, q.device)
    t = _repeat_heads(t, q.shape[1])
    coef = collinear_coefficients(t, layout)  # [batch, heads, seq, d/2]
    if variant == "slack":
        cos, sin = _angles(positions, inv_freq, q.dtype)
        q_rot = rotate(q, cos, sin, layout)
        t_rot = rotate(duplicate_slices(coef, layout), cos, sin, layout)
        # Operand order puts q ⊙ f(q) first so the contraction never forms [m, n, d]
        # (opt_einsum picks the same path in the released code).
        return torch.einsum("bhmd,bhmd,bhnd->bhmn", q, q_rot, t_rot)
    re, im = slice_members(q, layout)
    rho = re * re + im * im  # [batch, heads, seq, d/2]
    pos = positions.to(inv_freq.dtype)
    dist = pos[:, None] - pos[None, :]  # [m, n]
    cos_dist = torch.cos(dist[..., None] * inv_freq).to(q.dtype)  # [m, n, d/2]
    return torch.einsum("bhmj,bhnj,mnj->bhmn", rho, coef, cos_dist)


def einsum_attention(
    q: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    variant: Variant,
    inv_freq: Tensor,
    positions: Tensor | None = None,
    layout: Layout = "half",
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Attention from :func:`einsum_scores`: scale, mask, softmax (≥ float32), weighted values.

    The released code's path (materialised scores); ``[batch, heads, seq, d_v]``.
    """
    _check_shapes(q, t, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = einsum_scores(
        q, t, variant=variant, inv_freq=inv_freq, positions=positions, layout=layout
    ) * scale  # [batch, heads, seq, seq]
    if causal:
        seq = q.shape[-2]
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)  # [m, n]
        scores = scores.masked_fill(future, float("-inf"))
    # Softmax in at least float32, as HF and the released code do.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(v.dtype)
    return weights @ _repeat_heads(v, q.shape[1])
