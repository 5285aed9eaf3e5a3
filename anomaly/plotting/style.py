"""The one style module: every figure of the toolkit goes through here.

Paper-ready defaults: vector PDF beside a 200-dpi PNG, embedded TrueType fonts, the
Okabe–Ito colour-blind-safe palette, and a provenance JSON beside each figure.

Importing this module leaves matplotlib's backend alone, so a notebook shows its figures
inline; commands that only write files call :func:`use_file_backend` in their ``main``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
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


def apply_style() -> None:
    """Set the toolkit's matplotlib defaults (idempotent)."""
    from cycler import cycler

    plt.rcParams.update(_RC)
    plt.rcParams["axes.prop_cycle"] = cycler(color=CYCLE)


def save_figure(fig: Figure, stem: str | Path, provenance: Provenance) -> list[Path]:
    """Save ``fig`` as ``stem.pdf`` and ``stem.png`` plus ``stem.json`` provenance, atomically.

    Returns the three paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("pdf", "png"):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, metadata=_METADATA[ext])
        out.append(path)
    out.append(write_json(stem.with_suffix(".json"), provenance))
    return out
