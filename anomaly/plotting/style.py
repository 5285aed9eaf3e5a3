"""The one style module: every figure of the toolkit goes through here.

Paper-ready defaults: vector PDF beside a 200-dpi PNG, embedded TrueType fonts, the
Okabe–Ito colour-blind-safe palette, and a provenance JSON beside each figure.

Importing this module leaves matplotlib's backend alone, so a notebook shows its figures
inline; commands that only write files call :func:`use_file_backend` in their ``main``.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib.figure import Figure

from anomaly.io import Provenance, atomic_path, write_json

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = {
    "blue": "#0072B2",
    "orange": "#E69F00",
    "green": "#009E73",
    "vermillion": "#D55E00",
    "sky": "#56B4E9",
    "purple": "#CC79A7",
    "yellow": "#F0E442",
    "black": "#000000",
}
CYCLE = [PALETTE[c] for c in ("blue", "orange", "green", "vermillion", "purple", "sky", "black")]
# Sequential and diverging maps that stay readable in grey and for colour-blind readers.
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"

_RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "lines.linewidth": 1.4,
    "image.cmap": SEQUENTIAL_CMAP,
    "axes.prop_cycle": cycler(color=CYCLE),
}


# Saved files carry no date and no tool version (the provenance JSON records versions), so
# the same figure always has the same bytes.
_METADATA = {
    "pdf": {"CreationDate": None, "Creator": "anomaly", "Producer": None},
    "png": {"Software": None},
}


def use_file_backend() -> None:
    """Render without a display (Agg) unless ``MPLBACKEND`` chooses otherwise.

    For the command-line entry points only: called at import, it would stop notebooks from
    showing their figures.
    """
    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")


@contextmanager
def style() -> Iterator[None]:
    """The toolkit's matplotlib defaults inside the block, the caller's again after it.

    Every figure function draws under it (:func:`styled`) and :func:`save_figure` saves
    under it (the saved resolution, tight box and embedded fonts are settings read at
    saving), so a figure looks the same from a command, a test or a notebook, and nobody's
    global settings are changed.

    Only the toolkit's own settings are put back afterwards, not every rcParam as
    :func:`matplotlib.rc_context` would: a notebook's first figure resolves the inline
    backend inside the block, and IPython then switches interactive mode on; putting that
    back would stop every later figure from being shown.
    """
    caller = {key: plt.rcParams[key] for key in _RC}
    plt.rcParams.update(_RC)
    try:
        yield
    finally:
        plt.rcParams.update(caller)


@contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """numpy's global random state seeded with ``seed`` inside the block, the caller's again
    after it.

    seaborn's strip plots jitter their points with the global state (they take no
    generator): drawn inside the block, the same result gives the same figure, so committed
    figures regenerate to the same bytes, and no caller's random stream is moved.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


F = TypeVar("F", bound=Callable[..., Figure])


def styled(draw: F) -> F:
    """Decorator: ``draw`` runs under :func:`style`."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with style():
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def axes_or_new(ax: plt.Axes | None, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, plt.Axes, bool]:
    """``(figure, axes, created)``: ``ax`` and its figure, or a new figure of ``figsize``
    with one axes (``kwargs`` go to :func:`matplotlib.pyplot.subplots`). A function that
    draws one panel takes ``ax=None`` (seaborn's convention) and lays out only a figure it
    ``created``."""
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize, **kwargs)
    return fig, ax, True


def apply_style() -> None:
    """Set the toolkit's defaults for the rest of an interactive session (a notebook's own
    ad-hoc figures). The toolkit's code never calls it: it draws and saves under
    :func:`style`, which changes nothing outside its block."""
    plt.rcParams.update(_RC)


def save_figure(fig: Figure, stem: str | Path, provenance: Provenance) -> list[Path]:
    """Save ``fig`` as ``stem.pdf`` and ``stem.png`` plus ``stem.json`` provenance, atomically,
    under :func:`style`.

    Returns the three paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with style():
        for ext in ("pdf", "png"):
            path = stem.with_suffix(f".{ext}")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=ext, metadata=_METADATA[ext])
            out.append(path)
    out.append(write_json(stem.with_suffix(".json"), provenance))
    return out


Registry = Mapping[str, Callable[..., Figure]]
"""The one shape of a figure registry: figure name → the function that draws it from the
inputs every figure of the registry shares (none for the analytic figures, a
:class:`~anomaly.probe.result.ProbeResult`, an ablation's results dict). The name is the
file name after a prefix: ``<out>/<prefix><name>.{pdf,png,json}``."""

FORMATS = ("pdf", "png", "json")
"""The files of one figure: vector, 200-dpi raster, provenance."""


def figure_files(figures: Registry | Sequence[str], prefix: str = "") -> list[str]:
    """The file names :func:`save_figures` writes for ``figures``."""
    return [f"{prefix}{name}.{ext}" for name in figures for ext in FORMATS]


def save_figures(figures: Registry, out_dir: str | Path, provenance: Provenance, *inputs: Any,
                 prefix: str = "") -> list[Path]:
    """Draw every figure of ``figures`` from ``inputs`` and save it as
    ``out_dir/<prefix><name>.{pdf,png,json}`` (:func:`save_figure`), closing each figure
    whatever happens; returns the paths written."""
    paths: list[Path] = []
    for name, draw in figures.items():
        fig = draw(*inputs)
        try:
            paths += save_figure(fig, Path(out_dir) / f"{prefix}{name}", provenance)
        finally:
            plt.close(fig)
    return paths
