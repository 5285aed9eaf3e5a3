"""Orchestration of one ablation run: data, then per variant train → evaluate → probe.

Everything lands under the output directory and every step is resumable::

    DIR/config.json                 the run's full configuration (a resumed run must match)
    DIR/cache/tokens.safetensors    tokenised documents (SmolLM2 ids)
    DIR/<variant>/checkpoint/       model.safetensors, optimizer.safetensors, state.json
    DIR/<variant>/eval_<scaling>.json
    DIR/<variant>/geometry.json     anomalous fractions of the trained model
    DIR/results.json                written atomically once everything is done
    DIR/figures/ablation_*          its figures (anomaly.ablation.plots), written last

A step whose output exists is skipped, so a run stopped by ``deadline`` (``--max-minutes``)
or killed continues where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from anomaly.ablation.config import VARIANTS, AblationConfig, config_from_dict
from anomaly.ablation.data import AblationData, build_data
from anomaly.ablation.evaluate import ScalingResult, evaluate_scaling
from anomaly.ablation.geometry import anomalous_fractions, slack_spread
from anomaly.ablation.train import CHECKPOINT, TrainState, build_model, load_checkpoint, train
from anomaly.errors import UserError
from anomaly.io import Provenance, write_json
from anomaly.models import resolve_device


def check_config(out: Path, config: AblationConfig) -> None:
    """Record ``config`` in ``out``, or check that a run already there used the same one."""
    path = out / "config.json"
    if path.exists():
        previous = config_from_dict(json.loads(path.read_text()))
        if previous != config:
            raise UserError(
                f"{out} holds a run of a different configuration (preset {previous.preset!r}); "
                "use another --out directory or delete this one"
            )
    else:
        write_json(path, config.to_dict(), digits=None)  # compared exactly on resume


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run(
    config: AblationConfig,
    out: Path,
    *,
    variants: Sequence[str] = VARIANTS,
    device: str = "auto",
    deadline: float | None = None,
    probe: bool = True,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Run (or resume) the ablation in ``out``.

    With ``figures``, the figures of :mod:`anomaly.ablation.plots` are written to
    ``out/figures/ablation_*.{pdf,png,json}`` once ``results.json`` is.

    Returns:
        The results dict (also written to ``out/results.json``), or ``None`` when
        ``deadline`` (a ``time.monotonic()`` value) stopped it first.
    """
    started = time.perf_counter()
    dev = resolve_device(device)  # before anything is written
    if figures:  # checked now, not after hours of training
        from anomaly.ablation.plots import claim_figures, save_all

        figures_out = claim_figures(out / "figures")
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    log(f"preparing data ({config.preset} preset) …")
    data = build_data(config, out / "cache")
    log(f"  {data.train.shape[0]} training sequences of {config.data.train_length} tokens; "
        f"<unk> rate {data.stats['unk_rate']['held_out']:.3f} on held-out text")

    per_variant: dict[str, dict] = {}
    for variant in variants:
        result = run_variant(config, data, out / variant, variant, dev, deadline, probe, log)
        if result is None:
            return None
        per_variant[variant] = result
    results = assemble(config, data, per_variant, dev, time.perf_counter() - started)
    write_json(out / "results.json", results)
    log(f"wrote {out / 'results.json'}")
    if figures:
        prov = Provenance.from_argv(model=f"ablation/{config.preset}", seed=config.model_seed,
                                    extra={"results": str(out / "results.json")})
        with figures_out.writing() as tmp:
            paths = save_all(json.loads((out / "results.json").read_text()), tmp, prov)
        log(f"wrote {len(paths) // 3} figures to {out / 'figures'}")
    return results


def run_variant(
    config: AblationConfig,
    data: AblationData,
    vdir: Path,
    variant: str,
    device: torch.device,
    deadline: float | None,
    probe: bool,
    log: Callable[[str], None],
) -> dict | None:
    """Train, evaluate and probe one variant (each step skipped when already done)."""
    model = build_model(config, variant).to(device)
    ckpt = vdir / CHECKPOINT
    log(f"[{variant}] training")
    state: TrainState = train(model, data.train, config, ckpt, deadline=deadline, log=lambda s: log(f"[{variant}] {s}"))
    if state.step < config.train.steps:
        log(f"[{variant}] stopped at step {state.step}/{config.train.steps} (time limit); "
            "run the same command again to resume")
        return None
    load_checkpoint(ckpt, model)  # the final weights, also when training was already done
    model.eval()

    evals: dict[str, dict] = {}
    for scaling in config.eval.scalings:
        path = vdir / f"eval_{scaling}.json"
        done = _load_json(path)
        if done is None:
            if deadline is not None and time.monotonic() > deadline:
                log(f"[{variant}] time limit reached before evaluating {scaling}; run again to resume")
                return None
            log(f"[{variant}] evaluating, scaling {scaling}")
            res = evaluate_scaling(model, config, scaling, data.held_out, data.passkey,
                                   log=lambda s: log(f"[{variant}] {s}"))
            done = asdict(res)
            write_json(path, done)
        evals[scaling] = done

    geometry = _load_json(vdir / "geometry.json")
    if probe and geometry is None:
        tokens = config.eval.probe_tokens or config.data.train_length
        name = sorted(data.held_out)[0]
        ids = data.held_out[name][:tokens][None].to(device)  # [1, tokens]
        start = time.perf_counter()
        geometry = anomalous_fractions(model, ids, variant)
        geometry.update(text=name, seconds=time.perf_counter() - start)
        write_json(vdir / "geometry.json", geometry)
        log(f"[{variant}] anomalous fraction {geometry['mean']:.3f} (weighted {geometry['weighted_mean']:.3f})")
    if probe and variant == "coca_slack" and geometry is not None and "slack_spread" not in geometry:
        ids = data.held_out[geometry["text"]][: geometry["tokens"]][None].to(device)  # [1, tokens]
        geometry["slack_spread"] = slack_spread(model, ids, config.data.train_length, max(config.eval_lengths))
        write_json(vdir / "geometry.json", geometry)
        spread = geometry["slack_spread"]["overall_median_spread"]
        log(f"[{variant}] slack score spread over absolute positions / |relative part|: "
            + ", ".join(f"s={s}: {v:.2f}" for s, v in spread.items()))
    return {"state": state, "eval": evals, "geometry": geometry}


def assemble(config: AblationConfig, data: AblationData, per_variant: dict[str, dict], device: torch.device, seconds: float) -> dict:
    """The ``results.json`` dict (keys fixed by the issue: ``train_length``, ``eval_lengths``,
    ``ppl[variant][scaling]``, ``passkey[variant][scaling]``)."""
    scalings = list(config.eval.scalings)

    def table(key: str) -> dict:
        return {v: {s: r["eval"][s][key] for s in scalings} for v, r in per_variant.items()}

    states: dict[str, TrainState] = {v: r["state"] for v, r in per_variant.items()}
    return {
        "train_length": config.data.train_length,
        "eval_lengths": config.eval_lengths,
        "variants": list(per_variant),
        "scalings": scalings,
        "ppl": table("ppl"),
        "nll": table("nll"),
        "passkey": table("passkey"),
        "passkey_samples": config.eval.passkey_samples,
        "ppl_scored_tokens": config.eval.ppl_segments * (config.stride - 1),
        "stride": config.stride,
        "anomalous_fraction": {v: r["geometry"] for v, r in per_variant.items() if r["geometry"] is not None},
        "training": {
            v: {"curve": st.curve, "final_loss": st.curve["loss"][-1] if st.curve["loss"] else None,
                "steps": st.step, "tokens_per_s": st.tokens_per_s, "train_seconds": st.train_seconds}
            for v, st in states.items()
        },
        "tokens_per_s": {v: st.tokens_per_s for v, st in states.items()},
        "wall_s": {
            "train": {v: st.train_seconds for v, st in states.items()},
            "eval": {v: sum(r["eval"][s]["seconds"] for s in scalings) for v, r in per_variant.items()},
            "probe": {v: (r["geometry"] or {}).get("seconds") for v, r in per_variant.items()},
            "this_command": seconds,
        },
        "seeds": {"model": config.model_seed, "data": config.data_seed, "eval": config.eval_seed},
        "config": config.to_dict(),
        "data": data.stats,
        "vocab_hf_ids": list(data.vocab.hf_ids),
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()},
        "provenance": Provenance.from_argv(model=f"ablation/{config.preset}", seed=config.model_seed),
    }
