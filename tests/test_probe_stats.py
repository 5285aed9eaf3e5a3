"""anomaly.probe's statistics against brute force.

* The summary's fractions, histograms and mean logits equal brute-force float64 counts over
  all causal pairs of every tiny family.
* ``pair_statistics`` (both implementations) equals the reference loops of
  tests/reference.py on random contents; the sweep's pseudo-angle orders and bins as atan2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
from anomaly import rope
from anomaly.analytic import TWO_PI
from anomaly.probe import attention_logits, capture, mean_logit_by_distance, probe
from anomaly.probe.activations import rotated_heads
from anomaly.probe.core import EXACT_TAIL
from anomaly.probe.stats import pair_statistics
from probe_helpers import INIT, ids_for


# --------------------------------------------------------------------------------------
# 1. Summary statistics against brute force
# --------------------------------------------------------------------------------------


def brute_force(cap, windowed: bool = True) -> dict[str, np.ndarray]:
    """Case-(d) fractions over the causal pairs each layer scores (its sliding window's
    only, where it has one; every causal pair with ``windowed=False``), float64, by
    broadcasting."""
    L, H = len(cap.layers), cap.n_heads
    r = H // cap.n_kv_heads
    t = cap.q[0].shape[1]
    distance = np.arange(t)[:, None] - np.arange(t)[None, :]  # [m, n]: m − n
    frac, wfrac = np.zeros((L, H)), np.zeros((L, H))
    for l, layer in enumerate(cap.layers):
        window = (layer.sliding_window if windowed else None) or t
        causal = ((distance > 0) & (distance < window))[..., None]  # [m, n, 1]
        q, k = layer.q.double().numpy(), layer.k.double().numpy()
        d = q.shape[-1]
        re_im = np.array([ref.slice_index(j, d, cap.layout) for j in range(d // 2)])  # [J, 2]
        qa = np.arctan2(q[..., re_im[:, 1]], q[..., re_im[:, 0]])  # [H, T, J]
        ka = np.arctan2(k[..., re_im[:, 1]], k[..., re_im[:, 0]])  # [KV, T, J]
        qm = np.hypot(q[..., re_im[:, 1]], q[..., re_im[:, 0]])
        km = np.hypot(k[..., re_im[:, 1]], k[..., re_im[:, 0]])
        for h in range(H):
            g = h // r  # grouped-query attention: query head h reads key head h // r
            theta = np.mod(qa[h][:, None, :] - ka[g][None, :, :], TWO_PI)  # [m, n, J]
            case_d = causal & (theta > math.pi)
            w = qm[h][:, None, :] * km[g][None, :, :]
            frac[l, h] = case_d.sum() / ((d // 2) * causal.sum())
            wfrac[l, h] = (w * case_d).sum() / (w * causal).sum()
    return {"frac": frac, "wfrac": wfrac}


@pytest.fixture(scope="module")
def tiny_probes():
    """probe() and capture() of every tiny family on one short sequence (computed once)."""
    import conftest

    out = {}
    for arch in sorted(conftest.TINY_ARCHS):
        model = conftest.tiny_model(arch, initializer_range=INIT)
        ids = ids_for(model, 56, seed=3)[0]
        out[arch] = (model, ids, capture(model, ids), probe(model, ids, bins=16, model_name=f"tiny-{arch}"))
    return out


def test_probe_fractions_equal_brute_force(tiny_arch, tiny_probes):
    model, ids, cap, result = tiny_probes[tiny_arch]
    bf = brute_force(cap)
    frac, wfrac = result.anomalous_fraction, result.weighted_anomalous_fraction
    assert frac.shape == wfrac.shape == (model.config.num_hidden_layers, cap.n_heads)
    # One triple is 1/(J·T(T−1)/2) ≈ 6e-5 here: the counts must agree exactly.
    np.testing.assert_allclose(frac, bf["frac"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(wfrac, bf["wfrac"], rtol=1e-10, atol=0)
    assert result.to_json()["mean_anomalous_fraction"] == pytest.approx(bf["frac"].mean(), abs=1e-12)
    # Not all heads the same (GQA heads sharing a key head differ through their queries).
    assert np.ptp(frac) > 0


def test_probe_counts_a_sliding_layer_within_its_window():
    """A sliding-window layer (W = 8, 40 tokens) is measured over the pairs it scores: the
    fractions equal the windowed brute force (and differ from the all-pairs one), the mean
    logit is NaN where the window masks, and the logit peak lies inside the window."""
    import conftest

    model = conftest.tiny_model("mistral", sliding_window=8, initializer_range=INIT)
    ids = ids_for(model, 40, seed=4)[0]
    cap, result = capture(model, ids), probe(model, ids, bins=16)
    assert [layer.sliding_window for layer in cap.layers] == [8, 8] == result.sliding_window
    bf, every = brute_force(cap), brute_force(cap, windowed=False)
    np.testing.assert_allclose(result.anomalous_fraction, bf["frac"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.weighted_anomalous_fraction, bf["wfrac"], rtol=1e-10, atol=0)
    assert np.abs(result.anomalous_fraction - every["frac"]).max() > 1e-3
    assert np.isnan(result.mean_logit[:, :, 8:]).all() and np.isfinite(result.mean_logit[:, :, :8]).all()
    assert ((result.logit_peak_distance >= 1) & (result.logit_peak_distance <= 7)).all()
    assert json.loads(json.dumps(result.to_json()))["sliding_window"] == [8, 8]


def test_brute_force_matches_reference_loops(tiny_probes):
    """The broadcast brute force agrees with tests/reference.py's per-pair loop."""
    _, _, cap, _ = tiny_probes["llama"]
    layer = cap.layers[1]
    q, k = layer.q.double().numpy(), layer.k.double().numpy()
    h, g, r = 3, 1, cap.n_heads // cap.n_kv_heads
    assert h // r == g
    t = q.shape[1]
    count = 0
    for m in range(t):
        for n in range(m):
            count += int((ref.initial_angles(q[h, m], k[g, n], cap.layout) > math.pi).sum())
    assert count / (q.shape[-1] // 2 * t * (t - 1) / 2) == pytest.approx(brute_force(cap)["frac"][1, h], abs=1e-12)


def test_probe_histograms_and_keys(tiny_arch, tiny_probes):
    model, ids, cap, result = tiny_probes[tiny_arch]
    t = ids.numel()
    arrays = result.arrays()
    summary = result.to_json()
    L, H, J = len(cap.layers), cap.n_heads, cap.rotary_dim // 2
    hist = arrays["theta_hist"]
    assert hist.shape == (L, H, J, 16)
    assert (hist >= 0).all()
    assert (hist.sum(-1) == t * (t - 1) // 2).all()
    for key in ("model", "layers", "heads", "kv_heads", "head_dim", "layout", "tokens", "input_ids",
                "anomalous_fraction", "weighted_anomalous_fraction"):
        assert key in summary, key
    assert summary["model"] == f"tiny-{tiny_arch}"
    assert (summary["layers"], summary["heads"], summary["kv_heads"], summary["head_dim"]) == (
        L, H, cap.n_kv_heads, cap.head_dim)
    assert summary["layout"] == "half" and summary["tokens"] == t
    assert summary["input_ids"] == ids.tolist()
    np.testing.assert_array_equal(arrays["input_ids"], ids.numpy())
    assert result.kind == "rope" and result.zero_angle_tolerance == 0
    json.dumps(summary)  # JSON-ready


def test_probe_histogram_bins_within_one_of_exact(tiny_probes):
    """theta_hist puts each pair within one bin of its exact Θ bin (as documented)."""
    _, ids, cap, result = tiny_probes["qwen2"]
    bins = 16
    layer = cap.layers[0]
    q, k = layer.q.double().numpy(), layer.k.double().numpy()
    d = q.shape[-1]
    t = ids.numel()
    h, g = 1, 0
    j = 2
    a, b = ref.slice_index(j, d, cap.layout)
    theta = np.mod(np.arctan2(q[h, :, b], q[h, :, a])[:, None] - np.arctan2(k[g, :, b], k[g, :, a])[None, :], TWO_PI)
    exact = np.bincount(np.minimum((theta[np.tril_indices(t, -1)] * bins / TWO_PI).astype(int), bins - 1), minlength=bins)
    got = result.theta_hist[0, h, j]
    assert got.sum() == exact.sum()
    # Moving each pair by at most one bin: cumulative counts differ by at most the counts of
    # the neighbouring bins.
    assert np.abs(np.cumsum(got) - np.cumsum(exact)).max() <= exact.max() + got.max()
    cdf_got = np.cumsum(got)
    cdf_exact = np.cumsum(exact)
    assert (cdf_got[1:] >= cdf_exact[:-1]).all() and (cdf_exact[1:] >= cdf_got[:-1]).all()


def brute_mean_logit(layer, cap) -> np.ndarray:
    """``[H, T]``: float64 logits averaged pair by pair at each distance."""
    logits = attention_logits(layer.to(torch.float64)).numpy()  # [H, m, n]
    t = logits.shape[-1]
    return np.array([[np.mean([logits[h, m, m - s] for m in range(s, t)]) for s in range(t)]
                     for h in range(logits.shape[0])])


def test_probe_mean_logit_equals_brute_force(tiny_arch, tiny_probes):
    _, ids, cap, result = tiny_probes[tiny_arch]
    t = ids.numel()
    got = result.mean_logit  # [L, H, T]
    assert got.shape == (len(cap.layers), cap.n_heads, t)
    # T = 56 ≤ EXACT_TAIL: every lag is summed pair by pair in float64 (the FFT path is
    # checked below).
    assert t <= EXACT_TAIL
    for l, layer in enumerate(cap.layers):
        want = brute_mean_logit(layer, cap)
        np.testing.assert_allclose(got[l], want, rtol=0, atol=1e-9 * np.abs(want).max())
    peaks = result.logit_peak_distance
    window = result.logit_peak_window
    assert ((peaks >= 1) & (peaks <= window)).all()
    np.testing.assert_array_equal(peaks, 1 + got[:, :, 1 : window + 1].argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # gpt_neox: unrotated dims too
@pytest.mark.parametrize("exact_tail", [0, 20])
def test_mean_logit_fft_within_rounding_bound(arch, exact_tail, tiny_probes):
    """The float32 FFT path: within ``eps·log₂(2T)·Σ_d ‖q_d‖‖k_d‖/(T − s)`` of float64 pairs
    at lag ``s`` (the documented error model); lags in the exact tail to 1e-9."""
    _, ids, cap, _ = tiny_probes[arch]
    t = ids.numel()
    eps = torch.finfo(torch.float32).eps
    for layer in cap.layers:
        assert layer.q.dtype == torch.float32
        got = mean_logit_by_distance(layer, exact_tail=exact_tail).numpy()
        want = brute_mean_logit(layer, cap)
        q, k = rotated_heads(layer.to(torch.float64))  # [H, T, D], [KV, T, D]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        norms = (q.norm(dim=1) * k.norm(dim=1)).sum(-1).numpy()  # [H]: Σ_d ‖q_d‖‖k_d‖
        bound = eps * math.log2(2 * t) * norms[:, None] * layer.softmax_scale / np.arange(t, 0, -1)
        err = np.abs(got - want)
        assert (err[:, : t - exact_tail] <= bound[:, : t - exact_tail]).all()
        assert (err[:, t - exact_tail :] <= 1e-9 * np.abs(want).max()).all()
        # The bound is far below the signal: a wrong lag or scale could not hide in it.
        assert bound[:, : t // 2].max() < 1e-3 * np.abs(want).max()


# --------------------------------------------------------------------------------------
# 2. pair_statistics: both implementations against the brute-force reference loops
# --------------------------------------------------------------------------------------

GRID = 7  # phases on k·2π/7: ties (Θ = 0) happen, exact-π differences cannot


def _polar(r: float, angle: float) -> tuple[float, float]:
    return r * math.cos(angle), r * math.sin(angle)


# Lengths differ by powers of two only, so equal angles stay exactly equal under any phase
# formula (atan2, the sweep's pseudo-angle); angles on the grid or generic.
_vector = st.one_of(
    st.just((0.0, 0.0)),
    st.tuples(st.sampled_from([0.5, 1.0, 2.0, 4.0]),
              st.one_of(st.integers(0, GRID - 1).map(lambda i: i * TWO_PI / GRID), st.floats(1e-3, TWO_PI - 1e-3)),
              ).map(lambda ra: _polar(*ra)),
)


def _slices_to_vectors(slices: list, n: int, t: int, layout: str) -> np.ndarray:
    """``[n, t, 2J]`` from a list of ``n·t·J`` (re, im) slices, laid out in ``layout``."""
    j = len(slices) // (n * t)
    x = np.zeros((n, t, 2 * j))
    for idx, (re, im) in enumerate(slices):
        h, rest = divmod(idx, t * j)
        m, jj = divmod(rest, j)
        a, b = ref.slice_index(jj, 2 * j, layout)
        x[h, m, a], x[h, m, b] = re, im
    return x


@st.composite
def layer_contents(draw):
    kv, r, t, j = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 24)), draw(st.integers(1, 3))
    layout = draw(st.sampled_from(rope.LAYOUTS))
    pool = draw(st.lists(_vector, min_size=1, max_size=6))  # repeated vectors: tied phases
    vec = st.one_of(_vector, st.sampled_from(pool))
    q = _slices_to_vectors(draw(st.lists(vec, min_size=kv * r * t * j, max_size=kv * r * t * j)), kv * r, t, layout)
    k = _slices_to_vectors(draw(st.lists(vec, min_size=kv * t * j, max_size=kv * t * j)), kv, t, layout)
    tol = draw(st.sampled_from([0.0, 1e-9, 0.05, 1.0]))
    # Θ within rounding of π or of 2π − tol is undecidable in float64 (the code compares
    # phases with a ± π and a + tol, themselves rounded): keep such pairs out. Ties at
    # Θ = 0 stay in.
    re_im = np.array([ref.slice_index(i, 2 * j, layout) for i in range(j)])
    qa = np.arctan2(q[..., re_im[:, 1]], q[..., re_im[:, 0]]) % TWO_PI  # [H, T, J]
    ka = np.arctan2(k[..., re_im[:, 1]], k[..., re_im[:, 0]]) % TWO_PI
    ka = np.repeat(ka, r, axis=0)
    theta = (qa[:, :, None, :] - ka[:, None, :, :]) % TWO_PI  # [H, m, n, J]
    assume(np.abs(theta - math.pi).min() > 1e-9)
    assume(np.all((theta == 0) | (np.minimum(theta, TWO_PI - theta) > 1e-9)))
    if tol > 0:
        assume(np.abs(theta - (TWO_PI - tol)).min() > 1e-9)
    return q, k, layout, tol, draw(st.integers(2, 12)), draw(st.one_of(st.none(), st.integers(1, t)))


@pytest.mark.parametrize("method", ["sweep", "blocks"])
@settings(max_examples=50, deadline=None, database=None)
@given(data=layer_contents(), window=st.one_of(st.none(), st.integers(1, 30)))
def test_pair_statistics_equal_reference_loops(method, data, window):
    """Every statistic, zero slices, tied phases, both layouts, with and without the
    zero-angle tolerance, over every causal pair or a sliding window's (m − n < W; W ≥ T is
    every pair): exactly the brute-force loop's counts and histograms."""
    q, k, layout, tol, bins, block = data
    got = pair_statistics(torch.from_numpy(q), torch.from_numpy(k), layout, bins=bins, zero_angle_tol=tol,
                          method=method, block=block, window=window)
    want = ref.pair_statistics(q, k, layout, tol, bins, window=window)
    t = q.shape[1]
    w = min(window or t, t)
    assert got.pairs == t * (t - 1) // 2 - (t - w + 1) * (t - w) // 2
    assert got.hist.sum(-1).eq(got.pairs).all()
    np.testing.assert_array_equal(got.count_d.numpy(), want["count_d"])
    np.testing.assert_array_equal(got.hist.numpy(), want["hist"])
    np.testing.assert_allclose(got.weight_d.numpy(), want["weight_d"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.weight_all.numpy(), want["weight_all"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.mean_product.real.numpy(), want["product_re"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.mean_product.imag.numpy(), want["product_im"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_pair_statistics_random_layers_equal_reference(layout):
    """Random float32 contents with grouped-query heads (the probe's case): both
    implementations equal the reference loop, with and without the tolerance."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 33, 6, generator=g), torch.randn(2, 33, 6, generator=g)
    for tol in (0.0, 0.2):
        want = ref.pair_statistics(q.double().numpy(), k.double().numpy(), layout, tol, bins=8)
        assert 0 < want["count_d"].sum() < q.shape[0] * 3 * 33 * 32 // 2
        for method in ("sweep", "blocks"):
            got = pair_statistics(q, k, layout, bins=8, zero_angle_tol=tol, method=method)
            np.testing.assert_array_equal(got.count_d.numpy(), want["count_d"])
            np.testing.assert_array_equal(got.hist.numpy(), want["hist"])
            np.testing.assert_allclose(got.weight_d.numpy(), want["weight_d"], rtol=1e-9)
    # The tolerance must be able to change the count: 0.2 rad removes pairs near 2π.
    assert (ref.pair_statistics(q.double().numpy(), k.double().numpy(), layout, 0.2, bins=8)["count_d"].sum()
            < ref.pair_statistics(q.double().numpy(), k.double().numpy(), layout, 0.0, bins=8)["count_d"].sum())


def test_pair_statistics_window_changes_the_count():
    """On random contents a window of 5 keeps fewer case-(d) pairs than the whole causal
    triangle (the window is applied, not ignored)."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 40, 4, generator=g), torch.randn(1, 40, 4, generator=g)
    every, near = pair_statistics(q, k, "half"), pair_statistics(q, k, "half", window=5)
    assert near.pairs == 4 * 40 - 10 and near.count_d.sum() < every.count_d.sum()
    with pytest.raises(ValueError, match="window"):
        pair_statistics(q, k, "half", window=0)


def test_zero_angle_tolerance_absorbs_rounded_zeros():
    """Contents at angle 0 up to ±1e-16 rad (strict CoCA's, rotated back in float64): case
    (d) without the tolerance, none with it, in both implementations."""
    g = torch.Generator().manual_seed(2)
    rho = torch.rand(2, 40, 4, generator=g, dtype=torch.float64) + 0.1
    noise = 1e-16 * torch.randn(2, 40, 4, generator=g, dtype=torch.float64)
    q = torch.cat([rho, rho * noise], -1)  # half layout: slice j = (rho, rho·1e-16)
    k = torch.cat([rho.flip(1), -rho.flip(1) * noise], -1)
    for method in ("sweep", "blocks"):
        assert pair_statistics(q, k, "half", method=method).count_d.sum() > 0  # the failure it fixes
        assert pair_statistics(q, k, "half", zero_angle_tol=1e-9, method=method).count_d.sum() == 0


def test_pair_statistics_sweep_equals_blocks():
    """The compiled one-pass form and the vectorised tensor form agree on longer sequences
    than the reference loop can afford: zero slices, tied keys and crowded phases."""
    g = torch.Generator().manual_seed(3)
    for (kv, r, t, j) in [(2, 3, 50, 3), (7, 1, 123, 1), (2, 2, 300, 2), (5, 2, 600, 1)]:
        q, k = torch.randn(kv * r, t, 2 * j, generator=g), torch.randn(kv, t, 2 * j, generator=g)
        q[0, :7] = 0  # zero query slices
        k[-1, :9] = 0  # zero key slices
        k[0, 5:10] = k[0, 0]  # tied key phases
        if kv >= 5:  # phases crowded into a few 1e-4-rad buckets (a bias-dominated slice),
            # with the queries' case-(d) thresholds landing inside the crowd
            k[3:5, :, 0] = 1 + 1e-5 * torch.randn(2, t, generator=g)
            k[3:5, :, 1] = 1e-4 * torch.randn(2, t, generator=g)
            q[3 * r : 4 * r, :, 0] = 1 + 1e-5 * torch.randn(r, t, generator=g)
            q[4 * r : 5 * r, :, 0] = -1 + 1e-5 * torch.randn(r, t, generator=g)
            q[3 * r : 5 * r, :, 1] = 1e-4 * torch.randn(2 * r, t, generator=g)
        for tol in (0.0, 1e-9):
            sweep = pair_statistics(q, k, "half", bins=16, zero_angle_tol=tol, method="sweep")
            blocks = pair_statistics(q, k, "half", bins=16, zero_angle_tol=tol, method="blocks")
            assert torch.equal(sweep.count_d, blocks.count_d)
            assert torch.equal(sweep.hist, blocks.hist)
            assert sweep.hist.sum(-1).eq(t * (t - 1) // 2).all()
            for field in ("weight_d", "weight_all", "mean_product", "q_norm", "k_norm"):
                torch.testing.assert_close(getattr(sweep, field), getattr(blocks, field), rtol=1e-10, atol=1e-10)


def test_sweep_keeps_the_callers_thread_count():
    """numba's OpenMP layer shares its runtime with torch: the sweep must not leave torch on
    more threads than the caller allowed (the ablation's workers train on one thread each)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        q, k = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(1, 9, 8, dtype=torch.float64)
        pair_statistics(q, k, "half", bins=8, method="sweep")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_pair_statistics_refuses_bad_input():
    q, k = torch.randn(4, 10, 8), torch.randn(3, 10, 8)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        pair_statistics(q, k, "half")
    with pytest.raises(ValueError, match="zero_angle_tol"):
        pair_statistics(q, k[:2], "half", zero_angle_tol=4.0)
    with pytest.raises(ValueError, match="method"):
        pair_statistics(q, k[:2], "half", method="fast")


_coord = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False), st.floats(-1e-30, 1e-30))


@settings(max_examples=300, deadline=None, database=None)
@given(x1=_coord, y1=_coord, x2=_coord, y2=_coord, bins=st.integers(1, 70))
def test_pseudo_angle_orders_as_the_angle_and_bins_as_atan2(x1, y1, x2, y2, bins):
    """The sweep's stand-in for atan2: same order around the circle, half a turn away for
    −v, and the histogram bin the atan2 formula gives."""
    from anomaly.probe.sweep import _phase, _phase_bin, _pseudo, _table_bin, bin_table

    table = bin_table(bins)
    for x, y in ((x1, y1), (x2, y2)):
        p = _pseudo(x, y)
        assert 0.0 <= p < 4.0
        assert _table_bin(x, y, p, bins, table) == _phase_bin(_phase(x, y), bins)
        if (x, y) != (0.0, 0.0):
            gap = abs(_pseudo(-x, -y) - (p + 2.0) % 4.0)
            assert min(gap, 4.0 - gap) <= 1e-12  # half a turn, on the circle of length 4
    a1, a2 = _phase(x1, y1), _phase(x2, y2)
    if abs(a1 - a2) > 1e-12 and (x1, y1) != (0.0, 0.0) and (x2, y2) != (0.0, 0.0):
        assert (_pseudo(x1, y1) < _pseudo(x2, y2)) == (a1 < a2)


def test_pseudo_bins_at_bin_edges():
    """Vectors on and next to every bin edge bin exactly as ⌊atan2·bins/2π⌋ does."""
    from anomaly.probe.sweep import _phase, _phase_bin, _pseudo, _table_bin, bin_table

    for bins in (16, 64, 7):
        table = bin_table(bins)
        for i in range(bins):
            edge = i * TWO_PI / bins
            for angle in np.nextafter(edge, [-np.inf, np.inf]).tolist() + [edge, edge + 1e-9, edge - 1e-9]:
                for radius in (1e-3, 1.0, 37.5):
                    x, y = radius * math.cos(angle), radius * math.sin(angle)
                    assert _table_bin(x, y, _pseudo(x, y), bins, table) == _phase_bin(_phase(x, y), bins)
