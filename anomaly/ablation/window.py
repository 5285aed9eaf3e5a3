"""Fig. 4 of the paper at the seed level: retrieval with the key inside the training window
against outside it.

A passkey prompt of ``L`` tokens puts its key sentence at depth ``d`` of the filler, so about
``(1 − d)·L`` tokens before the question. The key lies within the training length ``T`` of
the question — the distances every model saw in training — where ``(1 − d)·L < T``, i.e.
``d > 1 − T/L`` (at 2×: depths 0.75 and 1; at 4×: depth 1 only). For each seed the *window
gap* is its mean share over those depths minus its mean share over the others, at one
length, from the per-seed ``[length, depth]`` grid (``passkey_grid_per_seed``); a seed is
paired with itself, and variants are compared by pairing their gaps seed by seed
(:func:`anomaly.replication.paired`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly import replication as st
from anomaly.ablation.results import grid_per_seed, variants_of


@dataclass(frozen=True)
class WindowGap:
    """One variant's inside-minus-outside comparison at ``length`` (no scaling)."""

    variant: str
    length: int
    inside: tuple[float, ...]
    """Depths whose key lies within ``T`` tokens of the question."""
    outside: tuple[float, ...]
    stat: st.Paired
    """inside − outside, paired within each seed."""


def split_depths(depths: list[float], length: int, train_length: int) -> tuple[list[int], list[int]]:
    """Indices of the depths inside (``d > 1 − T/L``) and outside the training window."""
    edge = 1 - train_length / length
    inside = [i for i, d in enumerate(depths) if d > edge]
    return inside, [i for i in range(len(depths)) if i not in inside]


def window_gap(results: dict, variant: str, length: int) -> WindowGap | None:
    """The window gap of ``variant`` at ``length`` (no scaling), or ``None`` where the run
    kept no per-seed grid or no depth lies on one side."""
    grids = grid_per_seed(results, variant, "none")
    lengths = list(results["eval_lengths"])
    if grids is None or length not in lengths:
        return None
    depths = list(results["depths"])
    inside, outside = split_depths(depths, length, results["train_length"])
    if not inside or not outside:
        return None
    row = lengths.index(length)
    ins = {s: float(np.mean(g[row, inside])) for s, g in grids.items()}
    out = {s: float(np.mean(g[row, outside])) for s, g in grids.items()}
    return WindowGap(variant, length, tuple(depths[i] for i in inside), tuple(depths[i] for i in outside),
                     st.paired(ins, out))


def gap_contrast(a: WindowGap, b: WindowGap) -> st.Paired:
    """Variant ``a``'s window gap minus ``b``'s, paired by seed (does ``a`` lose less outside?)."""
    return st.paired(dict(zip(a.stat.seeds, a.stat.differences)), dict(zip(b.stat.seeds, b.stat.differences)))


def window_gaps(results: dict, length: int) -> list[WindowGap]:
    """:func:`window_gap` of every variant at ``length`` that has one."""
    gaps = (window_gap(results, v, length) for v in variants_of(results))
    return [g for g in gaps if g is not None]
