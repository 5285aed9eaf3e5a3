"""``python -m anomaly.ablation.sweep``: each variant's learning rate, chosen on tuning seeds.

Trains every (tuning seed, learning rate, variant) of a small grid exactly as the ablation
trains (:func:`~anomaly.ablation.train.train`, validation every ``val_every`` steps on the
validation prompts), with no evaluation and no probe, and writes one result file per model::

    RESULTS/<variant>/lr<lr>_seed<s>.json    validation and training curves, config, provenance
    WORK/<variant>/lr<lr>_seed<s>/           checkpoint (resumable mid-model), config.json
    WORK/cache/, WORK/locks/                 token cache; one lock file per model in training

A model whose result file exists is skipped, so the sweep resumes across sessions from the
(committed) results folder alone; the work folder only saves the part of a model in training.
Several workers (processes, sessions) may share one sweep: each claims a model with a lock
file (:mod:`anomaly.ablation.lock`) and skips models done or claimed by a running worker.

``--summarise --out FILE`` applies the pre-registered rule (docs/ablation.md, "Choosing each
variant's learning rate"): per variant, the learning rate with the lowest validation digit
loss over the last :data:`WINDOW` validations, averaged over the tuning seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from anomaly import variants as registry
from anomaly.ablation.config import PRESETS, AblationConfig, check_config, config_from_dict, get_preset
from anomaly.ablation.data import AblationData, build_data
from anomaly.ablation.evaluate import validator
from anomaly.ablation.lock import lock_owner, locked
from anomaly.ablation.train import CHECKPOINT, TrainState, build_model, train
from anomaly.cli import ArgumentParser, UserError, run_main
from anomaly.io import Provenance, code_version, write_json
from anomaly.models import resolve_device
from anomaly.outputs import claim, claim_file

OWNER = "anomaly.ablation.sweep"
"""Owner of the sweep's folders and summary in their manifests (:mod:`anomaly.outputs`)."""

GRID_LRS = (5e-4, 1e-3, 2e-3)
"""The pre-registered peak learning rates (factor-2 steps around the cpu preset's 1e-3)."""
TUNING_SEEDS = (100, 101)
"""The pre-registered tuning seeds."""
ANALYSIS_SEEDS = range(10)
"""Seeds the analysis may use; a tuning seed is never one of them."""
WINDOW = 5
"""The score is the mean validation digit loss over the last ``WINDOW`` validations
(steps 2600–3000 of the cpu preset)."""
TIE_DECIMALS = 3
"""Means equal when rounded to this many decimals are a tie; the smaller learning rate wins."""

DIVERGED = "training loss became"
"""Start of the error :func:`~anomaly.ablation.train.train` raises on a non-finite loss."""

RULE = (f"for each variant, the learning rate with the lowest mean validation digit loss over the last "
        f"{WINDOW} validations, averaged over the tuning seeds; means equal to {TIE_DECIMALS} decimals "
        "are a tie, won by the smaller learning rate; a learning rate at which a model diverged (non-finite "
        "training loss) for any tuning seed is not eligible for that variant")


@dataclass(frozen=True)
class SweepModel:
    """One model of the sweep."""

    variant: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        """``lr<lr>_seed<seed>``, the learning rate as Python writes it (``lr0.0005_seed100``)."""
        return f"lr{self.lr!r}_seed{self.seed}"

    @property
    def tag(self) -> str:
        return f"[{self.variant} lr {self.lr:g} seed {self.seed}]"


def plan(variants: Sequence[str], lrs: Sequence[float], seeds: Sequence[int]) -> list[SweepModel]:
    """The sweep's models in the order they are trained: seed-major, then learning rate, then
    variant, so that a partial sweep already compares the variants on whole seeds."""
    order = [v for v in registry.names() if v in variants]
    return [SweepModel(v, lr, s) for s in seeds for lr in lrs for v in order]


def model_config(base: AblationConfig, lr: float, seed: int) -> AblationConfig:
    """The config one sweep model is trained with: ``base`` at peak learning rate ``lr``, seed
    ``seed``; nothing else changes."""
    return replace(base, train=replace(base.train, lr=lr), seeds=(seed,))


def result_path(results: Path, m: SweepModel) -> Path:
    return results / m.variant / f"{m.name}.json"


def check_results(results: Path, base: AblationConfig, models: Sequence[SweepModel]) -> None:
    """Refuse (before any work) a results folder whose existing files were trained with
    another config than this sweep would use: mixing them would make the skip wrong."""
    for m in models:
        path = result_path(results, m)
        if not path.exists():
            continue
        try:
            stored = config_from_dict(json.loads(path.read_text())["config"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--results {results}: {path} is not a sweep result; move it away or "
                            "choose another --results") from None
        if stored != model_config(base, m.lr, m.seed):
            raise UserError(f"--results {results} holds {path.name} of a different configuration (preset "
                            f"{stored.preset!r}); use another --results folder for this sweep")


@dataclass
class SweepProgress:
    """What one worker's pass over the sweep found and did."""

    done: int = 0
    """Models with a result file at the end."""
    trained: int = 0
    """Models this worker finished."""
    claimed_by_others: list[str] | None = None
    """Models left unfinished because a running worker holds their lock."""
    stopped: bool = False
    """The time limit stopped training (after a checkpoint)."""


def run_sweep(
    base: AblationConfig,
    work: Path,
    results: Path,
    models: Sequence[SweepModel],
    *,
    device: torch.device,
    command: str,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> SweepProgress:
    """Train every model of ``models`` that has no result file and no running owner, writing
    ``results/<variant>/<name>.json`` as each finishes. Passes over the list until no model
    is left that this worker could take, so a model whose worker died is picked up too."""
    if device.type == "cpu" and base.cpu_threads:
        torch.set_num_threads(base.cpu_threads)
    todo = sum(not result_path(results, m).exists() for m in models)
    log(f"sweep: {len(models)} models ({base.preset} preset), {todo} without a result; results in {results}, "
        f"work in {work}")
    progress = SweepProgress(claimed_by_others=[])
    if not todo:
        progress.done = len(models)
        return progress
    data = build_data(base, work / "cache")  # the text, vocabulary and prompts do not depend on lr or seed
    worker = _Worker(base, work, results, data, validator(base, data.passkey), device, command,
                     code_version(__name__), deadline, log)
    while True:
        took_one, busy = _sweep_pass(worker, models, progress)
        if progress.stopped or not took_one:
            break
    progress.done = sum(result_path(results, m).exists() for m in models)
    progress.claimed_by_others = busy
    return progress


@dataclass
class _Worker:
    """What every model one worker trains shares."""

    base: AblationConfig
    work: Path
    results: Path
    data: AblationData
    validate: Callable[[torch.nn.Module], dict]
    """As the ablation validates (:func:`~anomaly.ablation.evaluate.validator`)."""
    device: torch.device
    command: str
    code: dict[str, str]
    """The sweep's source hashes, for every result's provenance."""
    deadline: float | None
    log: Callable[[str], None]
    batches: dict[int, torch.Tensor] = field(default_factory=dict)
    """One seed's training sequences at a time (the plan is seed-major)."""

    def sequences(self, seed: int) -> torch.Tensor:
        if seed not in self.batches:
            self.batches.clear()
            self.batches[seed] = self.data.training_sequences(seed)[0]
        return self.batches[seed]


def _sweep_pass(worker: _Worker, models: Sequence[SweepModel], progress: SweepProgress) -> tuple[bool, list[str]]:
    """One pass over ``models``: each model without a result that no running worker holds is
    claimed and trained (:func:`_train_model`) until the time limit stops one
    (``progress.stopped``). Returns whether this pass took any model, and the models that
    running workers hold."""
    took_one = False
    busy: list[str] = []
    for m in models:
        out = result_path(worker.results, m)
        if out.exists():
            continue
        lock = worker.work / "locks" / f"{m.variant}_{m.name}.lock"
        with locked(lock) as mine:
            if not mine:
                owner = lock_owner(lock)
                busy.append(f"{m.variant}/{m.name}")
                worker.log(f"{m.tag} claimed by running pid {owner.pid if owner else '?'}; skipped")
                continue
            if out.exists():  # finished by another worker between the check and the claim
                continue
            took_one = True
            if not _train_model(worker, m, out, progress):
                progress.stopped = True
                break
    return took_one, busy


def _train_model(worker: _Worker, m: SweepModel, out: Path, progress: SweepProgress) -> bool:
    """Train (or resume) the claimed model ``m`` and write its result file ``out``: its
    validation record, or that it diverged. Returns ``False`` when the time limit stopped it."""
    log = worker.log
    config = model_config(worker.base, m.lr, m.seed)
    folder = worker.work / m.variant / m.name
    check_config(folder, config)  # a leftover checkpoint of another config is refused
    sequences = worker.sequences(m.seed)
    model = build_model(config, m.variant, m.seed).to(worker.device)
    log(f"{m.tag} training")
    try:
        state = train(model, sequences, config, folder / CHECKPOINT, validate=worker.validate,
                      deadline=worker.deadline, log=lambda s, tag=m.tag: log(f"{tag} {s}"))
    except RuntimeError as exc:
        if not str(exc).startswith(DIVERGED):
            raise
        # A result too: this learning rate is not eligible for this variant (the rule).
        write_json(out, {"variant": m.variant, "lr": m.lr, "seed": m.seed, "diverged": str(exc),
                         "config": config.to_dict(),
                         "provenance": Provenance(command=worker.command, model=f"ablation/{worker.base.preset}",
                                                  seed=m.seed, code=worker.code)})
        progress.trained += 1
        log(f"{m.tag} diverged ({exc}); recorded in {out}")
        return True
    if state.step < config.train.steps:
        log(f"{m.tag} stopped at step {state.step}/{config.train.steps} (time limit); "
            "run the same command again to resume")
        return False
    record = _record(worker, m, config, state)
    write_json(out, record)
    progress.trained += 1
    log(f"{m.tag} done in {state.train_seconds / 60:.1f} min: last-{WINDOW} digit loss "
        f"{score(record):.3f}, final exact {state.val['exact'][-1]:.2f}; wrote {out}")
    return True


def _record(worker: _Worker, m: SweepModel, config: AblationConfig, state: TrainState) -> dict:
    """The result file of a model trained to the cap: its validation and training curves,
    where and how fast it trained, its config and provenance."""
    device = worker.device
    return {
        "variant": m.variant,
        "lr": m.lr,
        "seed": m.seed,
        "validation": state.val,
        "score_window": WINDOW,
        "criterion_step": state.criterion_step,
        "final_loss": state.curve["loss"][-1] if state.curve["loss"] else None,
        "train_curve": state.curve,
        "train_seconds": state.train_seconds,
        "tokens_per_s": state.tokens_per_s,
        "device": {"type": device.type, "threads": torch.get_num_threads(),
                   "name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine())},
        "config": config.to_dict(),
        "provenance": Provenance(command=worker.command, model=f"ablation/{worker.base.preset}", seed=m.seed,
                                 code=worker.code, extra={"variant": m.variant, "lr": m.lr}),
    }


# --------------------------------------------------------------------------- the rule


def score(result: dict, window: int = WINDOW) -> float:
    """Mean validation digit loss over the last ``window`` validations of one model; ``inf``
    for a model that diverged."""
    if result.get("diverged"):
        return math.inf
    return float(sum(result["validation"]["digit_nll"][-window:]) / len(result["validation"]["digit_nll"][-window:]))


def choose(means: dict[float, float]) -> float | None:
    """The learning rate with the lowest mean score; means equal to :data:`TIE_DECIMALS`
    decimals tie, and the smaller learning rate wins. ``None`` when every mean is ``inf``
    (every learning rate diverged)."""
    if all(math.isinf(m) for m in means.values()):
        return None
    return min(means, key=lambda lr: (round(means[lr], TIE_DECIMALS), lr))


def summarise(results: Path, models: Sequence[SweepModel], common_lr: float | None = None) -> dict:
    """The table of the rule: per variant and learning rate, each tuning seed's score and
    final exact match, their means, and the chosen learning rate per variant (``None`` for
    every variant while any model of ``models`` has no result)."""
    variants = list(dict.fromkeys(m.variant for m in models))
    lrs = list(dict.fromkeys(m.lr for m in models))
    seeds = list(dict.fromkeys(m.seed for m in models))
    found = {m: json.loads(result_path(results, m).read_text()) for m in models if result_path(results, m).exists()}
    devices = {r["device"]["type"] for r in found.values() if "device" in r}
    if len(devices) > 1:
        raise UserError(f"--results {results} mixes models trained on {' and '.join(sorted(devices))}; "
                        "a sweep's models must share one device type")
    windows = {tuple(r["validation"]["step"][-WINDOW:]) for r in found.values() if not r.get("diverged")}
    table: dict[str, dict[str, dict]] = {}
    for v in variants:
        for lr in lrs:
            rs = {s: found.get(SweepModel(v, lr, s)) for s in seeds}
            ok = {s: r for s, r in rs.items() if r is not None and not r.get("diverged")}
            scores = {str(s): score(r) if s in ok else None for s, r in rs.items()}
            exact = {str(s): r["validation"]["exact"][-1] if s in ok else None for s, r in rs.items()}
            whole = len(ok) == len(seeds)
            table.setdefault(v, {})[repr(lr)] = {
                "digit_nll_last": scores,
                "mean": sum(scores.values()) / len(seeds) if whole else None,
                "final_exact": exact,
                "mean_final_exact": sum(exact.values()) / len(seeds) if whole else None,
                "diverged_seeds": [s for s, r in rs.items() if r is not None and r.get("diverged")],
            }
    complete = len(found) == len(models)
    # A diverged seed makes the mean inf: that learning rate is not eligible.
    chosen = {v: choose({lr: math.inf if table[v][repr(lr)]["diverged_seeds"] else table[v][repr(lr)]["mean"]
                         for lr in lrs}) if complete else None for v in variants}
    return {
        "rule": RULE,
        "complete": complete,
        "finished": len(found),
        "expected": len(models),
        "missing": [f"{m.variant}/{m.name}.json" for m in models if m not in found],
        "variants": variants,
        "lrs": lrs,
        "tuning_seeds": seeds,
        "window_steps": [list(w) for w in sorted(windows)],
        "table": table,
        "chosen": chosen,
        "secondary": None if common_lr is None else {
            "lr": common_lr,
            "note": "secondary reading: the same learning rate for every variant (the preset's)",
            "mean": {v: table[v].get(repr(common_lr), {}).get("mean") for v in variants},
        },
    }


def format_table(summary: dict) -> str:
    """The summary as a plain-text table (``*``: the chosen learning rate)."""
    seeds = [str(s) for s in summary["tuning_seeds"]]
    head = f"{'variant':<12} {'lr':>8} " + " ".join(f"{'seed ' + s:>9}" for s in seeds) + f" {'mean':>7} {'exact':>6}"
    lines = [f"last-{WINDOW} validation digit loss (nats) by tuning seed; exact: mean final exact match", head]
    fmt = lambda x, w, d: f"{x:>{w}.{d}f}" if x is not None else f"{'—':>{w}}"  # noqa: E731
    for v, rows in summary["table"].items():
        for lr_key, row in rows.items():
            mark = "*" if summary["chosen"].get(v) is not None and repr(summary["chosen"][v]) == lr_key else " "
            lines.append(f"{v:<12} {float(lr_key):>8g}{mark}" + " ".join(fmt(row["digit_nll_last"][s], 9, 3) for s in seeds)
                         + f" {fmt(row['mean'], 7, 3)} {fmt(row['mean_final_exact'], 6, 2)}"
                         + (f"  diverged: seed {', '.join(map(str, row['diverged_seeds']))}" if row["diverged_seeds"] else ""))
    if summary["complete"]:
        lines.append("chosen: " + ", ".join(f"{v} {lr:g}" if lr is not None else f"{v} none (every learning rate diverged)"
                                          for v, lr in summary["chosen"].items()))
    else:
        lines.append(f"sweep incomplete: {summary['finished']} of {summary['expected']} models; no learning rate "
                     "is chosen until all are finished")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m anomaly.ablation.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--lrs", nargs="+", type=float, default=list(GRID_LRS), help="peak learning rates")
    p.add_argument("--tuning-seeds", nargs="+", type=int, default=list(TUNING_SEEDS),
                   help="training seeds of the sweep (never 0–9: those are the analysis seeds)")
    p.add_argument("--variants", nargs="+", default=list(registry.names()), help="subset of the variants")
    p.add_argument("--results", required=True, type=Path, help="one result file per finished model (commit it)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints, token cache and locks (runs/…)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (after a checkpoint) once this many minutes have passed; rerun to resume")
    p.add_argument("--summarise", action="store_true", help="apply the rule to --results and write --out")
    p.add_argument("--out", type=Path, default=None, help="with --summarise: the summary JSON file")
    return p.parse_args(argv)


def check_grid(lrs: Sequence[float], seeds: Sequence[int], variants: Sequence[str]) -> None:
    """Refuse a grid the rule cannot use, in one line that says what to do."""
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lrs: a learning rate must be a finite number > 0, got {lr}")
        if float(f"{lr:.6g}") != lr:
            raise UserError(f"--lrs: give {lr!r} with at most 6 significant digits (results store 6)")
    if len(set(lrs)) != len(lrs):
        raise UserError("--lrs: a learning rate is given twice; list each once")
    for s in seeds:
        if s < 0:
            raise UserError(f"--tuning-seeds: a seed must be non-negative, got {s}")
        if s in ANALYSIS_SEEDS:
            raise UserError(f"--tuning-seeds {s}: seeds {ANALYSIS_SEEDS.start}–{ANALYSIS_SEEDS.stop - 1} are the "
                            "analysis seeds and never tune; choose others, e.g. 100 101")
    if len(set(seeds)) != len(seeds):
        raise UserError("--tuning-seeds: a seed is given twice; list each once")
    registry.check_names(variants)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    base = get_preset(args.preset)
    check_grid(args.lrs, args.tuning_seeds, args.variants)
    models = plan(args.variants, args.lrs, args.tuning_seeds)
    if args.summarise:
        if args.out is None:
            raise UserError("--summarise needs --out FILE for the summary, e.g. --out results/lr_sweep.json")
        if args.work is not None or args.max_minutes is not None:
            raise UserError("--summarise trains nothing: drop --work and --max-minutes")
        check_results(args.results, base, models)
        target = claim_file(args.out, OWNER, flag="--out")
        summary = summarise(args.results, models, common_lr=base.train.lr)
        summary["provenance"] = Provenance(command=" ".join(["python -m", OWNER, *argv]),
                                           model=f"ablation/{base.preset}", seed=list(args.tuning_seeds),
                                           code=code_version(__name__))
        with target.writing() as tmp:
            write_json(tmp / args.out.name, summary)
        print(format_table(summary), flush=True)
        print(f"wrote {args.out}", flush=True)
        return 0 if summary["complete"] else 3
    if args.out is not None:
        raise UserError("--out is the summary file of --summarise; a training sweep writes to --results")
    if args.work is None:
        raise UserError("--work is required to train (checkpoints and locks), e.g. --work runs/lr_sweep")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {args.max_minutes}")
    device = resolve_device(args.device)
    if base.preset == "gpu" and device.type == "cpu" and args.device != "cpu":
        raise UserError("--preset gpu would train for many hours on a CPU (no CUDA GPU is visible); "
                        "pass --device cpu to run it anyway, or use --preset cpu")
    check_results(args.results, base, models)
    results_dir = claim(args.results, OWNER, args.variants, flag="--results")
    work_dir = claim(args.work, OWNER, ["cache", "locks", *args.variants], flag="--work")
    results_dir.adopt()
    work_dir.adopt()
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None

    def log(s: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {s}", flush=True)

    progress = run_sweep(base, args.work, args.results, models, device=device, deadline=deadline, log=log,
                         command=" ".join(["python -m", OWNER, *argv]))
    log(f"sweep: {progress.done} of {len(models)} models finished ({progress.trained} by this worker)"
        + (f"; {len(progress.claimed_by_others)} in training by other workers" if progress.claimed_by_others else ""))
    return 0 if progress.done == len(models) else 3


if __name__ == "__main__":
    raise SystemExit(run_main(main))
