"""One trained model's folder of an ablation run: what a finished model holds (its training
record and one JSON file per evaluation) and :func:`evaluate_model`, which writes the files
that are missing (each step skipped when its file exists, so a run resumes from them).

The run (:mod:`anomaly.ablation.run`) decides which models to train and where; this module
only reads and fills one model's folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from anomaly import variants as registry
from anomaly.ablation.config import AblationConfig
from anomaly.ablation.data import AblationData
from anomaly.ablation.evaluate import evaluate_scaling, set_scaling
from anomaly.ablation.geometry import anomalous_fractions, coefficient_sparsity, slack_spread
from anomaly.ablation.retrieval import retrieval_attention
from anomaly.ablation.train import CHECKPOINT, CRITERION, MATCHED, TrainState, build_model, load_checkpoint, matched_step
from anomaly.errors import UserError
from anomaly.io import write_json


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


TRAINING = "training.json"
"""A model's finished training record (its :class:`TrainState`) beside its evaluation files."""


def outputs(config: AblationConfig, state: TrainState, probe: bool) -> list[str]:
    """File names (in the model's folder) of every evaluation of a model trained to
    ``state``: one per scaling, the retrieval head, the probe, and the criterion and
    matched-stage models where they are not the final one."""
    names = [f"eval_{s}.json" for s in config.eval.scalings] + ["retrieval.json"] + (["geometry.json"] if probe else [])
    if state.criterion_step is not None and state.criterion_step != state.step:
        names.append("criterion_eval.json")
    matched = matched_step(config, state.criterion_step)
    if matched is not None and matched != state.step:
        names.append("matched_eval.json")
    return names


def finished_state(config: AblationConfig, vdir: Path, probe: bool) -> TrainState | None:
    """The training record of a model that is done — trained to the cap and every evaluation
    file written — else ``None``. A done model needs no checkpoint: its files are the result."""
    record = _load_json(vdir / TRAINING)
    if record is None:
        return None
    state = TrainState(**record)
    if state.step < config.train.steps or not all((vdir / name).exists() for name in outputs(config, state, probe)):
        return None
    return state


def _step(path: Path, deadline: float | None, log: Callable[[str], None], what: str, compute: Callable[[], dict]) -> dict | None:
    """The JSON at ``path``, computing and writing it first when missing; ``None`` when the
    deadline has passed before it could start."""
    done = _load_json(path)
    if done is not None:
        return done
    if deadline is not None and time.monotonic() > deadline:
        log(f"time limit reached before {what}; run the same command again to resume")
        return None
    write_json(path, compute())
    # What was written (rounded to anomaly.io.FLOAT_DIGITS), not the full-precision dict: a
    # resumed run reads the file, and must assemble the very same results.json.
    return _load_json(path)


def evaluate_model(
    config: AblationConfig,
    data: AblationData,
    vdir: Path,
    variant: str,
    seed: int,
    device: torch.device,
    deadline: float | None,
    probe: bool,
    log: Callable[[str], None],
    state: TrainState,
) -> dict | None:
    """Evaluate, trace the retrieval head of, and probe one model trained to ``state`` (each
    step skipped when already done; a model's weights are loaded only for a step to do)."""
    tag = f"[{variant} seed {seed}]"
    one = _Evaluation(config, data, vdir, variant, seed, device, deadline, lambda s: log(f"{tag} {s}"))
    evals = one.scalings()
    if evals is None:
        return None
    retrieval = one.retrieval()
    if retrieval is None:
        return None
    geometry = None
    if probe and registry.variant(variant).probed:
        geometry = one.geometry()
        if geometry is None:
            return None
    # The "to criterion" reading: the weights when validation first reached the criterion;
    # the matched-stage reading: train.matched_steps steps later.
    criterion = one.snapshot(state, evals, state.criterion_step, CRITERION, "criterion_eval.json", "criterion")
    matched = one.snapshot(state, evals, matched_step(config, state.criterion_step), MATCHED, "matched_eval.json",
                           "matched-stage")
    if criterion is False or matched is False:
        return None
    return {"state": state, "eval": evals, "geometry": geometry, "retrieval": retrieval, "criterion": criterion,
            "matched": matched}


@dataclass
class _Evaluation:
    """The evaluation steps of one trained model (:func:`evaluate_model`), each read from its
    file in ``vdir`` when done; ``None`` from a step means the deadline stopped it."""

    config: AblationConfig
    data: AblationData
    vdir: Path
    variant: str
    seed: int
    device: torch.device
    deadline: float | None
    say: Callable[[str], None]
    loaded: dict[str, torch.nn.Module] = field(default_factory=dict)

    def weights(self, name: str) -> torch.nn.Module:
        """The model with the weights of ``vdir / name`` (loaded once, on first use)."""
        if name not in self.loaded:
            if not (self.vdir / name / "model.safetensors").exists():
                raise UserError(f"{self.vdir / name} is missing, and {self.vdir} still needs it for an evaluation; "
                                f"delete {self.vdir} to train this model again")
            model = build_model(self.config, self.variant, self.seed).to(self.device)
            load_checkpoint(self.vdir / name, model)
            self.loaded[name] = model.eval()
        return self.loaded[name]

    def step(self, file: str, what: str, compute: Callable[[], dict]) -> dict | None:
        return _step(self.vdir / file, self.deadline, self.say, what, compute)

    def scalings(self) -> dict[str, dict] | None:
        """The final model's evaluation under each of ``config.eval.scalings``."""
        config, data = self.config, self.data
        evals: dict[str, dict] = {}
        for scaling in config.eval.scalings:
            def compute(scaling=scaling) -> dict:
                self.say(f"evaluating, scaling {scaling}")
                return asdict(evaluate_scaling(self.weights(CHECKPOINT), config, scaling, data.held_out, data.passkey,
                                               log=self.say))
            evals[scaling] = self.step(f"eval_{scaling}.json", f"evaluating {scaling}", compute)
            if evals[scaling] is None:
                return None
        return evals

    def retrieval(self) -> dict | None:
        """The final model's retrieval head and its attention on the matching digit."""
        def trace() -> dict:
            model = self.weights(CHECKPOINT)
            return retrieval_attention(model, self.config, self.data.passkey, self.config.eval.retrieval_samples,
                                       lambda: set_scaling(model, self.config, "none"))

        retrieval = self.step("retrieval.json", "the retrieval head", trace)
        if retrieval is not None:
            self.say(f"retrieval head L{retrieval['head'][0]}H{retrieval['head'][1]}: attention on the matching "
                     "digit " + ", ".join(f"{m:.2f}" for m in retrieval["matching"]) + " by length")
        return retrieval

    def geometry(self) -> dict | None:
        """The final model's anomalous fractions (and the variant's extra readings)."""
        config, data, spec = self.config, self.data, registry.variant(self.variant)

        def measure() -> dict:
            model = self.weights(CHECKPOINT)
            tokens = config.eval.probe_tokens or config.data.train_length
            name = sorted(data.held_out)[0]
            ids = data.held_out[name][:tokens][None].to(self.device)  # [1, tokens]
            start = time.perf_counter()
            geo = anomalous_fractions(model, ids, self.variant)
            if spec.slack_geometry:
                geo["slack_spread"] = slack_spread(model, ids, config.data.train_length, max(config.eval_lengths))
            if spec.coefficient_sparsity:
                geo["coefficients"] = coefficient_sparsity(model, ids)
            geo.update(text=name, seconds=time.perf_counter() - start)
            self.say(f"anomalous fraction {geo['mean']:.3f} (weighted {geo['weighted_mean']:.3f})")
            return geo

        return self.step("geometry.json", "probing", measure)

    def snapshot(self, state: TrainState, evals: dict[str, dict], step: int | None, folder: str, file: str,
                 what: str) -> dict | None | bool:
        """The no-scaling evaluation of the weights kept at ``step`` (the final model's,
        ``evals["none"]``, when that is the last step, ``state.step``); ``None`` when there
        are none, ``False`` on the deadline."""
        if step is None:
            return None
        if step == state.step:
            return evals["none"]

        def compute() -> dict:
            self.say(f"evaluating the {what} model (step {step}), no scaling")
            return asdict(evaluate_scaling(self.weights(folder), self.config, "none", self.data.held_out,
                                           self.data.passkey, log=self.say))

        done = self.step(file, f"evaluating the {what} model", compute)
        return False if done is None else done
