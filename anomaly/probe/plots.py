"""Figures of a probe result. Each function maps a :class:`anomaly.probe.ProbeResult` to a
Figure, drawn under :func:`anomaly.plotting.style.style` (a one-panel figure draws into ``ax``
when given); :data:`FIGURES` is the registry and saving is
:func:`anomaly.plotting.style.save_figures`' job (:func:`save_all`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from anomaly import variants
from anomaly.io import Provenance
from anomaly.probe.result import ProbeResult
from anomaly.plotting.style import (CYCLE, DIVERGING_CMAP, PALETTE, SEQUENTIAL_CMAP, Registry, axes_or_new, save_figures,
                                    seeded, styled)


def chosen_heads(result: ProbeResult, count: int = 3) -> list[tuple[int, int]]:
    """(layer, head) with the highest, median and lowest weighted anomalous fraction."""
    w = result.weighted_anomalous_fraction
    order = np.argsort(w, axis=None)
    picks = [order[-1], order[len(order) // 2], order[0]][:count]
    return [tuple(int(i) for i in np.unravel_index(p, w.shape)) for p in picks]


@styled
def fraction_heatmap(result: ProbeResult) -> Figure:
    """Anomalous fraction (unweighted, weighted) over layers × heads, centred on chance."""
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4), sharey=True, constrained_layout=True)
    chance = result.chance_fraction
    data = [result.anomalous_fraction, result.weighted_anomalous_fraction]
    span = max(0.05, max(float(np.abs(d - chance).max()) for d in data))
    for ax, d, title in zip(axes, data, ("unweighted", "weighted by |q_j||k_j|")):
        im = ax.imshow(d, aspect="auto", cmap=DIVERGING_CMAP, vmin=chance - span, vmax=chance + span,
                       origin="lower", interpolation="nearest")
        ax.set_title(f"case-(d) share, {title}")
        ax.set_xlabel("query head")
        ax.grid(False)
    axes[0].set_ylabel("layer")
    cb = fig.colorbar(im, ax=axes, shrink=0.9)
    cb.set_label(f"fraction of causal triples in case (d) (chance = {chance})")
    fig.suptitle(f"{result.model}{variants.variant(result.kind).probe_title()}: {result.tokens} tokens", fontsize=9)
    return fig


@styled
def angle_histograms(result: ProbeResult, heads: list[tuple[int, int]] | None = None) -> Figure:
    """Θ density per slice (rows) for chosen heads; case (d) lies right of the line at π."""
    heads = heads or chosen_heads(result)
    hist = result.theta_hist.astype(float)  # [L, H, J, B]
    bins = hist.shape[-1]
    fig, axes = plt.subplots(1, len(heads), figsize=(2.8 * len(heads), 3.4), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    crit = result.critical_slice
    for ax, (l, h) in zip(axes, heads):
        dens = hist[l, h] / np.maximum(hist[l, h].sum(-1, keepdims=True), 1) * bins / (2 * math.pi)
        im = ax.imshow(dens, aspect="auto", origin="lower", cmap=SEQUENTIAL_CMAP,
                       extent=(0, 2 * math.pi, -0.5, dens.shape[0] - 0.5), interpolation="nearest")
        ax.axvline(math.pi, color=PALETTE["vermillion"], lw=1)
        if crit < dens.shape[0]:
            ax.axhline(crit - 0.5, color=PALETTE["orange"], lw=1, ls="--")
        w = result.weighted_anomalous_fraction[l, h]
        ax.set_title(f"layer {l}, head {h}\nweighted case-(d) share {w:.2f}")
        ax.set_xlabel("initial angle Θ (rad)")
        ax.set_xticks([0, math.pi, 2 * math.pi], ["0", "π", "2π"])
        ax.grid(False)
    axes[0].set_ylabel("slice j (low j = high frequency)")
    fig.colorbar(im, ax=axes, shrink=0.9).set_label("pair density (1/rad)")
    return fig


@styled
def tau_distribution(result: ProbeResult, ax: plt.Axes | None = None) -> Figure:
    """τ (at each head's mean angle) per slice over all heads, with the probed length and
    the critical slice of Liu et al.: each slice's distribution as a strip of points, one
    per (layer, head) in case (d)."""
    tau = result.tau  # [L, H, J]
    L, H, J = tau.shape
    fig, ax, _ = axes_or_new(ax, (5.0, 3.2), constrained_layout=True)
    jj = np.broadcast_to(np.arange(J), tau.shape)
    pos = tau > 0
    first = len(ax.collections)
    with seeded(0):
        sns.stripplot(x=jj[pos], y=tau[pos], orient="x", native_scale=True, jitter=0.3, size=3 ** 0.5, alpha=0.35,
                      color=CYCLE[0], linewidth=0, ax=ax)
    if len(ax.collections) > first:  # one collection per slice: the legend names the first
        ax.collections[first].set_label("head × layer (case d)")
    ax.axhline(result.tokens, color=PALETTE["vermillion"], lw=1, label=f"probed length T = {result.tokens}")
    ax.axvline(result.critical_slice - 0.5, color=PALETTE["orange"], ls="--", lw=1,
               label=f"critical slice (Liu et al.), train length {result.train_length}")
    ax.set_yscale("log")
    ax.set_xlabel("slice j")
    ax.set_ylabel("τ = (2π − Θ̄_j)/θ_j (tokens)")
    share = pos.mean()
    ax.set_title(f"τ at each head's mean angle; {share:.0%} of (layer, head, slice) in case (d)")
    ax.legend(loc="upper left", frameon=False)
    return fig


@styled
def logit_curves(result: ProbeResult, heads: list[tuple[int, int]] | None = None, ax: plt.Axes | None = None) -> Figure:
    """Mean real attention logit versus distance for chosen heads."""
    heads = heads or chosen_heads(result)
    ml = result.mean_logit  # [L, H, T]
    t = ml.shape[-1]
    s = np.arange(1, t)
    fig, ax, _ = axes_or_new(ax, (5.0, 3.2), constrained_layout=True)
    for (l, h), c in zip(heads, CYCLE):
        peak = int(result.logit_peak_distance[l, h])
        ax.plot(s, ml[l, h, 1:], color=c, label=f"layer {l}, head {h} (peak at {peak})")
        ax.plot([peak], [ml[l, h, peak]], "o", color=c, ms=4)
    ax.axvline(result.logit_peak_window, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("distance m − n (tokens)")
    ax.set_ylabel("mean pre-softmax logit")
    away = result.peaks_away_from_nearest_key
    ax.set_title(f"{away.sum()} of {away.size} heads peak away from the nearest key")
    ax.legend(frameon=False)
    return fig


@styled
def slice_norms(result: ProbeResult) -> Figure:
    """Mean |q_j| and |k_j| per slice, heads of all layers stacked (Barbero et al.'s view)."""
    qn = result.q_norm  # [L, H, J]
    kn = result.k_norm  # [L, KV, J]
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4), constrained_layout=True)
    for ax, n, name in zip(axes, (qn, kn), ("query", "key")):
        im = ax.imshow(n.reshape(-1, n.shape[-1]), aspect="auto", origin="lower", cmap=SEQUENTIAL_CMAP,
                       interpolation="nearest")
        ax.set_xlabel("slice j (low j = high frequency)")
        ax.set_ylabel("layer × head (stacked)")
        ax.set_title(f"mean {name} slice norm |{name[0]}_j|")
        ax.grid(False)
        fig.colorbar(im, ax=ax).set_label("norm")
    return fig


FIGURES: Registry = {
    "fraction_heatmap": fraction_heatmap,
    "angle_histograms": angle_histograms,
    "tau_distribution": tau_distribution,
    "logit_vs_distance": logit_curves,
    "slice_norms": slice_norms,
}
"""Figure name → its drawing from a :class:`ProbeResult`."""


def save_all(result: ProbeResult, out_dir: str | Path, provenance: Provenance, prefix: str = "probe_") -> list[Path]:
    """Write every probe figure as ``out_dir/<prefix><name>.{pdf,png,json}``."""
    return save_figures(FIGURES, out_dir, provenance, result, prefix=prefix)
