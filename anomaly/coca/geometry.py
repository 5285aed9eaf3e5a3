"""CoCA's effective geometry on real weights (docs/conventions.md §5).

The command: how far the **slack** score departs from a purely relative one (its spread
over absolute positions at a fixed distance, relative to the mean magnitude of its
relative part) and slack's **effective** case-(d) share, measured by
:mod:`anomaly.probe.slack_geometry` on the query and T contents a model actually produces.

Command line (the bundled SmolLM2 by default, or an HF folder / ``.gguf`` / CoCA
checkpoint saved with ``save_pretrained``)::

    python -m anomaly.coca.geometry [--model PATH] [--tokens 512] [--distances 1 16 256]

With an unconverted model the key projection stands in for T, which measures the geometry
CoCA would start from when dropped into that model, not that of a trained CoCA model.

This module is a command only (the one command inside :mod:`anomaly.coca`; the layer test
``tests/test_layers.py`` treats it so): nothing else in the package imports it, so
:mod:`anomaly.coca` stays free of the probe and of :mod:`anomaly.models`. The measurement's
names are re-exported here for code written against the earlier layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from anomaly.errors import UserError
from anomaly.probe.slack_geometry import (
    LayerGeometry,
    measure,
    measure_layer,
    slack_case_d_fraction,
    slack_relative_spread,
    spread_bytes,
    summarise,
)

__all__ = [  # the command, and the measurement's names re-exported from their earlier home
    "OWNER", "main",
    "LayerGeometry", "measure", "measure_layer", "slack_case_d_fraction", "slack_relative_spread",
    "spread_bytes", "summarise",
]

OWNER = "anomaly.coca.geometry"
"""Owner of ``--json`` files in their folder's manifest (see :mod:`anomaly.outputs`)."""


def main(argv: Sequence[str] | None = None) -> int | None:
    from anomaly import model_surgery
    from anomaly.cli import check_memory, layer_progress, transformers_bars
    from anomaly.coca.hf import CONFIG_KEY
    from anomaly.corpus import default_document
    from anomaly.io import write_json
    from anomaly.models import BUNDLED, check_rope_config, load_config, load_model, load_tokenizer
    from anomaly.outputs import claim_file

    args = _arguments(argv)
    target = claim_file(args.json, OWNER, flag="--json") if args.json else None
    name = args.model or BUNDLED
    config = load_config(name)
    check_rope_config(name, config, args.tokens, "CoCA's geometry is measured on a RoPE model's contents")
    check_memory(spread_bytes(model_surgery.text_config(config), args.pairs, args.positions),
                 f"--pairs {args.pairs} × --positions {args.positions}: the slack scores of one layer",
                 "lower --pairs or --positions")
    with transformers_bars(enabled=not args.quiet):
        tok = load_tokenizer(name)
        text = default_document()
        ids = tok(text.read()[: 20 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
        if ids.shape[1] < args.tokens:
            raise UserError(f"--tokens {args.tokens} exceeds the {ids.shape[1]} tokens of {text.name}; "
                            f"use --tokens {ids.shape[1]} or fewer")
        model = load_model(name, "cpu", "float32", tokenizer=tok).model
    # load_model has re-applied CoCA to a checkpoint saved with save_pretrained.
    variant = getattr(model.config, CONFIG_KEY, None)
    positions = torch.arange(0, args.positions, 16)
    with layer_progress(model_surgery.text_config(config).num_hidden_layers, "layers", enabled=not args.quiet) as progress:
        layers = measure(model, ids, distances=args.distances, positions=positions, pairs=args.pairs,
                         progress=progress)
    summary = summarise(layers)
    # Written before anything is printed: a reader that stops early (| head) costs no file.
    if target is not None:
        with target.writing() as tmp:
            write_json(tmp / args.json.name, {"model": name, "tokens": ids.shape[1], "distances": args.distances,
                                             "layers": layers, **summary})
    source = f"trained CoCA ({variant})" if variant else "unconverted: k_proj stands in for T"
    print(f"Slack CoCA geometry of {name} ({source}), {ids.shape[1]} tokens of Hamlet")
    _print_table(layers, summary, args.distances)
    if target is not None:
        print(f"wrote {args.json}")
    return None


def _arguments(argv: Sequence[str] | None):
    """The parsed command line, checked: every check that needs no weights comes first, as
    loading and measuring take minutes."""
    from anomaly.cli import ArgumentParser

    ap = ArgumentParser(prog="python -m anomaly.coca.geometry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder, .gguf file or CoCA checkpoint (default: bundled SmolLM2)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of Hamlet whose contents are used")
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--positions", type=int, default=4096, help="absolute key positions 0..N (step 16)")
    ap.add_argument("--pairs", type=int, default=64, help="content pairs per layer and distance")
    ap.add_argument("--json", type=Path, help="write the per-layer results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (ours and transformers' weight loading)")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if args.pairs < 1:
        raise UserError(f"--pairs must be at least 1, got {args.pairs}")
    if args.positions < 1:
        raise UserError(f"--positions must be at least 1 (key positions 0..N in steps of 16), got {args.positions}")
    if min(args.distances) < 1 or max(args.distances) >= args.tokens:
        raise UserError("every --distances value must be at least 1 and below --tokens "
                        f"({args.tokens}); raise --tokens or drop the long distances")
    return args


def _print_table(layers: list, summary: dict, distances: Sequence[int]) -> None:
    """The per-layer spreads and case-(d) shares as a Markdown table, then their summary."""
    print("| layer | " + " | ".join(f"spread/|rel| @ s={s} (median, p90)" for s in distances) + " | case-(d) share |")
    print("| ---: |" + " ---: |" * (len(distances) + 1))
    for r in layers:
        cells = " | ".join(f"{r.relative_spread[s][0]:.2f}, {r.relative_spread[s][1]:.2f}" for s in distances)
        print(f"| {r.layer} | {cells} | {sum(r.case_d_fraction) / len(r.case_d_fraction):.3f} |")
    overall, case_d = summary["overall_median_spread"], summary["mean_case_d_share"]
    print("median over layers of the per-layer median spread/|relative|: "
          + ", ".join(f"s={s}: {v:.2f}" for s, v in overall.items())
          + f"; mean slack case-(d) share: {case_d:.3f} (strict: 0)")


if __name__ == "__main__":
    from anomaly.cli import run_main

    raise SystemExit(run_main(main))
