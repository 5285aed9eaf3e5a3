"""Seed-level tables of an ablation run: a pure function of its ``results.json`` dict.

``results.json`` stores per-seed values only (its schema, readers and checks:
:mod:`anomaly.ablation.results`, whose names are re-exported here); every summary, interval
and test is computed here, with the trained model (the seed) as the unit
(:mod:`anomaly.replication`, docs/ablation.md "Verdicts"):

* :func:`series`: per reading, variant and panel (a scaling, or a snapshot of
  :data:`SNAPSHOTS`: the matched stage, to criterion), each
  seed's values, their mean and t-interval by length (what the figures draw);
* :func:`variant_contrasts` / :func:`scaling_effects`: paired per-seed differences between
  variants (slack − RoPE, strict − RoPE, strict − slack) and of dynamic NTK within a variant;
* :func:`learned`: seeds that learned retrieval by the end, with Fisher's exact test;
* :func:`criterion_times`: the step at which validation reached the criterion, censored;
* :func:`design_effects`: between- and within-seed variance where within-seed items exist;
* :func:`thesis`: the pre-registered rank correlation over RoPE seeds of the weighted case-(d)
  share with extrapolation;
* Fig. 4's window gap (:mod:`anomaly.ablation.window`) at 2× T;
* :func:`report`: all of it as Markdown (``python -m anomaly.ablation.analysis RESULTS``).

Perplexity is analysed as log-perplexity (the mean NLL per token): differences are in nats
and intervals are exponentiated back for display (a geometric mean over seeds).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomaly import replication as st
from anomaly import variants as registry
from anomaly.ablation.window import gap_contrast, window_gaps
from anomaly.verdicts import verdict
from anomaly.ablation.results import (  # noqa: F401  (re-exported: notebooks and tests read them here)
    MATCHED_STAGE, READINGS, REQUIRED_KEYS, SNAPSHOTS, TABLE_SHAPES, TO_CRITERION, check_results, criterion_of,
    criterion_reached, floats, grid_per_seed, load_results, mean_grid, panels_of, per_seed, scalings_of,
    seeds_reached, snapshot_of, snapshot_reached, variants_of)
from anomaly.cli import ArgumentParser, UserError, run_main

LABELS = {"ppl": "log-perplexity (nats/token)", "passkey": "exact passkey share", "digit_nll": "digit loss (nats)"}
"""What the differences of each reading are in."""
TITLES = {"ppl": "perplexity (geometric mean over seeds; interval exp of the log-scale t-interval)",
          "passkey": "exact passkey share", "digit_nll": "digit loss (nats per digit)"}

VARIANT_PAIRS = (("coca_slack", "rope"), ("coca_strict", "rope"), ("coca_strict", "coca_slack"))
"""Variant comparisons, each as ``a − b``."""

GUESSING = (math.log(9) + 4 * math.log(10)) / 5
"""Digit loss (nats per digit) of a model that knows a five-digit passkey comes but guesses
its digits: the first is drawn from 1–9 (passkeys are 10000–99999), the other four from 0–9."""


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class Series:
    """One variant's reading in one panel against length: ``values`` ``[seed, length]`` (row
    ``i`` is seed ``seeds[i]``), and by length the mean over seeds and its t-interval. For
    ``ppl`` every number is a perplexity: the per-seed values, ``exp`` of the mean
    log-perplexity (a geometric mean) and ``exp`` of its interval."""

    key: str
    variant: str
    panel: str
    seeds: tuple[int, ...]
    values: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def series(results: dict, key: str, variant: str, panel: str) -> Series | None:
    """:class:`Series` of ``key`` (``ppl``, ``passkey`` or ``digit_nll``); ``None`` where
    there is nothing to draw."""
    rows = per_seed(results, key, variant, panel)
    if rows is None:
        return None
    seeds = sorted(rows)
    table = np.array([rows[s] for s in seeds])  # [seed, length]
    stats = [st.seed_mean({s: rows[s][i] for s in seeds}) for i in range(table.shape[1])]
    mean, low, high = (np.array([getattr(x, f) for x in stats]) for f in ("mean", "low", "high"))
    if key == "ppl":
        table, mean, low, high = np.exp(table), np.exp(mean), np.exp(low), np.exp(high)
    return Series(key, variant, panel, tuple(seeds), table, mean, low, high)


def mean_curve(curves: list[dict], key: str) -> tuple[list, np.ndarray]:
    """Steps logged by every one of ``curves`` (training curves of a variant's seeds, from
    ``results["training"]``) and the mean of ``key`` over them there."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    by_step = [dict(zip(c["step"], floats(c[key]))) for c in curves]
    return common, np.array([np.mean([b[s] for b in by_step]) for s in common])


# ------------------------------------------------------------------------ contrasts


@dataclass(frozen=True)
class Contrast:
    """``a − b`` of ``key`` at ``length``, seed by seed (``a``/``b``: variants, with
    ``panel`` their common reading; or, for a scaling effect, two panels of ``variant``).
    For ``ppl`` the differences are of log-perplexity (nats per token)."""

    key: str
    length: int
    a: str
    b: str
    panel: str
    stat: st.Paired


def _at(rows: dict[int, np.ndarray], i: int) -> dict[int, float]:
    return {s: float(v[i]) for s, v in rows.items()}


def contrast(results: dict, key: str, length: int, a: tuple[str, str], b: tuple[str, str]) -> Contrast | None:
    """``a − b`` at ``length``, where ``a`` and ``b`` are ``(variant, panel)``. Seeds are
    paired by id; in a snapshot reading (:data:`SNAPSHOTS`) only seeds that reached it on
    both sides take part. ``None`` when no seed is on both sides."""
    ra, rb = per_seed(results, key, *a), per_seed(results, key, *b)
    if ra is None or rb is None:
        return None
    if a[1] in SNAPSHOTS or b[1] in SNAPSHOTS:
        common = set(ra) & set(rb)
        ra, rb = {s: ra[s] for s in common}, {s: rb[s] for s in common}
    if not ra:
        return None
    i = list(results["eval_lengths"]).index(length)
    same_variant = a[0] == b[0]
    label_a, label_b = (a[1], b[1]) if same_variant else (a[0], b[0])
    return Contrast(key, length, label_a, label_b, a[0] if same_variant else a[1],
                    st.paired(_at(ra, i), _at(rb, i)))


def variant_contrasts(results: dict, key: str, panel: str = "none") -> list[Contrast]:
    """:data:`VARIANT_PAIRS` at every length in ``panel``."""
    variants = variants_of(results)
    out = []
    for a, b in VARIANT_PAIRS:
        if a in variants and b in variants:
            for n in results["eval_lengths"]:
                c = contrast(results, key, n, (a, panel), (b, panel))
                if c is not None:
                    out.append(c)
    return out


def scaling_effects(results: dict, key: str, variant: str) -> list[Contrast]:
    """Every dynamic-NTK scaling minus no scaling, within ``variant``, at every length
    beyond the training length (at and below it NTK changes nothing)."""
    T = int(results["train_length"])
    return [c for s in scalings_of(results) if s != "none" for n in results["eval_lengths"] if n > T
            if (c := contrast(results, key, n, (variant, s), (variant, "none"))) is not None]


# --------------------------------------------------------------------- counts, time


@dataclass(frozen=True)
class Learned:
    """Which seeds of ``variant`` retrieve at the training length by the end of training (no
    scaling, exact match ≥ ``threshold`` on the evaluation prompts)."""

    variant: str
    threshold: float
    seeds: tuple[int, ...]
    learned: tuple[bool, ...]
    share: st.Proportion


def threshold_of(results: dict) -> float:
    """The validation criterion (exact-match share), 0.9 where the run records none."""
    return float((results.get("criterion") or {}).get("threshold") or 0.9)


def learned(results: dict, variant: str) -> Learned:
    """:class:`Learned` of ``variant``."""
    threshold = threshold_of(results)
    i = list(results["eval_lengths"]).index(int(results["train_length"]))
    rows = per_seed(results, "passkey", variant, "none") or {}
    seeds = sorted(rows)
    hits = tuple(bool(rows[s][i] >= threshold) for s in seeds)
    return Learned(variant, threshold, tuple(seeds), hits, st.proportion(sum(hits), len(hits)))


def learned_comparisons(results: dict) -> list[tuple[str, str, st.Counts]]:
    """``(a, b, counts)`` for :data:`VARIANT_PAIRS`: seeds that learned, Fisher's exact test."""
    variants = variants_of(results)
    out = []
    for a, b in VARIANT_PAIRS:
        if a in variants and b in variants:
            la, lb = learned(results, a), learned(results, b)
            out.append((a, b, st.compare_counts(la.share.k, la.share.n, lb.share.k, lb.share.n)))
    return out


def cap_of(results: dict) -> int:
    """The training budget in steps (the censoring point of the criterion step)."""
    steps = ((results.get("config") or {}).get("train") or {}).get("steps")
    if steps is None:  # older runs: the steps each model trained
        steps = max(r["steps"] for runs in (results.get("training") or {}).values() for r in runs)
    return int(steps)


def criterion_times(results: dict) -> dict[str, st.TimeToEvent]:
    """Variant → criterion steps as time to event, censored at :func:`cap_of`."""
    cap = cap_of(results)
    out = {}
    for v in variants_of(results):
        steps = criterion_of(results, v).get("steps")
        if steps is not None:
            out[v] = st.time_to_event(dict(zip(results["seeds"], steps)), cap)
    return out


# --------------------------------------------------------------------- design effect


@dataclass(frozen=True)
class Decomposition:
    """Design effect of ``key`` for ``variant`` in ``panel`` at ``length``."""

    key: str
    variant: str
    panel: str
    length: int
    effect: st.DesignEffect


def prompts_per_seed(results: dict) -> int:
    """Evaluation prompts per length and seed."""
    return int(results["passkey_samples"]) * len(results["depths"])


def design_effects(results: dict, panel: str = "none") -> list[Decomposition]:
    """Between- and within-seed variance by length for the readings with items inside a
    seed: passkey (prompts; a seed's share and count of prompts determine its 0/1 items),
    and log-perplexity where the run recorded each seed's segments (``segment_nll_per_seed``)."""
    out = []
    m = prompts_per_seed(results)
    for v in variants_of(results):
        rows = per_seed(results, "passkey", v, panel)
        if rows is not None and len(rows) > 1:
            for i, n in enumerate(results["eval_lengths"]):
                counts = [round(float(rows[s][i]) * m) for s in sorted(rows)]
                out.append(Decomposition("passkey", v, panel, n, st.design_effect(st.binary_items(counts, m))))
        segments = ((results.get("segment_nll_per_seed") or {}).get(v) or {}).get(panel)
        if segments is not None and len(segments) > 1:
            seg = floats(segments)  # [seed, length, segment]
            for i, n in enumerate(results["eval_lengths"]):
                out.append(Decomposition("ppl", v, panel, n, st.design_effect(seg[:, i])))
    return out


# ---------------------------------------------------------------------------- thesis


THESIS = (("2× passkey", "passkey", 2, "less"), ("4× log-perplexity", "ppl", 4, "greater"))
"""The pre-registered single-model test (docs/ablation.md): over the RoPE seeds, a higher
weighted case-(d) share goes with *worse* extrapolation, i.e. a lower passkey share at 2×
(ρ < 0) and a higher log-perplexity at 4× (ρ > 0), no scaling; one-sided permutation p-values (exact
up to :data:`anomaly.replication.EXACT_PERMUTATIONS` seeds, Monte Carlo beyond)."""


def thesis(results: dict, variant: str = "rope") -> list[tuple[str, st.RankCorrelation]]:
    """``(name, correlation)`` for each test of :data:`THESIS`; empty where the run has no
    probe of ``variant``, fewer than 3 seeds, or not those lengths."""
    geometry = (results.get("anomalous_fraction") or {}).get(variant)
    T = int(results["train_length"])
    lengths = list(results["eval_lengths"])
    if not geometry or len(results["seeds"]) < 3:
        return []
    share = {s: float(g["weighted_mean"]) for s, g in zip(results["seeds"], geometry)}
    out = []
    for name, key, multiple, alternative in THESIS:
        rows = per_seed(results, key, variant, "none")
        if rows is None or multiple * T not in lengths:
            continue
        out.append((name, st.spearman(share, _at(rows, lengths.index(multiple * T)), alternative)))
    return out


# -------------------------------------------------------------------------- markdown


def _p_kind(r: st.RankCorrelation) -> str:
    """How a rank correlation's p-value was obtained: every pairing, or a Monte Carlo sample."""
    return "exact" if r.exact else f"Monte Carlo ({st.MONTE_CARLO_RESAMPLES:,} pairings)"


def _number(value: Any, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def cell(s: Series, i: int, digits: int = 2, seed_digits: int | None = None) -> str:
    """``"0.56 [-0.71, 1.82] (0.670 · 1.000 · 0.000)"``: mean, t-interval, each seed (with
    ``seed_digits`` decimals, default ``digits``)."""
    seeds = " · ".join(_number(v, seed_digits or digits) for v in s.values[:, i])
    if len(s.seeds) < 2:
        return f"{_number(s.mean[i], digits)} (seed {s.seeds[0]}: {seeds})"
    return f"{_number(s.mean[i], digits)} [{_number(s.low[i], digits)}, {_number(s.high[i], digits)}] ({seeds})"


def variant_label(variant: str) -> str:
    """``"CoCA slack"`` for ``"coca_slack"``: the registered label (:mod:`anomaly.variants`)."""
    return registry.variant(variant).label


def panel_name(results: dict, panel: str) -> str:
    """``"matched stage (criterion + 500 steps)"`` for the matched stage; other panels as named."""
    if panel == MATCHED_STAGE:
        extra = (results.get("matched_stage") or {}).get("extra_steps")
        return f"{panel} (criterion + {extra} steps)" if extra is not None else panel
    return panel


def markdown_table(results: dict, key: str = "ppl", panels: Sequence[str] | None = None, digits: int | None = None) -> str:
    """``key`` (``ppl``, ``passkey`` or ``digit_nll``) as a Markdown table: one row per
    variant × panel, one column per length; each cell the mean over seeds (geometric for
    perplexity), its 95 % t-interval over seeds and each seed's value in seed order."""
    if key not in READINGS:
        raise ValueError(f"key must be one of {READINGS}, got {key!r}")
    digits = digits if digits is not None else (1 if key == "ppl" else 2)
    seed_digits = 3 if key == "passkey" else digits  # shares of 200 prompts: multiples of 0.005
    T, lengths = results["train_length"], results["eval_lengths"]
    head = ["variant", "reading"] + [f"{n} ({n / T:g}×)" for n in lengths]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants_of(results):
        for panel in panels or panels_of(results):
            s = series(results, key, v, panel)
            if s is None:
                continue
            name = panel if panel not in SNAPSHOTS else f"none, {panel_name(results, panel)} (seeds {', '.join(map(str, s.seeds))})"
            rows.append("| " + " | ".join([variant_label(v), name] + [cell(s, i, digits, seed_digits) for i in range(len(lengths))])
                        + " |")
    return "\n".join(rows)


def contrast_line(c: Contrast, expected: int | None = None, digits: int = 2) -> str:
    """``"slack − RoPE, none, 256: +0.43 [−0.63, 1.49], seeds +0.87 · +0.42 · +0.01, sign-flip p = 0.25"``,
    with the verdict of :func:`anomaly.verdicts.verdict` when ``expected`` is given."""
    p = c.stat
    diffs = " · ".join(f"{d:+.{digits}f}" for d in p.differences)
    interval = f"[{_number(p.low, digits)}, {_number(p.high, digits)}]" if p.n > 1 else "(one seed)"
    text = (f"{c.a} − {c.b}, {c.panel}, {c.length}: {p.estimate:+.{digits}f} {interval}, "
            f"seeds {', '.join(map(str, p.seeds))}: {diffs}, sign-flip p = {p.p:.2g}")
    if expected is not None:
        text += f" → {verdict(p, expected, digits=digits).text}"
    return text


def _contrast_table(contrasts: Sequence[Contrast], digits: int, within: bool = False) -> list[str]:
    """Markdown rows of ``contrasts``; ``within``: scaling effects (``a``/``b`` are panels of
    one variant, named in the first column)."""
    rows = ["| a − b | reading | length | n | mean Δ [95 % t-interval] | per seed | sign-flip p | 80 % power at |Δ| ≥ |",
            "|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        p = c.stat
        name, reading = ((f"{variant_label(c.panel)}: {c.a} − {c.b}", "—") if within
                         else (f"{variant_label(c.a)} − {variant_label(c.b)}", c.panel))
        rows.append(f"| {name} | {reading} | {c.length} | {p.n} | "
                    f"{p.estimate:+.{digits}f} [{_number(p.low, digits)}, {_number(p.high, digits)}] | "
                    + " · ".join(f"{d:+.{digits}f}" for d in p.differences)
                    + f" | {p.p:.2g} | {_number(p.mde, digits)} |")
    return rows


def _learned_section(results: dict) -> list[str]:
    """Markdown lines of :func:`learned` and :func:`learned_comparisons`."""
    T = int(results["train_length"])
    out = [f"## Learned retrieval by the end (exact match at {T} ≥ {threshold_of(results):g}, no scaling)", "",
           "| variant | seeds that learned | share [Clopper–Pearson 95 %] |", "|---|---|---|"]
    for v in variants_of(results):
        lv = learned(results, v)
        which = ", ".join(str(s) for s, hit in zip(lv.seeds, lv.learned) if hit) or "none"
        out.append(f"| {variant_label(v)} | {lv.share.k}/{lv.share.n} ({which}) | "
                   f"{lv.share.share:.2f} [{lv.share.low:.2f}, {lv.share.high:.2f}] |")
    out += ["", "| a vs b | Fisher's exact p | smallest p possible | verdict rule |", "|---|---|---|---|"]
    for a, b, c in learned_comparisons(results):
        out.append(f"| {variant_label(a)} vs {variant_label(b)} | {c.p:.2g} | {c.min_p:.2g} | "
                   f"{verdict(c, +1).text} |")
    return out


def _window_section(results: dict) -> list[str]:
    """Fig. 4 at the seed level (:mod:`anomaly.ablation.window`), at 2× T; added after the
    10-seed run, so its verdicts are labelled as not pre-registered."""
    gaps = {g.variant: g for g in window_gaps(results, 2 * results["train_length"])}
    if not gaps:
        return []
    g0 = next(iter(gaps.values()))
    out = ["", f"## Key inside vs outside the training window at {g0.length} tokens, no scaling (Fig. 4; not "
           "pre-registered)", "", f"Depths {', '.join(map(str, g0.inside))} put the key within T of the question, "
           f"{', '.join(map(str, g0.outside))} farther. Paper: RoPE drops outside (+1), CoCA does not (0).", "",
           "| comparison | n | mean Δ [95 % t-interval] | per seed | sign-flip p | verdict |", "|---|---|---|---|---|---|"]
    rows = [(f"{variant_label(v)}: inside − outside", g.stat, +1 if v == "rope" else 0) for v, g in gaps.items()]
    rows += [(f"gap {variant_label(v)} − gap RoPE", gap_contrast(g, gaps["rope"]), -1)
             for v, g in gaps.items() if v != "rope" and "rope" in gaps]
    for name, p, expected in rows:
        out.append(f"| {name} | {p.n} | {p.estimate:+.2f} [{_number(p.low)}, {_number(p.high)}] | "
                   f"{' · '.join(f'{d:+.2f}' for d in p.differences)} | {p.p:.2g} | "
                   + verdict(p, expected).text.replace("|", "\\|") + " |")
    return out


def report(results: dict) -> str:
    """Every seed-level table of the run as Markdown."""
    seeds = results["seeds"]
    out = [f"# Seed-level analysis ({len(seeds)} seeds: {', '.join(map(str, seeds))})", ""]
    if results.get("note"):
        out += [f"NOTE: {results['note']}", ""]
    out += ["Cells: mean over seeds [95 % t-interval over seeds] (each seed in seed order); perplexity: geometric",
            "mean, its interval exp of the log-scale t-interval. Differences are paired by seed; perplexity",
            "differences are of log-perplexity (nats per token).", ""]
    for key in READINGS:
        out += [f"## {TITLES[key]}", "", markdown_table(results, key), ""]
    for key in READINGS:
        digits = 2 if key == "digit_nll" else 3
        out += [f"## Paired differences between variants: {LABELS[key]}", ""]
        out += _contrast_table([c for panel in panels_of(results) for c in variant_contrasts(results, key, panel)],
                               digits)
        out += ["", f"## Dynamic NTK minus no scaling, within each variant: {LABELS[key]}", ""]
        out += _contrast_table([c for v in variants_of(results) for c in scaling_effects(results, key, v)], digits,
                               within=True)
        out.append("")
    if "none" in scalings_of(results):
        out += _learned_section(results)
    times = criterion_times(results)
    if times:
        out += ["", f"## Criterion step (validation exact match ≥ {threshold_of(results):g}), censored at "
                f"{cap_of(results)} steps", "", "| variant | steps by seed | reached | Kaplan–Meier median |",
                "|---|---|---|---|"]
        for v, t in times.items():
            steps = ", ".join("—" if s is None else str(s) for s in t.steps)
            median = "not reached" if t.median is None else f"{t.median:g}"
            out.append(f"| {variant_label(v)} | {steps} | {t.reached}/{len(t.steps)} | {median} |")
        out.append("")
        for a, b in VARIANT_PAIRS:
            if a in times and b in times:
                out.append(f"- log-rank {variant_label(a)} vs {variant_label(b)}: p = {st.logrank(times[a], times[b]):.2g} "
                           "(asymptotic; indicative only with few seeds)")
    decompositions = design_effects(results)
    if decompositions:
        out += ["", "## Why the seed is the unit: design effect (no scaling)", "",
                "| reading | variant | length | between-seed var | within-seed var | ICC | design effect | "
                "effective n of the pooled units |", "|---|---|---|---|---|---|---|---|"]
        for d in decompositions:
            e = d.effect
            out.append(f"| {d.key} | {variant_label(d.variant)} | {d.length} | {e.between:.4f} | {e.within:.4f} | "
                       f"{_number(e.icc)} | {_number(e.deff, 1)} | {_number(e.n_eff, 1)} of {e.seeds * e.items} |")
    out += _window_section(results)
    correlations = thesis(results)
    if correlations:
        out += ["", "## Pre-registered: weighted case-(d) share vs extrapolation over RoPE seeds", ""]
        for name, r in correlations:
            out.append(f"- {name}: Spearman ρ = {_number(r.rho)} over seeds {', '.join(map(str, r.seeds))} "
                       f"(share {', '.join(f'{x:.3f}' for x in r.x)}; values {', '.join(f'{y:.3f}' for y in r.y)}), "
                       f"one-sided {_p_kind(r)} p = {r.p:.2g} ({r.alternative})")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m anomaly.ablation.analysis",
                       description="Print the seed-level tables of an ablation run (Markdown) from its results.json.")
    p.add_argument("results", type=Path, help="a results.json, or the --out directory of an ablation run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(report(load_results(args.results)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
