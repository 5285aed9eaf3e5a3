"""``python -m anomaly.ablation --preset smoke|cpu|gpu --out DIR``: the slack-vs-strict ablation.

Trains ``rope``, ``coca_slack`` and ``coca_strict`` from scratch with identical settings,
evaluates perplexity and passkey retrieval at 1×–16× the training length with and without
dynamic NTK, probes the trained models' anomalous fractions, and writes ``DIR/results.json``.
Re-running the same command resumes an interrupted or time-limited run. The figures land in
``DIR/figures``; ``python -m anomaly.ablation.plots DIR/results.json --out figures``
regenerates them from the results alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from anomaly.ablation.config import PRESETS, VARIANTS, get_preset
from anomaly.ablation.run import run
from anomaly.cli import UserError, run_main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anomaly.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of the variants to run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (after a checkpoint) once this many minutes have passed; rerun to resume")
    p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--no-probe", action="store_true", help="skip the anomalous-fraction probe")
    p.add_argument("--no-figures", action="store_true", help="do not write DIR/figures at the end")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = get_preset(args.preset)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be positive, got {args.steps}")
        config = config.with_steps(args.steps)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {args.max_minutes}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a directory; choose a directory")
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    results = run(config, args.out, variants=args.variants, device=args.device, deadline=deadline,
                  probe=not args.no_probe, figures=not args.no_figures, log=lambda s: print(s, flush=True))
    return 0 if results is not None else 3


if __name__ == "__main__":
    raise SystemExit(run_main(main))
