"""Orchestration of one ablation run: data, then training of every (seed, variant), then
evaluation, retrieval attention and probe of each trained model, then ``results.json``.

Everything lands under the output directory and every step is resumable::

    DIR/config.json                          the run's configuration (a resumed run must match)
    DIR/cache/tokens.safetensors             tokenised documents (SmolLM2 ids)
    DIR/<variant>/seed<s>/checkpoint/        model.safetensors, optimizer.safetensors, state.json
    DIR/<variant>/seed<s>/criterion/         weights when validation first reached the criterion
    DIR/<variant>/seed<s>/matched/           weights train.matched_steps steps later (when set)
    DIR/<variant>/seed<s>/training.json      the finished training's record (TrainState)
    DIR/<variant>/seed<s>/eval_<scaling>.json       the final model (equal budget)
    DIR/<variant>/seed<s>/criterion_eval.json       the criterion model, no scaling
    DIR/<variant>/seed<s>/matched_eval.json         the matched-stage model, no scaling
    DIR/<variant>/seed<s>/retrieval.json     the retrieval head's attention
    DIR/<variant>/seed<s>/geometry.json      anomalous fractions of the trained model
    DIR/results.json                         written atomically once everything is done
    DIR/figures/ablation_*                   its figures (anomaly.ablation.plots), written last

A step whose output exists is skipped, so a run stopped by ``deadline`` (``--max-minutes``)
or killed continues where it stopped when the same command is run again. A model whose
``training.json`` and evaluation files all exist is done: it needs neither its checkpoint
nor training, so a run resumes from its (committed) JSON files alone once the weights are
gone. In one process each model is evaluated as soon as it is trained, so its files exist
as each model finishes. Under ``torchrun`` every rank trains every model first; rank 0
alone then evaluates and writes.

Models already trained by another run with the same recipe can be read from its folder
instead of trained again (``models_from``, ``--models-from DIR``): a variant whose config in
that run equals this run's for it (:meth:`AblationConfig.for_variant`), seeds it finished.
That folder is only read; ``results.json`` says which models came from where
(``models_from``). The same-learning-rate reading uses it for the variants whose learning
rate is the same in both readings.

Several single processes may share one run (``--shared``): each model is trained and evaluated
under a lock file in its folder (:mod:`anomaly.ablation.lock`), a process leaves a model that
another running process holds, and the last process to finish writes ``results.json``. A model
whose process was killed is taken over (from its checkpoint) by the next process to reach it.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from anomaly import variants as registry
from anomaly.ablation.assembly import SMOKE_NOTE, assemble
from anomaly.ablation.config import AblationConfig, check_config, config_from_dict
from anomaly.ablation.data import AblationData, build_data
from anomaly.ablation.distributed import World, join, leave
from anomaly.ablation.evaluate import validator
from anomaly.ablation.lock import lock_owner, locked
from anomaly.ablation.model_files import TRAINING, evaluate_model, finished_state, outputs
from anomaly.ablation.train import CHECKPOINT, TrainState, build_model, seed_dir, train
from anomaly.errors import UserError
from anomaly.io import Provenance, write_json
from anomaly.models import resolve_device
from anomaly.outputs import OutputDir

__all__ = ["MODEL_LOCK", "RESULTS_LOCK", "SMOKE_NOTE", "TRAINING", "evaluate_model", "finished_state", "outputs",
           "run", "seed_dir"]

Model = tuple[int, str]
"""One model of a run: ``(seed, variant)``."""


def run(
    config: AblationConfig,
    out: Path,
    *,
    variants: Sequence[str] | None = None,
    device: str = "auto",
    deadline: float | None = None,
    probe: bool = True,
    figures: bool = True,
    world: World = World(),
    log: Callable[[str], None] = print,
    models_from: Path | None = None,
) -> dict | None:
    """Run (or resume) the ablation in ``out``, reading finished models of the same recipe
    from the run folder ``models_from`` where it has them (see the module docstring).

    With ``figures``, the figures of :mod:`anomaly.ablation.plots` are written to
    ``out/figures/ablation_*.{pdf,png,json}`` once ``results.json`` is.

    Returns:
        The results dict (also written to ``out/results.json``), or ``None`` when
        ``deadline`` (a ``time.monotonic()`` value) stopped it first, when models held by
        other processes sharing the run are unfinished, and on ranks other than 0.
    """
    started = time.perf_counter()
    variants = registry.names() if variants is None else tuple(variants)
    registry.check_names(variants)
    check_models_from(models_from, world)
    dev = join(world, resolve_device(device), config.train.batch_size)  # before anything is written
    if dev.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    figures_out, data = _prepare(config, out, figures, world, log)
    validate = validator(config, data.passkey)
    held: list[Model] = []
    reused = {} if models_from is None else _reused(config, data, models_from, variants, dev, probe, log)
    if world.distributed:
        trained = _train_every_model(config, data, out, variants, dev, validate, world, deadline, log)
        if trained is None or not world.main:
            return None
        done = _evaluate_every_model(config, data, out, trained, dev, deadline, probe, log)
    else:
        mine = _work_through(config, data, out, variants, dev, validate, deadline, probe, log, reused)
        if mine is None:
            return None
        done, held = mine
        others = _left_to_others(config, data, out, held, dev, deadline, probe, log)
        done = None if others is None else {**done, **others}
    if done is None:
        return None
    states = {v: [done[seed, v][0] for seed in config.seeds] for v in variants}
    per_variant = {v: [done[seed, v][1] for seed in config.seeds] for v in variants}
    sources = _sources(reused, models_from)
    finish = functools.partial(_finish, config, data, out, per_variant, states, dev, started, figures_out, log,
                               sources)
    return _finish_once(out, log, finish) if held else finish()


def check_models_from(models_from: Path | None, world: World) -> None:
    """Refuse ``models_from`` under torchrun, before anything is read or written: the ranks
    train every model together, and a model read from another run has no place in that."""
    if models_from is not None and world.distributed:
        raise UserError("--models-from is for single processes; run it without torchrun")


def _reused(config: AblationConfig, data: AblationData, other: Path, variants: Sequence[str], dev: torch.device,
            probe: bool, log: Callable[[str], None]) -> dict[Model, tuple[TrainState, dict]]:
    """The finished models of run folder ``other`` that this run can take as they are: of a
    variant trained there with this run's config for it, every evaluation file present (so
    reading them writes nothing there)."""
    path = other / "config.json"
    if not path.is_file():
        raise UserError(f"--models-from {other}: no config.json there; give the folder of an ablation run")
    theirs = config_from_dict(json.loads(path.read_text()))
    found: dict[Model, tuple[TrainState, dict]] = {}
    for variant in variants:
        if theirs.for_variant(variant) != config.for_variant(variant):
            log(f"--models-from {other}: {variant} was trained there with another recipe; trained here")
            continue
        wants_probe = probe and registry.variant(variant).probed
        for seed in config.seeds:
            vdir = seed_dir(other, variant, seed)
            state = finished_state(config, vdir, wants_probe)
            if state is not None:
                result = evaluate_model(config, data, vdir, variant, seed, dev, None, wants_probe, log, state)
                found[seed, variant] = state, result
        seeds = [s for s in config.seeds if (s, variant) in found]
        log(f"--models-from {other}: {variant}, {len(seeds)} of {len(config.seeds)} seeds read from there")
    return found


def _sources(reused: dict[Model, tuple[TrainState, dict]], other: Path | None) -> dict[str, dict]:
    """``results.json``'s ``models_from``: per variant, the folder and seeds read from it."""
    out: dict[str, dict] = {}
    for seed, variant in sorted(reused):
        out.setdefault(variant, {"folder": str(other), "seeds": []})["seeds"].append(seed)
    return out


def _prepare(config: AblationConfig, out: Path, figures: bool, world: World,
             log: Callable[[str], None]) -> tuple[OutputDir | None, AblationData]:
    """Check ``out`` and claim its figures (rank 0, before hours of training), then the data
    (tokenised by rank 0, read from its cache by the others). Returns the claimed figure
    folder (``None`` without ``figures`` and on other ranks) and the data."""
    figures_out = None
    if world.main:
        if figures:  # checked now, not after hours of training
            from anomaly.ablation.plots import claim_figures

            figures_out = claim_figures(out / "figures")
        out.mkdir(parents=True, exist_ok=True)
        check_config(out, config)
        if config.preset == "smoke":
            log(SMOKE_NOTE)
        log(f"preparing data ({config.preset} preset) …")
        data = build_data(config, out / "cache")
    world.barrier()  # the token cache is on disk
    if not world.main:
        data = build_data(config, out / "cache")
    log(f"  {config.train.steps * config.train.batch_size} training sequences of {config.data.train_length} "
        f"tokens per seed; <unk> rate {data.stats['unk_rate']['held_out']:.3f} on held-out text "
        "(tokens outside the trimmed vocabulary)")
    return figures_out, data


def _train_every_model(config: AblationConfig, data: AblationData, out: Path, variants: Sequence[str],
                       dev: torch.device, validate: Callable[[torch.nn.Module], dict], world: World,
                       deadline: float | None, log: Callable[[str], None]) -> dict[Model, TrainState] | None:
    """Under DDP every rank must take part in every training (rank 0 evaluates after all of
    them): each model's state, or ``None`` when the deadline stopped one. Leaves ``world``."""
    states: dict[Model, TrainState] = {}
    for seed in config.seeds:
        batches = None
        for variant in variants:
            vdir = seed_dir(out, variant, seed)
            if batches is None:
                batches, _ = data.training_sequences(seed)
            state = _train(config, variant, seed, vdir, batches, dev, validate, world, deadline, log)
            if state is None:
                leave(world)
                return None
            states[seed, variant] = state
    leave(world)
    return states


def _evaluate_every_model(config: AblationConfig, data: AblationData, out: Path, trained: dict[Model, TrainState],
                          dev: torch.device, deadline: float | None, probe: bool,
                          log: Callable[[str], None]) -> dict[Model, tuple[TrainState, dict]] | None:
    """Each trained model's state and evaluations, in training order; ``None`` on the deadline."""
    done: dict[Model, tuple[TrainState, dict]] = {}
    for (seed, variant), state in trained.items():
        result = evaluate_model(config, data, seed_dir(out, variant, seed), variant, seed, dev, deadline, probe, log,
                                state)
        if result is None:
            return None
        done[seed, variant] = state, result
    return done


def _work_through(config: AblationConfig, data: AblationData, out: Path, variants: Sequence[str],
                  dev: torch.device, validate: Callable[[torch.nn.Module], dict], deadline: float | None,
                  probe: bool, log: Callable[[str], None],
                  reused: dict[Model, tuple[TrainState, dict]]) -> tuple[dict[Model, tuple[TrainState, dict]],
                                                                         list[Model]] | None:
    """One model at a time, each under its own lock, so that several processes (--shared)
    can work through one run: the state and evaluations of every model this process did or
    found done, and the models another running process holds (left to it); ``None`` on the
    deadline. Models in ``reused`` are taken as they are."""
    done: dict[Model, tuple[TrainState, dict]] = dict(reused)
    held: list[Model] = []
    for seed in config.seeds:
        sequences = functools.cache(lambda seed=seed: data.training_sequences(seed)[0])  # made once, if needed
        for variant in variants:
            if (seed, variant) in reused:
                continue
            outcome = _model(config, data, out, variant, seed, sequences, dev, validate, deadline, probe, log)
            if outcome is False:
                return None  # time limit
            if outcome is None:
                held.append((seed, variant))
            else:
                done[seed, variant] = outcome
    return done, held


def _left_to_others(config: AblationConfig, data: AblationData, out: Path, held: list[Model], dev: torch.device,
                    deadline: float | None, probe: bool,
                    log: Callable[[str], None]) -> dict[Model, tuple[TrainState, dict]] | None:
    """The models other processes held, if their workers finished them in the meantime: each
    one's state and evaluations; ``None`` (said in the log) while one is unfinished, or on
    the deadline."""
    done: dict[Model, tuple[TrainState, dict]] = {}
    for seed, variant in held:
        vdir = seed_dir(out, variant, seed)
        state = finished_state(config, vdir, probe and registry.variant(variant).probed)
        if state is None:
            log(f"{len(held)} model(s) were being trained by other processes; the last process to finish "
                "writes results.json (or run the same command again once they are done)")
            return None
        result = evaluate_model(config, data, vdir, variant, seed, dev, deadline, probe, log, state)
        if result is None:
            return None
        done[seed, variant] = state, result
    return done


def _finish_once(out: Path, log: Callable[[str], None], finish: Callable[[], dict]) -> dict | None:
    """``finish()`` unless another process, done at the same moment, is already at it."""
    with locked(out / RESULTS_LOCK) as mine:
        if not mine:
            log("another process is writing results.json")
            return None
        return finish()


def _finish(config: AblationConfig, data: AblationData, out: Path, per_variant: dict[str, list[dict]],
            states: dict[str, list[TrainState]], dev: torch.device, started: float, figures_out: OutputDir | None,
            log: Callable[[str], None], sources: dict[str, dict]) -> dict:
    """Write ``results.json`` from every model's results, and the figures into ``figures_out``
    (an :class:`~anomaly.outputs.OutputDir` claimed beforehand) unless it is ``None``."""
    results = assemble(config, data, per_variant, states, dev, time.perf_counter() - started)
    if sources:
        results["models_from"] = sources
    write_json(out / "results.json", results)
    log(f"wrote {out / 'results.json'}")
    if config.preset == "smoke":
        log(SMOKE_NOTE)
    if figures_out is not None:
        from anomaly.ablation.plots import save_all

        prov = Provenance.from_argv(model=f"ablation/{config.preset}", seed=list(config.seeds),
                                    extra={"results": str(out / "results.json")})
        with figures_out.writing() as tmp:
            paths = save_all(json.loads((out / "results.json").read_text()), tmp, prov)
        log(f"wrote {len(paths) // 3} figures to {out / 'figures'}")
    return results


MODEL_LOCK = ".anomaly-model.lock"
"""A model folder's lock file: held by the process training or evaluating that model."""

RESULTS_LOCK = ".anomaly-results.lock"
"""Held while ``results.json`` and the figures are written, when several processes share a run."""


def _train(config: AblationConfig, variant: str, seed: int, vdir: Path, batches: list, dev: torch.device,
           validate: Callable[[torch.nn.Module], dict], world: World, deadline: float | None,
           log: Callable[[str], None]) -> TrainState | None:
    """Train (or resume) one model to the cap and write its training record; ``None`` when
    the deadline stopped it first."""
    tag = f"[{variant} seed {seed}]"
    model = build_model(config, variant, seed).to(dev)
    log(f"{tag} training at peak lr {config.lr_of(variant):g}")
    state = train(model, batches, config.for_variant(variant), vdir / CHECKPOINT, validate=validate,
                  world=world, deadline=deadline, log=lambda s: log(f"{tag} {s}"))
    if state.step < config.train.steps:
        log(f"{tag} stopped at step {state.step}/{config.train.steps} (time limit); "
            "run the same command again to resume")
        return None
    if world.main:
        write_json(vdir / TRAINING, state.__dict__, digits=None)  # read back exactly on resume
    return state


def _model(config: AblationConfig, data: AblationData, out: Path, variant: str, seed: int,
           sequences: Callable[[], list], dev: torch.device, validate: Callable[[torch.nn.Module], dict],
           deadline: float | None, probe: bool, log: Callable[[str], None]) -> tuple[TrainState, dict] | None | bool:
    """One model of a single-process run, trained and evaluated unless done: its state and
    evaluations; ``None`` when another running process holds it; ``False`` on the deadline."""
    vdir = seed_dir(out, variant, seed)
    probe = probe and registry.variant(variant).probed  # a variant the probe cannot read has no geometry.json
    state = finished_state(config, vdir, probe)
    if state is None:
        with locked(vdir / MODEL_LOCK) as mine:
            if not mine:
                owner = lock_owner(vdir / MODEL_LOCK)
                log(f"[{variant} seed {seed}] held by process {owner.pid if owner else '?'}; left to it")
                return None
            state = finished_state(config, vdir, probe)  # finished while we looked?
            if state is None:
                state = _train(config, variant, seed, vdir, sequences(), dev, validate, World(), deadline, log)
                if state is None:
                    return False
            result = evaluate_model(config, data, vdir, variant, seed, dev, deadline, probe, log, state)
    else:
        result = evaluate_model(config, data, vdir, variant, seed, dev, deadline, probe, log, state)
    return False if result is None else (state, result)
