"""The pieces every figure of an ablation run is drawn with (:mod:`anomaly.ablation.plots`):
the variants' styles, panel titles, the per-seed series (each seed a point, the mean over
seeds a line, its 95 % t-interval a band), the evaluation-length axis, legends below the
panels and the title that carries a run's note. They draw; the numbers come from
:mod:`anomaly.ablation.analysis` and :mod:`anomaly.ablation.results`.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from anomaly import variants as registry
from anomaly.ablation.analysis import Series, panel_name, series
from anomaly.ablation.results import SNAPSHOTS, TO_CRITERION, panels_of, snapshot_of, variants_of
from anomaly.plotting.style import PALETTE

BAND_ALPHA = 0.18
"""Opacity of a 95 % band."""
SEED_STYLE = {"ls": "none", "ms": 4, "alpha": 0.85, "mfc": "none", "mew": 1.0}
"""Hollow markers of the per-seed values, beside the mean's line (every seed is seen)."""
SEED_NUDGE = 2 ** 0.03
"""Sideways shift (a factor in log2 x) of the per-seed points from their mean's."""


def variant_style(variant: str) -> dict[str, Any]:
    """Label, short label, colour and marker of ``variant``, the same in every figure: its entry in
    :data:`anomaly.variants.REGISTRY`. An unregistered variant is a :class:`UserError`."""
    v = registry.variant(variant)
    return {"label": v.label, "short": v.short, "color": PALETTE[v.colour], "marker": v.marker}


def scaling_label(scaling: str) -> str:
    """``"none"`` → ``"no scaling"``; ``"ntk-4"`` → ``"dynamic NTK, factor 4"``."""
    if scaling == "none":
        return "no scaling"
    if scaling.startswith("ntk-"):
        return f"dynamic NTK, factor {scaling[4:]}"
    return scaling


def seeds_reached_label(results: dict, variant: str, panel: str = TO_CRITERION) -> str:
    """``"2/3"``: seeds of ``variant`` that reached the snapshot ``panel``, of all its seeds."""
    entry = snapshot_of(results, variant, panel)
    return f"{entry.get('seeds_reached', 0)}/{len(entry.get('steps') or results['seeds'])}"


def panel_title(results: dict, panel: str) -> str:
    """A scaling's label; for a snapshot (:data:`SNAPSHOTS`), the reading and how many seeds
    reached it."""
    if panel not in SNAPSHOTS:
        return scaling_label(panel)
    threshold = (results.get("criterion") or {}).get("threshold")
    counts = ", ".join(f"{variant_style(v)['short']} {seeds_reached_label(results, v, panel)}"
                       for v in variants_of(results))
    name = panel_name(results, panel)
    return (f"{name} (no scaling)\nseeds reaching {threshold:g} at validation:\n{counts}"
            if threshold is not None and panel == TO_CRITERION else f"{name} (no scaling)\nseeds: {counts}")


def finish(fig: Figure, results: dict, title: str) -> Figure:
    """Title ``fig``; a run that carries a ``note`` (the smoke preset's "plumbing check")
    says so under the title of every figure, so that no figure of it passes for a result."""
    note = results.get("note")
    if note:
        width = max(50, int(fig.get_size_inches()[0] * 13))  # characters per line at 9 pt
        title = f"{title}\n" + textwrap.fill(f"NOTE: {note}", width)
    fig.suptitle(title, fontsize=9)
    return fig


def empty_figure(results: dict, title: str, message: str) -> Figure:
    """A figure that says what is missing, for runs without that part (e.g. ``--no-probe``)."""
    fig, ax = plt.subplots(figsize=(4.5, 2.0), constrained_layout=True)
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return finish(fig, results, title)


def length_axis(ax: plt.Axes, lengths: Sequence[int], train_length: int) -> None:
    """Log2 x axis with a tick at every evaluation length and a line at the training length."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(lengths)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in lengths], rotation=45, ha="right")
    ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
    ax.axvline(train_length, color=PALETTE["black"], ls=":", lw=1, zorder=0)
    ax.set_xlabel("evaluation length (tokens)")


def nudged(lengths: Sequence[int], index: int, count: int) -> np.ndarray:
    """``lengths`` shifted sideways (in log2 x) per variant, so equal values stay visible."""
    return np.asarray(lengths, dtype=float) * 2 ** (0.05 * (index - (count - 1) / 2))


def panel_row(n: int) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(2.5 * n + 1.8, 3.2), sharey=True, constrained_layout=True, squeeze=False)
    return fig, axes[0]


def legend_below(fig: Figure, axes: Sequence[plt.Axes], train_length: int | None, extra: Sequence[Artist] = ()) -> None:
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
    bottom_legend(fig, handles)


def bottom_legend(fig: Figure, handles: Sequence[Artist]) -> None:
    # Below the panels, where it cannot collide with a long (noted) title or with data.
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), frameon=False)


SEED_HANDLE = {"ls": "none", "marker": "o", "ms": 4, "mfc": "none", "color": "0.3", "label": "each seed"}
BAND_HANDLE = {"facecolor": "0.5", "alpha": 2 * BAND_ALPHA, "lw": 0, "label": "95 % t-interval over seeds"}


def draw_series(ax: plt.Axes, x: np.ndarray, r: Series, style: dict, gid: str,
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


def finite_range(results: dict, key: str) -> tuple[float, float]:
    """Smallest and largest finite mean, bound and per-seed value of ``key`` over every
    variant and panel (``(1, 10)`` when there is none)."""
    found = [np.concatenate([r.mean, r.low, r.high, r.values.ravel()]) for v in variants_of(results)
             for p in panels_of(results) if (r := series(results, key, v, p)) is not None]
    x = np.concatenate(found) if found else np.zeros(0)
    x = x[np.isfinite(x)]
    return (float(x.min()), float(x.max())) if x.size else (1.0, 10.0)


def vs_length(results: dict, key: str, scale: float = 1.0,
               ceiling: float | None = None) -> tuple[Figure, np.ndarray, bool]:
    """``key`` against evaluation length: one panel per reading (:func:`panels_of`), one
    line with band and per-seed markers per variant (:func:`draw_series`). Returns the figure,
    its panels and whether any value was pinned to ``ceiling``."""
    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    variants, panels = variants_of(results), panels_of(results)
    fig, axes = panel_row(len(panels))
    pinned = False
    for ax, panel in zip(axes, panels):
        for i, v in enumerate(variants):
            r = series(results, key, v, panel)
            if r is not None:
                pinned |= draw_series(ax, nudged(lengths, i, len(variants)), r, variant_style(v),
                                f"{v}/{panel}", scale, ceiling)
        length_axis(ax, lengths, T)
        ax.set_title(panel_title(results, panel))
    return fig, axes, pinned


def seed_count(results: dict) -> str:
    n = len(results["seeds"])
    return f"{n} seed" + ("s" if n != 1 else "")


CELL_SEEDS = 4
"""Most seeds whose values a heatmap cell lists; beyond, it gives their range."""


def cell_seeds(values: Sequence[float]) -> str:
    """``"67·100·0"`` (each seed, in seed order), or ``"0–100"`` for more than :data:`CELL_SEEDS`."""
    if len(values) > CELL_SEEDS:
        return f"{min(values):.0f}–{max(values):.0f}"
    return "·".join(f"{v:.0f}" for v in values)
