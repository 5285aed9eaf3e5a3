"""anomaly.analytic against brute-force float64 loops, both layouts, several sizes and bases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
from anomaly import analytic as an
from anomaly import rope
from anomaly.rope import RopeScaling

LAYOUTS = ["half", "interleaved"]
SIZES = [(8, 10.0), (64, 10000.0), (128, 500000.0)]
PI = math.pi


def _rand(seed, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ initial angle, scenario, τ


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d,base", SIZES)
def test_initial_angle_matches_atan2_loop(layout, d, base):
    q, k = _rand(d, 2, 6, d)
    got = an.initial_angle(q, k, layout)
    assert got.shape == (6, d // 2)
    for i in range(6):
        want = ref.initial_angles(q[i].numpy(), k[i].numpy(), layout)
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-12)
    assert (got >= 0).all() and (got < 2 * PI).all()


def test_initial_angle_is_counter_clockwise_from_key_to_query():
    k = torch.tensor([1.0, 0.0], dtype=torch.float64)  # half layout: z = 1
    q = torch.tensor([0.0, -1.0], dtype=torch.float64)  # z = -i: a quarter turn clockwise
    assert math.isclose(float(an.initial_angle(q, k)[0]), 1.5 * PI)
    assert math.isclose(float(an.initial_angle(k, q)[0]), 0.5 * PI)


def test_wrap_angle_is_half_open():
    x = torch.tensor([-1e-20, 0.0, 2 * PI, -2 * PI, 7.0, -0.5], dtype=torch.float64)
    w = an.wrap_angle(x)
    assert (w >= 0).all() and (w < 2 * PI).all()
    assert w[0] == 0 and w[2] == 0


SCENARIO_TABLE = [
    # Θ, m, n, case — including the boundaries Θ = 0 and Θ = π (docs/conventions.md §3: Θ ≤ π is a/b).
    (0.0, 1, 5, "a"), (0.0, 5, 1, "b"), (1.0, 1, 5, "a"), (1.0, 5, 1, "b"),
    (PI, 1, 5, "a"), (PI, 5, 1, "b"), (PI + 1e-9, 1, 5, "c"), (PI + 1e-9, 5, 1, "d"),
    (4.0, 1, 5, "c"), (4.0, 5, 1, "d"), (2 * PI - 1e-9, 5, 1, "d"), (2 * PI, 5, 1, "b"),
    (-0.5, 5, 1, "d"),  # angles are reduced mod 2π first
]


@pytest.mark.parametrize("theta,m,n,case", SCENARIO_TABLE)
def test_scenario_table(theta, m, n, case):
    assert an.scenario(theta, m, n) == case


def test_scenario_arrays_and_errors():
    got = an.scenario(np.array([0.5, 0.5, 4.0, 4.0]), np.array([1, 3, 1, 3]), 2)
    assert got.tolist() == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="m == n"):
        an.scenario(1.0, 3, 3)
    with pytest.raises(ValueError, match="NaN"):
        an.scenario(float("nan"), 3, 1)


TAU_TABLE = [
    (0.0, 0.1, "a", 0.0), (PI, 0.1, "a", PI / 0.1), (1.0, 0.5, "a", 2.0),
    (1.0, 0.5, "b", 0.0), (4.0, 0.5, "c", 0.0), (4.0, 0.5, "d", (2 * PI - 4.0) / 0.5),
    (2 * PI - 0.2, 0.1, "d", 2.0),
]


@pytest.mark.parametrize("theta,freq,case,tau", TAU_TABLE)
def test_diminished_tokens_table(theta, freq, case, tau):
    assert math.isclose(float(an.diminished_tokens(theta, freq, case)), tau, rel_tol=1e-12, abs_tol=1e-12)


def test_diminished_tokens_bad_case():
    with pytest.raises(ValueError, match="case"):
        an.diminished_tokens(1.0, 0.1, "e")


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(0, 2 * PI, exclude_max=True), freq=st.floats(0.02, 3.0), causal=st.booleans())
def test_abnormal_positions_count_rising_steps(theta, freq, causal):
    """τ's integer count equals a step-by-step count of distances where the score still rises."""
    tau = an.diminished_tokens(theta, freq, "d" if causal else "a") if (theta > PI) == causal else 0.0
    assume(abs(float(tau) - round(float(tau))) > 1e-6)  # an exact integer τ is a border itself
    got = int(an.abnormal_positions(theta, freq, causal=causal))
    assert got == ref.rising_run(theta, freq, causal=causal)


@settings(max_examples=60, deadline=None)
@given(theta=st.floats(0, 2 * PI, exclude_max=True), freq=st.floats(0.01, 2.0), s=st.integers(-400, 400))
def test_is_rising_matches_finite_difference(theta, freq, s):
    assume(s != 0)
    h = 1e-6 * math.copysign(1, s)
    f = lambda x: math.cos(theta + x * freq)  # noqa: E731
    diff = f(s + h) - f(s)
    assume(abs(diff) > 1e-12)
    assert bool(an.is_rising(theta, freq, s)) == (diff > 0)


def test_is_rising_at_boundaries():
    assert bool(an.is_rising(PI, 0.1, 1e-9)) and bool(an.is_rising(PI, 0.1, -1e-9))
    assert not bool(an.is_rising(0.0, 0.1, 1e-9)) and not bool(an.is_rising(0.0, 0.1, -1e-9))


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d,base", SIZES)
def test_rope_score_matches_rotate_then_dot(layout, d, base):
    q, k = _rand(d + 1, 2, d)
    f = rope.inv_freq(d, base)
    th = ref.freqs(d, base)
    ms, ns = np.meshgrid(np.arange(0, 40, 3), np.arange(0, 40, 5), indexing="ij")
    got = an.rope_score(q, k, torch.tensor(ms), torch.tensor(ns), f, layout)
    for i in range(ms.shape[0]):
        for j in range(ms.shape[1]):
            want = ref.score(q.numpy(), k.numpy(), ms[i, j], ns[i, j], th, layout)
            assert math.isclose(float(got[i, j]), want, rel_tol=1e-10, abs_tol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slice_scores_are_magnitude_times_cosine_of_final_angle(layout):
    q, k = _rand(3, 2, 16)
    f = rope.inv_freq(16, 1e4)
    theta0 = an.initial_angle(q, k, layout)
    mag = rope.to_complex(q, layout).abs() * rope.to_complex(k, layout).abs()
    got = an.slice_scores(q, k, 9, 2, f, layout)
    torch.testing.assert_close(got, an.slice_score(theta0, 7, f, mag))


def test_score_curve_equals_pointwise_scores():
    q, k = _rand(4, 2, 3, 32)  # a batch of three heads
    f = rope.inv_freq(32, 1e4)
    dist = torch.arange(-20, 21)
    curve = an.score_curve(q, k, dist, f)
    assert curve.shape == (3, 41)
    for h in range(3):
        for i, s in enumerate(dist.tolist()):
            assert math.isclose(float(curve[h, i]), float(an.rope_score(q[h], k[h], s, 0, f)), rel_tol=1e-12, abs_tol=1e-12)


def test_layouts_agree_on_permuted_vectors():
    d = 16
    q, k = _rand(5, 2, d)
    perm = torch.tensor([i for j in range(d // 2) for i in (j, j + d // 2)])  # half -> interleaved
    f = rope.inv_freq(d, 1e4)
    torch.testing.assert_close(
        an.rope_score(q, k, 11, 4, f, "half"), an.rope_score(q[perm], k[perm], 11, 4, f, "interleaved")
    )
    torch.testing.assert_close(an.initial_angle(q, k, "half"), an.initial_angle(q[perm], k[perm], "interleaved"))


# ------------------------------------------------------------------ borders and interpolation


@settings(max_examples=50, deadline=None)
@given(theta=st.floats(0, 2 * PI, exclude_max=True), freq=st.floats(0.01, 1.0))
def test_rotary_borders_are_where_monotonicity_flips(theta, freq):
    borders = an.rotary_borders(theta, freq, 60.0 / freq)
    assert len(borders) > 0
    for b in borders.tolist():
        assert abs(math.sin(theta + b * freq)) < 1e-9  # final angle is a multiple of π
        eps = 1e-4 / freq
        before = math.cos(theta + (b - eps) * freq) - math.cos(theta + (b - 2 * eps) * freq)
        after = math.cos(theta + (b + 2 * eps) * freq) - math.cos(theta + (b + eps) * freq)
        assert before * after < 0
    # No flip strictly between 0 and the first border.
    grid = np.linspace(0, float(borders[0]), 200)[1:-1]
    slopes = -np.sin(theta + grid * freq)
    assert (slopes > 0).all() or (slopes < 0).all()


def test_first_border_is_tau_in_case_d():
    theta = torch.linspace(PI + 0.01, 2 * PI - 0.01, 50, dtype=torch.float64)
    torch.testing.assert_close(an.first_border(theta, 0.3), an.causal_tau(theta, 0.3))


@pytest.mark.parametrize("d,base", [(64, 1e4), (128, 1e4), (128, 5e5)])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_pi_multiplies_the_abnormal_area_by_k(d, base, factor):
    theta0 = torch.rand(500, d // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 * PI
    eff = an.interpolation_effect(theta0, d, base, RopeScaling(type="linear", factor=factor))
    torch.testing.assert_close(eff.ratio, torch.full((d // 2,), factor, dtype=torch.float64))
    torch.testing.assert_close(eff.scaled_tau, factor * eff.tau)
    # Integer counts: floor arithmetic keeps them within one position of k× the original.
    assert ((eff.scaled_positions - factor * eff.positions).abs() <= factor).all()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("lam", [2.0, 4.0, 8.0])
def test_ntk_grows_slice_j_by_lambda_to_2j_over_d_minus_2(d, lam):
    theta0 = torch.full((d // 2,), 1.5 * PI, dtype=torch.float64)
    eff = an.interpolation_effect(theta0, d, 1e4, RopeScaling(type="ntk", factor=lam))
    j = torch.arange(d // 2, dtype=torch.float64)
    torch.testing.assert_close(eff.ratio, lam ** (2 * j / (d - 2)))
    torch.testing.assert_close(eff.scaled_tau / eff.tau, lam ** (2 * j / (d - 2)))
    # The paper's λ^(2j/d) is the large-d approximation: off by at most λ^(1/(d/2-1)) − 1.
    rel = (eff.ratio / eff.paper_ratio - 1).abs().max()
    assert rel <= lam ** (2 / (d - 2)) - 1 + 1e-12


def test_anomalous_slices_rotations_and_critical_dimension():
    f = rope.inv_freq(128, 1e4)
    theta0 = torch.full((64,), 1.9 * PI, dtype=torch.float64)
    flags = an.anomalous_slices(theta0, f, 4096)
    want = [bool(fj * 4096 < 2 * PI - 1.9 * PI) for fj in f.tolist()]
    assert flags.tolist() == want
    assert not an.anomalous_slices(torch.full((64,), 0.5 * PI), f, 4096).any()
    torch.testing.assert_close(an.rotations(f, 4096), f * 4096 / (2 * PI))
    # Liu et al.: LLaMA2 (d = 128, base 1e4, 4K) has critical dimension 92.
    assert an.critical_dimension(128, 1e4, 4096) == 92
    # Slices at and beyond d_extra/2 make less than one turn in the training length.
    dc = an.critical_dimension(128, 1e4, 4096)
    assert (an.rotations(f, 4096)[dc // 2:] < 1).all() and (an.rotations(f, 4096)[: dc // 2 - 1] >= 1).all()


# ------------------------------------------------------------------ decay bounds


def _abel_sum_loop(h, s, th):
    """Su's bound by explicit loops (h_{N} = 0)."""
    n = len(h)
    S = [0j]
    for j in range(n):
        S.append(S[-1] + complex(math.cos(s * th[j]), math.sin(s * th[j])))
    hp = list(h) + [0j]
    return max(abs(hp[i + 1] - hp[i]) for i in range(n)) * sum(abs(S[j + 1]) for j in range(n))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.integers(-5000, 5000), d=st.sampled_from([8, 64]),
       layout=st.sampled_from(LAYOUTS))
def test_decay_bounds_hold_and_match_loops(seed, s, d, layout):
    q, k = _rand(seed, 2, d)
    f = rope.inv_freq(d, 1e4)
    score = float(an.rope_score(q, k, s, 0, f, layout))
    su = float(an.su_bound(q, k, s, f, layout))
    h = (rope.to_complex(q, layout) * rope.to_complex(k, layout).conj()).numpy()
    assert math.isclose(su, _abel_sum_loop(h, s, f.numpy()), rel_tol=1e-10)
    assert abs(score) <= su * (1 + 1e-12)
    # CoCA: the collinear score Σ l_j cos(sθ_j) obeys the CoCA bound, itself ≤ Su's.
    l = np.abs(h)
    collinear = float(np.sum(l * np.cos(s * f.numpy())))
    cb = float(an.coca_bound(q, k, s, f, layout))
    assert abs(collinear) <= cb * (1 + 1e-12)
    assert cb <= su * (1 + 1e-12)


# ------------------------------------------------------------------ CoCA closed forms


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d,base", SIZES)
def test_strict_and_slack_match_literal_loops(layout, d, base):
    q, t = _rand(d + 7, 2, d)
    f, th = rope.inv_freq(d, base), ref.freqs(d, base)
    for m, n in [(5, 2), (2, 5), (100, 0), (7, 7), (3000, 2999)]:
        want_strict = ref.strict_score(q.numpy(), t.numpy(), m, n, th, layout)
        want_slack = ref.slack_score(q.numpy(), t.numpy(), m, n, th, layout)
        assert math.isclose(float(an.strict_score(q, t, m, n, f, layout)), want_strict, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(an.slack_score(q, t, m, n, f, layout)), want_slack, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_coefficients_loop(layout):
    t = _rand(1, 4, 12)
    want = np.stack([ref.coefficients(row.numpy(), layout) for row in t])
    np.testing.assert_allclose(an.collinear_coefficients(t, layout).numpy(), want)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 4000), n=st.integers(0, 4000),
       shift=st.integers(1, 4000), layout=st.sampled_from(LAYOUTS))
def test_strict_is_relative_and_slack_parts_decompose(seed, m, n, shift, layout):
    q, t = _rand(seed, 2, 16)
    f = rope.inv_freq(16, 1e4)
    a = float(an.strict_score(q, t, m, n, f, layout))
    b = float(an.strict_score(q, t, m + shift, n + shift, f, layout))
    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    parts = an.slack_parts(q, t, m, n, f, layout)
    total = float(an.slack_score(q, t, m, n, f, layout))
    assert math.isclose(float(parts.relative + parts.absolute), total, rel_tol=1e-9, abs_tol=1e-9)
    assert abs(float(parts.absolute)) <= float(parts.absolute_amplitude) * (1 + 1e-9) + 1e-12
    shifted = an.slack_parts(q, t, m + shift, n + shift, f, layout)
    assert math.isclose(float(shifted.relative), float(parts.relative), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slack_equals_strict_for_equal_query_members(layout):
    d = 32
    c = _rand(2, 3, d // 2)
    q = rope.duplicate_slices(c, layout)  # both members of every slice equal
    t = _rand(3, 3, d)
    f = rope.inv_freq(d, 1e4)
    torch.testing.assert_close(an.slack_score(q, t, 40, 13, f, layout), an.strict_score(q, t, 40, 13, f, layout))
    v = an.slack_position_variation(q, t, 5, range(0, 300), f, layout)
    assert float(v.relative_spread.abs().max()) < 1e-9


def test_slack_varies_with_absolute_position_for_generic_contents():
    q, t = _rand(9, 2, 64)
    t = t.abs()  # positive coefficients in every slice
    f = rope.inv_freq(64, 1e4)
    v = an.slack_position_variation(q, t, 10, range(0, 2000), f)
    assert v.scores.shape == (2000,)
    assert float(v.relative_spread) > 0.05
    parts = an.slack_parts(q, t, 10 + v.positions, v.positions, f)
    assert float(v.spread) <= 2 * float(parts.absolute_amplitude) * (1 + 1e-9)
