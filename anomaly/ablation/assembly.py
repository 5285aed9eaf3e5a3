"""The ``results.json`` dict of a finished ablation run, assembled from every model's
training record and evaluations (:func:`assemble`; :mod:`anomaly.ablation.run` writes it,
:mod:`anomaly.ablation.results` reads it). Only per-seed values and means over seeds are
stored: intervals and tests are :mod:`anomaly.ablation.analysis`'s, with the seed as the unit.
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from anomaly.ablation.config import AblationConfig
from anomaly.ablation.data import AblationData
from anomaly.ablation.train import TrainState, matched_step
from anomaly.io import Provenance
from anomaly.replication import ppl_of

SMOKE_NOTE = ("smoke preset: a plumbing check of every step on a model too small and too briefly "
              "trained to mean anything; its numbers are not results")
"""Printed at the start and the end of a smoke run and recorded in its results."""


def _pooled(per_seed: list[dict], key: str) -> np.ndarray:
    """``[seed, length, …]`` array of one per-prompt or per-segment field."""
    return np.asarray([r[key] for r in per_seed], dtype=float)


def _summaries(evals: list[dict]) -> dict:
    """Per-seed values and means over seeds of one variant under one scaling (``evals``:
    that scaling's :class:`ScalingResult` dicts, one per seed). Intervals and tests are not
    stored: :mod:`anomaly.ablation.analysis` computes them from the per-seed values, with
    the seed as the unit."""
    exact = _pooled(evals, "passkey_exact")  # [seed, length, depth, prompt]
    digits = _pooled(evals, "passkey_digit_nll")  # [seed, length, depth, prompt]
    out = {
        "passkey": exact.mean(axis=(0, 2, 3)).tolist(),
        "passkey_per_seed": exact.mean(axis=(2, 3)).tolist(),
        "passkey_grid": exact.mean(axis=(0, 3)).tolist(),
        "passkey_grid_per_seed": exact.mean(axis=3).tolist(),  # [seed, length, depth]
        "digit_nll": digits.mean(axis=(0, 2, 3)).tolist(),
        "digit_nll_per_seed": digits.mean(axis=(2, 3)).tolist(),
    }
    if evals[0]["segment_nll"]:
        seg = _pooled(evals, "segment_nll")  # [seed, length, segment]
        out.update(
            # exp of the mean NLL over every seed's segments: the geometric mean over seeds
            # of their perplexities, as every seed scores the same segments
            ppl=[ppl_of(float(s.mean())) for s in seg.swapaxes(0, 1)],
            ppl_per_seed=np.vectorize(lambda s: ppl_of(float(s.mean())), signature="(n)->()")(seg).tolist(),
            nll=seg.mean(axis=(0, 2)).tolist(),
            segment_nll_per_seed=seg.tolist(),
        )
    return out


def assemble(config: AblationConfig, data: AblationData, per_variant: dict[str, list[dict]],
             states: dict[str, list[TrainState]], device: torch.device, seconds: float) -> dict:
    """The ``results.json`` dict (keys fixed by the issues: ``train_length``, ``eval_lengths``,
    ``seeds``, ``ppl``/``passkey`` ``[variant][scaling]`` (means over seeds) and their
    ``*_per_seed``; see docs/ablation.md for every key). ``per_variant``: each variant's
    evaluations per seed (:func:`anomaly.ablation.run.evaluate_model`); ``states``: their
    training records."""
    scalings = list(config.eval.scalings)
    criterion, matched = _snapshots(config, per_variant)
    return {
        "train_length": config.data.train_length,
        "eval_lengths": config.eval_lengths,
        "variants": list(per_variant),
        "scalings": scalings,
        "seeds": list(config.seeds),
        "depths": list(config.eval.depths),
        **_tables(per_variant, scalings),
        "passkey_samples": config.eval.passkey_samples,
        "passkey_prompts_per_length": config.eval.passkey_samples * len(config.eval.depths) * len(config.seeds),
        "ppl_scored_tokens": config.eval.ppl_segments * (config.stride - 1) * len(config.seeds),
        "stride": config.stride,
        "criterion": {"threshold": config.train.criterion, "scaling": "none", "per_variant": criterion},
        **({"matched_stage": {"extra_steps": config.train.matched_steps, "threshold": config.train.criterion,
                              "scaling": "none", "per_variant": matched}}
           if config.train.matched_steps is not None else {}),
        "lr": {v: config.lr_of(v) for v in per_variant},
        "lr_reading": ("per variant (train.lr_by_variant, chosen by the learning-rate sweep)" if config.train.lr_by_variant
                       else "the same peak learning rate for every variant (train.lr)"),
        "retrieval": {v: [r["retrieval"] for r in runs] for v, runs in per_variant.items()},
        "anomalous_fraction": {v: [r["geometry"] for r in runs] for v, runs in per_variant.items()
                               if all(r["geometry"] is not None for r in runs)},
        "training": _training(config, states),
        "wall_s": {
            "train": {v: sum(st.train_seconds for st in sts) for v, sts in states.items()},
            "eval": {v: sum(r["eval"][s]["seconds"] for r in runs for s in scalings) for v, runs in per_variant.items()},
            "this_command": seconds,
        },
        "note": SMOKE_NOTE if config.preset == "smoke" else None,
        "config": config.to_dict(),
        "data": data.stats,
        "vocab_hf_ids": list(data.vocab.hf_ids),
        "device": _device(device),
        "provenance": Provenance.from_argv(model=f"ablation/{config.preset}", seed=list(config.seeds)),
    }


def _tables(per_variant: dict[str, list[dict]], scalings: list[str]) -> dict[str, dict]:
    """Each reading of :func:`_summaries` as ``{key: {variant: {scaling: value}}}``."""
    tables: dict[str, dict] = {}
    for v, runs in per_variant.items():
        for s in scalings:
            for key, value in _summaries([r["eval"][s] for r in runs]).items():
                tables.setdefault(key, {}).setdefault(v, {})[s] = value
    return tables


def _snapshots(config: AblationConfig, per_variant: dict[str, list[dict]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per variant, the "to criterion" and the matched-stage readings (:func:`_reached`)."""
    criterion = {v: _reached(runs, "criterion", [r["state"].criterion_step for r in runs])
                 for v, runs in per_variant.items()}
    matched = {v: _reached(runs, "matched", [matched_step(config, r["state"].criterion_step) for r in runs])
               for v, runs in per_variant.items()}
    return criterion, matched


def _reached(runs: list[dict], snapshot: str, steps: list[int | None]) -> dict:
    """One variant's snapshot readings (``snapshot``: ``"criterion"`` or ``"matched"``):
    each seed's step, how many seeds reached it, and the summaries over those seeds."""
    reached = [r[snapshot] for r in runs if r[snapshot] is not None]
    return {"steps": steps, "seeds_reached": len(reached), **(_summaries(reached) if reached else {})}


def _training(config: AblationConfig, states: dict[str, list[TrainState]]) -> dict[str, list[dict]]:
    """Per variant and seed, the training curve, validation and timings."""
    return {
        v: [{"curve": st.curve, "val": st.val, "criterion_step": st.criterion_step, "steps": st.step,
             "lr": config.lr_of(v), "matched_step": matched_step(config, st.criterion_step),
             "final_loss": st.curve["loss"][-1] if st.curve["loss"] else None,
             "tokens_per_s": st.tokens_per_s, "train_seconds": st.train_seconds} for st in sts]
        for v, sts in states.items()
    }


def _device(device: torch.device) -> dict:
    """What the run was evaluated on: the device type, its name and the CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}
