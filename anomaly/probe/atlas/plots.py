"""Figures of the atlas (:class:`anomaly.probe.atlas.tables.Atlas`): every text as a point,
the mean over texts with its 95 % t-interval over them, chance as a line. :data:`FIGURES` is
the registry; :func:`anomaly.plotting.style.save_figures` saves it."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from anomaly.analytic import CHANCE_FRACTION
from anomaly.plotting.style import CYCLE, PALETTE, Registry, styled
from anomaly.probe.atlas.tables import ALL, Atlas, LABELS, Row

KIND_MARKERS = {"prose": "o", "code": "^"}
"""Per-text points: a circle for prose, a triangle for code."""


def _models(atlas: Atlas) -> list[str]:
    return list(dict.fromkeys(r.model for r in atlas.rows))


def _groups(atlas: Atlas, model: str) -> list[str]:
    return list(dict.fromkeys(r.group for r in atlas.rows if r.model == model))


def _series(atlas: Atlas, model: str, group: str, reading: str) -> list[Row]:
    return sorted((r for r in atlas.rows if (r.model, r.group, r.reading, r.texts) == (model, group, reading, "all")),
                  key=lambda r: r.tokens)


def _kinds(atlas: Atlas, model: str, tokens: int) -> dict[str, str]:
    """Text name → kind, from the rows by kind."""
    return {name: r.texts for r in atlas.rows if r.model == model and r.tokens == tokens and r.texts != "all"
            for name in r.values}


def _draw_series(ax: plt.Axes, atlas: Atlas, model: str, group: str, reading: str, colour: str,
                 offset: float, label: str, ls: str = "-") -> None:
    rows = _series(atlas, model, group, reading)
    if not rows:
        return
    x = np.array([r.tokens for r in rows], dtype=float) * 2.0 ** offset  # a small shift per series
    mean = np.array([r.mean for r in rows])
    err = np.array([[r.mean - r.low for r in rows], [r.high - r.mean for r in rows]])
    ax.errorbar(x, mean, yerr=np.nan_to_num(err), color=colour, ls=ls, marker="s", ms=4, capsize=2, label=label,
                gid=f"mean:{model}:{group}:{reading}")
    for xi, r in zip(x, rows):
        kinds = _kinds(atlas, model, r.tokens)
        for name, v in r.values.items():
            ax.plot([xi * 2.0 ** 0.08], [v], KIND_MARKERS.get(kinds.get(name, ""), "o"), color=colour, ms=3,
                    alpha=0.45, mew=0, gid=f"text:{model}:{group}:{reading}:{r.tokens}:{name}")


@styled
def shares_by_length(atlas: Atlas) -> Figure:
    """Case-(d) share against the number of tokens, per model (columns): unweighted,
    weighted, and weighted among fast and slow slices (rows); one colour per layer group."""
    models = _models(atlas)
    fig, axes = plt.subplots(3, len(models), figsize=(3.4 * len(models), 7.6), sharex=True, squeeze=False,
                             constrained_layout=True)
    for col, model in enumerate(models):
        groups = _groups(atlas, model)
        for row, readings in enumerate((("share",), ("weighted",), ("fast_weighted", "slow_weighted"))):
            ax = axes[row, col]
            for i, group in enumerate(groups):
                colour = "0.2" if group == ALL else CYCLE[(i - 1) % len(CYCLE)]
                for reading, ls in zip(readings, ("-", "--")):
                    if group == ALL and reading not in ("share", "weighted"):
                        continue
                    label = group if len(readings) == 1 else f"{group}: {LABELS[reading]}"
                    _draw_series(ax, atlas, model, group, reading, colour, 0.04 * (i - len(groups) / 2), label, ls)
            ax.axhline(CHANCE_FRACTION, color=PALETTE["vermillion"], lw=0.8, ls=":", label="chance")
            ax.set_xscale("log", base=2)
            ax.set_ylabel({0: "case-(d) share", 1: "weighted case-(d) share",
                           2: "weighted share: fast (—), slow (--)"}[row])
            if row == 0:
                ax.set_title(model)
            if row == 2:
                ax.set_xlabel("tokens probed T")
            ax.legend(frameon=False, fontsize=6)
    fig.suptitle("RoPE anomaly by context length: mean over texts with 95 % interval; "
                 "points: texts (○ prose, △ code)", fontsize=8)
    return fig


@styled
def shares_by_layer(atlas: Atlas) -> Figure:
    """Weighted case-(d) share per layer, per model, at each model's longest length: one
    line per text, the mean over texts in black, layers marked by their group."""
    models = _models(atlas)
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), squeeze=False,
                             constrained_layout=True)
    for ax, model in zip(axes[0], models):
        profile = max((p for p in atlas.profiles if p.model == model), key=lambda p: p.tokens)
        per = np.array(list(profile.weighted.values()))  # [texts, L]
        x = np.arange(per.shape[1])
        for v in per:
            ax.plot(x, v, color="0.65", lw=0.6, alpha=0.7)
        ax.plot(x, per.mean(0), color="k", lw=1.2, label=f"mean over {len(per)} texts",
                gid=f"layer_mean:{model}:{profile.tokens}")
        for i, group in enumerate(dict.fromkeys(profile.groups)):
            sel = np.array([g == group for g in profile.groups])
            ax.plot(x[sel], per.mean(0)[sel], "o", color=CYCLE[i % len(CYCLE)], ms=4, label=group, zorder=3)
        ax.set_xticks(x[:: max(1, len(x) // 8)], [str(profile.layers[i]) for i in x[:: max(1, len(x) // 8)]])
        ax.set_title(f"{model}, {profile.tokens} tokens")
        ax.axhline(CHANCE_FRACTION, color=PALETTE["vermillion"], lw=0.8, ls=":", label="chance")
        ax.set_xlabel("layer")
        ax.set_ylabel("weighted case-(d) share")
        ax.legend(frameon=False, fontsize=7)
    return fig


@styled
def mean_angles(atlas: Atlas) -> Figure:
    """Share of (head, slice) whose mean initial angle is in case (d), and their median τ,
    against the number of tokens, per model and layer group."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2), constrained_layout=True)
    for m, model in enumerate(_models(atlas)):
        groups = [g for g in _groups(atlas, model) if g != ALL]
        for i, group in enumerate(groups):
            colour = CYCLE[(2 * m + i) % len(CYCLE)]
            for ax, reading in zip(axes, ("mean_angle_d", "median_tau")):
                _draw_series(ax, atlas, model, group, reading, colour, 0.04 * i, f"{model}, {group}")
    axes[0].axhline(CHANCE_FRACTION, color=PALETTE["vermillion"], lw=0.8, ls=":", label="chance")
    axes[0].set_ylabel("share of (head, slice) with Θ̄ in case (d)")
    axes[1].set_ylabel("median τ over them (tokens)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens probed T")
    axes[0].legend(frameon=False, fontsize=6)
    return fig


FIGURES: Registry = {
    "shares_by_length": shares_by_length,
    "shares_by_layer": shares_by_layer,
    "mean_angles": mean_angles,
}
