"""Figures and tables of an ablation run, from its ``results.json`` dict.

Each figure function maps the results dict (as :func:`anomaly.ablation.run.run` returns it
or as loaded from ``results.json``) to a matplotlib Figure; :func:`save_all` writes them all
through :func:`anomaly.plotting.style.save_figure`. Regenerate the figures of a finished run
without touching the models::

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
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

from anomaly import variants as registry
from anomaly.ablation.analysis import (GUESSING, SNAPSHOTS, TO_CRITERION, Series, grid_per_seed, load_results,
                                       mean_grid, panel_name, panels_of, series, snapshot_of, snapshot_reached,
                                       variant_contrasts, variants_of)
from anomaly.cli import ArgumentParser, UserError, run_main
from anomaly.io import Provenance
from anomaly.outputs import OutputDir, claim
from anomaly.plotting.style import CYCLE, PALETTE, SEQUENTIAL_CMAP, apply_style, save_figure, use_file_backend

CHANCE = 0.5
"""Anomalous fraction of directions drawn uniformly at random (docs/conventions.md §3): half of the
causal triples land in case (d)."""

BAND_ALPHA = 0.18
"""Opacity of a 95 % band."""
SEED_STYLE = {"ls": "none", "ms": 4, "alpha": 0.85, "mfc": "none", "mew": 1.0}
"""Hollow markers of the per-seed values, beside the mean's line (every seed is seen)."""
SEED_NUDGE = 2 ** 0.03
"""Sideways shift (a factor in log2 x) of the per-seed points from their mean's."""


def variant_style(variant: str, index: int = 0) -> dict[str, Any]:
    """Label, short label, colour and marker of ``variant``, the same in every figure: its entry in
    :data:`anomaly.variants.REGISTRY` (``index``, its place in the figure, is not needed: every
    variant has its own style). An unregistered variant is a :class:`UserError`."""
    v = registry.variant(variant)
    return {"label": v.label, "short": v.short, "color": PALETTE[v.colour], "marker": v.marker}


def scaling_label(scaling: str) -> str:
    """``"none"`` → ``"no scaling"``; ``"ntk-4"`` → ``"dynamic NTK, factor 4"``."""
    if scaling == "none":
        return "no scaling"
    if scaling.startswith("ntk-"):
        return f"dynamic NTK, factor {scaling[4:]}"
    return scaling


def _seeds_reached(results: dict, variant: str, panel: str = TO_CRITERION) -> str:
    """``"2/3"``: seeds of ``variant`` that reached the snapshot ``panel``, of all its seeds."""
    entry = snapshot_of(results, variant, panel)
    return f"{entry.get('seeds_reached', 0)}/{len(entry.get('steps') or results['seeds'])}"


def panel_title(results: dict, panel: str) -> str:
    """A scaling's label; for a snapshot (:data:`SNAPSHOTS`), the reading and how many seeds
    reached it."""
    if panel not in SNAPSHOTS:
        return scaling_label(panel)
    threshold = (results.get("criterion") or {}).get("threshold")
    counts = ", ".join(f"{variant_style(v, i)['short']} {_seeds_reached(results, v, panel)}"
                       for i, v in enumerate(variants_of(results)))
    name = panel_name(results, panel)
    return (f"{name} (no scaling)\nseeds reaching {threshold:g} at validation:\n{counts}"
            if threshold is not None and panel == TO_CRITERION else f"{name} (no scaling)\nseeds: {counts}")


# -------------------------------------------------------------------------- drawing


def _values(seq: Any) -> np.ndarray:
    """Floats, nested lists allowed, with ``None`` (non-finite in JSON) as NaN."""
    return np.asarray(seq, dtype=float)  # numpy reads None as NaN


def _finish(fig: Figure, results: dict, title: str) -> Figure:
    """Title ``fig``; a run that carries a ``note`` (the smoke preset's "plumbing check")
    says so under the title of every figure, so that no figure of it passes for a result."""
    note = results.get("note")
    if note:
        width = max(50, int(fig.get_size_inches()[0] * 13))  # characters per line at 9 pt
        title = f"{title}\n" + textwrap.fill(f"NOTE: {note}", width)
    fig.suptitle(title, fontsize=9)
    return fig


def _empty(results: dict, title: str, message: str) -> Figure:
    """A figure that says what is missing, for runs without that part (e.g. ``--no-probe``)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(4.5, 2.0), constrained_layout=True)
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return _finish(fig, results, title)


def _length_axis(ax: plt.Axes, lengths: Sequence[int], train_length: int) -> None:
    """Log2 x axis with a tick at every evaluation length and a line at the training length."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(lengths)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in lengths], rotation=45, ha="right")
    ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
    ax.axvline(train_length, color=PALETTE["black"], ls=":", lw=1, zorder=0)
    ax.set_xlabel("evaluation length (tokens)")


def _nudged(lengths: Sequence[int], index: int, count: int) -> np.ndarray:
    """``lengths`` shifted sideways (in log2 x) per variant, so equal values stay visible."""
    return np.asarray(lengths, dtype=float) * 2 ** (0.05 * (index - (count - 1) / 2))


def _panels(n: int) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(2.5 * n + 1.8, 3.2), sharey=True, constrained_layout=True, squeeze=False)
    return fig, axes[0]


def _legend(fig: Figure, axes: Sequence[plt.Axes], train_length: int | None, extra: Sequence[Artist] = ()) -> None:
    """One legend, below the panels: the variants (from the first panel that has them),
    what the faint markers and bands mean, ``extra`` artists, the training length."""
    handles: list[Artist] = []
    for ax in axes:
        handles = [h for h, label in zip(*ax.get_legend_handles_labels()) if not label.startswith("_")]
        if handles:
            break
    handles += list(extra)
    if train_length is not None:
        handles.append(plt.Line2D([], [], color=PALETTE["black"], ls=":", lw=1,
                                  label=f"training length {train_length}"))
    _bottom_legend(fig, handles)


def _bottom_legend(fig: Figure, handles: Sequence[Artist]) -> None:
    # Below the panels, where it cannot collide with a long (noted) title or with data.
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), frameon=False)


SEED_HANDLE = {"ls": "none", "marker": "o", "ms": 4, "mfc": "none", "color": "0.3", "label": "each seed"}
BAND_HANDLE = {"facecolor": "0.5", "alpha": 2 * BAND_ALPHA, "lw": 0, "label": "95 % t-interval over seeds"}


def _draw(ax: plt.Axes, x: np.ndarray, r: Series, style: dict, gid: str,
          scale: float = 1.0, ceiling: float | None = None) -> bool:
    """The mean over seeds of ``r`` as a line, its 95 % t-interval over seeds as a band and
    each seed's value as a hollow point just beside it, at positions ``x``.

    Values are multiplied by ``scale``. With ``ceiling``, non-finite values and bounds are
    drawn at it (hollow triangles for the values); returns whether any was. The band is a
    ``PolyCollection`` with gid ``gid + "/ci"`` (none with a single seed), the line a
    ``Line2D`` with ``gid + "/mean"``, each seed's points one with ``gid + "/seed"``.
    """
    pinned = False
    mean = scale * r.mean
    ok = np.isfinite(mean)
    ax.plot(x[ok], mean[ok], color=style["color"], marker=style["marker"], ms=3.5, label=style["label"],
            gid=f"{gid}/mean")
    if ceiling is not None and not ok.all():
        ax.plot(x[~ok], np.full((~ok).sum(), ceiling), ls="none", marker="^", ms=7, mfc="none",
                mec=style["color"], mew=1.3, clip_on=False)
        pinned = True
    if len(r.seeds) > 1:
        low, high = scale * r.low, scale * r.high
        if ceiling is not None:  # an interval with a diverged end reaches the ceiling
            low, high = (np.where(np.isfinite(b), b, ceiling) for b in (low, high))
        ax.fill_between(x, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0, gid=f"{gid}/ci")
    for seed_values in r.values:
        y = scale * seed_values
        fin = np.isfinite(y)
        ax.plot(x[fin] * SEED_NUDGE, y[fin], marker=style["marker"], color=style["color"], gid=f"{gid}/seed",
                **SEED_STYLE)
        if ceiling is not None and not fin.all():
            ax.plot(x[~fin] * SEED_NUDGE, np.full((~fin).sum(), ceiling), ls="none", marker="^", ms=4, mfc="none",
                    mec=style["color"], alpha=0.6, clip_on=False)
            pinned = True
    return pinned


def _finite_range(results: dict, key: str) -> tuple[float, float]:
    """Smallest and largest finite mean, bound and per-seed value of ``key`` over every
    variant and panel (``(1, 10)`` when there is none)."""
    found = [np.concatenate([r.mean, r.low, r.high, r.values.ravel()]) for v in variants_of(results)
             for p in panels_of(results) if (r := series(results, key, v, p)) is not None]
    x = np.concatenate(found) if found else np.zeros(0)
    x = x[np.isfinite(x)]
    return (float(x.min()), float(x.max())) if x.size else (1.0, 10.0)


def _vs_length(results: dict, key: str, scale: float = 1.0,
               ceiling: float | None = None) -> tuple[Figure, np.ndarray, bool]:
    """``key`` against evaluation length: one panel per reading (:func:`panels_of`), one
    line with band and per-seed markers per variant (:func:`_draw`). Returns the figure,
    its panels and whether any value was pinned to ``ceiling``."""
    apply_style()
    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    variants, panels = variants_of(results), panels_of(results)
    fig, axes = _panels(len(panels))
    pinned = False
    for ax, panel in zip(axes, panels):
        for i, v in enumerate(variants):
            r = series(results, key, v, panel)
            if r is not None:
                pinned |= _draw(ax, _nudged(lengths, i, len(variants)), r, variant_style(v, i),
                                f"{v}/{panel}", scale, ceiling)
        _length_axis(ax, lengths, T)
        ax.set_title(panel_title(results, panel))
    return fig, axes, pinned


def _seed_count(results: dict) -> str:
    n = len(results["seeds"])
    return f"{n} seed" + ("s" if n != 1 else "")


# -------------------------------------------------------------------------- figures


def perplexity_vs_length(results: dict) -> Figure:
    """Sliding-window perplexity against evaluation length, one panel per RoPE scaling
    (the layout of the paper's Fig. 1): geometric mean over seeds, 95 % t-interval over
    seeds (on the log scale), each seed. Log-log axes; the dotted line is the training length."""
    lo, hi = _finite_range(results, "ppl")
    ceiling = hi * 2.0  # where non-finite values are drawn
    fig, axes, pinned = _vs_length(results, "ppl", ceiling=ceiling)
    for ax in axes:
        ax.set_yscale("log")
    axes[0].set_ylim(lo / 1.25, ceiling * 1.5 if pinned else hi * 1.25)
    axes[0].set_ylabel("perplexity (held-out text, log scale)")
    extra = [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE)]
    if pinned:
        extra.append(plt.Line2D([], [], ls="none", marker="^", ms=7, mfc="none", mec=PALETTE["black"],
                                label="non-finite (clipped)"))
    _legend(fig, axes, int(results["train_length"]), extra)
    tokens = results.get("ppl_scored_tokens")
    return _finish(fig, results, f"Perplexity vs length (geometric mean over {_seed_count(results)}, band on the log scale"
                   + (f", {tokens} scored tokens per length" if tokens else "") + ")")


def passkey_vs_length(results: dict) -> Figure:
    """Exact passkey retrieval against evaluation length, same layout as
    :func:`perplexity_vs_length` (the paper's Tables 2–3 as curves), plus the snapshot
    panels (matched stage, to criterion) where some seed reached them."""
    fig, axes, _ = _vs_length(results, "passkey", scale=100.0)
    axes[0].set_ylim(-5, 105)
    axes[0].set_ylabel("exact passkey retrieval (% of prompts)")
    _legend(fig, axes, int(results["train_length"]), [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE)])
    prompts = results.get("passkey_prompts_per_length")
    return _finish(fig, results, f"Passkey retrieval vs length ({_seed_count(results)}"
                   + (f", {prompts} prompts per length at equal budget" if prompts else "") + ")")


def digit_loss_vs_length(results: dict) -> Figure:
    """Mean loss on the passkey's digits against evaluation length, same layout as
    :func:`passkey_vs_length`. A model that has not learned retrieval sits at or above
    the dashed line, :data:`~anomaly.ablation.analysis.GUESSING` (2.28 nats: guessing the
    first digit among 1–9 and the other four among 0–9)."""
    fig, axes, _ = _vs_length(results, "digit_nll")
    for ax in axes:
        ax.axhline(GUESSING, color=PALETTE["black"], ls="--", lw=1, zorder=0, gid="guessing")
    axes[0].annotate("guessing", (0.03, GUESSING), xycoords=("axes fraction", "data"), xytext=(0, 2),
                     textcoords="offset points", va="bottom", fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("digit loss (nats per digit)")
    guess = plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"guessing: {GUESSING:.2f}")
    _legend(fig, axes, int(results["train_length"]), [plt.Line2D([], [], **SEED_HANDLE), Patch(**BAND_HANDLE), guess])
    return _finish(fig, results, f"Passkey digit loss vs length (teacher-forced, mean over {_seed_count(results)})")


def passkey_heatmap(results: dict) -> Figure:
    """Exact passkey retrieval (no scaling) per evaluation length × depth of the key
    sentence, one panel per variant: the equal-budget models, and below them the "to
    criterion" ones where some seed reached it. Depth 0 puts the key at the start of the
    context, 1 just before the question. Each cell gives the mean over seeds and, where the
    run recorded them (``passkey_grid_per_seed``), each seed's value below it (up to
    :data:`CELL_SEEDS` seeds; beyond, their range)."""
    apply_style()
    lengths, depths, T = list(results["eval_lengths"]), list(results["depths"]), int(results["train_length"])
    variants = variants_of(results)
    rows = ["none"] + [p for p in SNAPSHOTS if snapshot_reached(results, p)]
    fig, axes = plt.subplots(len(rows), len(variants), figsize=(1.0 + 2.4 * len(variants), 0.9 + 2.4 * len(rows)),
                             sharex=True, sharey=True, constrained_layout=True, squeeze=False)
    samples = results.get("passkey_samples")
    image = None
    recorded = True
    for row, panel in zip(axes, rows):
        for i, (ax, v) in enumerate(zip(row, variants)):
            ax.grid(False)
            st = variant_style(v, i)
            grid = mean_grid(results, v, panel)  # [length, depth]
            seeds = grid_per_seed(results, v, panel)
            recorded &= seeds is not None or grid is None
            if panel == "none":
                ax.set_title(f"{st['label']}, equal budget")
            else:
                ax.set_title(f"{st['label']}, {panel}\n({_seeds_reached(results, v, panel)} seeds)")
            if grid is None:
                ax.text(0.5, 0.5, f"no seed reached\nthe {panel}", ha="center", va="center", transform=ax.transAxes)
                continue
            image = ax.imshow(grid, origin="lower", aspect="auto", cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0,
                              interpolation="nearest", gid=f"{v}/{panel}/grid")
            for (li, di), val in np.ndenumerate(grid):
                missing = math.isnan(val)
                text = "n/a" if missing else f"{100 * val:.0f}"
                if seeds is not None and not missing:
                    text += "\n" + _cell_seeds([100 * g[li, di] for g in seeds.values()])
                ax.text(di, li, text, ha="center", va="center", fontsize=6.5 if seeds is None else 5,
                        color="black" if missing or val >= 0.6 else "white")  # viridis is dark at its low end
    for ax in axes[-1]:
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("key depth (0 = start of context)")
    for ax in axes[:, 0]:
        ax.set_yticks(range(len(lengths)), [f"{n} ({n / T:g}×)" for n in lengths])
        ax.set_ylabel("evaluation length (tokens)")
    if image is not None:
        cb = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        cb.set_label("exact passkey retrieval (% of prompts)")
        cb.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    per_cell = f", {samples} prompts per cell and seed" if samples else ""
    seeds_note = ("each seed below the mean" if recorded else
                  "this run kept no per-seed cells; each seed by length: ablation_passkey")
    return _finish(fig, results, f"Passkey retrieval (%) by length and depth, no scaling\n"
                   f"(mean over {_seed_count(results)}{per_cell}; {seeds_note})")


CELL_SEEDS = 4
"""Most seeds whose values a heatmap cell lists; beyond, it gives their range."""


def _cell_seeds(values: Sequence[float]) -> str:
    """``"67·100·0"`` (each seed, in seed order), or ``"0–100"`` for more than :data:`CELL_SEEDS`."""
    if len(values) > CELL_SEEDS:
        return f"{min(values):.0f}–{max(values):.0f}"
    return "·".join(f"{v:.0f}" for v in values)


def _mean_curve(curves: list[dict], key: str) -> tuple[list, np.ndarray]:
    """Steps logged by every one of ``curves`` and the mean of ``key`` over them there."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    by_step = [dict(zip(c["step"], _values(c[key]))) for c in curves]
    return common, np.array([np.mean([b[s] for b in by_step]) for s in common])


def training_curves(results: dict) -> Figure:
    """Per variant: training loss against step (mean over seeds, each seed faint) with the
    shared learning-rate schedule, and the passkey validation at the training length (exact
    match and digit loss, one thin line per seed), each seed's criterion step starred."""
    apply_style()
    training = results.get("training") or {}
    variants = [v for v in variants_of(results) if training.get(v)]
    if not variants:
        return _empty(results, "Training curves", "no training record in this run")
    fig, ax = plt.subplot_mosaic([["loss", "exact", "digit"], ["lr", "exact", "digit"]], figsize=(11.0, 3.8),
                                 height_ratios=[3, 1], constrained_layout=True)
    ax["lr"].sharex(ax["loss"])
    threshold = (results.get("criterion") or {}).get("threshold")
    lr_drawn = starred = False
    for i, v in enumerate(variants):
        st = variant_style(v, i)
        runs = training[v]  # one dict per seed
        curves = [r["curve"] for r in runs if (r.get("curve") or {}).get("step")]
        for c in curves:
            ax["loss"].plot(c["step"], _values(c["loss"]), color=st["color"], lw=0.7, alpha=0.35)
        if curves:
            steps, mean = _mean_curve(curves, "loss")
            ax["loss"].plot(steps, mean, color=st["color"], label=st["label"], gid=f"{v}/loss")
            if not lr_drawn and curves[0].get("lr"):
                ax["lr"].plot(curves[0]["step"], curves[0]["lr"], color=PALETTE["black"], lw=1)
                lr_drawn = True
        for r in runs:
            val = r.get("val") or {}
            if not val.get("step"):
                continue
            step = r.get("criterion_step")
            for panel, key, scale in (("exact", "exact", 100.0), ("digit", "digit_nll", 1.0)):
                y = scale * _values(val[key])
                ax[panel].plot(val["step"], y, color=st["color"], lw=0.9, alpha=0.7, marker=st["marker"], ms=2.5)
                if step is not None and step in val["step"]:
                    ax[panel].plot([step], [y[val["step"].index(step)]], ls="none", marker="*", ms=10, mfc="none",
                                   mec=st["color"], mew=1.2, gid=f"{v}/criterion")
                    starred = True
    ax["loss"].set_ylabel("training loss (nats / token)")
    ax["loss"].set_title(f"training loss (mean over {_seed_count(results)}; each seed faint)")
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
    _legend(fig, [ax["loss"]], None, extra)
    config = results.get("config") or {}
    prompts = (config.get("train") or {}).get("val_prompts")
    title = f"Training (sequences of T = {results['train_length']} tokens)"
    if prompts:
        title += f"; validation: {prompts} passkey prompts at T, apart from the evaluation's"
    if threshold is not None and not starred:
        title += f"\nno seed reached the criterion ({100 * threshold:g} % exact match)"
    return _finish(fig, results, title)


def retrieval_head(results: dict) -> Figure:
    """Per variant, the retrieval head (the head that attends most to the matching passkey
    digit at ``T``, :mod:`anomaly.ablation.retrieval`) of its first seed: the attention
    rows of the queries that predict the digits over one prompt at ``T``, the key sentence
    marked; and a panel of every seed's retrieval-head attention on the matching digit
    against evaluation length."""
    apply_style()
    data = results.get("retrieval") or {}
    variants = [v for v in variants_of(results) if data.get(v)]
    if not variants:
        return _empty(results, "Retrieval head", "no retrieval-head trace in this run")
    n = len(variants)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * n + 4.6, 3.2), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.0] * n + [1.4]})
    maps, line_ax = axes[:n], axes[n]
    examples = [_values(data[v][0]["example"]["rows"]) for v in variants]  # [digit, position] each
    vmax = max(float(np.nanmax(e)) for e in examples)
    seeds = results.get("seeds") or list(range(len(data[variants[0]])))
    image = None
    for i, (ax, v, rows) in enumerate(zip(maps, variants, examples)):
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
        ax.set_title(f"{variant_style(v, i)['label']}, seed {seeds[0]}\nlayer {layer}, head {head}")
        ax.set_xlabel("key position (token)")
        ax.set_yticks(range(rows.shape[0]), [str(d + 1) for d in range(rows.shape[0])])
        ax.grid(False)
    maps[0].set_ylabel("query predicting passkey digit")
    fig.colorbar(image, ax=list(maps), shrink=0.9).set_label("attention probability")

    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    for i, v in enumerate(variants):
        st = variant_style(v, i)
        x = _nudged(lengths, i, n)
        per_seed = np.array([_values(run["matching"]) for run in data[v]])  # [seed, length]
        line_ax.plot(x, per_seed.mean(axis=0), color=st["color"], marker=st["marker"], ms=3.5, label=st["label"],
                     gid=f"{v}/matching")
        for y in per_seed:
            line_ax.plot(x, y, marker=st["marker"], color=st["color"], gid=f"{v}/matching/seed", **SEED_STYLE)
    uniform = 2.0 / np.asarray(lengths, dtype=float)  # the digit appears twice in the key sentence
    line_ax.plot(lengths, uniform, color="0.5", ls="--", lw=1, zorder=0, label="uniform attention: 2 / length")
    _length_axis(line_ax, lengths, T)
    line_ax.set_yscale("log", nonpositive="mask")
    line_ax.set_ylabel("attention on the matching digit")
    line_ax.set_title(f"each seed's retrieval head (mean over {_seed_count(results)})")
    _legend(fig, [line_ax], T, [plt.Line2D([], [], **SEED_HANDLE)])
    prompts = data[variants[0]][0].get("prompts_per_length")
    example = data[variants[0]][0]["example"]
    return _finish(fig, results, "Retrieval head: where the digit-predicting queries look "
                   f"(left: one prompt of {example['length']} tokens, key sentence dashed"
                   + (f"; right: {prompts} prompts per length and seed" if prompts else "") + "; no scaling)")


def anomalous_fraction(results: dict) -> Figure:
    """Share of causal (query, key, slice) triples in case (d) per variant: the mean over
    layers and heads (unweighted and weighted by ``|q_j||k_j|``) as bars of the mean over
    seeds with each seed's value marked, and every head of every seed as a dot. Strict
    CoCA is 0 by construction; the dashed line is chance (0.5)."""
    apply_style()
    geo = results.get("anomalous_fraction") or {}
    variants = [v for v in variants_of(results) if geo.get(v)]
    if not variants:
        return _empty(results, "Anomalous fraction", "no anomalous-fraction probe in this run")
    fig, (bar_ax, head_ax) = plt.subplots(1, 2, figsize=(8.0, 3.3), sharey=True, constrained_layout=True)
    x = np.arange(len(variants))
    colours = [variant_style(v, i)["color"] for i, v in enumerate(variants)]
    rng = np.random.default_rng(0)  # horizontal jitter of the head dots only
    kinds = ((-0.2, "mean", "anomalous_fraction", None, True),
             (0.2, "weighted_mean", "weighted_anomalous_fraction", "//", False))
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
            heads = np.concatenate([_values(g[per_head]).ravel() for g in geo[v]])  # [seed · layer · head]
            head_ax.plot(xi + offset + rng.uniform(-0.08, 0.08, heads.size), heads, ls="none", marker="o", ms=2.5,
                         mfc=c if filled else "none", mec=c, alpha=0.6)
    labels = [variant_style(v, i)["label"] for i, v in enumerate(variants)]
    for ax in (bar_ax, head_ax):
        ax.axhline(CHANCE, color=PALETTE["black"], ls="--", lw=1)
        ax.set_xticks(x, labels, rotation=20, ha="right")
    bar_ax.set_ylim(0, 1.0)
    bar_ax.set_ylabel("anomalous fraction (share in case (d))")
    bar_ax.set_title(f"mean over layers and heads (bars: mean over {_seed_count(results)})")
    head_ax.set_title("every head of every seed")
    proxies = [Patch(facecolor="0.6", edgecolor="white", label="unweighted (filled dots)"),
               Patch(facecolor="0.6", edgecolor="white", hatch="//", label="weighted by |q_j||k_j| (hollow dots)"),
               plt.Line2D([], [], ls="none", marker="o", ms=3, color=PALETTE["black"], alpha=0.6, label="each seed"),
               plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"chance ({CHANCE})")]
    _bottom_legend(fig, proxies)
    tokens = {g.get("tokens") for v in variants for g in geo[v]} - {None}
    return _finish(fig, results, "Anomalous fraction of the trained models"
                   + (f" ({tokens.pop()} held-out tokens)" if len(tokens) == 1 else ""))


PAIR_STYLE = {("coca_slack", "rope"): PALETTE["blue"], ("coca_strict", "rope"): PALETTE["green"],
              ("coca_strict", "coca_slack"): PALETTE["black"]}
"""Colour of each paired comparison in :func:`paired_differences`."""


def paired_differences(results: dict) -> Figure:
    """The variant comparisons as the verdicts read them: for each pair of
    :data:`~anomaly.ablation.analysis.VARIANT_PAIRS`, no scaling, the per-seed differences
    ``a − b`` (each seed a point), their mean and 95 % t-interval over seeds (error bar),
    against length; one panel for the passkey share, one for log-perplexity (nats per token).
    A difference is only established where the interval misses 0 *and* the exact sign-flip
    test gives p < 0.05 (docs/ablation.md, "Verdicts")."""
    apply_style()
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
            x = _nudged([c.length for c in rows], i, len(pairs))
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
        _length_axis(ax, lengths, T)
        ax.set_ylabel(label)
    axes[0].set_title("passkey retrieval, no scaling")
    axes[1].set_title("perplexity (log scale), no scaling")
    handles += [plt.Line2D([], [], ls="none", marker="o", ms=3.5, mfc="none", color="0.3", label="each seed"),
                plt.Line2D([], [], color=PALETTE["black"], ls=":", lw=1, label=f"training length {T}")]
    _bottom_legend(fig, handles)
    return _finish(fig, results, f"Paired differences between variants, seed by seed ({_seed_count(results)}; "
                   "bars: mean and 95 % t-interval over seeds)")


FIGURES = {
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
    names = [f"{prefix}_{name}.{ext}" for name in FIGURES for ext in ("pdf", "png", "json")]
    return claim(out_dir, OWNER, names)


def save_all(results: dict, out_dir: str | Path, provenance: Provenance, prefix: str = "ablation") -> list[Path]:
    """Write every figure as ``out_dir/<prefix>_<name>.{pdf,png,json}``; returns the paths.

    Writes into ``out_dir`` as it is; commands write into the staging folder of
    :func:`claim_figures`' target so that nobody else's files are touched.
    """
    paths: list[Path] = []
    for name, make in FIGURES.items():
        fig = make(results)
        try:
            paths += save_figure(fig, Path(out_dir) / f"{prefix}_{name}", provenance)
        finally:
            plt.close(fig)
    return paths


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
