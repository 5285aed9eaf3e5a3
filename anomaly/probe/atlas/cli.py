"""``python -m anomaly.probe.atlas``: the anomaly across models, lengths and texts.

Probes every model (short name, folder, GGUF file) at every ``--tokens`` length it has the
positions for, on the same ``--texts`` documents of each kind, and writes ``atlas.json``
(every probe's readings, the comparison, provenance), ``atlas.md`` (its tables) and the
figures (``atlas_*``) into ``--out``; nothing else there is touched. The statistics and
their unit, the text, are described in :mod:`anomaly.probe.atlas`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from anomaly.cli import ArgumentParser, UserError, positive_int, run_main, transformers_bars
from anomaly.io import Provenance, write_json, write_text
from anomaly.outputs import OutputDir, claim

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
    p.add_argument("--out", type=Path, default=Path("runs/atlas"), help="output folder (default runs/atlas)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, ...")
    p.add_argument("--no-figures", action="store_true", help="write atlas.json and atlas.md only")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    return p


def _claim_out(args: argparse.Namespace) -> OutputDir:
    from anomaly.plotting.style import figure_files
    from anomaly.probe.atlas.plots import FIGURES

    names = ["atlas.json", "atlas.md"] + ([] if args.no_figures else figure_files(FIGURES, PREFIX))
    return claim(args.out, OWNER, names, replace_own=True)


def _plan(models: list[str], tokens: list[int]) -> dict[str, list[int]]:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from anomaly.plotting.style import use_file_backend

    use_file_backend()
    from anomaly.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from anomaly.probe.atlas.readings import readings
    from anomaly.probe.atlas.tables import Cell, compare, markdown
    from anomaly.probe.atlas.texts import choose_texts
    from anomaly.probe.core import probe

    if len(set(args.models)) != len(args.models):
        raise UserError("--models names a model twice; give each once")
    if min(args.tokens) < 2:
        raise UserError("--tokens must be at least 2")
    target = _claim_out(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plan = _plan(args.models, sorted(set(args.tokens)))
    with transformers_bars(enabled=False):
        tokenizers = {name: load_tokenizer(name) for name in plan}

    def ids(name: str, text: str, tokens: int) -> torch.Tensor | None:
        prefix = text[: CHARS_PER_TOKEN * (tokens + MARGIN)]
        got = tokenizers[name](prefix, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        return got[:tokens] if got.numel() >= tokens + MARGIN else None

    texts = choose_texts(args.texts, lambda text: all(ids(n, text, plan[n][-1]) is not None for n in plan), args.seed)
    cells: list[Cell] = []
    started = time.perf_counter()
    for name, lengths in plan.items():
        t0 = time.perf_counter()
        with transformers_bars(enabled=False):
            loaded = load_model(name, device, dtype, tokenizer=tokenizers[name])
        if not args.quiet:
            print(f"{name}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        for text in texts:
            # One tokenisation per text at the longest length; a shorter window is its prefix.
            window = ids(name, text.document.read(), lengths[-1])
            for tokens in lengths:
                t0 = time.perf_counter()
                result = probe(loaded.model, window[:tokens], model_name=name)
                cells.append(Cell(name, text, readings(result)))
                if not args.quiet:
                    r = cells[-1].readings
                    print(f"  {text.name} ({text.kind}), {tokens} tokens: case-(d) share {r.share:.3f}, "
                          f"weighted {r.weighted:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        del loaded
    atlas = compare(cells)
    prov = Provenance.from_argv(model=" ".join(plan), seed=args.seed, extra={
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "lengths": plan,
        "texts": [t.name for t in texts]})
    record = {
        "models": plan,
        "texts": [t.to_json() for t in texts],
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
    print(f"{len(cells)} probes of {len(plan)} models on {len(texts)} texts in {time.perf_counter() - started:.0f} s; "
          f"wrote {target.path}: atlas.json, atlas.md" + ("" if args.no_figures else ", atlas_*.{pdf,png,json}"))
    return 0


def entry(argv: Sequence[str] | None = None) -> int:
    with torch.no_grad():
        return run_main(main, argv)
