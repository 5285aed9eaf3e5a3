"""Plots of the analytic results in :mod:`anomaly.figures`: each takes a result, returns a Figure
(drawn under :func:`anomaly.plotting.style.style`); a one-panel plot draws into ``ax`` when given."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from anomaly.plotting.style import CYCLE, DIVERGING_CMAP, PALETTE, axes_or_new, styled

PI = math.pi
CASE_TITLES = {
    "a": "(a) m < n, Θ ≤ π: anomalous",
    "b": "(b) m > n, Θ ≤ π: expected",
    "c": "(c) m < n, Θ > π: expected",
    "d": "(d) m > n, Θ > π: anomalous",
}


def _draw_slices(ax, theta0: float, causal: bool, anomalous: bool) -> None:
    """The 2-D picture: key slice on the x-axis, query slice at Θ, arrow of rotation."""
    circle = np.linspace(0, 2 * PI, 200)
    ax.plot(np.cos(circle), np.sin(circle), color="0.8", lw=0.8)
    ax.annotate("", xy=(1, 0), xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=PALETTE["blue"], lw=1.6))
    ax.annotate("", xy=(math.cos(theta0), math.sin(theta0)), xytext=(0, 0),
                arrowprops=dict(arrowstyle="-|>", color=PALETTE["vermillion"], lw=1.6))
    ax.text(1.08, -0.12, "$k_j$", color=PALETTE["blue"])
    ax.text(1.12 * math.cos(theta0), 1.12 * math.sin(theta0), "$q_j$", color=PALETTE["vermillion"], ha="center")
    # The initial angle, counter-clockwise from k to q.
    arc = np.linspace(0, theta0, 60)
    ax.plot(0.28 * np.cos(arc), 0.28 * np.sin(arc), color="0.3", lw=0.9)
    ax.text(0.38 * math.cos(theta0 / 2), 0.38 * math.sin(theta0 / 2), "Θ", ha="center", va="center")
    # As |m − n| grows the final angle Θ + (m − n)θ turns ccw (m > n) or cw (m < n).
    direction = 1 if causal else -1
    span = np.linspace(theta0, theta0 + direction * 0.9, 30)
    color = PALETTE["vermillion"] if anomalous else "0.45"
    ax.add_patch(FancyArrowPatch((0.72 * math.cos(span[0]), 0.72 * math.sin(span[0])),
                                 (0.72 * math.cos(span[-1]), 0.72 * math.sin(span[-1])),
                                 connectionstyle=f"arc3,rad={0.25 * direction}", arrowstyle="-|>",
                                 mutation_scale=9, color=color, lw=1.1))
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")


@styled
def plot_fig3_cases(cases) -> Figure:
    """Fig. 3: for each case, the slice picture (top) and score versus distance (bottom)."""
    fig, axes = plt.subplots(2, 4, figsize=(10, 4.6), gridspec_kw={"height_ratios": [1, 1.1]})
    for col, c in enumerate(cases):
        anomalous = c.tau > 0
        _draw_slices(axes[0, col], c.theta0, causal=c.distances[-1] > 0, anomalous=anomalous)
        axes[0, col].set_title(CASE_TITLES[c.case] + f"\nΘ = {c.theta0 / PI:.2f}π", fontsize=8)
        ax = axes[1, col]
        d, sc = c.distances.numpy(), c.scores.numpy()
        ax.plot(d, sc, color=PALETTE["blue"])
        if anomalous:
            sign = np.sign(d[-1])
            ax.axvspan(0, sign * c.tau, color=PALETTE["vermillion"], alpha=0.15, lw=0)
            ax.axvline(sign * c.tau, color=PALETTE["vermillion"], ls="--", lw=1)
            ax.text(sign * (c.tau + 2), -1.05, f"τ = {c.tau:.1f} tokens", color=PALETTE["vermillion"],
                    ha="left" if sign > 0 else "right", fontsize=7)
        ax.set_ylim(-1.15, 1.2)
        ax.set_xlabel("signed distance m − n (tokens)")
        if col == 0:
            ax.set_ylabel("slice score cos(Θ + (m−n)θ)")
    fig.suptitle(f"The four scenarios of a RoPE slice (θ = 2π/{2 * PI / cases[0].freq:.0f} rad/token; "
                 "shaded: score rises with distance)", fontsize=9)
    fig.tight_layout()
    return fig


@styled
def plot_anomaly_map(result, ax: plt.Axes | None = None) -> Figure:
    """Slice score over (Θ, distance) with the abnormal area (|s| < τ) hatched."""
    fig, ax, created = axes_or_new(ax, (6.4, 4.2))
    s, th = result.distances.numpy(), result.theta0.numpy() / PI
    mesh = ax.pcolormesh(s, th, result.scores.numpy(), cmap=DIVERGING_CMAP, vmin=-1, vmax=1, shading="nearest",
                         rasterized=True)
    ax.contourf(s, th, result.abnormal.numpy().astype(float), levels=[0.5, 1.5], colors="none", hatches=["////"])
    ax.plot(result.tau.numpy(), th, color=PALETTE["black"], lw=1.2, ls="--", label="τ (first rotary border)")
    ax.axhline(1, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    for x, y, case in ((-0.75, 0.5, "a"), (0.75, 0.5, "b"), (-0.75, 1.5, "c"), (0.75, 1.5, "d")):
        ax.text(x * s.max(), y, f"({case})", ha="center", va="center", fontsize=10, weight="bold",
                bbox=dict(facecolor="white", alpha=0.7, lw=0))
    ax.set_xlabel("signed distance m − n (tokens)")
    ax.set_ylabel("initial angle Θ (units of π rad)")
    ax.set_title(f"Slice score cos(Θ + (m−n)θ), θ = {result.freq:.3f} rad/token\n"
                 "hatched: abnormal area, nearer keys score lower than farther ones")
    ax.legend(loc="lower left", fontsize=7)
    fig.colorbar(mesh, ax=ax, label="slice score (unit magnitudes)")
    ax.grid(False)
    if created:
        fig.tight_layout()
    return fig


@styled
def plot_scaling(study) -> Figure:
    """τ per slice under each scaling, and its growth against the paper's claims."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    j = np.arange(study.head_dim // 2)
    for name, color in zip(study.names, CYCLE):
        eff = study.effects[name]
        ax1.semilogy(j, eff.scaled_tau.numpy(), label=name, lw=1.2, color=color)
        if name != "none":
            ax2.plot(j, eff.ratio.numpy(), label=name, lw=1.2, color=color)
    for i, name in enumerate(study.names[1:3]):
        paper = study.effects[name].paper_ratio.numpy()
        ax2.plot(j, paper, ls=":", color="k", lw=1.0, label="paper's claim (k; λ^(2j/d))" if i else None)
    ax1.axhline(study.train_length, color="0.4", ls="--", lw=0.8)
    ax1.text(0, study.train_length * 1.15, f"training length {study.train_length}", fontsize=7, color="0.3")
    ax1.set_xlabel("slice index j")
    ax1.set_ylabel("τ: tokens in the abnormal area")
    ax1.set_title(f"Abnormal area per slice, Θ = {study.theta0 / PI:.2f}π (d = {study.head_dim}, base {study.base:g})")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("slice index j")
    ax2.set_ylabel("growth of τ (× unscaled)")
    ax2.set_title("Growth of the abnormal area; exact NTK: λ^(2j/(d−2))")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


@styled
def plot_decay(study, ax: plt.Axes | None = None) -> Figure:
    """Su's and CoCA's content-free decay terms against distance."""
    fig, ax, created = axes_or_new(ax, (5.2, 3.4))
    s = study.distances.numpy()
    ax.semilogx(s, study.su.numpy(), label="RoPE (Su): (2/d) Σ|S_{j+1}|")
    ax.semilogx(s, study.coca.numpy(), label="CoCA: (2/d) Σ|C_{j+1}|")
    ax.set_xlabel("relative distance m − n (tokens)")
    ax.set_ylabel("relative upper bound (unitless)")
    ax.set_title(f"Long-term decay bounds (d = {study.head_dim}, base {study.base:g})")
    ax.legend()
    if created:
        fig.tight_layout()
    return fig
