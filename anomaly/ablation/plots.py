"""Figures and tables of an ablation run, from its ``results.json`` dict.

Each figure function maps the results dict (as :func:`anomaly.ablation.run.run` returns it
or as loaded from ``results.json``) to a matplotlib Figure; :func:`save_all` writes them all
through :func:`anomaly.plotting.style.save_figure`. Regenerate the figures of a finished run
without touching the models::

    python -m anomaly.ablation.plots runs/ablation_cpu/results.json --out figures

Non-finite perplexities (a model that diverged at some length: ``inf``, or ``null`` in the
JSON) are not dropped silently: they are drawn as hollow triangles pinned to the top of
their panel and named in the legend.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from anomaly.cli import ArgumentParser, UserError, run_main
from anomaly.io import Provenance
from anomaly.outputs import OutputDir, claim
from anomaly.plotting.style import CYCLE, DIVERGING_CMAP, PALETTE, apply_style, save_figure, use_file_backend

VARIANT_STYLE: dict[str, dict[str, Any]] = {
    "rope": {"label": "RoPE", "color": PALETTE["vermillion"], "marker": "o"},
    "coca_slack": {"label": "CoCA slack", "color": PALETTE["blue"], "marker": "s"},
    "coca_strict": {"label": "CoCA strict", "color": PALETTE["green"], "marker": "D"},
}
"""Label, colour and marker of each variant, the same in every figure."""

CHANCE = 0.5
"""Anomalous fraction of directions drawn uniformly at random (docs/conventions.md §3): half of the
causal triples land in case (d)."""

REQUIRED_KEYS = ("train_length", "eval_lengths", "ppl", "passkey")


def variant_style(variant: str, index: int = 0) -> dict[str, Any]:
    """Label, colour and marker of ``variant`` (unknown variants cycle the palette)."""
    if variant in VARIANT_STYLE:
        return VARIANT_STYLE[variant]
    return {"label": variant, "color": CYCLE[(index + 3) % len(CYCLE)], "marker": "^"}


def scaling_label(scaling: str) -> str:
    """``"none"`` → ``"no scaling"``; ``"ntk-4"`` → ``"dynamic NTK, factor 4"``."""
    if scaling == "none":
        return "no scaling"
    if scaling.startswith("ntk-"):
        return f"dynamic NTK, factor {scaling[4:]}"
    return scaling


def variants_of(results: dict) -> list[str]:
    """Variants in the order of ``results["variants"]`` (else of the ``ppl`` table)."""
    return list(results.get("variants") or results["ppl"])


def scalings_of(results: dict) -> list[str]:
    """Scalings in the order of ``results["scalings"]`` (else of the first variant's table)."""
    return list(results.get("scalings") or next(iter(results["ppl"].values())))


def _values(seq: Sequence[Any]) -> np.ndarray:
    """Floats with ``None`` (NaN in JSON) as NaN."""
    return np.array([math.nan if v is None else float(v) for v in seq], dtype=float)


def _length_axis(ax: plt.Axes, lengths: Sequence[int], train_length: int) -> None:
    """Log2 x axis with a tick at every evaluation length and a line at the training length."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(lengths)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in lengths], rotation=45, ha="right")
    ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
    ax.axvline(train_length, color=PALETTE["black"], ls=":", lw=1, zorder=0)
    ax.set_xlabel("evaluation length (tokens)")


def _panels(n: int, sharey: bool = True) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(2.5 * n + 0.6, 3.0), sharey=sharey, constrained_layout=True, squeeze=False)
    return fig, axes[0]


def perplexity_vs_length(results: dict) -> Figure:
    """Sliding-window perplexity against evaluation length, one line per variant and one
    panel per RoPE scaling (the layout of the paper's Fig. 1). Log-log axes; the dotted
    line is the training length."""
    apply_style()
    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    variants, scalings = variants_of(results), scalings_of(results)
    table = {v: {s: _values(results["ppl"][v][s]) for s in scalings} for v in variants}
    finite = np.concatenate([a[np.isfinite(a)] for row in table.values() for a in row.values()] or [np.zeros(0)])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1.0, 10.0)
    ceiling = hi * 2.0  # where non-finite values are drawn
    fig, axes = _panels(len(scalings))
    clipped_any = False
    for ax, s in zip(axes, scalings):
        for i, v in enumerate(variants):
            st = variant_style(v, i)
            y = table[v][s]
            ok = np.isfinite(y)
            ax.plot(np.asarray(lengths)[ok], y[ok], color=st["color"], marker=st["marker"], ms=3.5,
                    label=st["label"])
            if (~ok).any():
                clipped_any = True
                ax.plot(np.asarray(lengths)[~ok], np.full((~ok).sum(), ceiling), ls="none", marker="^",
                        ms=7, mfc="none", mec=st["color"], mew=1.3, clip_on=False)
        ax.set_yscale("log")
        _length_axis(ax, lengths, T)
        ax.set_title(scaling_label(s))
    axes[0].set_ylim(lo / 1.25, ceiling * 1.5 if clipped_any else hi * 1.25)
    axes[0].set_ylabel("perplexity (held-out text, log scale)")
    marker = dict(ls="none", marker="^", ms=7, mfc="none", mec=PALETTE["black"])
    _legend(axes, T, {"non-finite (clipped)": marker} if clipped_any else {})
    tokens = results.get("ppl_scored_tokens")
    fig.suptitle("Perplexity vs length" + (f" ({tokens} scored tokens per length)" if tokens else ""), fontsize=9)
    return fig


def _legend(axes, train_length: int, extra: dict[str, dict]) -> None:
    """One legend for a row of panels: the variants, any extra markers, the training length."""
    handles, labels = axes[0].get_legend_handles_labels()
    for label, style in extra.items():
        handles.append(plt.Line2D([], [], **style))
        labels.append(label)
    handles.append(plt.Line2D([], [], color=PALETTE["black"], ls=":", lw=1))
    labels.append(f"training length {train_length}")
    axes[-1].legend(handles, labels, loc="best", frameon=False)


def passkey_vs_length(results: dict) -> Figure:
    """Passkey-retrieval accuracy against evaluation length, same layout as
    :func:`perplexity_vs_length` (the paper's Tables 2–3 as curves)."""
    apply_style()
    lengths, T = list(results["eval_lengths"]), int(results["train_length"])
    variants, scalings = variants_of(results), scalings_of(results)
    fig, axes = _panels(len(scalings))
    missing_any = False
    n = len(variants)
    for ax, s in zip(axes, scalings):
        for i, v in enumerate(variants):
            st = variant_style(v, i)
            y = 100 * _values(results["passkey"][v][s])
            ok = np.isfinite(y)
            # Nudge variants sideways (in log2 x) so equal accuracies stay visible.
            x = np.asarray(lengths, dtype=float) * 2 ** (0.06 * (i - (n - 1) / 2))
            ax.plot(x[ok], y[ok], color=st["color"], marker=st["marker"], ms=3.5, label=st["label"])
            if (~ok).any():
                missing_any = True
                ax.plot(x[~ok], np.zeros((~ok).sum()), ls="none", marker="x", ms=6, color=st["color"])
        _length_axis(ax, lengths, T)
        ax.set_title(scaling_label(s))
    axes[0].set_ylim(-5, 105)
    axes[0].set_ylabel("passkey accuracy (%)")
    marker = dict(ls="none", marker="x", color=PALETTE["black"])
    _legend(axes, T, {"not evaluated": marker} if missing_any else {})
    samples = results.get("passkey_samples")
    fig.suptitle("Passkey retrieval vs length" + (f" ({samples} prompts per point)" if samples else ""), fontsize=9)
    return fig


def training_curves(results: dict) -> Figure:
    """Training loss (mean over each logging interval) against optimiser step per variant,
    with the learning-rate schedule they share."""
    apply_style()
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(5.0, 4.0), sharex=True, constrained_layout=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    training = results.get("training", {})
    lr_drawn = False
    for i, v in enumerate(variants_of(results)):
        curve = (training.get(v) or {}).get("curve") or {}
        if not curve.get("step"):
            continue
        st = variant_style(v, i)
        ax.plot(curve["step"], _values(curve["loss"]), color=st["color"], label=st["label"])
        if not lr_drawn and curve.get("lr"):
            ax_lr.plot(curve["step"], curve["lr"], color=PALETTE["black"], lw=1)
            lr_drawn = True
    ax.set_ylabel("training loss (nats / token)")
    ax.legend(frameon=False)
    tokens = (results.get("config") or {}).get("data", {}).get("train_length")
    ax.set_title("Training curves" + (f" (sequences of {tokens} tokens)" if tokens else ""))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return fig


def anomalous_fraction(results: dict) -> Figure:
    """Share of causal (query, key, slice) triples in case (d) per variant: mean over heads
    and layers as bars (unweighted and weighted by ``|q_j||k_j|``), and per layer × head as
    heatmaps on a fixed 0–1 scale centred on chance (0.5). Strict CoCA is 0 by construction."""
    apply_style()
    geo = results.get("anomalous_fraction") or {}
    variants = [v for v in variants_of(results) if v in geo]
    if not variants:
        fig, ax = plt.subplots(figsize=(4.0, 2.0), constrained_layout=True)
        ax.text(0.5, 0.5, "no anomalous-fraction probe in this run", ha="center", va="center")
        ax.set_axis_off()
        return fig
    widths = [1.6] + [1.0] * len(variants)
    fig, axes = plt.subplots(1, 1 + len(variants), figsize=(2.2 + 2.0 * len(variants), 3.0),
                             constrained_layout=True, gridspec_kw={"width_ratios": widths})
    bar_ax, maps = axes[0], axes[1:]
    x = np.arange(len(variants))
    for offset, key, hatch, name in ((-0.2, "mean", None, "unweighted"), (0.2, "weighted_mean", "//", "weighted")):
        vals = [float(geo[v][key]) for v in variants]
        colours = [variant_style(v, i)["color"] for i, v in enumerate(variants)]
        bars = bar_ax.bar(x + offset, vals, width=0.38, color=colours, hatch=hatch, edgecolor="white")
        for b, val in zip(bars, vals):
            bar_ax.annotate("0" if val == 0 else f"{val:.2f}", (b.get_x() + b.get_width() / 2, val), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    bar_ax.axhline(CHANCE, color=PALETTE["black"], ls="--", lw=1)
    from matplotlib.patches import Patch

    proxies = [Patch(facecolor="0.6", edgecolor="white", label="unweighted"),
               Patch(facecolor="0.6", edgecolor="white", hatch="//", label="weighted by |q_j||k_j|"),
               plt.Line2D([], [], color=PALETTE["black"], ls="--", lw=1, label=f"chance ({CHANCE})")]
    bar_ax.set_xticks(x, [variant_style(v, i)["label"] for i, v in enumerate(variants)], rotation=20, ha="right")
    bar_ax.set_ylim(0, 1.0)
    bar_ax.set_ylabel("anomalous fraction (share in case (d))")
    bar_ax.legend(handles=proxies, frameon=False, fontsize=7, loc="upper right")
    bar_ax.set_title("mean over layers and heads")
    im = None
    for ax, v in zip(maps, variants):
        frac = np.asarray(geo[v]["anomalous_fraction"], dtype=float)  # [layer, head]
        im = ax.imshow(frac, aspect="auto", origin="lower", cmap=DIVERGING_CMAP, vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        if frac.size <= 64:
            for (l, h), val in np.ndenumerate(frac):
                ax.text(h, l, f"{val:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(val - 0.5) > 0.3 else "black")
        ax.set_title(variant_style(v)["label"])
        ax.set_xlabel("query head")
        ax.set_xticks(range(frac.shape[1]))
        ax.set_yticks(range(frac.shape[0]))
        ax.grid(False)
    maps[0].set_ylabel("layer")
    cb = fig.colorbar(im, ax=list(maps), shrink=0.9)
    cb.set_label("share in case (d), unweighted")
    cb.ax.axhline(CHANCE, color=PALETTE["black"], lw=1)
    tokens = {geo[v].get("tokens") for v in variants} - {None}
    fig.suptitle("Anomalous fraction of the trained models" + (f" ({tokens.pop()} held-out tokens)" if len(tokens) == 1 else ""),
                 fontsize=9)
    return fig


FIGURES = {
    "ppl": perplexity_vs_length,
    "passkey": passkey_vs_length,
    "training": training_curves,
    "anomalous_fraction": anomalous_fraction,
}
"""Figure name → function; :func:`save_all` writes ``<prefix>_<name>.{pdf,png,json}``."""


def check_results(results: Any, source: str = "results") -> dict:
    """``results`` if it has the keys and shapes the figures need; a :class:`UserError` otherwise."""
    if not isinstance(results, dict):
        raise UserError(f"{source} is not an ablation results object (a JSON object is expected)")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; is it an ablation results.json?")
    try:
        n = len(results["eval_lengths"])
        for key in ("ppl", "passkey"):
            for v, row in results[key].items():
                for s, vals in row.items():
                    if len(vals) != n:
                        raise UserError(f"{source}: {key}[{v}][{s}] has {len(vals)} values "
                                        f"for {n} evaluation lengths")
    except (AttributeError, TypeError):
        raise UserError(f"{source}: ppl and passkey must map variant -> scaling -> list "
                        "of values; is it an ablation results.json?") from None
    return results


def load_results(path: str | Path) -> dict:
    """Load ``path`` (a ``results.json`` or a run directory holding one), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"no results file at {path}; give a results.json or an ablation --out directory")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    return check_results(results, str(path))


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


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "passkey":
        return f"{100 * value:.0f}%"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def markdown_table(results: dict, key: str = "ppl") -> str:
    """``ppl`` or ``passkey`` as a Markdown table: one row per variant × scaling, one
    column per evaluation length (``×`` multiples of the training length)."""
    if key not in ("ppl", "passkey"):
        raise ValueError(f"key must be 'ppl' or 'passkey', got {key!r}")
    T, lengths = results["train_length"], results["eval_lengths"]
    head = ["variant", "scaling"] + [f"{n} ({n / T:g}×)" for n in lengths]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, v in enumerate(variants_of(results)):
        for s in scalings_of(results):
            cells = [variant_style(v, i)["label"], s] + [_fmt(x, key) for x in results[key][v][s]]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
    prov = Provenance.from_argv(model=f"ablation/{config.get('preset', '?')}", seed=config.get("model_seed"),
                                extra={"results": str(args.results), "results_provenance": results.get("provenance")})
    with target.writing() as tmp:
        save_all(results, tmp, prov, args.prefix)
    for path in target.written:
        if path.suffix == ".pdf":
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
