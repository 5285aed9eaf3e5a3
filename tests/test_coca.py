"""anomaly.coca attention kernels against literal float64 loops (docs/conventions.md §5).

References: ``reference.strict_score`` is Eq. 9 literally (key slice = t_{n,j} × query
slice, rotate both, dot), ``reference.slack_score`` the released code's
``<f(q, m) ⊙ q, f(t̃, n)>`` — one pair at a time, with 2×2 rotation matrices.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from anomaly import analytic, rope
from anomaly.coca import (
    CocaCache,
    coca_attention,
    coca_qk,
    einsum_attention,
    einsum_scores,
    transform_key,
    transform_query,
)

LAYOUTS = ["half", "interleaved"]
VARIANTS = ["strict", "slack"]
LOOP_SCORE = {"strict": ref.strict_score, "slack": ref.slack_score}


def _inputs(batch, heads, kv_heads, seq, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, d, generator=g, dtype=torch.float64)
    t = torch.randn(batch, kv_heads, seq, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq, d, generator=g, dtype=torch.float64)
    return q.to(dtype), t.to(dtype), v.to(dtype)


def loop_scores(q, t, positions, theta, layout, variant) -> np.ndarray:
    """``[batch, heads, seq_q, seq_k]`` unscaled scores, one (query, key) pair at a time."""
    q, t = q.double().numpy(), t.double().numpy()
    positions = np.asarray(positions)
    batch, heads, seq, _ = q.shape
    group = heads // t.shape[1]
    out = np.zeros((batch, heads, seq, seq))
    for b in range(batch):
        pos = positions[b] if positions.ndim == 2 else positions
        for h in range(heads):
            for m in range(seq):
                for n in range(seq):
                    out[b, h, m, n] = LOOP_SCORE[variant](
                        q[b, h, m], t[b, h // group, n], pos[m], pos[n], theta, layout
                    )
    return out


def loop_attention(scores, v, scale, causal) -> np.ndarray:
    """Softmax-weighted values from explicit scores (float64)."""
    v = v.double().numpy()
    batch, heads, seq, _ = scores.shape
    group = heads // v.shape[1]
    s = scores * scale
    if causal:
        s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.stack([np.stack([w[b, h] @ v[b, h // group] for h in range(heads)]) for b in range(batch)])


# --------------------------------------------------------------------------------------
# Scores: per-token transforms and einsum forms against the literal loops
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d,base", [(8, 10000.0), (16, 10.0), (64, 500000.0)])
def test_transformed_dot_product_is_the_literal_score(layout, variant, d, base):
    q, t, _ = _inputs(1, 2, 2, 6, d, seed=d)
    positions = torch.tensor([0, 3, 4, 90, 1000, 4097])
    theta = rope.inv_freq(d, base)
    qp, kp = coca_qk(q, t, variant=variant, inv_freq=theta, positions=positions, layout=layout)
    scores = (qp @ kp.transpose(-1, -2)).numpy()
    expected = loop_scores(q, t, positions, ref.freqs(d, base), layout, variant)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_einsum_scores_are_the_literal_score(layout, variant):
    q, t, _ = _inputs(2, 4, 2, 7, 8, seed=3)
    positions = torch.tensor([2, 5, 6, 7, 40, 41, 300])
    theta = rope.inv_freq(8, 10000.0)
    scores = einsum_scores(q, t, variant=variant, inv_freq=theta, positions=positions, layout=layout)
    expected = loop_scores(q, t, positions, ref.freqs(8, 10000.0), layout, variant)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_strict_score_matches_the_analytic_closed_form():
    q, t, _ = _inputs(1, 1, 1, 5, 16, seed=11)
    theta = rope.inv_freq(16, 10000.0)
    qp, kp = coca_qk(q, t, variant="strict", inv_freq=theta)
    scores = qp @ kp.transpose(-1, -2)  # [1, 1, 5, 5]
    m, n = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    closed = analytic.strict_score(q[0, 0][:, None], t[0, 0][None, :], m, n, theta)
    torch.testing.assert_close(scores[0, 0], closed, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Fused attention against the loops: layouts, GQA, causal or not, dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_coca_attention_float64_matches_loop(layout, variant, heads, kv_heads, causal):
    q, t, v = _inputs(2, heads, kv_heads, 6, 8, seed=heads * 10 + kv_heads)
    theta = rope.inv_freq(8, 100.0)
    out = coca_attention(q, t, v, variant=variant, inv_freq=theta, layout=layout, causal=causal)
    scores = loop_scores(q, t, np.arange(6), ref.freqs(8, 100.0), layout, variant)
    expected = loop_attention(scores, v, 1 / math.sqrt(8), causal)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_coca_attention_matches_einsum_formulation(layout, variant, causal):
    q, t, v = _inputs(2, 6, 2, 33, 16, seed=5)
    theta = rope.inv_freq(16, 10000.0)
    kw = dict(variant=variant, inv_freq=theta, layout=layout, causal=causal)
    torch.testing.assert_close(
        coca_attention(q, t, v, **kw), einsum_attention(q, t, v, **kw), rtol=1e-12, atol=1e-12
    )


def test_batched_positions_and_custom_scale():
    q, t, v = _inputs(2, 2, 1, 5, 8, seed=9)
    positions = torch.tensor([[0, 1, 2, 3, 4], [100, 101, 102, 250, 251]])
    theta = rope.inv_freq(8, 10000.0)
    out = coca_attention(
        q, t, v, variant="slack", inv_freq=theta, positions=positions, scale=0.3
    )
    scores = loop_scores(q, t, positions.numpy(), ref.freqs(8, 10000.0), "half", "slack")
    np.testing.assert_allclose(out.numpy(), loop_attention(scores, v, 0.3, True), rtol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 4e-2, 4e-2)]
)
def test_low_precision_tolerances(variant, dtype, rtol, atol):
    q64, t64, v64 = _inputs(1, 4, 2, 64, 32, seed=21)
    theta = rope.inv_freq(32, 10000.0)
    exact = coca_attention(q64, t64, v64, variant=variant, inv_freq=theta)
    low = coca_attention(
        q64.to(dtype), t64.to(dtype), v64.to(dtype), variant=variant, inv_freq=theta
    )
    assert low.dtype == dtype
    torch.testing.assert_close(low.double(), exact, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# KV cache: decoding equals one full pass
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_decoding_equals_full_attention(variant, layout):
    q, t, v = _inputs(2, 4, 2, 12, 8, seed=31)
    theta = rope.inv_freq(8, 10000.0)
    kw = dict(variant=variant, inv_freq=theta, layout=layout)
    full = coca_attention(q, t, v, **kw)
    cache = CocaCache()
    # Prefill 5 tokens, a 3-token chunk on top of the cache, then one token at a time.
    steps = [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 12)]
    parts = [coca_attention(q[..., a:b, :], t[..., a:b, :], v[..., a:b, :], cache=cache, **kw) for a, b in steps]
    torch.testing.assert_close(torch.cat(parts, dim=-2), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 12
    # What is cached is the transformed key, nothing bigger than a vanilla key.
    _, k_eff = coca_qk(q, t, **kw)
    torch.testing.assert_close(cache.keys, k_eff)


# --------------------------------------------------------------------------------------
# Geometry: strict is relative with initial angle 0; slack is not relative
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strict_effective_initial_angle_is_zero_in_every_slice(layout):
    q, t, _ = _inputs(1, 4, 2, 50, 32, seed=41)
    t = t.abs()  # every coefficient positive, so every slice's angle is defined
    theta = rope.inv_freq(32, 10000.0)
    qc, kc = coca_qk(q, t, variant="strict", inv_freq=theta, layout=layout, rotated=False)
    angles = analytic.initial_angle(qc, kc.repeat_interleave(2, dim=1), layout)
    # Θ ∈ [0, 2π): 0 up to rounding may wrap to just under 2π.
    dist = torch.minimum(angles, 2 * math.pi - angles)
    assert dist.max() < 1e-9
    # The contents are the real numbers |q_j|² and t_{n,j}.
    re, im = rope.slice_members(qc, layout)
    torch.testing.assert_close(re, rope.to_complex(q, layout).abs() ** 2)
    assert im.abs().max() < 1e-9


def test_slack_effective_query_depends_on_absolute_position():
    q, t, _ = _inputs(1, 1, 1, 1, 16, seed=43)
    theta = rope.inv_freq(16, 10000.0)
    contents = [
        coca_qk(q, t, variant="slack", inv_freq=theta, positions=torch.tensor([p]), rotated=False)[0]
        for p in (0, 7, 100)
    ]
    assert not torch.allclose(contents[0], contents[1])
    assert not torch.allclose(contents[0], contents[2])


@pytest.mark.parametrize("variant,relative", [("strict", True), ("slack", False)])
def test_relative_only_for_strict(variant, relative):
    q, t, _ = _inputs(1, 2, 2, 8, 16, seed=47)
    theta = rope.inv_freq(16, 10000.0)
    base = einsum_scores(q, t, variant=variant, inv_freq=theta, positions=torch.arange(8))
    shifted = einsum_scores(q, t, variant=variant, inv_freq=theta, positions=torch.arange(8) + 37)
    assert torch.allclose(base, shifted, rtol=1e-10, atol=1e-10) is relative


def test_slack_equals_strict_when_query_slice_members_are_equal():
    q, t, _ = _inputs(1, 2, 1, 9, 16, seed=53)
    re, _ = rope.slice_members(q, "half")
    q_equal = torch.cat([re, re], dim=-1)  # x_j = y_j in every slice (half layout)
    theta = rope.inv_freq(16, 10000.0)
    slack = einsum_scores(q_equal, t, variant="slack", inv_freq=theta)
    strict = einsum_scores(q_equal, t, variant="strict", inv_freq=theta)
    torch.testing.assert_close(slack, strict, rtol=1e-10, atol=1e-10)
    # ... and with unequal members they differ.
    assert not torch.allclose(
        einsum_scores(q, t, variant="slack", inv_freq=theta),
        einsum_scores(q, t, variant="strict", inv_freq=theta),
    )


# --------------------------------------------------------------------------------------
# Gradients and property tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_through_q_t_v(variant):
    q, t, v = _inputs(1, 2, 1, 4, 4, seed=61)
    t = t + 0.05 * torch.sign(t)  # keep slice means away from ReLU's kink
    q, t, v = (x.requires_grad_() for x in (q, t, v))
    theta = rope.inv_freq(4, 10000.0)
    fn = lambda q, t, v: coca_attention(q, t, v, variant=variant, inv_freq=theta)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, t, v))


@settings(max_examples=40, deadline=None)
@given(
    d=st.sampled_from([2, 4, 8, 32]),
    base=st.sampled_from([10.0, 1e4, 1e6]),
    m=st.integers(0, 100_000),
    n=st.integers(0, 100_000),
    layout=st.sampled_from(LAYOUTS),
    variant=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**16),
)
def test_property_transforms_reproduce_loop_score(d, base, m, n, layout, variant, seed):
    g = np.random.default_rng(seed)
    q, t = g.normal(size=d), g.normal(size=d)
    theta = rope.inv_freq(d, base)
    cos_m, sin_m = rope.cos_sin(torch.tensor(m), theta)
    cos_n, sin_n = rope.cos_sin(torch.tensor(n), theta)
    qp = transform_query(torch.tensor(q), cos_m, sin_m, variant, layout)
    kp = transform_key(torch.tensor(t), cos_n, sin_n, variant, layout)
    expected = LOOP_SCORE[variant](q, t, m, n, ref.freqs(d, base), layout)
    scale = 1 + np.abs(q).max() ** 2 * np.abs(t).max() * d
    assert abs(float(qp @ kp) - expected) < 1e-9 * scale


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, t, v = _inputs(1, 3, 2, 4, 8, seed=0)
    theta = rope.inv_freq(8, 10000.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        coca_attention(q, t, v, variant="slack", inv_freq=theta)
    q, t, v = _inputs(1, 2, 2, 4, 8, seed=0)
    with pytest.raises(ValueError, match="unknown CoCA variant"):
        coca_attention(q, t, v, variant="loose", inv_freq=theta)
    with pytest.raises(ValueError, match="partial rotary"):
        coca_attention(q, t, v, variant="slack", inv_freq=theta[:2])
    with pytest.raises(ValueError, match="layout"):
        coca_attention(q, t, v, variant="slack", inv_freq=theta, layout="zigzag")
