"""Figures of an ablation run, from its ``results.json`` dict.

Each figure function maps the results dict (as :func:`anomaly.ablation.run.run` returns it
or as loaded from ``results.json``, :mod:`anomaly.ablation.results`) to a matplotlib Figure,
drawn under :func:`anomaly.plotting.style.style` with the pieces of
:mod:`anomaly.ablation.drawing`; :data:`FIGURES` is the registry and :func:`save_all` writes
them all through :func:`anomaly.plotting.style.save_figures`. The tables are
:mod:`anomaly.ablation.analysis`'. Regenerate the figures of a finished run without touching
the models::

    python -m anomaly.ablation.plots runs/ablation_cpu/results.json --out figures

Every number is drawn with what it rests on, from :mod:`anomaly.ablation.analysis` (the
seed is the unit): each seed's own value as a point, the mean over seeds as a line and its
95 % t-interval over seeds as a shaded band (perplexity: geometric mean, interval on the log
scale). Where some seeds reached the validation criterion, their snapshot readings (no
scaling) get panels of their own beside the equal-budget ones, each title saying how many
seeds reached it: the matched stage (the weights ``train.matched_steps`` steps after the
criterion step, where the run kept them) and "to criterion" (the weights when validation
first reached it).

Non-finite perplexities (a model that diverged at some length: ``inf``, or ``null`` in the
JSON) are not dropped silently: they are drawn as hollow triangles pinned to the top of
their panel and named in the legend.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.artist import Artist
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from anomaly.ablation.analysis import GUESSING, mean_curve, variant_contrasts
from anomaly.ablation.drawing import (BAND_HANDLE, CELL_SEEDS, SEED_HANDLE, SEED_NUDGE, SEED_STYLE, bottom_legend,
                                      cell_seeds, empty_figure, finish, finite_range, legend_below, length_axis,
                                      nudged, seed_count, seeds_reached_label, variant_style, vs_length)
from anomaly.ablation.results import (SNAPSHOTS, TO_CRITERION, floats, grid_per_seed, load_results, mean_grid,
                                      snapshot_reached, variants_of)  # TO_CRITERION: re-exported for older code
from anomaly.analytic import CHANCE_FRACTION
from anomaly.cli import ArgumentParser, UserError, run_main
from anomaly.io import Provenance
from anomaly.outputs import OutputDir, claim
from anomaly.plotting.style import (CYCLE, PALETTE, SEQUENTIAL_CMAP, Registry, figure_files, save_figures, seeded,
                                    styled, use_file_backend)

CHANCE = CHANCE_FRACTION
"""Anomalous fraction of directions drawn uniformly at random (docs/conventions.md §3)."""

# -------------------------------------------------------------------------- figures


@styled
def perplexity_vs_length(results: dict) -> Figure:
    """Sliding-window perplexity against evaluation length, one panel per RoPE scaling
    (the layout of the paper's Fig. 1): geometric mean over seeds, 95 % t-interval over
    seeds (on the log scale), each seed. Log-log axes; the dotted line is the training length."""
    lo, hi = finite_range(results, "ppl")
    ceiling = hi * 2.0  # where non-finite values are drawn
    fig, axes, pinned = vs_length(results, "ppl", ceiling=ceiling)
    for ax in axes:
        ax.set_yscale("log")
    axes[0].set_ylim(lo / 1.25, ceiling * 1.5 if pinned else hi * 1.25)
    axes[0].set_ylabel("perplexity (held-out text, log scale)")
    extra = [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE)]
    if pinned:
        extra.append(plt.Line2D([], [], ls="none", marker="^", ms=7, mfc="none", mec=PALETTE["black"],
                                label="non-finite (clipped)"))
    legend_below(fig, axes, int(results["train_length"]), extra)
    tokens = results.get("ppl_scored_tokens")
    return finish(fig, results, f"Perplexity vs length (geometric mean over {seed_count(results)}, band on the log scale"
                   + (f", {tokens} scored tokens per length" if tokens else "") + ")")


@styled
def passkey_vs_length(results: dict) -> Figure:
    """Exact passkey retrieval against evaluation length, same layout as
    :func:`perplexity_vs_length` (the paper's Tables 2–3 as curves), plus the snapshot
    panels (matched stage, to criterion) where some seed reached them."""
    fig, axes, _ = vs_length(results, "passkey", scale=100.0)
    axes[0].set_ylim(-5, 105)
    axes[0].set_ylabel("exact passkey retrieval (% of prompts)")
    legend_below(fig, axes, int(results["train_length"]), [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE)])
    prompts = results.get("passkey_prompts_per_length")
    return finish(fig, results, f"Passkey retrieval vs length ({seed_count(results)}"
                   + (f", {prompts} prompts per length at equal budget" if prompts else "") + ")")


@styled
def digit_loss_vs_length(results: dict) -> Figure:
    """Mean loss on the passkey's digits against evaluation length, same layout as
    :func:`passkey_vs_length`. A model that has not learned retrieval sits at or above
    the dashed line, :data:`~anomaly.ablation.analysis.GUESSING` (2.28 nats: guessing the
    first digit among 1–9 and the other four among 0–9)."""
    fig, axes, _ = vs_length(results, "digit_nll")
    for ax in axes:
        ax.axhline(GUESSING, color=PALETTE["black"], ls="--", lw=1, zorder=0, gid="guessing")
    axes[0].annotate("guessing", (0.03, GUESSING), xycoords=("axes fraction", "data"), xytext=(0, 2),
                     textcoords="offset points", va="bottom", fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("digit loss (nats per digit)")
    guess = plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"guessing: {GUESSING:.2f}")
    legend_below(fig, axes, int(results["train_length"]), [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE), guess])
    return finish(fig, results, f"Passkey digit loss vs length (teacher-forced, mean over {seed_count(results)})")


@styled
def passkey_heatmap(results: dict) -> Figure:
    """Exact passkey retrieval (no scaling) per evaluation length × depth of the key
    sentence, one panel per variant: the equal-budget models, and below them the "to
    criterion" ones where some seed reached it. Depth 0 puts the key at the start of the
    context, 1 just before the question. Each cell gives the mean over seeds and, where the
    run recorded them (``passkey_grid_per_seed``), each seed's value below it (up to
    :data:`CELL_SEEDS` seeds; beyond, their range)."""
    lengths, depths, T = list(results["eval_lengths"]), list(results["depths"]), int(results["train_length"])
    variants = variants_of(results)
    rows = ["none"] + [p for p in SNAPSHOTS if snapshot_reached(results, p)]
    fig, axes = plt.subplots(len(rows), len(variants), figsize=(1.0 + 2.4 * len(variants), 0.9 + 2.4 * len(rows)),
                             sharex=True, sharey=True, constrained_layout=True, squeeze=False)
    samples = results.get("passkey_samples")
    image = None
    recorded = True
    for row, panel in zip(axes, rows):
        for ax, v in zip(row, variants):
            ax.grid(False)
            st = variant_style(v)
            grid = mean_grid(results, v, panel)  # [length, depth]
            seeds = grid_per_seed(results, v, panel)
            recorded &= seeds is not None or grid is None
            if panel == "none":
                ax.set_title(f"{st['label']}, equal budget")
            else:
                ax.set_title(f"{st['label']}, {panel}\n({seeds_reached_label(results, v, panel)} seeds)")
            if grid is None:
                ax.text(0.5, 0.5, f"no seed reached\nthe {panel}", ha="center", va="center", transform=ax.transAxes)
                continue
            image = _grid_panel(ax, grid, seeds, [f"{d:g}" for d in depths], [f"{n} ({n / T:g}×)" for n in lengths],
                                f"{v}/{panel}/grid")
    for ax in axes[-1]:
        ax.set_xlabel("key depth (0 = start of context)")
    for ax in axes[:, 0]:
        ax.set_ylabel("evaluation length (tokens)")
    if image is not None:
        cb = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        cb.set_label("exact passkey retrieval (% of prompts)")
        cb.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    per_cell = f", {samples} prompts per cell and seed" if samples else ""
    seeds_note = ("each seed below the mean" if recorded else
                  "this run kept no per-seed cells; each seed by length: ablation_passkey")
    return finish(fig, results, f"Passkey retrieval (%) by length and depth, no scaling\n"
                   f"(mean over {seed_count(results)}{per_cell}; {seeds_note})")


def _grid_panel(ax: plt.Axes, grid: np.ndarray, seeds: dict[int, np.ndarray] | None, depths: list[str],
                lengths: list[str], gid: str) -> QuadMesh:
    """One panel of :func:`passkey_heatmap`: ``grid`` ``[length, depth]`` as seaborn's
    annotated heatmap (the mesh gets ``gid``), the shortest length at the bottom. Each cell
    gives the mean in % and, with ``seeds``, each seed's value below it; a cell without a
    value says "n/a"."""
    missing = np.isnan(grid)
    text = np.full(grid.shape, "", dtype=object)
    for (li, di), val in np.ndenumerate(grid):
        if not missing[li, di]:
            text[li, di] = f"{100 * val:.0f}" + ("" if seeds is None else
                                                 "\n" + cell_seeds([100 * g[li, di] for g in seeds.values()]))
    size = 6.5 if seeds is None else 5
    # seaborn picks each number's colour (dark or white) by its cell's luminance.
    sns.heatmap(grid, ax=ax, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0, cbar=False, annot=text, fmt="",
                annot_kws={"fontsize": size}, xticklabels=depths, yticklabels=lengths)
    mesh = ax.collections[-1]
    mesh.set_gid(gid)
    for li, di in zip(*np.nonzero(missing)):  # seaborn leaves a masked cell blank
        ax.text(di + 0.5, li + 0.5, "n/a", ha="center", va="center", fontsize=size, color="black")
    ax.set_ylim(0, grid.shape[0])  # seaborn puts the first row on top; lengths grow upwards
    ax.tick_params(axis="y", labelrotation=0)
    return mesh


def _training_loss(ax: dict[str, plt.Axes], variant: str, st: dict, runs: list[dict], draw_lr: bool) -> bool:
    """Each seed's training loss faint and their mean (gid ``<variant>/loss``) on ``ax["loss"]``;
    with ``draw_lr``, the learning-rate schedule on ``ax["lr"]``. Returns whether it drew that."""
    curves = [r["curve"] for r in runs if (r.get("curve") or {}).get("step")]  # runs: one dict per seed
    for c in curves:
        ax["loss"].plot(c["step"], floats(c["loss"]), color=st["color"], lw=0.7, alpha=0.35)
    if not curves:
        return False
    steps, mean = mean_curve(curves, "loss")
    ax["loss"].plot(steps, mean, color=st["color"], label=st["label"], gid=f"{variant}/loss")
    if draw_lr and curves[0].get("lr"):
        ax["lr"].plot(curves[0]["step"], curves[0]["lr"], color=PALETTE["black"], lw=1)
        return True
    return False


def _validation(ax: dict[str, plt.Axes], variant: str, st: dict, runs: list[dict]) -> bool:
    """Each seed's validation at T (exact match on ``ax["exact"]``, digit loss on
    ``ax["digit"]``), its criterion step starred (gid ``<variant>/criterion``). Returns
    whether any seed's was."""
    starred = False
    for r in runs:
        val = r.get("val") or {}
        if not val.get("step"):
            continue
        step = r.get("criterion_step")
        for panel, key, scale in (("exact", "exact", 100.0), ("digit", "digit_nll", 1.0)):
            y = scale * floats(val[key])
            ax[panel].plot(val["step"], y, color=st["color"], lw=0.9, alpha=0.7, marker=st["marker"], ms=2.5)
            if step is not None and step in val["step"]:
                ax[panel].plot([step], [y[val["step"].index(step)]], ls="none", marker="*", ms=10, mfc="none",
                               mec=st["color"], mew=1.2, gid=f"{variant}/criterion")
                starred = True
    return starred


@styled
def training_curves(results: dict) -> Figure:
    """Per variant: training loss against step (mean over seeds, each seed faint) with the
    shared learning-rate schedule, and the passkey validation at the training length (exact
    match and digit loss, one thin line per seed), each seed's criterion step starred."""
    training = results.get("training") or {}
    variants = [v for v in variants_of(results) if training.get(v)]
    if not variants:
        return empty_figure(results, "Training curves", "no training record in this run")
    fig, ax = plt.subplot_mosaic([["loss", "exact", "digit"], ["lr", "exact", "digit"]], figsize=(11.0, 3.8),
                                 height_ratios=[3, 1], constrained_layout=True)
    ax["lr"].sharex(ax["loss"])
    threshold = (results.get("criterion") or {}).get("threshold")
    lr_drawn = starred = False
    for v in variants:
        st = variant_style(v)
        lr_drawn |= _training_loss(ax, v, st, training[v], draw_lr=not lr_drawn)
        starred |= _validation(ax, v, st, training[v])
    ax["loss"].set_ylabel("training loss (nats / token)")
    ax["loss"].set_title(f"training loss (mean over {seed_count(results)}; each seed faint)")
    ax["loss"].tick_params(labelbottom=False)
    ax["lr"].set_ylabel("learning rate")
    ax["lr"].set_xlabel("optimiser step")
    ax["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax["exact"].set_ylim(-5, 105)
    ax["exact"].set_ylabel("validation exact match (% of prompts)")
    ax["exact"].set_title("validation at T: exact passkey retrieval")
    ax["digit"].axhline(GUESSING, color=PALETTE["black"], ls="--", lw=1, zorder=0)
    ax["digit"].set_ylabel("validation digit loss (nats per digit)")
    ax["digit"].set_title("validation at T: digit loss")
    for name in ("exact", "digit"):
        ax[name].set_xlabel("optimiser step")
    extra: list[Artist] = [plt.Line2D([], [], color="0.45", lw=0.9, alpha=0.7, label="each seed")]
    if threshold is not None:
        ax["exact"].axhline(100 * threshold, color=PALETTE["black"], ls=":", lw=1, zorder=0)
        extra.append(plt.Line2D([], [], color=PALETTE["black"], ls=":", lw=1,
                                label=f"criterion: {100 * threshold:g} % exact"))
    if starred:
        extra.append(plt.Line2D([], [], ls="none", marker="*", ms=10, mfc="none", mec=PALETTE["black"],
                                label="criterion reached"))
    extra.append(plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"guessing: {GUESSING:.2f}"))
    legend_below(fig, [ax["loss"]], None, extra)
    config = results.get("config") or {}
    prompts = (config.get("train") or {}).get("val_prompts")
    title = f"Training (sequences of T = {results['train_length']} tokens)"
    if prompts:
        title += f"; validation: {prompts} passkey prompts at T, apart from the evaluation's"
    if threshold is not None and not starred:
        title += f"\nno seed reached the criterion ({100 * threshold:g} % exact match)"
    return finish(fig, results, title)


@styled
def retrieval_head(results: dict) -> Figure:
    """Per variant, the retrieval head (the head that attends most to the matching passkey
    digit at ``T``, :mod:`anomaly.ablation.retrieval`) of its first seed: the attention
    rows of the queries that predict the digits over one prompt at ``T``, the key sentence
    marked; and a panel of every seed's retrieval-head attention on the matching digit
    against evaluation length."""
    data = results.get("retrieval") or {}
    variants = [v for v in variants_of(results) if data.get(v)]
    if not variants:
        return empty_figure(results, "Retrieval head", "no retrieval-head trace in this run")
    n = len(variants)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * n + 4.6, 3.2), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.0] * n + [1.4]})
    maps, line_ax = axes[:n], axes[n]
    examples = [floats(data[v][0]["example"]["rows"]) for v in variants]  # [digit, position] each
    vmax = max(float(np.nanmax(e)) for e in examples)
    seeds = results.get("seeds") or list(range(len(data[variants[0]])))
    image = None
    for ax, v, rows in zip(maps, variants, examples):
        first = data[v][0]
        start, end = first["example"]["key_span"]
        image = ax.imshow(rows, aspect="auto", cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest",
                          gid=f"{v}/example")
        for edge in (start - 0.5, end - 0.5):
            ax.axvline(edge, color=PALETTE["orange"], lw=1, ls="--")
        ax.annotate("key sentence", ((start + end) / 2 - 0.5, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                    color=PALETTE["orange"])
        layer, head = first["head"]
        ax.set_title(f"{variant_style(v)['label']}, seed {seeds[0]}\nlayer {layer}, head {head}")
        ax.set_xlabel("key position (token)")
        ax.set_yticks(range(rows.shape[0]), [str(d + 1) for d in range(rows.shape[0])])
        ax.grid(False)
    maps[0].set_ylabel("query predicting passkey digit")
    fig.colorbar(image, ax=list(maps), shrink=0.9).set_label("attention probability")

    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    for i, v in enumerate(variants):
        st = variant_style(v)
        x = nudged(lengths, i, n)
        per_seed = np.array([floats(run["matching"]) for run in data[v]])  # [seed, length]
        line_ax.plot(x, per_seed.mean(axis=0), color=st["color"], marker=st["marker"], ms=3.5, label=st["label"],
                     gid=f"{v}/matching")
        for y in per_seed:
            line_ax.plot(x, y, marker=st["marker"], color=st["color"], gid=f"{v}/matching/seed", **SEED_STYLE)
    uniform = 2.0 / np.asarray(lengths, dtype=float)  # the digit appears twice in the key sentence
    line_ax.plot(lengths, uniform, color="0.5", ls="--", lw=1, zorder=0, label="uniform attention: 2 / length")
    length_axis(line_ax, lengths, T)
    line_ax.set_yscale("log", nonpositive="mask")
    line_ax.set_ylabel("attention on the matching digit")
    line_ax.set_title(f"each seed's retrieval head (mean over {seed_count(results)})")
    legend_below(fig, [line_ax], T, [plt.Line2D([], [], **SEED_HANDLE)])
    prompts = data[variants[0]][0].get("prompts_per_length")
    example = data[variants[0]][0]["example"]
    return finish(fig, results, "Retrieval head: where the digit-predicting queries look "
                   f"(left: one prompt of {example['length']} tokens, key sentence dashed"
                   + (f"; right: {prompts} prompts per length and seed" if prompts else "") + "; no scaling)")


@styled
def anomalous_fraction(results: dict) -> Figure:
    """Share of causal (query, key, slice) triples in case (d) per variant: the mean over
    layers and heads (unweighted and weighted by ``|q_j||k_j|``) as bars of the mean over
    seeds with each seed's value marked, and every head of every seed as a dot. Strict
    CoCA is 0 by construction; the dashed line is chance (0.5)."""
    geo = results.get("anomalous_fraction") or {}
    variants = [v for v in variants_of(results) if geo.get(v)]
    if not variants:
        return empty_figure(results, "Anomalous fraction", "no anomalous-fraction probe in this run")
    fig, (bar_ax, head_ax) = plt.subplots(1, 2, figsize=(8.0, 3.3), sharey=True, constrained_layout=True)
    x = np.arange(len(variants))
    colours = [variant_style(v)["color"] for v in variants]
    kinds = ((-0.2, "mean", "anomalous_fraction", None, True),
             (0.2, "weighted_mean", "weighted_anomalous_fraction", "//", False))
    with seeded(0):  # the strips' jitter: seaborn draws it from numpy's global state
        for offset, key, per_head, hatch, filled in kinds:  # filled: dot style of the per-head panel
            per_seed = [[float(g[key]) for g in geo[v]] for v in variants]
            means = [float(np.mean(s)) for s in per_seed]
            bars = bar_ax.bar(x + offset, means, width=0.38, color=colours, hatch=hatch, edgecolor="white", gid=key)
            for xi, seed_values, b, val in zip(x, per_seed, bars, means):
                bar_ax.plot(np.full(len(seed_values), xi + offset), seed_values, ls="none", marker="o", ms=3,
                            color=PALETTE["black"], alpha=0.6, gid=f"{key}/seeds")
                top = max([val, *seed_values])
                bar_ax.annotate("0" if val == 0 else f"{val:.2f}", (b.get_x() + b.get_width() / 2, top),
                                xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            for xi, v, c in zip(x, variants, colours):
                heads = np.concatenate([floats(g[per_head]).ravel() for g in geo[v]])  # [seed · layer · head]
                sns.stripplot(x=np.full(heads.size, xi + offset), y=heads, orient="x", native_scale=True, jitter=0.08,
                              size=2.5, linewidth=1.0, edgecolor=c, alpha=0.6, ax=head_ax,
                              **({"color": c} if filled else {"facecolor": "none"}))
                head_ax.collections[-1].set_gid(f"{v}/{key}/heads")
    labels = [variant_style(v)["label"] for v in variants]
    for ax in (bar_ax, head_ax):
        ax.axhline(CHANCE, color=PALETTE["black"], ls="--", lw=1)
        ax.set_xticks(x, labels, rotation=20, ha="right")
    bar_ax.set_ylim(0, 1.0)
    bar_ax.set_ylabel("anomalous fraction (share in case (d))")
    bar_ax.set_title(f"mean over layers and heads (bars: mean over {seed_count(results)})")
    head_ax.set_title("every head of every seed")
    proxies = [Patch(facecolor="0.6", edgecolor="white", label="unweighted (filled dots)"),
               Patch(facecolor="0.6", edgecolor="white", hatch="//", label="weighted by |q_j||k_j| (hollow dots)"),
               plt.Line2D([], [], ls="none", marker="o", ms=3, color=PALETTE["black"], alpha=0.6, label="each seed"),
               plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"chance ({CHANCE})")]
    bottom_legend(fig, proxies)
    tokens = {g.get("tokens") for v in variants for g in geo[v]} - {None}
    return finish(fig, results, "Anomalous fraction of the trained models"
                   + (f" ({tokens.pop()} held-out tokens)" if len(tokens) == 1 else ""))


PAIR_STYLE = {("coca_slack", "rope"): PALETTE["blue"], ("coca_strict", "rope"): PALETTE["green"],
              ("coca_strict", "coca_slack"): PALETTE["black"]}
"""Colour of each paired comparison in :func:`paired_differences`."""


@styled
def paired_differences(results: dict) -> Figure:
    """The variant comparisons as the verdicts read them: for each pair of
    :data:`~anomaly.ablation.analysis.VARIANT_PAIRS`, no scaling, the per-seed differences
    ``a − b`` (each seed a point), their mean and 95 % t-interval over seeds (error bar),
    against length; one panel for the passkey share, one for log-perplexity (nats per token).
    A difference is only established where the interval misses 0 *and* the exact sign-flip
    test gives p < 0.05 (docs/ablation.md, "Verdicts")."""
    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), constrained_layout=True)
    handles: list[Artist] = []
    for ax, key, label in ((axes[0], "passkey", "Δ exact passkey share (a − b)"),
                           (axes[1], "ppl", "Δ log-perplexity, nats per token (a − b)")):
        contrasts = variant_contrasts(results, key, "none")
        pairs = list(dict.fromkeys((c.a, c.b) for c in contrasts))
        for i, pair in enumerate(pairs):
            colour = PAIR_STYLE.get(pair, CYCLE[i % len(CYCLE)])
            rows = [c for c in contrasts if (c.a, c.b) == pair]
            x = nudged([c.length for c in rows], i, len(pairs))
            mean = np.array([c.stat.estimate for c in rows])
            low = np.array([c.stat.low for c in rows])
            high = np.array([c.stat.high for c in rows])
            name = f"{variant_style(pair[0])['short']} − {variant_style(pair[1])['short']}"
            bars = ax.errorbar(x, mean, yerr=[mean - low, high - mean], color=colour, marker="_", ms=10, lw=1.2,
                               capsize=2.5, ls="none", label=name)
            bars.lines[0].set_gid(f"{key}/{pair[0]}-{pair[1]}/mean")  # the marker line of the means
            for j, c in enumerate(rows):
                ax.plot(np.full(c.stat.n, x[j] * SEED_NUDGE), c.stat.differences, ls="none", marker="o", ms=3.5,
                        mfc="none", mec=colour, alpha=0.85, gid=f"{key}/{pair[0]}-{pair[1]}/seeds")
            if key == "passkey":
                handles.append(bars)
        ax.axhline(0, color=PALETTE["black"], lw=0.8, zorder=0)
        length_axis(ax, lengths, T)
        ax.set_ylabel(label)
    axes[0].set_title("passkey retrieval, no scaling")
    axes[1].set_title("perplexity (log scale), no scaling")
    handles += [plt.Line2D([], [], ls="none", marker="o", ms=3.5, mfc="none", color="0.3", label="each seed"),
                plt.Line2D([], [], color=PALETTE["black"], ls=":", lw=1, label=f"training length {T}")]
    bottom_legend(fig, handles)
    return finish(fig, results, f"Paired differences between variants, seed by seed ({seed_count(results)}; "
                   "bars: mean and 95 % t-interval over seeds)")


FIGURES: Registry = {
    "ppl": perplexity_vs_length,
    "passkey": passkey_vs_length,
    "passkey_heatmap": passkey_heatmap,
    "digit_loss": digit_loss_vs_length,
    "training": training_curves,
    "retrieval": retrieval_head,
    "anomalous_fraction": anomalous_fraction,
    "differences": paired_differences,
}
"""Figure name → function; :func:`save_all` writes ``<prefix>_<name>.{pdf,png,json}``."""


# ------------------------------------------------------------------------- outputs


OWNER = "anomaly.ablation.plots"
"""Owner of these figures in an output folder's manifest (see :mod:`anomaly.outputs`)."""


def claim_figures(out_dir: str | Path, prefix: str = "ablation") -> OutputDir:
    """Check, before any work, that :func:`save_all`'s files may be written into ``out_dir``."""
    return claim(out_dir, OWNER, figure_files(FIGURES, f"{prefix}_"))


def save_all(results: dict, out_dir: str | Path, provenance: Provenance, prefix: str = "ablation") -> list[Path]:
    """Write every figure as ``out_dir/<prefix>_<name>.{pdf,png,json}``; returns the paths.

    Writes into ``out_dir`` as it is; commands write into the staging folder of
    :func:`claim_figures`' target so that nobody else's files are touched.
    """
    return save_figures(FIGURES, out_dir, provenance, results, prefix=f"{prefix}_")


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m anomaly.ablation.plots",
                       description="Regenerate the figures of an ablation run from its results.json.")
    p.add_argument("results", type=Path, help="a results.json, or the --out directory of an ablation run")
    p.add_argument("--out", type=Path, default=Path("figures"), help="figure directory (default: figures)")
    p.add_argument("--prefix", default="ablation", help="file-name prefix (default: ablation)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    use_file_backend()
    if not args.prefix or "/" in args.prefix or args.prefix.startswith("."):
        raise UserError(f"--prefix {args.prefix!r} must be a plain, visible file-name prefix, e.g. --prefix ablation")
    results = load_results(args.results)
    target = claim_figures(args.out, args.prefix)
    config = results.get("config") or {}
    prov = Provenance.from_argv(model=f"ablation/{config.get('preset', '?')}", seed=results.get("seeds"),
                                extra={"results": str(args.results), "results_provenance": results.get("provenance")})
    with target.writing() as tmp:
        save_all(results, tmp, prov, args.prefix)
    for path in target.written:
        if path.suffix == ".pdf":
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
