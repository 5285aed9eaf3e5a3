"""``python -m anomaly.probe.atlas``: the anomaly across models, lengths and texts.

Probes every model (short name, folder, GGUF file) at every ``--tokens`` length it has the
positions for, on the same ``--texts`` documents of each kind, and writes ``atlas.json``
(every probe's readings, the comparison, provenance), ``atlas.md`` (its tables) and the
figures (``atlas_*``) into ``--out``; nothing else there is touched. The statistics and
their unit, the text, are described in :mod:`anomaly.probe.atlas`.

Resumable: each probe's readings are saved in ``--out``/``atlas_cells/`` as soon as they
are measured (:mod:`anomaly.probe.atlas.cells`), and the same command run again reuses
every saved cell whose key (model bytes, text, token ids, dtype, device, code) matches,
loading a model only if one of its cells is missing. So a run that was stopped is resumed
by running it again.

The work is three steps: :func:`plan_cells` (every check, and every cell's key, before any
weight is loaded), :func:`measure_cells` (reuse or probe, saving each cell) and
:func:`write_atlas` (the comparison and its files, moved into ``--out`` together).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from anomaly.cli import ArgumentParser, UserError, positive_int, run_main, transformers_bars
from anomaly.io import Provenance, write_json, write_text
from anomaly.outputs import OutputDir, claim
from anomaly.probe.atlas.cells import CELLS, CellKey, CellStore
from anomaly.probe.atlas.readings import Readings
from anomaly.probe.atlas.tables import Cell
from anomaly.probe.atlas.texts import Text

OWNER = "anomaly.probe.atlas"
PREFIX = "atlas_"
DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")
DEFAULT_TOKENS = (512, 2048, 8192, 32768)
CHARS_PER_TOKEN = 12
"""Characters read per token wanted: a window's tokens come from a prefix of the document
this long (more than any tokenizer here needs; a shorter prefix is refused, not guessed)."""
MARGIN = 16
"""Tokens the prefix must hold beyond the window, so the window's last tokens do not
depend on where the prefix was cut."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m anomaly.probe.atlas",
                       description="Probe several models at several lengths on the same prose and code texts, "
                                   "and compare them with the text as the unit.")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="short names, HF folders or .gguf files (default: the two bundled models)")
    p.add_argument("--tokens", nargs="+", type=positive_int, default=list(DEFAULT_TOKENS),
                   help="window lengths; a model is probed at those within its positions (default 512 2048 8192 32768)")
    p.add_argument("--texts", type=positive_int, default=4,
                   help="documents per kind, prose and code (default 4: 8 texts; 6 or more texts let the exact "
                        "test reach p < 0.05)")
    p.add_argument("--seed", type=int, default=0, help="order in which documents are drawn (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs/atlas"),
                   help="output folder (default runs/atlas); its atlas_cells/ keeps every probe's readings, "
                        "so the same command run again resumes where it stopped")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, ...")
    p.add_argument("--no-figures", action="store_true", help="write atlas.json and atlas.md only")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    return p


def _claim_out(args: argparse.Namespace) -> OutputDir:
    from anomaly.plotting.style import figure_files
    from anomaly.probe.atlas.plots import FIGURES

    names = ["atlas.json", "atlas.md", CELLS] + ([] if args.no_figures else figure_files(FIGURES, PREFIX))
    return claim(args.out, OWNER, names, replace_own=True)


def _lengths(models: list[str], tokens: list[int]) -> dict[str, list[int]]:
    """Model → the lengths it is probed at (within its positions), configs checked first."""
    from anomaly import model_surgery
    from anomaly.models import check_rope_config, load_config

    plan = {}
    for name in models:
        config = load_config(name)
        limit = model_surgery.max_positions_of(config)
        mine = sorted(t for t in tokens if not limit or t <= limit)
        if not mine:
            raise UserError(f"{name} has {limit} positions, fewer than every --tokens; give a shorter length")
        check_rope_config(name, config, mine[-1], "the atlas measures RoPE's initial angles")
        plan[name] = mine
    return plan


def _window(tokenizer, text: str, tokens: int) -> torch.Tensor | None:
    """The first ``tokens`` ids of ``text`` (``[tokens]``), ``None`` if it is too short."""
    prefix = text[: CHARS_PER_TOKEN * (tokens + MARGIN)]
    got = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return got[:tokens] if got.numel() >= tokens + MARGIN else None


@dataclass(frozen=True)
class Planned:
    """One cell to reuse or measure: a model on the first ``key.tokens`` of a text."""

    text: Text
    ids: torch.Tensor
    """``[T]`` token ids."""
    key: CellKey


@dataclass(frozen=True)
class Plan:
    """What the atlas will hold, decided before any weight is loaded."""

    lengths: dict[str, list[int]]
    """Model → its lengths."""
    texts: list[Text]
    cells: dict[str, list[Planned]]
    """Model → its cells, text by text, shortest length first."""
    device: torch.device
    dtype: torch.dtype
    tokenizers: dict
    """Model → its tokenizer (loaded once, handed to the model's loading)."""


def plan_cells(args: argparse.Namespace) -> Plan:
    """Every check (models' configs, texts long enough) and every cell's key, before any
    weight is loaded."""
    from anomaly.models import load_tokenizer, resolve_device, resolve_dtype
    from anomaly.probe.atlas.cells import code_key, ids_sha256, model_identity
    from anomaly.probe.atlas.texts import choose_texts

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lengths = _lengths(args.models, sorted(set(args.tokens)))
    with transformers_bars(enabled=False):
        tokenizers = {name: load_tokenizer(name) for name in lengths}
    # One tokenisation per text and model, at the model's longest length: the check that a
    # text is long enough and the cells' ids share it (a shorter window is its prefix).
    windows: dict[tuple[str, str], torch.Tensor | None] = {}

    def window(name: str, text: str) -> torch.Tensor | None:
        if (name, text) not in windows:
            windows[name, text] = _window(tokenizers[name], text, lengths[name][-1])
        return windows[name, text]

    texts = choose_texts(args.texts, lambda text: all(window(n, text) is not None for n in lengths), args.seed)
    code = code_key()
    cells: dict[str, list[Planned]] = {}
    for name, mine in lengths.items():
        identity = model_identity(name)
        cells[name] = []
        for text in texts:
            ids_longest = window(name, text.document.read())
            for tokens in mine:
                ids = ids_longest[:tokens]
                key = CellKey(name, identity, text.name, text.sha256, tokens, ids_sha256(ids),
                              str(dtype).removeprefix("torch."), device.type, code)
                cells[name].append(Planned(text, ids, key))
    return Plan(lengths, texts, cells, device, dtype, tokenizers)


def _saved(name: str, planned: list[Planned], store: CellStore, quiet: bool) -> list[Readings | None]:
    """The readings saved for each of ``planned`` under its exact key (``None`` where there
    are none); says which saved cells are stale and why."""
    saved = [store.load(p.key) for p in planned]
    stale = [why for p, r in zip(planned, saved) if r is None and (why := store.stale(p.key))]
    if stale:
        _say(quiet, f"{name}: {len(stale)} saved cells are measured again, as their key differs in: "
                    f"{'; '.join(sorted(set(stale)))}")
    return saved


def measure_cells(plan: Plan, store: CellStore, cells_out: OutputDir, quiet: bool) -> tuple[list[Cell], int]:
    """Every planned cell, reused from ``store`` where its key matches, else probed and
    saved there at once; a model is loaded only for the cells it must measure. Returns the
    cells in plan order and how many were reused."""
    from anomaly.models import load_model
    from anomaly.probe.atlas.readings import measure

    cells: list[Cell] = []
    reused = 0
    for name, planned in plan.cells.items():
        saved = _saved(name, planned, store, quiet)
        reused += sum(r is not None for r in saved)
        loaded = None
        if any(r is None for r in saved):
            cells_out.adopt()  # the folder and its atlas_cells are the atlas's from now on
            t0 = time.perf_counter()
            with transformers_bars(enabled=False):
                loaded = load_model(name, plan.device, plan.dtype, tokenizer=plan.tokenizers[name])
            _say(quiet, f"{name}: loaded in {time.perf_counter() - t0:.0f} s")
        for p, readings in zip(planned, saved):
            t0 = time.perf_counter()
            how = "reused"
            if readings is None:
                readings, how = measure(loaded.model, p.ids, name), "probed"
                store.save(p.key, readings)
            _say(quiet, f"  {p.text.name} ({p.text.kind}), {p.key.tokens} tokens: case-(d) share "
                        f"{readings.share:.3f}, weighted {readings.weighted:.3f} "
                        f"({how}, {time.perf_counter() - t0:.0f} s)")
            cells.append(Cell(name, p.text, readings))
        del loaded
    return cells, reused


def write_atlas(args: argparse.Namespace, plan: Plan, cells: list[Cell], target: OutputDir) -> None:
    """The comparison of ``cells``: ``atlas.json``, ``atlas.md`` and (unless ``--no-figures``)
    the figures, staged and moved into ``--out`` together."""
    from anomaly.probe.atlas.tables import compare, markdown

    atlas = compare(cells)
    prov = Provenance.from_argv(model=" ".join(plan.lengths), seed=args.seed, extra={
        "device": str(plan.device), "dtype": str(plan.dtype).removeprefix("torch."), "lengths": plan.lengths,
        "texts": [t.name for t in plan.texts]})
    record = {
        "models": plan.lengths,
        "texts": [t.to_json() for t in plan.texts],
        "cells": [{"model": c.model, "text": c.text.name, "kind": c.text.kind, **c.readings.to_json()} for c in cells],
        "atlas": atlas.to_json(),
        "provenance": prov,
    }
    with target.writing() as tmp:
        write_json(tmp / "atlas.json", record)
        write_text(tmp / "atlas.md", f"# Atlas of the RoPE anomaly\n\nCommand: `{prov.command}`\n\n" + markdown(atlas))
        if not args.no_figures:
            from anomaly.plotting.style import save_figures
            from anomaly.probe.atlas.plots import FIGURES

            save_figures(FIGURES, tmp, prov, atlas, prefix=PREFIX)


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from anomaly.plotting.style import use_file_backend

    use_file_backend()
    if len(set(args.models)) != len(args.models):
        raise UserError("--models names a model twice; give each once")
    if min(args.tokens) < 2:
        raise UserError("--tokens must be at least 2")
    target = _claim_out(args)
    plan = plan_cells(args)
    store = CellStore(args.out / CELLS)
    store.check([p.key for planned in plan.cells.values() for p in planned])
    started = time.perf_counter()
    cells, reused = measure_cells(plan, store, replace(target, names=frozenset([CELLS])), args.quiet)
    write_atlas(args, plan, cells, target)
    print(f"{len(cells)} probes of {len(plan.lengths)} models on {len(plan.texts)} texts "
          f"({reused} reused from {store.folder}) in {time.perf_counter() - started:.0f} s; "
          f"wrote {target.path}: atlas.json, atlas.md" + ("" if args.no_figures else ", atlas_*.{pdf,png,json}"))
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    with torch.no_grad():
        return run_main(main, argv)
