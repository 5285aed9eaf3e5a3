"""The seed-level statistics core (anomaly.replication) and the analysis layer
(anomaly.ablation.analysis) against hand-computed and brute-force cases, and against the
committed 3-seed run's per-seed arrays."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from anomaly.ablation import analysis
from anomaly import replication as st
from anomaly.verdicts import verdict

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "ablation_cpu.json"


@pytest.fixture(scope="module")
def committed() -> dict:
    return analysis.load_results(COMMITTED)


# ----------------------------------------------------------------------- t-interval


def test_t_interval_of_three_seeds_by_hand():
    values = {0: 1.0, 1: 2.0, 2: 6.0}
    # mean 3, sd sqrt(((−2)² + (−1)² + 3²)/2) = sqrt(7); with 2 degrees of freedom the t
    # quantile has the closed form (2p − 1)/sqrt(2p(1 − p)): p = 0.975 gives 4.3026527...
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t == pytest.approx(4.30265, abs=1e-5)
    half = t * math.sqrt(7) / math.sqrt(3)
    m = st.seed_mean(values)
    assert m.n == 3 and m.mean == pytest.approx(3.0) and m.sd == pytest.approx(math.sqrt(7))
    assert (m.low, m.high) == pytest.approx((3 - half, 3 + half), rel=1e-12)


def test_t_interval_degenerate_cases():
    assert st.seed_mean({4: 0.5}).low != st.seed_mean({4: 0.5}).low  # NaN: one seed gives no interval
    m = st.seed_mean({0: 0.0, 1: 0.0, 2: 0.0})
    assert (m.low, m.high) == (0.0, 0.0)
    assert all(math.isnan(b) for b in st.t_interval([1.0, math.inf, 2.0]))


def test_issue_example_two_x_slack_minus_rope():
    """Issue 17's example: 2× slack − RoPE per seed +0.865, +0.42, +0.01 (from the committed
    per-seed shares 0.92/0.98/0.01 and 0.055/0.56/0.00) give [−0.63, 1.49] and p = 0.25."""
    c = st.paired({0: 0.92, 1: 0.98, 2: 0.01}, {0: 0.055, 1: 0.56, 2: 0.0})
    assert c.differences == pytest.approx((0.865, 0.42, 0.01))
    assert (round(c.low, 2), round(c.high, 2)) == (-0.63, 1.49)
    assert c.p == pytest.approx(0.25) and not c.excludes_null


# ------------------------------------------------------------------- sign flip, pairing


def test_sign_flip_p_for_three_seeds_by_hand():
    # All three differences positive: only the identity and the all-negated pattern are
    # as extreme in |mean| → 2 of 8.
    assert st.sign_flip_p([0.3, 0.1, 0.2]) == pytest.approx(2 / 8)
    # Differences 3, −1, 1: the 8 signed sums ±3 ± 1 ± 1 have |sum| 5, 3, 3, 1 (twice each);
    # the observed sum is 3, so 6 of 8 are as extreme.
    assert st.sign_flip_p([3.0, -1.0, 1.0]) == pytest.approx(6 / 8)
    assert st.sign_flip_p([0.5]) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_sign_flip_p_matches_brute_force(seed):
    d = np.random.default_rng(seed).normal(0.3, 1.0, 6)
    sums = np.array([np.dot(signs, d) for signs in itertools.product((1, -1), repeat=d.size)])
    expected = np.mean(np.abs(sums) >= abs(d.sum()) - 1e-12)
    assert st.sign_flip_p(d) == pytest.approx(expected)


def test_paired_differences_pair_the_right_seeds():
    a = {0: 10.0, 1: 20.0, 2: 30.0, 5: 40.0}
    b = {5: 4.0, 2: 3.0, 0: 1.0, 1: 2.0}  # another order, same seeds
    c = st.paired(a, b)
    assert c.seeds == (0, 1, 2, 5)
    assert c.differences == (9.0, 18.0, 27.0, 36.0)
    shuffled = dict(reversed(list(a.items())))
    assert st.paired(shuffled, b) == c
    with pytest.raises(ValueError, match="same seeds"):
        st.paired(a, {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0})


def test_paired_contrast_of_results_pairs_seeds_by_id(committed):
    """In the to-criterion reading the seeds that reached it differ between variants: only
    common seeds are paired, each with itself."""
    c = analysis.contrast(committed, "passkey", 256, ("coca_strict", analysis.TO_CRITERION),
                          ("coca_slack", analysis.TO_CRITERION))
    assert c.stat.seeds == (0, 1)  # strict reached in seeds 0 and 1, slack in 0, 1, 2
    strict = committed["criterion"]["per_variant"]["coca_strict"]["passkey_per_seed"]
    slack = committed["criterion"]["per_variant"]["coca_slack"]["passkey_per_seed"]
    assert c.stat.differences == pytest.approx((strict[0][1] - slack[0][1], strict[1][1] - slack[1][1]))
    # The file lists seeds in another order (rows with them): the same pairs, the same result.
    r = copy.deepcopy(committed)
    r["seeds"] = r["seeds"][::-1]
    for v in r["variants"]:
        r["passkey_per_seed"][v]["none"] = r["passkey_per_seed"][v]["none"][::-1]
    ref = analysis.contrast(committed, "passkey", 256, ("coca_slack", "none"), ("rope", "none")).stat
    assert analysis.contrast(r, "passkey", 256, ("coca_slack", "none"), ("rope", "none")).stat == ref
    # Only one variant's rows reordered: seeds are now paired with other seeds, and it shows.
    r["passkey_per_seed"]["rope"]["none"] = r["passkey_per_seed"]["rope"]["none"][::-1]
    assert analysis.contrast(r, "passkey", 256, ("coca_slack", "none"), ("rope", "none")).stat != ref


def test_headline_difference_recomputed_from_the_committed_arrays(committed):
    """Any reported paired interval is a t-interval over the committed per-seed values."""
    slack = np.asarray(committed["passkey_per_seed"]["coca_slack"]["none"])[:, 1]
    rope = np.asarray(committed["passkey_per_seed"]["rope"]["none"])[:, 1]
    d = slack - rope
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    c = analysis.contrast(committed, "passkey", 256, ("coca_slack", "none"), ("rope", "none")).stat
    assert (c.low, c.high) == pytest.approx((d.mean() - half, d.mean() + half))
    # Perplexity: log-perplexity differences.
    a = np.log(np.asarray(committed["ppl_per_seed"]["coca_slack"]["none"])[:, 2])
    b = np.log(np.asarray(committed["ppl_per_seed"]["rope"]["none"])[:, 2])
    c = analysis.contrast(committed, "ppl", 512, ("coca_slack", "none"), ("rope", "none")).stat
    assert c.differences == pytest.approx(tuple(a - b)) and c.estimate == pytest.approx((a - b).mean())


# -------------------------------------------------------------------------- power


def test_detectable_difference_has_the_stated_power():
    for n in (3, 6, 10):
        mde = st.detectable_difference(0.5, n)
        assert st.paired_t_power(mde, 0.5, n) == pytest.approx(0.8, abs=1e-6)
        assert st.paired_t_power(0.0, 0.5, n) == pytest.approx(0.05, abs=1e-9)  # size at no effect
    # The textbook value: n = 10, 80 % power, two-sided 5 % → d ≈ 0.996 SD.
    assert st.detectable_difference(1.0, 10) == pytest.approx(0.996, abs=2e-3)
    assert st.detectable_difference(1.0, 6) < st.detectable_difference(1.0, 3)


# ------------------------------------------------------------------------- counts


@pytest.mark.parametrize("n", [3, 10])
def test_clopper_pearson_at_zero_and_n(n):
    alpha = 0.05
    zero, full = st.proportion(0, n), st.proportion(n, n)
    assert zero.low == 0.0 and zero.high == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-9)
    assert full.high == 1.0 and full.low == pytest.approx((alpha / 2) ** (1 / n), rel=1e-9)


def test_fisher_on_a_two_by_two_table_by_hand():
    # [[3, 0], [1, 2]]: with margins 4 and 2 of 6, P(table) = C(3,3)C(3,1)/C(6,4) = 3/15 = 0.2;
    # the only other table as unlikely is [[1, 2], [3, 0]] (0.2); p = 0.4.
    c = st.compare_counts(3, 3, 1, 3)
    assert c.p == pytest.approx(0.4) and c.estimate == pytest.approx(2 / 3)
    assert c.min_p == pytest.approx(0.1)  # [[3, 0], [0, 3]]: 2 / C(6, 3)
    assert c.mde == math.inf  # no outcome of 3 vs 3 seeds reaches 0.05
    assert not c.excludes_null
    assert verdict(c, +1).text == ("not distinguishable with 3 seeds (no difference is detectable: "
                                      "the exact test cannot go below p = 0.1 with 3 seeds)")


def test_counts_where_no_change_has_power_say_so_not_the_floor():
    # 7/10 against 7/10: 10 vs 10 seeds can reach p < 0.05, but even 10/10 against a true 0.7
    # is rejected only when the comparator draws 5 or fewer (power 0.15): no change has 80 %.
    c = st.compare_counts(7, 10, 7, 10)
    assert c.min_p < 0.05 and c.mde == math.inf
    assert verdict(c, +1).text == ("not distinguishable with 10 seeds (no difference is detectable: "
                                   "none reaches 80 % power with 10 seeds)")


def test_fisher_power_brute_force():
    # 4 vs 4 seeds: the tables Fisher rejects at 0.05 are [[4,0],[0,4]] and its mirror (p = 2/70).
    p_a, p_b = 0.9, 0.2
    expected = p_a ** 4 * (1 - p_b) ** 4 + (1 - p_a) ** 4 * p_b ** 4
    assert st.fisher_power(p_a, p_b, 4, 4) == pytest.approx(expected)


# ------------------------------------------------------------------------- verdict


def _paired(diffs):
    return st.paired({i: d for i, d in enumerate(diffs)}, {i: 0.0 for i in range(len(diffs))})


def test_verdict_rule_three_outcomes():
    up = _paired([0.9, 1.1, 1.0, 1.2, 0.8, 1.05, 0.95])  # 7 seeds, all positive: p = 2/128
    assert up.p == pytest.approx(2 / 128) and up.excludes_null
    assert verdict(up, +1).word == "agrees"
    assert verdict(up, -1).word == "contradicts"
    assert verdict(up, 0).word == "contradicts"  # a claimed "no difference" is contradicted
    three = _paired([0.9, 1.1, 1.0])  # interval excludes 0 but the exact p cannot go below 0.25
    assert three.excludes_null and three.p == pytest.approx(0.25)
    v = verdict(three, +1)
    assert v.word == "not distinguishable"
    assert v.text.startswith(f"not distinguishable with 3 seeds (80 % power to detect |Δ| ≥ {three.mde:.2f}")
    assert "cannot go below p = 0.25" in v.text
    mixed = _paired([0.5, -0.4, 0.3, -0.2, 0.1, 0.4, -0.3])
    assert verdict(mixed, +1).word == "not distinguishable"


# ----------------------------------------------------------------------- time to event


def test_time_to_event_censors_at_the_cap():
    t = st.time_to_event({0: None, 1: 600, 2: None}, cap=3000)
    assert t.reached == 1 and t.median is None  # 2 of 3 never reached it: the curve stays at 2/3
    assert t.curve_not_yet[0] == pytest.approx(2 / 3)
    s = st.time_to_event({0: 2100, 1: 1700, 2: 1500}, cap=3000)
    assert s.median == 1700 and s.curve_not_yet == pytest.approx((2 / 3, 1 / 3, 0.0))
    assert 0 < st.logrank(s, t) < 1


# -------------------------------------------------------------------------- design effect


def test_design_effect_on_a_constructed_matrix():
    # Seed effects ±1 (3 seeds: −1, 0, +1) plus within-seed deviations ±0.5 in every row:
    # MSW = sum of squares 4·0.25·... computed by hand below.
    items = np.array([0.5, -0.5, 0.5, -0.5])  # mean 0, within variance (ddof 1) = 1/3
    x = np.array([[-1.0], [0.0], [1.0]]) + items[None, :]  # [3 seeds, 4 items]
    e = st.design_effect(x)
    assert e.within == pytest.approx(1 / 3)
    # MSB = m · Σ(seed mean − grand)² / (k − 1) = 4 · 2 / 2 = 4; between = (4 − 1/3) / 4
    assert e.between == pytest.approx((4 - 1 / 3) / 4)
    icc = e.between / (e.between + 1 / 3)
    assert e.icc == pytest.approx(icc) and e.deff == pytest.approx(1 + 3 * icc)
    assert e.n_eff == pytest.approx(12 / (1 + 3 * icc))
    # No seed effect: the pooled units are independent (deff 1 where between = 0).
    assert st.design_effect(np.tile(items, (3, 1))).deff == pytest.approx(1.0)


def test_binary_items_reproduce_the_counts():
    m = st.binary_items([3, 0, 5], 5)
    assert m.shape == (3, 5) and list(m.sum(axis=1)) == [3, 0, 5]


# ------------------------------------------------------------------------- spearman


def test_spearman_exact_p_by_enumeration():
    x = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.9}
    y = {3: 4.0, 0: 1.0, 2: 2.0, 1: 3.0}  # ranks x: 1 3 2 4, y: 1 3 2 4 → ρ = 1
    r = st.spearman(x, y, "greater")
    assert r.rho == pytest.approx(1.0) and r.p == pytest.approx(1 / 24) and r.exact
    # Three seeds, one-sided: the smallest p is 1/6.
    r3 = st.spearman({0: 1.0, 1: 2.0, 2: 3.0}, {0: 3.0, 1: 2.0, 2: 1.0}, "less")
    assert r3.rho == pytest.approx(-1.0) and r3.p == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        st.spearman({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 3: 3.0})


# ----------------------------------------------------------------- committed run tables


def test_committed_run_verdicts_follow_the_rule(committed):
    """With 3 seeds no passkey or perplexity comparison passes the rule (the exact test
    cannot go below 0.25), however far the t-interval is from 0."""
    for key in analysis.READINGS:
        for c in analysis.variant_contrasts(committed, key, "none"):
            assert verdict(c.stat, +1).word == "not distinguishable"
    ppl = {c.length: c.stat for c in analysis.variant_contrasts(committed, "ppl", "none")
           if (c.a, c.b) == ("coca_slack", "rope")}
    assert all(max(s.differences) < 0 for n, s in ppl.items() if n >= 256)  # slack lower in 3/3 seeds, 2×–16×
    learned = {v: analysis.learned(committed, v).share.k for v in committed["variants"]}
    assert learned == {"rope": 1, "coca_slack": 3, "coca_strict": 2}
    fisher = {(a, b): c.p for a, b, c in analysis.learned_comparisons(committed)}
    assert fisher[("coca_slack", "rope")] == pytest.approx(0.4)


def test_committed_design_effect_says_the_seed_is_the_unit(committed):
    rope_1x = next(d for d in analysis.design_effects(committed)
                   if (d.key, d.variant, d.length) == ("passkey", "rope", 128))
    # shares 0.67, 1.00, 0.00 of 200 prompts each: effective n about 4 of 600.
    assert rope_1x.effect.n_eff < 8 and rope_1x.effect.icc > 0.5


def test_report_and_table_cells(committed):
    text = analysis.report(committed)
    assert "not distinguishable with 3 seeds" in text and "Fisher" in text and "Kaplan–Meier" in text
    row = analysis.markdown_table(committed, "passkey").splitlines()[2]
    s = analysis.series(committed, "passkey", "rope", "none")
    assert row.split(" | ")[2] == analysis.cell(s, 0, 2, 3)
    assert "(0.670 · 1.000 · 0.000)" in row
    with pytest.raises(ValueError):
        analysis.markdown_table(committed, "nll")


def test_guessing_level_of_the_digit_loss():
    # first digit uniform on 1–9, the other four on 0–9
    assert analysis.GUESSING == pytest.approx((math.log(9) + 4 * math.log(10)) / 5)
    assert round(analysis.GUESSING, 2) == 2.28


def test_committed_results_have_no_pooled_intervals():
    raw = json.loads(COMMITTED.read_text())
    assert not any(k.endswith("_ci") for k in raw)
    assert not any(k.endswith("_ci") for entry in raw["criterion"]["per_variant"].values() for k in entry)


# ----------------------------------------------------------------------- Fig. 4's window gap


def test_window_gap_pairs_each_seed_with_itself_and_variants_by_seed():
    from anomaly.ablation.window import gap_contrast, split_depths, window_gap

    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert split_depths(depths, 256, 128) == ([3, 4], [0, 1, 2])  # 2×: key within T at depths 0.75, 1
    assert split_depths(depths, 512, 128) == ([4], [0, 1, 2, 3])

    def grid(inside, outside):  # [length, depth] at lengths 128 and 256
        return [[1.0] * 5, [outside] * 3 + [inside] * 2]

    results = {"seeds": [3, 5], "depths": depths, "eval_lengths": [128, 256], "train_length": 128,
               "variants": ["rope", "coca_slack"],
               "passkey_grid_per_seed": {"rope": {"none": [grid(0.9, 0.1), grid(0.5, 0.5)]},
                                         "coca_slack": {"none": [grid(0.4, 0.4), grid(0.8, 0.2)]}}}
    rope = window_gap(results, "rope", 256)
    assert list(rope.stat.seeds) == [3, 5] and list(rope.stat.differences) == pytest.approx([0.8, 0.0])
    slack = window_gap(results, "coca_slack", 256)
    assert list(gap_contrast(slack, rope).differences) == pytest.approx([0.0 - 0.8, 0.6 - 0.0])
    assert window_gap(results, "rope", 1024) is None  # a length the run did not evaluate
