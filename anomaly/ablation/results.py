"""The schema of an ablation run's ``results.json``: what it holds, how to read it, and the
check that a file is one.

``results.json`` stores per-seed values only (``*_per_seed``: ``[seed][length]`` per variant
and scaling; criterion steps; training curves; anomalous fractions). This module names its
parts and reads them: the variants, scalings and panels (a scaling, or a snapshot of
:data:`SNAPSHOTS`: the matched stage, to criterion), each seed's values of a reading
(:func:`per_seed`, :func:`grid_per_seed`), and :func:`load_results` / :func:`check_results`,
which refuse a file without the keys and shapes the tables and figures need. The
statistics and tables are :mod:`anomaly.ablation.analysis`'s, the figures
:mod:`anomaly.ablation.plots`'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomaly.cli import UserError

TO_CRITERION = "to criterion"
"""Panel name of the "to criterion" reading (the weights when validation first reached the
criterion), beside the scalings' names."""
MATCHED_STAGE = "matched stage"
"""Panel name of the matched-stage reading (the weights ``train.matched_steps`` steps after the
criterion step; docs/ablation.md, "The analysis run")."""
SNAPSHOTS = {MATCHED_STAGE: "matched_stage", TO_CRITERION: "criterion"}
"""Panels read from weights kept during training (no scaling), with their ``results.json`` key;
only seeds that reached the snapshot have a row."""

READINGS = ("ppl", "passkey", "digit_nll")
"""Readings by length: perplexity (analysed on the log scale), exact passkey share, digit loss."""

TABLE_SHAPES: dict[str, tuple[str, ...]] = {
    "ppl": ("length",), "ppl_per_seed": ("seed", "length"),
    "passkey": ("length",), "passkey_per_seed": ("seed", "length"),
    "passkey_grid": ("length", "depth"),
    "digit_nll": ("length",), "digit_nll_per_seed": ("seed", "length"),
}
"""Tables ``[variant][scaling]`` every run has, and the axes of each one's values."""

REQUIRED_KEYS = ("train_length", "eval_lengths", "seeds", "depths", *TABLE_SHAPES)


# ------------------------------------------------------------------------ the schema


def variants_of(results: dict) -> list[str]:
    """Variants in the order of ``results["variants"]`` (else of the ``ppl`` table)."""
    return list(results.get("variants") or results["ppl"])


def scalings_of(results: dict) -> list[str]:
    """Scalings in the order of ``results["scalings"]`` (else of the first variant's table)."""
    return list(results.get("scalings") or next(iter(results["ppl"].values())))


def snapshot_of(results: dict, variant: str, panel: str = TO_CRITERION) -> dict:
    """``results[key]["per_variant"][variant]`` for a panel of :data:`SNAPSHOTS` (``criterion``
    or ``matched_stage``), or ``{}`` when the run has none."""
    return ((results.get(SNAPSHOTS[panel]) or {}).get("per_variant") or {}).get(variant) or {}


def criterion_of(results: dict, variant: str) -> dict:
    """``results["criterion"]["per_variant"][variant]``, or ``{}`` when the run has none."""
    return snapshot_of(results, variant, TO_CRITERION)


def snapshot_reached(results: dict, panel: str = TO_CRITERION) -> bool:
    """Whether any seed of any variant reached the snapshot ``panel``."""
    return any(snapshot_of(results, v, panel).get("seeds_reached") for v in variants_of(results))


def criterion_reached(results: dict) -> bool:
    """Whether any seed of any variant reached the validation criterion."""
    return snapshot_reached(results, TO_CRITERION)


def panels_of(results: dict) -> list[str]:
    """The readings side by side: every scaling, then each of :data:`SNAPSHOTS` that some
    seed reached (matched stage, then to criterion)."""
    return scalings_of(results) + [p for p in SNAPSHOTS if snapshot_reached(results, p)]


def seeds_reached(results: dict, variant: str, panel: str = TO_CRITERION) -> list[int]:
    """Seed ids of ``variant`` that reached the snapshot ``panel``, in the run's seed order
    (the rows of its ``*_per_seed`` tables there)."""
    steps = snapshot_of(results, variant, panel).get("steps") or [None] * len(results["seeds"])
    return [s for s, step in zip(results["seeds"], steps) if step is not None]


def floats(seq: Any) -> np.ndarray:
    """Floats of a ``results.json`` table, nested lists allowed, with ``None`` (non-finite
    in JSON) as NaN."""
    return np.asarray(seq, dtype=float)  # numpy reads None as NaN


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


def per_seed(results: dict, key: str, variant: str, panel: str) -> dict[int, np.ndarray] | None:
    """Seed id → ``[length]`` values of ``key`` (``ppl``: log-perplexity) for ``variant``
    in ``panel``; ``None`` where there are none (no seed reached the criterion)."""
    if panel in SNAPSHOTS:
        entry = snapshot_of(results, variant, panel)
        seeds, rows = seeds_reached(results, variant, panel), entry.get(f"{key}_per_seed")
    else:
        seeds, rows = results["seeds"], ((results.get(f"{key}_per_seed") or {}).get(variant) or {}).get(panel)
    if not seeds or rows is None:
        return None
    table = floats(rows)  # [seed, length]
    if key == "ppl":
        table = _log(table)
    return {s: row for s, row in zip(seeds, table)}


def grid_per_seed(results: dict, variant: str, panel: str) -> dict[int, np.ndarray] | None:
    """Seed id → ``[length, depth]`` passkey shares, where the run recorded them
    (``passkey_grid_per_seed``; runs before it kept only the mean over seeds)."""
    if panel in SNAPSHOTS:
        seeds = seeds_reached(results, variant, panel)
        rows = snapshot_of(results, variant, panel).get("passkey_grid_per_seed")
    else:
        seeds = results["seeds"]
        rows = ((results.get("passkey_grid_per_seed") or {}).get(variant) or {}).get(panel)
    if rows is None:
        return None
    return {s: floats(g) for s, g in zip(seeds, rows)}


def mean_grid(results: dict, variant: str, panel: str) -> np.ndarray | None:
    """``[length, depth]`` passkey share, mean over seeds (``None`` where no seed reached the
    criterion)."""
    if panel in SNAPSHOTS:
        grid = snapshot_of(results, variant, panel).get("passkey_grid")
    else:
        grid = results["passkey_grid"][variant][panel]
    return None if grid is None else floats(grid)


# ---------------------------------------------------------------- loading, checking


def _check_shape(values: Any, expected: tuple[int, ...], axes: Sequence[str], where: str) -> None:
    try:
        shape = floats(values).shape
    except (TypeError, ValueError):
        raise UserError(f"{where} is not a table of numbers; is it an ablation results.json?") from None
    if shape != expected:
        raise UserError(f"{where} has shape {list(shape)} where [{', '.join(axes)}] = {list(expected)} "
                        "was expected; is the file complete?")


def check_results(results: Any, source: str = "results") -> dict:
    """``results`` if it has the keys and shapes the tables and figures need; a
    :class:`UserError` otherwise."""
    if not isinstance(results, dict):
        raise UserError(f"{source} is not an ablation results object (a JSON object is expected)")
    if "ppl" in results and "ppl_per_seed" not in results:
        raise UserError(f"{source} is a results.json of the earlier one-seed ablation, without the per-seed values "
                        "the seed-level tables need; run python -m anomaly.ablation again for a current one")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; is it an ablation results.json?")
    try:
        dims = {"length": len(results["eval_lengths"]), "seed": len(results["seeds"]),
                "depth": len(results["depths"])}
        int(results["train_length"])
        for key, axes in TABLE_SHAPES.items():
            expected = tuple(dims[a] for a in axes)
            for v in variants_of(results):
                for s in scalings_of(results):
                    _check_shape(results[key][v][s], expected, axes, f"{source}: {key}[{v}][{s}]")
        for v in variants_of(results):
            for panel, name in SNAPSHOTS.items():
                entry = snapshot_of(results, v, panel)
                for key, axes in TABLE_SHAPES.items():
                    if entry.get("seeds_reached") and key in entry:
                        expected = tuple(entry["seeds_reached"] if a == "seed" else dims[a] for a in axes)
                        _check_shape(entry[key], expected, axes, f"{source}: {name} {key}[{v}]")
    except (AttributeError, TypeError, ValueError, KeyError, StopIteration) as exc:
        what = f" ({exc.args[0]!r} missing)" if isinstance(exc, KeyError) else ""
        raise UserError(f"{source}: the tables must map variant -> scaling -> values for every variant and "
                        f"scaling{what}; is it an ablation results.json?") from None
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
