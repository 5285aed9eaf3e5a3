"""``python -m anomaly.ablation --preset smoke|cpu|gpu --out DIR``: the slack-vs-strict ablation.

Trains ``rope``, ``coca_slack`` and ``coca_strict`` from scratch with identical settings from
each of ``--seeds`` seeds, evaluates perplexity and passkey retrieval (length × depth) at
1×–16× the training length with and without dynamic NTK, follows each model's retrieval
head, probes the trained models' anomalous fractions, and writes ``DIR/results.json`` with
every reading per seed (its seed-level statistics: ``python -m anomaly.ablation.analysis``). ``torchrun --nproc_per_node N -m anomaly.ablation …`` trains with DDP
(each process takes 1/N of every batch; rank 0 evaluates and writes).
Re-running the same command resumes an interrupted or time-limited run; files in DIR
that are not the run's own are left alone. The figures land in
``DIR/figures``; ``python -m anomaly.ablation.plots DIR/results.json --out figures``
regenerates them from the results alone.

``--lr-from FILE`` trains each variant at its own peak learning rate, the one the
learning-rate sweep chose (``python -m anomaly.ablation.sweep --summarise --out FILE``);
without it every variant trains at ``train.lr`` (the same-learning-rate-for-all reading).
``--models-from RUN_DIR`` reads the finished models of a variant trained there with the same
recipe instead of training them again (the same-learning-rate reading takes RoPE and strict
from the primary run, where they already trained at 1e-3).

Every setting (preset, ``--set``, ``--steps``, ``--seeds``, ``--lr-from``) is checked, with the memory it
would take, before anything is written into DIR, so a corrected rerun into the same DIR is
never refused for a bad first try. One command at a time writes a DIR: a second one
started on the same DIR while the first runs is refused (a lock file with the writer's
pid, taken over when that process is gone) — unless every command is given ``--shared``:
then each process takes one model at a time (a lock per model), so N processes on N cores
work through one run together, and the last to finish writes the results.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from anomaly import variants
from anomaly.ablation.config import PRESETS, get_preset, memory_bytes, override, validate
from anomaly.ablation.distributed import refuse_under_torchrun, under_torchrun, world_from_env
from anomaly.ablation.lock import LockOwner, is_running, lock_owner, locked
from anomaly.ablation.run import check_models_from, run
from anomaly.cli import ArgumentParser, UserError, check_memory, finite_float, run_main
from anomaly.models import resolve_device
from anomaly.outputs import claim

OWNER = "anomaly.ablation"
"""Owner of a run folder's entries in its manifest (see :mod:`anomaly.outputs`)."""

MAX_SEEDS = 1000
"""Most ``--seeds`` (each trains every variant once: far beyond any run's time)."""

LOCK = ".anomaly-ablation.lock"
"""The run folder's lock file (pid and start time of the command writing it)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m anomaly.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    p.add_argument("--variants", nargs="+", default=list(variants.names()), help="subset of the variants to run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-minutes", type=finite_float, default=None,
                   help="stop (after a checkpoint) once this many minutes have passed; rerun to resume")
    p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--seeds", type=int, default=None,
                   help="train every variant from seeds 0 … N-1 (default: the preset's, 3 for cpu)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change one setting of the preset, e.g. --set model.head_dim=64 (repeatable; "
                        "a run with changed settings is a diagnostic, not the preset)")
    p.add_argument("--lr-from", type=Path, default=None, metavar="SWEEP_JSON",
                   help="train each variant at the peak learning rate the sweep's summary chose for it "
                        "(python -m anomaly.ablation.sweep --summarise --out SWEEP_JSON)")
    p.add_argument("--models-from", type=Path, default=None, metavar="RUN_DIR",
                   help="read finished models of the same recipe from another run's folder instead of training "
                        "them (a variant trained there with this run's config for it; the folder is only read)")
    p.add_argument("--shared", action="store_true",
                   help="share DIR with other processes started with --shared (one model at a time each; "
                        "start one per free core)")
    p.add_argument("--no-probe", action="store_true", help="skip the anomalous-fraction probe")
    p.add_argument("--no-figures", action="store_true", help="do not write DIR/figures at the end")
    return p.parse_args(argv)


def lrs_from_sweep(path: Path) -> tuple[tuple[str, float], ...]:
    """Each variant's chosen peak learning rate from a sweep summary (``chosen``), as
    ``train.lr_by_variant``.

    Raises:
        UserError: the file is missing or not a sweep summary, the sweep is incomplete, or it
            chose no learning rate for a variant.
    """
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--lr-from {path}: no such file; write it with python -m anomaly.ablation.sweep "
                        "--summarise --out FILE") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"--lr-from {path}: cannot read it as JSON ({exc}); give the sweep's summary file") from None
    if not isinstance(summary, dict) or not {"rule", "complete", "chosen"} <= set(summary) \
            or not isinstance(summary["chosen"], dict):
        raise UserError(f"--lr-from {path} is not a learning-rate sweep summary (python -m anomaly.ablation.sweep "
                        "--summarise --out FILE writes one)")
    if summary["complete"] is not True:
        raise UserError(f"--lr-from {path}: the sweep is incomplete ({summary.get('finished', '?')} of "
                        f"{summary.get('expected', '?')} models); finish it and run --summarise again")
    chosen = summary["chosen"]
    for v in variants.names():
        lr = chosen.get(v)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"--lr-from {path}: the sweep chose no usable learning rate for {v} ({lr!r}); "
                            "a sweep of every variant is needed")
    return tuple((v, float(chosen[v])) for v in variants.names())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserError as exc:
        if under_torchrun():
            refuse_under_torchrun(str(exc))
        raise


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    from anomaly.plotting.style import use_file_backend

    use_file_backend()
    config = get_preset(args.preset)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be positive, got {args.steps}")
        config = config.with_steps(args.steps)
    for assignment in args.set:
        config = override(config, assignment)
    if args.lr_from is not None:
        if any(a.partition("=")[0].strip() in ("train.lr", "train.lr_by_variant") for a in args.set):
            raise UserError("--lr-from sets each variant's learning rate; drop --set train.lr… (the same "
                            "learning rate for all is a run without --lr-from)")
        config = replace(config, train=replace(config.train, lr_by_variant=lrs_from_sweep(args.lr_from)))
    if args.seeds is not None:
        if not 1 <= args.seeds <= MAX_SEEDS:
            raise UserError(f"--seeds must be between 1 and {MAX_SEEDS}, got {args.seeds}")
        config = config.with_seeds(args.seeds)
    variants.check_names(args.variants)
    _check_models_from(args.models_from, args.out)
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {args.max_minutes}")
    # Before anything is written: a refused setting or device must leave no config.json behind.
    validate(config)
    check_memory(memory_bytes(config), f"the {config.preset} preset's model, data and evaluation (as set)",
                 "lower --steps, model.vocab_size, eval.batch_tokens or the model's size")
    device = resolve_device(args.device)
    if config.preset == "gpu" and device.type == "cpu" and args.device != "cpu":
        raise UserError("--preset gpu would train for many hours on a CPU (no CUDA GPU is visible); "
                        "pass --device cpu to run it anyway, or use --preset cpu")
    world = world_from_env()
    world.check_split(config.train.batch_size)  # every rank, before rank 0 writes anything
    check_models_from(args.models_from, world)
    if not world.main:
        return _run(args, config, device, world)
    # The run folder's top-level entries; anything else in --out is left alone.
    names = ["config.json", "cache", "results.json", "figures", *args.variants]
    target = claim(args.out, OWNER, names)
    lock = args.out / LOCK
    owner = lock_owner(lock)
    if args.shared:
        if world.distributed:
            raise UserError("--shared is for single processes; under torchrun the ranks already share one run")
        if owner is not None and owner.pid != 0 and is_running(owner) and owner != LockOwner.me():
            raise UserError(f"--out {args.out} is being written by process {owner.pid} without --shared; wait for "
                            "it to finish, or restart every process with --shared")
        target.adopt()
        return _run(args, config, device, world)
    with locked(lock) as mine:
        if not mine:
            owner = lock_owner(lock)
            raise UserError(f"--out {args.out} is being written by process {owner.pid if owner else '?'} "
                            "(another python -m anomaly.ablation); wait for it to finish, run every process "
                            "with --shared, or choose another --out")
        target.adopt()
        return _run(args, config, device, world)


def _check_models_from(other: Path | None, out: Path) -> None:
    """Refuse a ``--models-from`` that is not another run's folder (before anything is written)."""
    if other is None:
        return
    if not (other / "config.json").is_file():
        raise UserError(f"--models-from {other}: no config.json there; give the folder of an ablation run "
                        "(python -m anomaly.ablation --out DIR)")
    if other.resolve() == out.resolve():
        raise UserError("--models-from is another run's folder; a run resumes its own --out without it")


def _run(args: argparse.Namespace, config, device, world) -> int:
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    log = (lambda s: print(s, flush=True)) if world.main else (lambda s: None)
    results = run(config, args.out, variants=args.variants, device=str(device), deadline=deadline,
                  probe=not args.no_probe, figures=not args.no_figures, world=world, log=log,
                  models_from=args.models_from)
    return 0 if results is not None or not world.main else 3


if __name__ == "__main__":
    raise SystemExit(run_main(main))
